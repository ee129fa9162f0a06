//! Throwaway `redis-server` processes for integration tests.
//!
//! Every server listens on a free loopback port (never 6379), keeps its data
//! and log in its own temporary directory and is killed when dropped.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

/// How long a freshly spawned server gets to answer before we give up.
const READY_DEADLINE: Duration = Duration::from_secs(10);
/// Poll interval while waiting for a server to come up.
const READY_POLL: Duration = Duration::from_millis(10);
/// Attempts (each on a new port) that [`RedisServer::start`] makes.
const START_ATTEMPTS: usize = 5;
/// How long [`RedisServer::restart`] keeps trying to get its old port back.
const REBIND_DEADLINE: Duration = Duration::from_secs(5);
/// Commands that [`RedisServer::total_commands`] does not count: the ones
/// this harness and redis-rs connection handshakes (`CLIENT SETINFO`, RESP3
/// `HELLO`) issue.
pub const UNCOUNTED_COMMANDS: &[&str] = &["info", "ping", "config", "client", "hello"];

/// Path of the `redis-server` binary: `$REDIS_SERVER` if set, else the first
/// `redis-server` on `PATH`, `/usr/bin` or `/usr/local/bin`.
pub fn redis_server_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("REDIS_SERVER").filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    path_dirs
        .into_iter()
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")])
        .map(|dir| dir.join("redis-server"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "redis-server not found: install it (scripts/test.sh does this) or set REDIS_SERVER"
            )
        })
}

/// Picks a currently free loopback port (bind to port 0, then release it).
/// Never returns 6379, the port of a system Redis.
pub fn free_port() -> u16 {
    loop {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local_addr").port();
        if port != 6379 {
            return port;
        }
    }
}

/// Result of waiting for a freshly spawned process.
enum Ready {
    /// It answers, and it is our process.
    Up,
    /// It exited (typically: the port was taken); the string says how.
    Exited(String),
    /// Something else answers on the port while our process lives.
    Impostor,
    /// Nothing answered before the deadline.
    TimedOut,
}

/// A `redis-server` child process on a loopback port, killed on drop.
pub struct RedisServer {
    port: u16,
    tempdir: tempfile::TempDir,
    /// In a mutex so that `is_running(&self)` can `try_wait`.
    child: Mutex<Option<Child>>,
    /// Arguments added to every start (e.g. `--cluster-enabled yes`).
    extra_args: Vec<String>,
}

impl RedisServer {
    /// Starts a server on a free loopback port and waits until it answers.
    /// Retries on a new port (up to 5 attempts) if the process exits early;
    /// panics with the server log if it cannot be brought up.
    pub fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    /// As [`start`](Self::start), with extra `redis-server` arguments (kept
    /// for restarts). A `{dir}` in an argument is replaced by the server's
    /// temporary directory.
    pub fn start_with(extra_args: &[&str]) -> RedisServer {
        let tempdir = tempfile::Builder::new()
            .prefix("locked-cache-redis")
            .tempdir()
            .expect("create tempdir for redis-server");
        let dir = tempdir.path().display().to_string();
        let mut server = RedisServer {
            port: 0,
            tempdir,
            child: Mutex::new(None),
            extra_args: extra_args
                .iter()
                .map(|a| a.replace("{dir}", &dir))
                .collect(),
        };
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            server.port = free_port();
            match server.spawn_and_wait() {
                Ready::Up => return server,
                Ready::Exited(why) => failures.push(format!("port {}: {why}", server.port)),
                Ready::Impostor => {
                    failures.push(format!("port {}: taken by another server", server.port))
                }
                Ready::TimedOut => server.fail("did not answer PING within 10 s"),
            }
            server.kill();
        }
        server.fail(&format!(
            "failed to start after {START_ATTEMPTS} attempts: {failures:?}"
        ))
    }

    /// The TCP port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The socket address (`127.0.0.1:PORT`) of the server.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// Connection URL: `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server with SIGKILL and reaps it. Idempotent.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child_mut().take() {
            // SIGKILL works on a stopped process too; the CONT lets a paused
            // server's sockets close in the normal order.
            let _ = Command::new("kill")
                .arg("-CONT")
                .arg(child.id().to_string())
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the server if it is running and starts it again on the same
    /// port (retrying for up to 5 s while the port is busy), then waits
    /// until it answers. The data set starts empty (persistence is off).
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + REBIND_DEADLINE;
        loop {
            match self.spawn_and_wait() {
                Ready::Up => return,
                Ready::TimedOut => self.fail("did not answer PING within 10 s after restart"),
                Ready::Exited(_) | Ready::Impostor if Instant::now() < deadline => {
                    self.kill();
                    thread::sleep(Duration::from_millis(50));
                }
                Ready::Exited(why) => {
                    self.fail(&format!("could not restart on port {}: {why}", self.port))
                }
                Ready::Impostor => self.fail(&format!(
                    "could not restart: port {} is taken by another server",
                    self.port
                )),
            }
        }
    }

    /// Whether the server process is alive.
    /// Freezes the server (SIGSTOP): its connections stay open, nothing
    /// answers, nothing is refused. [`resume`](Self::resume) thaws it; so does
    /// dropping it.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Thaws a server frozen by [`pause`](Self::pause) (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = {
            let child = self.child.lock().unwrap_or_else(|e| e.into_inner());
            child
                .as_ref()
                .map(|c| c.id())
                .expect("server is not running")
        };
        let status = Command::new("kill")
            .arg(signal)
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {pid} failed");
    }

    pub fn is_running(&self) -> bool {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Contents of the server's log file (all runs, including restarts).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Runs `CLIENT KILL TYPE pubsub` on this server, disconnecting every
    /// subscriber.
    pub fn client_kill_pubsub(&self) {
        self.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    }

    /// Per-command call counts from `INFO commandstats`, keyed by lowercase
    /// command name (`"get"`; subcommands as `"client|kill"`).
    pub fn command_stats(&self) -> HashMap<String, u64> {
        let info: String = self.query(&["INFO", "commandstats"]);
        parse_command_stats(&info)
    }

    /// The number `field` of `INFO section` (`info_number("stats",
    /// "evicted_keys")`); panics, naming it, if the server does not report it.
    pub fn info_number(&self, section: &str, field: &str) -> u64 {
        let info: String = self.query(&["INFO", section]);
        parse_info_number(&info, field)
            .unwrap_or_else(|| panic!("INFO {section} has no number {field}"))
    }

    /// Calls of one command (`"get"`, `"set"`, ...) so far; 0 if never called.
    pub fn command_calls(&self, name: &str) -> u64 {
        self.command_stats()
            .get(&name.to_ascii_lowercase())
            .copied()
            .unwrap_or(0)
    }

    /// Sum of all command calls except [`UNCOUNTED_COMMANDS`] (`info`,
    /// `ping`, `config`, `client` and their subcommands).
    pub fn total_commands(&self) -> u64 {
        self.command_stats()
            .iter()
            .filter(|(name, _)| {
                let base = name.split('|').next().unwrap_or(name);
                !UNCOUNTED_COMMANDS.contains(&base)
            })
            .map(|(_, calls)| calls)
            .sum()
    }

    /// Resets the command statistics (`CONFIG RESETSTAT`).
    pub fn reset_stats(&self) {
        self.cmd(&["CONFIG", "RESETSTAT"]);
    }

    /// Runs one command on a fresh synchronous connection and returns the
    /// reply; panics on connection or server errors. Note the command
    /// itself shows up in [`command_stats`](Self::command_stats).
    pub fn cmd(&self, args: &[&str]) -> redis::Value {
        self.query(args)
    }

    /// Like [`cmd`](Self::cmd) but converts the reply and returns errors
    /// instead of panicking.
    pub fn try_query<T: redis::FromRedisValue>(&self, args: &[&str]) -> redis::RedisResult<T> {
        let (name, rest) = args
            .split_first()
            .expect("cmd needs at least a command name");
        let mut con = self.connection()?;
        redis::cmd(name).arg(rest).query(&mut con)
    }

    /// Like [`cmd`](Self::cmd) but converts the reply to `T`.
    pub fn query<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        self.try_query(args)
            .unwrap_or_else(|e| panic!("{args:?} on redis {}: {e}", self.port))
    }

    /// A new synchronous connection (5 s I/O timeouts) to this server.
    pub fn connection(&self) -> redis::RedisResult<redis::Connection> {
        let client = redis::Client::open(self.url())?;
        let con = client.get_connection_with_timeout(Duration::from_secs(5))?;
        con.set_read_timeout(Some(Duration::from_secs(5)))?;
        con.set_write_timeout(Some(Duration::from_secs(5)))?;
        Ok(con)
    }

    fn child_mut(&mut self) -> &mut Option<Child> {
        self.child.get_mut().unwrap_or_else(|e| e.into_inner())
    }

    fn log_path(&self) -> PathBuf {
        self.tempdir.path().join("redis.log")
    }

    /// Spawns redis-server on `self.port` and waits until it answers.
    fn spawn_and_wait(&mut self) -> Ready {
        debug_assert!(self.child_mut().is_none());
        let child = spawn_redis(
            self.port,
            self.tempdir.path(),
            &self.log_path(),
            &self.extra_args,
        );
        let pid = child.id();
        *self.child_mut() = Some(child);
        let deadline = Instant::now() + READY_DEADLINE;
        loop {
            if let Some(status) = self.reap_if_exited() {
                return Ready::Exited(status);
            }
            match probe_pid(self.addr()) {
                Some(p) if p == pid => return Ready::Up,
                Some(_) => {
                    // Give our process a moment to fail on the taken port.
                    thread::sleep(Duration::from_millis(50));
                    return match self.reap_if_exited() {
                        Some(status) => Ready::Exited(status),
                        None => Ready::Impostor,
                    };
                }
                None => {}
            }
            if Instant::now() >= deadline {
                return Ready::TimedOut;
            }
            thread::sleep(READY_POLL);
        }
    }

    /// If the child has exited, reaps it and describes its exit status.
    fn reap_if_exited(&mut self) -> Option<String> {
        let slot = self.child_mut();
        let status = slot.as_mut()?.try_wait().ok()??;
        *slot = None;
        Some(status.to_string())
    }

    fn fail(&mut self, why: &str) -> ! {
        self.kill();
        panic!(
            "redis-server ({}) {why}\n--- {} ---\n{}",
            redis_server_binary().display(),
            self.log_path().display(),
            self.log()
        );
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Spawns `redis-server` on `127.0.0.1:port` without persistence.
fn spawn_redis(port: u16, dir: &Path, log: &Path, extra_args: &[String]) -> Child {
    assert_ne!(port, 6379, "refusing to start a test server on 6379");
    let bin = redis_server_binary();
    Command::new(&bin)
        .arg("--port")
        .arg(port.to_string())
        .arg("--bind")
        .arg("127.0.0.1")
        .arg("--save")
        .arg("")
        .arg("--appendonly")
        .arg("no")
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(log)
        .args(extra_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("failed to run {}: {e}", bin.display()))
}

/// `process_id` of whatever Redis answers on `addr`, or `None` if nothing
/// answers (yet).
fn probe_pid(addr: SocketAddr) -> Option<u32> {
    let client = redis::Client::open(format!("redis://{addr}")).ok()?;
    let mut con = client
        .get_connection_with_timeout(Duration::from_millis(500))
        .ok()?;
    con.set_read_timeout(Some(Duration::from_millis(500)))
        .ok()?;
    let info: String = redis::cmd("INFO").arg("server").query(&mut con).ok()?;
    parse_info_number(&info, "process_id").and_then(|pid| pid.try_into().ok())
}

/// The number `field` of an `INFO` reply (`field:123` on a line of its own).
pub fn parse_info_number(info: &str, field: &str) -> Option<u64> {
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|n| n.trim().parse().ok())
}

/// Parses `INFO commandstats` output (`cmdstat_get:calls=12,usec=...`) into
/// `{"get": 12}`.
pub fn parse_command_stats(info: &str) -> HashMap<String, u64> {
    info.lines()
        .filter_map(|line| {
            let (name, fields) = line.trim().strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = fields
                .split(',')
                .find_map(|f| f.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name.to_ascii_lowercase(), calls))
        })
        .collect()
}

/// Several independent servers, e.g. for multi-node tests.
pub struct Fleet {
    /// The servers, in start order.
    pub servers: Vec<RedisServer>,
}

impl Fleet {
    /// Starts `n` servers concurrently (one thread each).
    pub fn start(n: usize) -> Fleet {
        let results: Vec<thread::Result<RedisServer>> = thread::scope(|s| {
            let handles: Vec<_> = (0..n).map(|_| s.spawn(RedisServer::start)).collect();
            handles.into_iter().map(|h| h.join()).collect()
        });
        let mut servers = Vec::with_capacity(n);
        let mut panic = None;
        for r in results {
            match r {
                Ok(server) => servers.push(server),
                Err(p) => panic = panic.or(Some(p)),
            }
        }
        if let Some(p) = panic {
            drop(servers);
            std::panic::resume_unwind(p);
        }
        Fleet { servers }
    }

    /// URLs of all servers, in order.
    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(RedisServer::url).collect()
    }

    /// Kills server `i` (SIGKILL).
    pub fn kill(&mut self, i: usize) {
        self.servers[i].kill();
    }

    /// Restarts server `i` on its old port.
    pub fn restart(&mut self, i: usize) {
        self.servers[i].restart();
    }

    /// Number of servers.
    pub fn len(&self) -> usize {
        self.servers.len()
    }

    /// Whether the fleet has no servers.
    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }
}

impl std::ops::Index<usize> for Fleet {
    type Output = RedisServer;

    fn index(&self, i: usize) -> &RedisServer {
        &self.servers[i]
    }
}
