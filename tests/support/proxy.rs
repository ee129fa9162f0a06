//! A loopback TCP proxy for fault-injection tests: add latency, stall
//! traffic, cut or refuse connections between a client and a Redis server.
//!
//! Must be started inside a Tokio runtime; its tasks are aborted on drop.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Shutdown, SocketAddr};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::AbortHandle;

/// How long the proxy waits to connect to its target before dropping the
/// accepted client connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// One proxied connection, as seen by the controls.
struct Conn {
    /// The forwarding task (owns both sockets).
    task: AbortHandle,
    /// Duplicated handles of the client-side and target-side sockets, so
    /// that `cut_all` can shut them down synchronously.
    sockets: [std::net::TcpStream; 2],
}

/// State shared between the [`TcpProxy`] handle and its tasks.
struct Shared {
    target: SocketAddr,
    delay_nanos: AtomicU64,
    stalled: watch::Sender<bool>,
    refusing: AtomicBool,
    next_id: AtomicU64,
    conns: Mutex<HashMap<u64, Conn>>,
}

impl Shared {
    fn conns(&self) -> MutexGuard<'_, HashMap<u64, Conn>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn delay(&self) -> Duration {
        Duration::from_nanos(self.delay_nanos.load(Ordering::Relaxed))
    }
}

/// A TCP proxy on `127.0.0.1:0` forwarding every connection to a target.
pub struct TcpProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept_task: AbortHandle,
}

impl TcpProxy {
    /// Starts listening on a free loopback port and forwards each accepted
    /// connection (both directions) to `target`.
    pub async fn start(target: SocketAddr) -> TcpProxy {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("proxy: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("proxy: local_addr");
        let shared = Arc::new(Shared {
            target,
            delay_nanos: AtomicU64::new(0),
            stalled: watch::Sender::new(false),
            refusing: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
            conns: Mutex::new(HashMap::new()),
        });
        let accept_task = tokio::spawn(accept_loop(listener, Arc::clone(&shared))).abort_handle();
        TcpProxy {
            addr,
            shared,
            accept_task,
        }
    }

    /// The proxy's listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address connections are forwarded to.
    pub fn target(&self) -> SocketAddr {
        self.shared.target
    }

    /// Connection URL of the proxy: `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.addr.port())
    }

    /// Adds `d` of latency before each forwarded chunk, in both directions
    /// (`Duration::ZERO` = none). Applies to chunks read from now on.
    pub fn set_delay(&self, d: Duration) {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.shared.delay_nanos.store(nanos, Ordering::Relaxed);
    }

    /// Stops forwarding bytes: connections stay open and data is held
    /// until [`resume`](Self::resume).
    pub fn stall(&self) {
        self.shared.stalled.send_replace(true);
    }

    /// Resumes forwarding after [`stall`](Self::stall); held data is sent.
    pub fn resume(&self) {
        self.shared.stalled.send_replace(false);
    }

    /// Closes every current connection (both sides) right away; new
    /// connections are still accepted.
    pub fn cut_all(&self) {
        let conns: Vec<Conn> = self.shared.conns().drain().map(|(_, c)| c).collect();
        for conn in conns {
            for socket in &conn.sockets {
                let _ = socket.shutdown(Shutdown::Both);
            }
            conn.task.abort();
        }
    }

    /// While `on`, new connections are accepted and immediately closed.
    /// Existing connections are unaffected.
    pub fn refuse(&self, on: bool) {
        self.shared.refusing.store(on, Ordering::SeqCst);
    }

    /// Number of currently open proxied connections.
    pub fn connections(&self) -> usize {
        self.shared.conns().len()
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept_task.abort();
        self.cut_all();
    }
}

/// Removes a connection from the registry when its task ends or is aborted.
struct Deregister {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for Deregister {
    fn drop(&mut self) {
        self.shared.conns().remove(&self.id);
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let inbound = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                // E.g. out of file descriptors: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if shared.refusing.load(Ordering::SeqCst) {
            drop(inbound);
            continue;
        }
        let outbound =
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(shared.target)).await {
                Ok(Ok(stream)) => stream,
                // Target down: close the client side, like a dead server would.
                _ => continue,
            };
        let _ = inbound.set_nodelay(true);
        let _ = outbound.set_nodelay(true);
        let (Some(dup_in), Some(dup_out)) = (dup(&inbound), dup(&outbound)) else {
            continue;
        };
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        // The task starts forwarding (and may deregister) only once it is
        // registered, so a connection that ends at once leaves no stale entry.
        let (registered, wait_registered) = oneshot::channel::<()>();
        let task_shared = Arc::clone(&shared);
        let task = tokio::spawn(async move {
            let _ = wait_registered.await;
            let guard = Deregister {
                shared: task_shared,
                id,
            };
            forward(inbound, outbound, guard).await;
        })
        .abort_handle();
        shared.conns().insert(
            id,
            Conn {
                task,
                sockets: [dup_in, dup_out],
            },
        );
        let _ = registered.send(());
    }
}

/// A second handle to the socket behind `stream` (for synchronous shutdown).
fn dup(stream: &TcpStream) -> Option<std::net::TcpStream> {
    let fd = stream.as_fd().try_clone_to_owned().ok()?;
    Some(std::net::TcpStream::from(fd))
}

/// Forwards both directions until either side closes or fails, then
/// closes both.
async fn forward(inbound: TcpStream, outbound: TcpStream, guard: Deregister) {
    let shared = Arc::clone(&guard.shared);
    let (client_read, client_write) = inbound.into_split();
    let (target_read, target_write) = outbound.into_split();
    tokio::select! {
        () = pump(client_read, target_write, &shared) => {}
        () = pump(target_read, client_write, &shared) => {}
    }
    drop(guard);
}

/// Copies chunks from `from` to `to`, applying the delay and stall controls
/// before writing each chunk.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, shared: &Shared) {
    let mut stalled = shared.stalled.subscribe();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let delay = shared.delay();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if stalled.wait_for(|s| !*s).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
