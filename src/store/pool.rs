//! Connection pools for [`RedisStore`](super::RedisStore): bb8 over redis-rs
//! multiplexed connections.
//!
//! The pool we build ourselves does not PING on checkout (a hit must cost one round
//! trip). Instead, a connection found dead (an I/O error, a dropped connection, no
//! answer within the command timeout) is retired, together with every pooled
//! connection opened before it: what kills one idle connection (a server restart,
//! Redis's idle `timeout`, `CLIENT KILL`, a proxy or load balancer dropping idle
//! flows) usually kills its idle siblings too, and bb8 hands connections out in
//! turn, so a retry would otherwise take the next dead one. bb8 opens fresh ones
//! in their place. A pool the user built with bb8-redis is used as it is.
//!
//! Commands do not check a connection out of bb8 each time: the last one
//! checked out is kept in a *current* slot and every command sends on a clone
//! of it (one multiplexed connection carrying every concurrent command, as
//! redis-rs's `ConnectionManager` does), until it is retired by the rules above;
//! then the next command checks out a fresh one through bb8. A bb8 checkout per
//! command cost about 20% of the throughput of hits at 16 to 64 concurrent
//! callers (`cargo bench --bench hit_path -- --sides get_or_load,manager,single`).
//!
//! A clone costs atomic increments (and its drop decrements) on counters every
//! thread shares, as does the current slot's lock. So a command that succeeded
//! gives its clone back ([`Connection::give_back`]) to a small stack of spares,
//! one per stripe of threads (`stripes.rs`), and the next command of that
//! thread takes it from there: on a hit, no cache line every thread writes.
//! A spare is checked as the current connection is (its flag, its generation)
//! and belongs to the slot's epoch: every change of the slot starts a new one
//! and empties the stripes (see [`Current`]). Spares live no longer than the
//! pool.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bb8_redis::RedisConnectionManager;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, RedisError};
use tokio::sync::watch;

use super::auth::CredentialSource;
use super::endpoint::Endpoint;
use crate::stripes::{self, STRIPES};

/// A multiplexed connection that remembers it failed, and the generation it was
/// opened in. The flag is shared with the clones handed out by [`Pool::get`], so
/// a failure seen on a clone retires the pooled connection.
pub struct Conn {
    inner: MultiplexedConnection,
    broken: Arc<AtomicBool>,
    generation: u64,
}

/// Connections opened before `retired_below` are retired: set past a dead
/// connection's generation when one is found dead, so its siblings go too.
#[derive(Debug, Default)]
pub struct Generations {
    current: AtomicU64,
    /// The pool's endpoint moves (Sentinel): a `READONLY` reply means its
    /// connections are to a demoted master (see `endpoint.rs`).
    moving: bool,
}

impl Generations {
    fn current(&self) -> u64 {
        self.current.load(Ordering::Acquire)
    }

    /// Retires every connection of `generation` or older.
    fn retire_up_to(&self, generation: u64) {
        self.current.fetch_max(generation + 1, Ordering::AcqRel);
    }
}

/// bb8 manager for [`Conn`], with connect and response timeouts.
#[derive(Debug, Clone)]
pub struct Manager {
    endpoint: Endpoint,
    connect_timeout: Duration,
    command_timeout: Duration,
    generations: Arc<Generations>,
    policy_checked: Arc<AtomicBool>,
    server: String,
    /// Rotating credentials (feature `credentials`; see `auth.rs`).
    credentials: Option<CredentialSource>,
}

impl bb8::ManageConnection for Manager {
    type Connection = Conn;
    type Error = RedisError;

    async fn connect(&self) -> Result<Conn, RedisError> {
        let generation = self.generations.current();
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.command_timeout));
        // redis-rs authenticates the connection with the source's latest
        // credentials and re-authenticates it when they change.
        let config = match &self.credentials {
            None => config,
            #[cfg(feature = "credentials")]
            Some(source) => config.set_credentials_provider(source.clone()),
            #[cfg(not(feature = "credentials"))]
            Some(source) => match *source {},
        };
        let client = self.endpoint.client(self.connect_timeout).await?;
        let inner = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        // The first script alone, so that a refusal (NOAUTH: a password is
        // required) comes back as itself, not as a pipeline of four failures.
        let mut conn = inner.clone();
        let (first, rest) = super::scripts::ALL.split_at(1);
        redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(first)
            .query_async::<()>(&mut conn)
            .await?;
        let mut load = redis::pipe();
        for source in rest {
            load.cmd("SCRIPT").arg("LOAD").arg(source).ignore();
        }
        load.query_async::<()>(&mut conn).await?;
        if !self.policy_checked.swap(true, Ordering::AcqRel) {
            super::eviction::check_policy(&mut conn, &self.server).await;
        }
        Ok(Conn {
            inner,
            broken: Arc::new(AtomicBool::new(false)),
            generation,
        })
    }

    async fn is_valid(&self, conn: &mut Conn) -> Result<(), RedisError> {
        redis::cmd("PING").query_async::<()>(&mut conn.inner).await
    }

    fn has_broken(&self, conn: &mut Conn) -> bool {
        conn.is_retired(&self.generations)
    }
}

/// Either our own pool or one the user handed in.
#[derive(Clone)]
pub enum Pool {
    Own(
        bb8::Pool<Manager>,
        ConnectErrors,
        Arc<Generations>,
        Arc<Current>,
    ),
    User(bb8::Pool<RedisConnectionManager>),
}

/// The connection commands are sent on until it is retired: a clone of the
/// last pooled connection checked out, with its pooled original's flag and
/// generation (so retiring either retires both); and clones of it that
/// commands gave back, by stripe of threads.
///
/// Every change of the slot (a connection put in, a retired one taken out)
/// starts a new epoch and empties every stripe: a spare is only ever a clone
/// of the slot's connection of the current epoch, so no spare keeps a
/// retired connection, or one the slot no longer holds, open past the next
/// command that finds it retired (clones lent to commands in flight live
/// until their command ends).
#[derive(Default)]
pub struct Current {
    slot: std::sync::Mutex<Option<Spare>>,
    /// Read by every hit; on a cache line of its own, away from the slot's
    /// lock, which the slow path writes.
    epoch: Epoch,
    spares: [Spares; STRIPES],
}

/// [`Current`]'s epoch, alone on its cache line.
#[derive(Default)]
#[repr(align(128))]
struct Epoch(AtomicU64);

/// A clone of the current connection, with its flag, generation and epoch.
#[derive(Clone)]
struct Spare {
    lent: Box<Lent>,
    broken: Arc<AtomicBool>,
    generation: u64,
    epoch: u64,
}

/// The spares of one stripe of threads, alone on its cache line.
#[derive(Default)]
#[repr(align(128))]
struct Spares(std::sync::Mutex<Vec<Spare>>);

/// Spares kept per stripe at most: a thread's next command takes the one
/// its last gave back, so a few suffice; the rest are dropped.
const SPARES: usize = 16;

impl Current {
    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Spare>> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts `conn` (or nothing) in the slot, under its lock: a new epoch,
    /// and every stripe emptied. Returns the new epoch.
    fn renew(
        &self,
        slot: &mut std::sync::MutexGuard<'_, Option<Spare>>,
        conn: Option<(MultiplexedConnection, Arc<AtomicBool>, u64)>,
    ) -> u64 {
        let epoch = self.epoch.0.fetch_add(1, Ordering::SeqCst).wrapping_add(1);
        let old = std::mem::replace(
            &mut **slot,
            conn.map(|(conn, broken, generation)| Spare {
                lent: Lent::new(conn),
                broken,
                generation,
                epoch,
            }),
        );
        drop(old);
        // After the new epoch: a spare given back from now on is refused
        // (`give_back` reads the epoch under its stripe's lock).
        for spares in &self.spares {
            let stale = std::mem::take(&mut *spares.lock());
            drop(stale);
        }
        epoch
    }

    /// This thread's stripe of spares.
    fn spares(&self) -> std::sync::MutexGuard<'_, Vec<Spare>> {
        self.spares[stripes::this_thread()].lock()
    }
}

impl Spares {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Spare>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Spare {
    /// Not retired, and a clone of the slot's connection of `epoch`.
    fn usable(&self, generations: &Generations, epoch: u64) -> bool {
        !self.broken.load(Ordering::Relaxed)
            && self.generation >= generations.current()
            && self.epoch == epoch
    }
}

/// bb8 hands failed connection attempts to an error sink and lets `get` wait out
/// the whole connection timeout. This sink publishes them, so that a `get` in
/// progress fails at once with the real error (connection refused) instead.
#[derive(Debug, Clone)]
pub struct ConnectErrors(Arc<watch::Sender<Option<RedisError>>>);

impl bb8::ErrorSink<RedisError> for ConnectErrors {
    fn sink(&self, error: RedisError) {
        self.0.send_replace(Some(error));
    }

    fn boxed_clone(&self) -> Box<dyn bb8::ErrorSink<RedisError>> {
        Box::new(self.clone())
    }
}

/// A connection to run commands on: a clone of a pooled multiplexed connection
/// (so callers pipeline on it instead of queueing for a checkout), and the flag
/// that retires the pooled original when a command fails on the connection.
pub struct Connection<'p> {
    /// Boxed: a hit moves its connection out of the stripe, into its future
    /// and back, 8 bytes each time rather than 170 (about 200 instructions a
    /// hit). A spare's box goes back with it, so this allocates only when a
    /// connection is first lent.
    pub lent: Box<Lent>,
    health: Health<'p>,
    /// Where the clone goes back after a command that succeeded (our pool's),
    /// and the epoch it was lent in.
    lender: Option<(&'p Current, u64)>,
}

/// A multiplexed connection and a buffer to build commands in.
#[derive(Clone)]
pub struct Lent {
    pub conn: MultiplexedConnection,
    /// `Cmd::clear` keeps its allocations: a spare's buffer comes back with
    /// it, so a hit builds its `GET` without allocating. Empty in the slot (a
    /// clone of it allocates nothing).
    pub command: redis::Cmd,
}

impl Lent {
    fn new(conn: MultiplexedConnection) -> Box<Lent> {
        Box::new(Lent {
            conn,
            command: redis::Cmd::new(),
        })
    }
}

/// What is left of a [`Connection`] once its multiplexed connection was taken
/// for a command: the means to retire the pooled original and its siblings.
pub struct Health<'p> {
    own: Option<(Arc<AtomicBool>, u64, &'p Generations)>,
}

impl Conn {
    fn is_retired(&self, generations: &Generations) -> bool {
        self.broken.load(Ordering::Relaxed) || self.generation < generations.current()
    }
}

impl Pool {
    pub fn own(
        endpoint: Endpoint,
        server: String,
        size: u32,
        connect_timeout: Duration,
        command_timeout: Duration,
        credentials: Option<CredentialSource>,
    ) -> Pool {
        let generations = Arc::new(Generations {
            current: AtomicU64::new(0),
            moving: endpoint.follows_failover(),
        });
        // A failover the Sentinels announce retires every connection: a
        // demoted master may go on taking writes for seconds.
        if let (Some(mut switches), Ok(runtime)) =
            (endpoint.switches(), tokio::runtime::Handle::try_current())
        {
            let generations = Arc::downgrade(&generations);
            runtime.spawn(async move {
                while switches.changed().await.is_ok() {
                    let Some(generations) = generations.upgrade() else {
                        return;
                    };
                    generations.retire_up_to(generations.current());
                }
            });
        }
        let errors = ConnectErrors(Arc::new(watch::channel(None).0));
        let pool = bb8::Pool::builder()
            .max_size(size)
            .error_sink(Box::new(errors.clone()))
            .connection_timeout(connect_timeout)
            .test_on_check_out(false)
            .retry_connection(false)
            .build_unchecked(Manager {
                endpoint,
                connect_timeout,
                command_timeout,
                generations: Arc::clone(&generations),
                policy_checked: Arc::default(),
                server,
                credentials,
            });
        Pool::Own(pool, errors, generations, Arc::default())
    }

    /// The current connection, without waiting: a spare this thread's stripe
    /// was given back, else a clone of the current one; `None` when there is
    /// none (or it was retired), or the pool is a user's. Commands try this
    /// first, so that a hit's future does not hold the (large) future of a
    /// checkout.
    pub fn current(&self) -> Option<Connection<'_>> {
        let Pool::Own(_, _, generations, current) = self else {
            return None;
        };
        let lend = |spare: Spare| Connection {
            lent: spare.lent,
            health: Health {
                own: Some((spare.broken, spare.generation, generations)),
            },
            lender: Some((current, spare.epoch)),
        };
        let spare = current.spares().pop();
        if let Some(spare) = spare {
            if spare.usable(generations, current.epoch.0.load(Ordering::SeqCst)) {
                return Some(lend(spare));
            }
            // Retired (then so is the slot's, checked below) or of an epoch
            // that has just ended (its stripes are being emptied).
            drop(spare);
        }
        let mut slot = current.slot();
        match &*slot {
            Some(spare) if spare.usable(generations, current.epoch.0.load(Ordering::SeqCst)) => {
                Some(lend(spare.clone()))
            }
            Some(_) => {
                current.renew(&mut slot, None);
                None
            }
            None => None,
        }
    }

    /// A connection; `Err(None)` when none came within the pool's timeout.
    pub async fn get(&self) -> Result<Connection<'_>, Option<RedisError>> {
        match self {
            Pool::Own(p, errors, generations, current) => loop {
                if let Some(connection) = self.current() {
                    return Ok(connection);
                }
                let mut failed = errors.0.subscribe();
                failed.mark_unchanged();
                let checkout = tokio::select! {
                    checkout = p.get() => checkout.map_err(run_error)?,
                    Ok(()) = failed.changed() => return Err(failed.borrow().clone()),
                };
                if checkout.is_retired(generations) {
                    // Returning it makes bb8 call has_broken and drop it.
                    drop(checkout);
                    continue;
                }
                let epoch = current.renew(
                    &mut current.slot(),
                    Some((
                        checkout.inner.clone(),
                        Arc::clone(&checkout.broken),
                        checkout.generation,
                    )),
                );
                return Ok(Connection {
                    lent: Lent::new(checkout.inner.clone()),
                    health: Health {
                        own: Some((
                            Arc::clone(&checkout.broken),
                            checkout.generation,
                            &**generations,
                        )),
                    },
                    lender: Some((current, epoch)),
                });
            },
            Pool::User(p) => {
                let checkout = p.get().await.map_err(run_error)?;
                Ok(Connection {
                    lent: Lent::new((*checkout).clone()),
                    health: Health { own: None },
                    lender: None,
                })
            }
        }
    }
}

fn run_error(e: bb8::RunError<RedisError>) -> Option<RedisError> {
    match e {
        bb8::RunError::User(e) => Some(e),
        bb8::RunError::TimedOut => None,
    }
}

impl<'p> Connection<'p> {
    /// The connection to send on, and what reports its failure.
    pub fn split(self) -> (MultiplexedConnection, Health<'p>) {
        (self.lent.conn, self.health)
    }

    /// What reports a failure of the connection.
    pub fn health(&self) -> &Health<'p> {
        &self.health
    }

    /// After a command that succeeded: the clone goes back to this thread's
    /// stripe of spares, for the next command to take, unless there are
    /// enough there, or it was retired or its epoch ended (then it is
    /// dropped).
    pub fn give_back(self) {
        let (Some((current, epoch)), Some((broken, generation, generations))) =
            (self.lender, self.health.own)
        else {
            return;
        };
        let spare = Spare {
            lent: self.lent,
            broken,
            generation,
            epoch,
        };
        let mut spares = current.spares();
        // The epoch is read under the stripe's lock: an epoch that ended
        // before is seen here, or its emptying of this stripe comes after.
        if spares.len() < SPARES
            && spare.usable(generations, current.epoch.0.load(Ordering::SeqCst))
        {
            spares.push(spare);
        } else {
            drop(spares);
            drop(spare);
        }
    }
}

impl Health<'_> {
    /// Retires the pooled connection when `err` means it can no longer be used:
    /// no answer within the command timeout retires it alone; a dead connection
    /// (I/O error, dropped) retires every connection opened up to it as well.
    /// Returns true when the connection was dead, so the command may be re-sent
    /// on a fresh one.
    ///
    /// A connection the server no longer takes as logged in (`NOAUTH`,
    /// `WRONGPASS`: its credentials expired or were revoked, and its
    /// re-authentication stopped) counts as dead too: the command was not run,
    /// and a fresh connection logs in with the latest credentials.
    ///
    /// On a Sentinel endpoint, so does a `READONLY` reply: the connection is
    /// to a master that was demoted, and a fresh one goes to the new master.
    pub fn note_error(&self, err: &RedisError) -> bool {
        let demoted =
            matches!(&self.own, Some((_, _, g)) if g.moving) && err.code() == Some("READONLY");
        let dead = is_dead(err) || is_logged_out(err) || demoted;
        if let Some((flag, generation, generations)) = &self.own {
            if dead {
                generations.retire_up_to(*generation);
            }
            if dead || err.is_timeout() || err.is_unrecoverable_error() {
                flag.store(true, Ordering::Relaxed);
            }
        }
        dead
    }
}

/// True when the server refused a command because the connection is not (or
/// no longer) authenticated.
pub fn is_logged_out(err: &RedisError) -> bool {
    matches!(err.code(), Some("NOAUTH" | "WRONGPASS"))
}

/// True when `err` means the connection is gone (not a stalled server, not an
/// error reply): the command may be re-sent on a fresh connection.
pub fn is_dead(err: &RedisError) -> bool {
    !err.is_timeout() && (err.is_io_error() || err.is_connection_dropped())
}
