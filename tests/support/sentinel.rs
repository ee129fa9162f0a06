//! A throwaway Sentinel group: one master, one replica and three Sentinels
//! (`redis-server <conf> --sentinel` on free loopback ports), quorum 2,
//! `down-after-milliseconds` as given. Everything is killed on drop.

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::server::{RedisServer, free_port, redis_server_binary};

/// The group's name in the Sentinels.
pub const MASTER_NAME: &str = "lcmaster";

/// One Sentinel process.
pub struct SentinelNode {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for SentinelNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The master (`servers[0]` at start), its replica and the Sentinels.
pub struct SentinelGroup {
    pub servers: Vec<RedisServer>,
    pub sentinels: Vec<SentinelNode>,
}

impl SentinelGroup {
    /// Starts the group and waits until every Sentinel knows the master and
    /// the replica is in sync.
    pub fn start(down_after: Duration) -> SentinelGroup {
        let master = RedisServer::start();
        let port = master.port().to_string();
        let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &port]);
        let sentinels: Vec<SentinelNode> = (0..3)
            .map(|_| spawn_sentinel(master.port(), down_after))
            .collect();
        let group = SentinelGroup {
            servers: vec![master, replica],
            sentinels,
        };
        group.wait_until("the replica is in sync and every Sentinel sees it", |g| {
            let info: String = g.servers[1].query(&["INFO", "replication"]);
            info.contains("master_link_status:up")
                && g.sentinels.iter().all(|s| {
                    let replicas: redis::RedisResult<redis::Value> =
                        sentinel_query(s.port, &["SENTINEL", "REPLICAS", MASTER_NAME]);
                    matches!(replicas, Ok(redis::Value::Array(r)) if !r.is_empty())
                })
        });
        group
    }

    /// The Sentinels' URLs.
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|s| format!("redis://127.0.0.1:{}", s.port))
            .collect()
    }

    /// The port the first answering Sentinel names as the master.
    pub fn master_port(&self) -> Option<u16> {
        self.sentinels.iter().find_map(|s| {
            let addr: redis::RedisResult<Vec<String>> = sentinel_query(
                s.port,
                &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME],
            );
            addr.ok()?.get(1)?.parse().ok()
        })
    }

    /// Polls `ready` every 50 ms for up to 30 s.
    pub fn wait_until(&self, what: &str, ready: impl Fn(&SentinelGroup) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready(self) {
            assert!(
                Instant::now() < deadline,
                "Sentinel group: {what}: not within 30 s"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

fn sentinel_query<T: redis::FromRedisValue>(port: u16, args: &[&str]) -> redis::RedisResult<T> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    let mut con = client.get_connection_with_timeout(Duration::from_millis(500))?;
    con.set_read_timeout(Some(Duration::from_millis(1000)))?;
    let (name, rest) = args.split_first().expect("a command");
    redis::cmd(name).arg(rest).query(&mut con)
}

fn spawn_sentinel(master_port: u16, down_after: Duration) -> SentinelNode {
    let dir = tempfile::Builder::new()
        .prefix("locked-cache-sentinel")
        .tempdir()
        .expect("tempdir");
    let port = free_port();
    let conf = dir.path().join("sentinel.conf");
    let mut file = std::fs::File::create(&conf).expect("sentinel.conf");
    let ms = down_after.as_millis();
    write!(
        file,
        "port {port}\nbind 127.0.0.1\ndir {dir}\nlogfile {dir}/sentinel.log\n\
         sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n\
         sentinel down-after-milliseconds {MASTER_NAME} {ms}\n\
         sentinel failover-timeout {MASTER_NAME} 10000\n\
         sentinel parallel-syncs {MASTER_NAME} 1\n",
        dir = dir.path().display()
    )
    .expect("write sentinel.conf");
    drop(file);
    let child = Command::new(redis_server_binary())
        .arg(&conf)
        .arg("--sentinel")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn redis-server --sentinel");
    let node = SentinelNode {
        port,
        child,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while sentinel_query::<String>(port, &["PING"]).is_err() {
        assert!(
            Instant::now() < deadline,
            "Sentinel on {port} did not answer within 10 s"
        );
        thread::sleep(Duration::from_millis(50));
    }
    node
}
