//! The shard groups of a [`ClusterStore`](super::ClusterStore): one redis-rs
//! cluster connection per primary found at connect time, each serving the
//! slots that primary had, so that a primary down, hung or failing over
//! stalls only the calls on its own slots.
//!
//! Why not one cluster connection for every slot: redis-rs 1.8's async
//! cluster connection runs a slot refresh (after a `MOVED`, a `READONLY`, a
//! missing connection) ahead of every queued request, holding its
//! connection-map lock while it asks nodes one after another and then PINGs
//! or reconnects every node of the topology
//! (`cluster_handling/async_connection/mod.rs`: `poll_flush` polls
//! `poll_recover` before `poll_complete`; `refresh_slots` holds
//! `conn_lock.write()` through `query_slots` and
//! `refresh_connections_locked`; upstream redis-rs#2092, "a bad node can block
//! the world"; on timeouts not honoured, #1528). A node that
//! hangs or is gone makes that refresh as long as a response or connect
//! timeout, for every slot behind the same connection. Here the refresh of a
//! failing shard's connection delays that shard's calls only.
//!
//! And a shard whose primary hangs with its sockets open is never routed
//! around by redis-rs: a response timeout is an I/O `TimedOut`, retried on the
//! same node and never a reason to refresh the slots (`RedisError::retry_method`
//! gives `RetryImmediately`; `request.rs`, `choose_response`), so its calls
//! time out even after its replica is promoted. Here a timeout or a
//! connection error on a group makes its primary [suspect](Groups::suspect):
//! off the request path, every [`CHECK_EVERY`] while it stays suspect, `CLUSTER SLOTS` is
//! asked through another group, and when the group's slots have a new
//! primary the group gets a new cluster connection (seeded without the old
//! primary), swapped in when it is ready.
//!
//! A slot that later moves to another group's primary is still served by its
//! first group's connection (which follows the `MOVED`): routing stays right,
//! isolation follows the groups as they were at connect time.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use redis::Value;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};

/// How often a suspect group's primary is checked at most.
pub(super) const CHECK_EVERY: Duration = Duration::from_millis(50);

/// Slots of a Redis Cluster.
const SLOTS: usize = 16384;

/// One slot range of `CLUSTER SLOTS`: its primary and every node serving it,
/// as `host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SlotRange {
    pub first: u16,
    pub last: u16,
    pub primary: String,
    /// The primary's node id, when the reply has it.
    pub primary_id: Option<String>,
    pub nodes: Vec<String>,
}

/// Parses a `CLUSTER SLOTS` reply (ranges whose nodes are `[host, port, …]`);
/// an empty host is the answering node's, which we do not know: skipped.
pub(super) fn parse_slots(reply: &Value) -> Vec<SlotRange> {
    let Value::Array(ranges) = reply else {
        return Vec::new();
    };
    let text = |v: &Value| match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    let node = |v: &Value| {
        let Value::Array(parts) = v else { return None };
        let host = text(parts.first()?)?;
        let Value::Int(port) = parts.get(1)? else {
            return None;
        };
        (!host.is_empty()).then(|| format!("{host}:{port}"))
    };
    ranges
        .iter()
        .filter_map(|range| {
            let Value::Array(parts) = range else {
                return None;
            };
            let (Some(Value::Int(first)), Some(Value::Int(last))) = (parts.first(), parts.get(1))
            else {
                return None;
            };
            let nodes: Vec<String> = parts[2..].iter().filter_map(node).collect();
            let primary_id = match parts.get(2) {
                Some(Value::Array(primary)) => primary.get(2).and_then(text),
                _ => None,
            };
            Some(SlotRange {
                first: u16::try_from(*first).ok()?,
                last: u16::try_from(*last).ok()?,
                primary: nodes.first()?.clone(),
                primary_id,
                nodes,
            })
        })
        .collect()
}

/// The `host:port` of a node URL (`redis://[user:password@]host:port[/db]`).
pub(super) fn host_port(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, rest)| rest);
    rest.split(['/', '?']).next().unwrap_or(rest)
}

/// One group: the slots a primary had at connect time, and the cluster
/// connection that serves them.
pub(super) struct Group {
    connection: RwLock<ClusterConnection>,
    /// The primary of the group's slots when last looked (`host:port`).
    primary: Mutex<String>,
    /// A slot of the group, to ask for its primary and to route through it.
    pub slot: u16,
    checking: AtomicBool,
    /// When a call on the group last timed out or lost its connection.
    suspected: Mutex<Instant>,
    /// Told when the connection is replaced: calls waiting on the old one
    /// (on a hung primary) go to the new one.
    replaced: tokio::sync::Notify,
}

impl Group {
    /// Resolves when the group's connection is next replaced.
    pub fn replaced(&self) -> tokio::sync::futures::Notified<'_> {
        self.replaced.notified()
    }

    pub fn connection(&self) -> ClusterConnection {
        self.connection
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Makes a cluster connection from seed URLs (the store's own builder
/// settings), within its connect and command timeouts.
pub(super) type Connect = Arc<
    dyn Fn(
            Vec<String>,
        )
            -> futures_util::future::BoxFuture<'static, redis::RedisResult<ClusterConnection>>
        + Send
        + Sync,
>;

/// The groups and the slot → group table.
pub(super) struct Groups {
    groups: Vec<Group>,
    /// Each slot's group: as read at connect time, then moved by
    /// [`regroup`](Groups::regroup).
    by_slot: Vec<AtomicU8>,
    /// A [`regroup`](Groups::regroup) is running.
    regrouping: AtomicBool,
    seeds: Vec<String>,
    connect: Connect,
    /// A check of a suspect primary, and a connection rebuilt, are bounded by
    /// this (the connect plus the command timeout).
    bound: Duration,
}

impl Groups {
    /// Groups over the ranges of `slots` (one per distinct primary); the
    /// first group takes `first`, the connection that read them; the others
    /// are connected now, all at once. A cluster that reports no range gets
    /// one group.
    pub async fn connect(
        first: ClusterConnection,
        slots: &[SlotRange],
        seeds: Vec<String>,
        connect: Connect,
        bound: Duration,
    ) -> redis::RedisResult<Groups> {
        let primaries: Vec<String> = slots
            .iter()
            .map(|r| r.primary.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .take(usize::from(u8::MAX))
            .collect();
        let mut by_slot = vec![0u8; SLOTS];
        for range in slots {
            let group = primaries.iter().position(|p| *p == range.primary);
            let group = group.unwrap_or(0) as u8;
            by_slot[usize::from(range.first)..=usize::from(range.last).min(SLOTS - 1)].fill(group);
        }
        let others = futures_util::future::try_join_all(
            (1..primaries.len()).map(|_| (connect)(seeds.clone())),
        )
        .await?;
        let slot_of = |g: usize| {
            by_slot
                .iter()
                .position(|&x| usize::from(x) == g)
                .unwrap_or(0)
        };
        let groups = std::iter::once(first)
            .chain(others)
            .enumerate()
            .map(|(g, connection)| Group {
                connection: RwLock::new(connection),
                primary: Mutex::new(primaries.get(g).cloned().unwrap_or_default()),
                slot: slot_of(g) as u16,
                checking: AtomicBool::new(false),
                suspected: Mutex::new(Instant::now()),
                replaced: tokio::sync::Notify::new(),
            })
            .collect();
        Ok(Groups {
            groups,
            by_slot: by_slot.into_iter().map(AtomicU8::new).collect(),
            regrouping: AtomicBool::new(false),
            seeds,
            connect,
            bound,
        })
    }

    /// The group that serves `slot`.
    pub fn of_slot(&self, slot: u16) -> usize {
        usize::from(self.by_slot[usize::from(slot) % SLOTS].load(Ordering::Relaxed))
    }

    /// A slot answered `MOVED`: reads the slots' primaries again
    /// (`CLUSTER SLOTS`) off the request path, one such read at a time, and
    /// puts each slot in the group of its primary now (a primary new to the
    /// cluster has no group: its slots stay where they were, and redis-rs
    /// follows their redirections), so that a batch's pipelines group slots
    /// with the node that serves them.
    pub fn regroup(self: &Arc<Self>) {
        if self.regrouping.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.regrouping.store(false, Ordering::Release);
            return;
        };
        let groups = Arc::clone(self);
        runtime.spawn(async move {
            if let Some(slots) = groups.topology(0).await {
                groups.regroup_by(&slots);
            }
            groups.regrouping.store(false, Ordering::Release);
        });
    }

    /// Each slot of `slots` in the group whose primary serves it, if any.
    fn regroup_by(&self, slots: &[SlotRange]) {
        let primaries: Vec<String> = self
            .groups
            .iter()
            .map(|g| g.primary.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect();
        for range in slots {
            let Some(g) = primaries.iter().position(|p| *p == range.primary) else {
                continue;
            };
            let Ok(g) = u8::try_from(g) else { continue };
            let last = usize::from(range.last).min(SLOTS - 1);
            for at in self
                .by_slot
                .get(usize::from(range.first)..=last)
                .into_iter()
                .flatten()
            {
                at.store(g, Ordering::Relaxed);
            }
        }
    }

    pub fn group(&self, g: usize) -> &Group {
        &self.groups[g]
    }

    pub fn len(&self) -> usize {
        self.groups.len()
    }

    /// Group `g` timed out or lost a connection: check its primary off the
    /// request path, every [`CHECK_EVERY`] for as long as the group was
    /// suspected within the last `bound` (calls stuck on a
    /// hung primary time out all at once, a command timeout apart), and give
    /// it a new connection once its slots have a new primary.
    pub fn suspect(self: &Arc<Self>, g: usize) {
        let group = &self.groups[g];
        *group.suspected.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        if group.checking.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            group.checking.store(false, Ordering::Release);
            return;
        };
        let groups = Arc::clone(self);
        runtime.spawn(async move {
            let group = &groups.groups[g];
            loop {
                let checked = tokio::time::timeout(groups.bound, groups.check(g)).await;
                let suspected = *group.suspected.lock().unwrap_or_else(|e| e.into_inner());
                if checked == Ok(true) || suspected.elapsed() > groups.bound {
                    break;
                }
                tokio::time::sleep(CHECK_EVERY).await;
            }
            group.checking.store(false, Ordering::Release);
        });
    }

    /// `CLUSTER SLOTS`, asked through the other groups' connections first
    /// (each routed to its own group's primary), then through `g`'s own.
    async fn topology(&self, g: usize) -> Option<Vec<SlotRange>> {
        let order = (0..self.groups.len())
            .filter(|&h| h != g)
            .chain(std::iter::once(g));
        for h in order {
            let route = Route::new(self.groups[h].slot, SlotAddr::Master);
            let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
            let mut conn = self.groups[h].connection();
            let mut cmd = redis::cmd("CLUSTER");
            cmd.arg("SLOTS");
            let asked = tokio::time::timeout(self.bound, conn.route_command(cmd, routing)).await;
            if let Ok(Ok(reply)) = asked {
                let slots = parse_slots(&reply);
                if !slots.is_empty() {
                    return Some(slots);
                }
            }
        }
        None
    }

    /// Whether group `g` got a new connection.
    async fn check(&self, g: usize) -> bool {
        let Some(slots) = self.topology(g).await else {
            return false;
        };
        let group = &self.groups[g];
        let Some(now) = slots
            .iter()
            .find(|r| (r.first..=r.last).contains(&group.slot))
        else {
            return false;
        };
        let old = group
            .primary
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if now.primary == old {
            return false;
        }
        // The new primary alone first: it knows that it is one, where a
        // seed that has not heard of the failover yet would give the new
        // connection the old slot map (and a hung seed would cost it a whole
        // connect timeout). Else the seeds and the topology's nodes, without
        // the old primary. No SCRIPT LOAD: the scripts' first EVALSHA on the
        // new primary falls back on NOSCRIPT.
        let prefix = self.seeds[0]
            .rsplit_once('@')
            .map(|(head, _)| format!("{head}@"))
            .or_else(|| {
                self.seeds[0]
                    .split_once("://")
                    .map(|(scheme, _)| format!("{scheme}://"))
            })
            .unwrap_or_else(|| "redis://".to_owned());
        let mut seeds: Vec<String> = self
            .seeds
            .iter()
            .filter(|s| host_port(s) != old)
            .cloned()
            .collect();
        let known: BTreeSet<String> = seeds.iter().map(|s| host_port(s).to_owned()).collect();
        let listed: BTreeSet<&String> = slots.iter().flat_map(|r| &r.nodes).collect();
        seeds.extend(
            listed
                .into_iter()
                .filter(|n| **n != old && !known.contains(*n))
                .map(|n| format!("{prefix}{n}")),
        );
        tracing::warn!(
            old_primary = %old,
            new_primary = %now.primary,
            "a cluster shard failed over: its calls move to a new cluster connection"
        );
        let connection = match (self.connect)(vec![format!("{prefix}{}", now.primary)]).await {
            Ok(connection) => Ok(connection),
            Err(_) => (self.connect)(seeds).await,
        };
        let mut connection = match connection {
            Ok(connection) => connection,
            Err(e) => {
                tracing::warn!(error = %e, "no new cluster connection for a failed-over shard");
                return false;
            }
        };
        // Swapped in only if it routes the group's slots to the new primary
        // (else the next check tries again).
        if let Some(id) = &now.primary_id {
            let route = Route::new(group.slot, SlotAddr::Master);
            let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
            let mut myid = redis::cmd("CLUSTER");
            myid.arg("MYID");
            match connection.route_command(myid, routing).await {
                Ok(Value::BulkString(answer)) if answer == id.as_bytes() => {}
                other => {
                    tracing::warn!(?other, "the new cluster connection has the old slot map");
                    return false;
                }
            }
        }
        *group.connection.write().unwrap_or_else(|e| e.into_inner()) = connection;
        *group.primary.lock().unwrap_or_else(|e| e.into_inner()) = now.primary.clone();
        group.replaced.notify_waiters();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn cluster_slots_are_parsed_with_their_primary_first() {
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                Value::Array(vec![bulk("127.0.0.1"), Value::Int(7000), bulk("id0")]),
                Value::Array(vec![bulk("127.0.0.1"), Value::Int(7003), bulk("id3")]),
            ]),
            Value::Array(vec![
                Value::Int(5461),
                Value::Int(16383),
                Value::Array(vec![bulk(""), Value::Int(7001)]),
            ]),
        ]);
        assert_eq!(
            parse_slots(&reply),
            vec![SlotRange {
                first: 0,
                last: 5460,
                primary: "127.0.0.1:7000".into(),
                primary_id: Some("id0".into()),
                nodes: vec!["127.0.0.1:7000".into(), "127.0.0.1:7003".into()],
            }]
        );
    }

    #[test]
    fn host_port_drops_scheme_credentials_and_database() {
        assert_eq!(host_port("redis://127.0.0.1:7000"), "127.0.0.1:7000");
        assert_eq!(host_port("rediss://u:p@w@host:6380/0"), "host:6380");
        assert_eq!(host_port("host:1"), "host:1");
    }
}
