//! A throwaway Redis Cluster: 3 primaries and 3 replicas, each a
//! `redis-server --cluster-enabled yes` on a free loopback port, joined with
//! plain `CLUSTER` commands (no `redis-cli` needed), and killed on drop.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use super::server::RedisServer;

/// How long a cluster gets to agree on its topology.
const CONVERGE_DEADLINE: Duration = Duration::from_secs(20);

/// A running cluster: `nodes[0..3]` start as primaries of slots 0–5460,
/// 5461–10922 and 10923–16383; `nodes[3..6]` as their replicas.
pub struct Cluster {
    pub nodes: Vec<RedisServer>,
    /// Nodes frozen by [`pause`](Cluster::pause): running, never answering,
    /// so never asked.
    paused: Mutex<BTreeSet<usize>>,
}

impl Cluster {
    /// Starts the six nodes and waits until every node reports
    /// `cluster_state:ok` with all replicas attached. `node_timeout` is the
    /// cluster's failure-detection time (`cluster-node-timeout`).
    pub fn start(node_timeout: Duration) -> Cluster {
        let timeout = node_timeout.as_millis().to_string();
        let args = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "{dir}/nodes.conf",
            "--cluster-node-timeout",
            timeout.as_str(),
            // Replicas take over from a failed primary however long ago they
            // last heard from it.
            "--cluster-replica-validity-factor",
            "0",
            // The healthy shards keep serving while one is down (with the
            // default, `yes`, every node answers CLUSTERDOWN for every slot
            // from the moment a primary is marked failing until its replica
            // is promoted).
            "--cluster-require-full-coverage",
            "no",
        ];
        let nodes: Vec<RedisServer> = thread::scope(|s| {
            let handles: Vec<_> = (0..6)
                .map(|_| s.spawn(|| RedisServer::start_with(&args)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("node"))
                .collect()
        });
        let cluster = Cluster {
            nodes,
            paused: Mutex::default(),
        };
        for node in &cluster.nodes[1..] {
            cluster.nodes[0].cmd(&["CLUSTER", "MEET", "127.0.0.1", &node.port().to_string()]);
        }
        let ranges = [("0", "5460"), ("5461", "10922"), ("10923", "16383")];
        for (node, (from, to)) in cluster.nodes[..3].iter().zip(ranges) {
            node.cmd(&["CLUSTER", "ADDSLOTSRANGE", from, to]);
        }
        cluster.wait_until("all six nodes know each other", |c| {
            c.nodes.iter().all(|n| {
                let nodes: String = n.query(&["CLUSTER", "NODES"]);
                nodes.lines().filter(|l| !l.trim().is_empty()).count() == 6
            })
        });
        for i in 0..3 {
            let primary: String = cluster.nodes[i].query(&["CLUSTER", "MYID"]);
            cluster.nodes[i + 3].cmd(&["CLUSTER", "REPLICATE", &primary]);
        }
        cluster.wait_healed();
        cluster
    }

    /// Waits until every node reports `cluster_state:ok` and sees three
    /// replicas and no failing node (after a killed node is restarted or a
    /// paused one resumed: it rejoins as a replica).
    pub fn wait_healed(&self) {
        self.wait_until("the cluster is up with three replicas", |c| {
            c.nodes.iter().all(|n| {
                let info: String = n.query(&["CLUSTER", "INFO"]);
                let nodes: String = n.query(&["CLUSTER", "NODES"]);
                let flags: Vec<&str> = nodes
                    .lines()
                    .filter_map(|l| l.split_whitespace().nth(2))
                    .collect();
                let replicas = flags
                    .iter()
                    .filter(|flags| flags.split(',').any(|f| f == "slave"))
                    .count();
                let failing = flags.iter().any(|flags| flags.contains("fail"));
                info.contains("cluster_state:ok") && replicas == 3 && !failing
            })
        });
    }

    /// Freezes node `i` (SIGSTOP): its sockets stay open and nothing answers.
    pub fn pause(&self, i: usize) {
        self.paused.lock().unwrap().insert(i);
        self.nodes[i].pause();
    }

    /// Thaws node `i` (SIGCONT).
    pub fn resume(&self, i: usize) {
        self.nodes[i].resume();
        self.paused.lock().unwrap().remove(&i);
    }

    /// The nodes that answer: running and not paused.
    pub fn answering(&self) -> impl Iterator<Item = &RedisServer> {
        let paused = self.paused.lock().unwrap().clone();
        self.nodes
            .iter()
            .enumerate()
            .filter(move |(i, n)| !paused.contains(i) && n.is_running())
            .map(|(_, n)| n)
    }

    /// Seed URLs: every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The index of the node that serves `slot` as primary right now, as the
    /// first live node that knows it says. A node that has just restarted or
    /// just seen a failover may not list the slot yet: every live node is
    /// asked, for up to 10 s.
    pub fn primary_of(&self, slot: u16) -> usize {
        let ports: HashMap<u16, usize> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.port(), i))
            .collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            for node in self.answering() {
                let Ok(slots) = node.try_query::<redis::Value>(&["CLUSTER", "SLOTS"]) else {
                    continue;
                };
                if let redis::Value::Array(ranges) = slots {
                    for range in ranges {
                        let redis::Value::Array(parts) = range else {
                            continue;
                        };
                        let (Some(redis::Value::Int(from)), Some(redis::Value::Int(to))) =
                            (parts.first(), parts.get(1))
                        else {
                            continue;
                        };
                        if (*from as u16..=*to as u16).contains(&slot)
                            && let Some(redis::Value::Array(primary)) = parts.get(2)
                            && let Some(redis::Value::Int(port)) = primary.get(1)
                        {
                            return ports[&(*port as u16)];
                        }
                    }
                }
            }
            if Instant::now() >= deadline {
                panic!("no primary serves slot {slot}");
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// A node that answers (running, not paused).
    pub fn live_node(&self) -> &RedisServer {
        self.answering().next().expect("a live node")
    }

    /// Waits until `ready` holds (polling), or panics naming `what`.
    pub fn wait_until(&self, what: &str, ready: impl Fn(&Cluster) -> bool) {
        let deadline = Instant::now() + CONVERGE_DEADLINE;
        while !ready(self) {
            if Instant::now() >= deadline {
                let states: Vec<String> = self
                    .answering()
                    .map(|n| n.query::<String>(&["CLUSTER", "NODES"]))
                    .collect();
                panic!(
                    "cluster: timed out waiting until {what}:\n{}",
                    states.join("\n")
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}
