//! How a batch's commands reach a [`ClusterStore`]'s nodes, for
//! `batch.rs`: [`per_slot`](ClusterStore::per_slot), one command per slot
//! (the slots at once, each chunked), and
//! [`per_node`](ClusterStore::per_node), the same commands in one pipeline
//! per node, so a batch costs one round trip per node however many slots its
//! keys hash to; a chunk a node's pipeline did not answer goes again on its
//! own through `run`.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::try_join_all;
use redis::RedisError;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, SingleNodeRoutingInfo, SlotAddr};

use super::super::many::{MAX_BYTES_PER_SCRIPT, by_slot, chunked, chunks, scatter};
use super::ClusterStore;
use super::shards::Groups;
use crate::defaults::MAX_KEYS_PER_COMMAND;
use crate::error::{Error, Result};

/// The most keys one node's pipeline carries (and, where the commands carry
/// values, [`MAX_BYTES_PER_SCRIPT`] of them); a node with more gets several
/// pipelines, sent at once.
const MAX_KEYS_PER_PIPELINE: usize = MAX_KEYS_PER_COMMAND;

/// The slot of a group of [`by_slot`] (every item of it has the same).
fn slot_of<T>(group: &[T], key: impl Fn(&T) -> &str) -> u16 {
    group
        .first()
        .map_or(0, |item| super::super::slot::slot(key(item).as_bytes()))
}

/// One chunk of one slot's items, for a node's pipeline: the slot group it
/// came from (an index into [`by_slot`]'s groups), its slot and its items.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece<'a, T> {
    group: usize,
    slot: u16,
    items: &'a [T],
}

/// A piece whose reply in a node's pipeline is this error is sent again on
/// its own (with [`ClusterStore::run`]'s retries and redirections): the slot
/// moved or is moving, the shard is busy or has no primary, the node has not
/// loaded the script, or the reply was not of the expected shape. Any other
/// error reply is the piece's answer.
fn send_alone(e: &RedisError) -> bool {
    match e.code() {
        None => true,
        Some(code) => matches!(
            code,
            "MOVED"
                | "ASK"
                | "TRYAGAIN"
                | "CLUSTERDOWN"
                | "MASTERDOWN"
                | "NOSCRIPT"
                | "LOADING"
                | "READONLY"
        ),
    }
}

/// What [`ClusterStore::per_node`] sends each node: the command's name (for
/// errors), how to add a piece to a pipeline and read its replies, how to
/// send a piece on its own, and the deadline of it all.
struct NodeSend<'a, A, P, F> {
    command: &'static str,
    add: &'a A,
    parse: &'a P,
    send: &'a F,
    deadline: Instant,
}

/// The pieces by the shard (`shard_of` their slot) that serves them, in the
/// order first seen, each shard's cut into pipelines of at most
/// [`MAX_KEYS_PER_PIPELINE`] items and [`MAX_BYTES_PER_SCRIPT`] `bytes` (a
/// piece is never cut: [`chunks`] bounds it the same way). A slot group's
/// pieces keep their order within its shard.
fn node_pipelines<'a, T>(
    pieces: Vec<Piece<'a, T>>,
    shard_of: impl Fn(u16) -> usize,
    bytes: impl Fn(&T) -> usize,
) -> Vec<(usize, Vec<Piece<'a, T>>)> {
    let mut out: Vec<(usize, Vec<Piece<'a, T>>)> = Vec::new();
    // Per shard: the pipeline being filled (an index into `out`), its items
    // and its bytes.
    let mut open: std::collections::HashMap<usize, (usize, usize, usize)> = Default::default();
    for piece in pieces {
        let shard = shard_of(piece.slot);
        let size: usize = piece.items.iter().map(&bytes).sum();
        let fits = open.get(&shard).is_some_and(|&(_, items, held)| {
            items + piece.items.len() <= MAX_KEYS_PER_PIPELINE
                && held + size <= MAX_BYTES_PER_SCRIPT
        });
        if !fits {
            out.push((shard, Vec::new()));
            open.insert(shard, (out.len() - 1, 0, 0));
        }
        let Some((at, items, held)) = open.get_mut(&shard) else {
            continue;
        };
        *items += piece.items.len();
        *held += size;
        out[*at].1.push(piece);
    }
    out
}

impl ClusterStore {
    /// One command per slot of `items` (by `key`), the slots at once, each
    /// chunked (by count, and by `bytes` where a script carries values); the
    /// answers in the items' order. `send` sends one chunk on a connection.
    pub(super) async fn per_slot<T, R, F, Fut>(
        &self,
        command: &'static str,
        items: &[T],
        key: impl Fn(&T) -> &str,
        bytes: impl Fn(&T) -> usize + Copy,
        send: F,
    ) -> Result<Vec<R>>
    where
        T: Copy,
        R: Default,
        F: Fn(ClusterConnection, Vec<T>) -> Fut,
        Fut: Future<Output = std::result::Result<Vec<R>, RedisError>>,
    {
        let groups = by_slot(items, &key);
        let send = &send;
        let sends = groups.iter().map(|(_, group)| {
            let slot = slot_of(group, &key);
            chunked(group, bytes, move |chunk| {
                self.run(command, slot, move |c| send(c, chunk.to_vec()))
            })
        });
        let answers = try_join_all(sends).await?;
        Ok(scatter(items.len(), &groups, answers))
    }

    /// A command per slot of `items` (by `key`, chunked as
    /// [`per_slot`](Self::per_slot) does), sent as **one pipeline per node**,
    /// the nodes at once: a batch costs one round trip per node, however
    /// many slots its keys hash to. `add` puts one chunk's commands in a
    /// pipeline (answering how many replies they make) and `parse` reads
    /// those replies. A chunk answered with an error [`send_alone`] names
    /// (its slot moved since the shards were read, a script the node has not
    /// loaded, a busy slot), or a node whose pipeline was not answered (a
    /// dead connection, a failover; redis-rs first retries a pipeline that
    /// met a redirection as a whole), is sent again on its own with `send`
    /// and [`run`](Self::run)'s retries, all within one command timeout; a
    /// `MOVED` also moves its slot to its new node's group, so later batches
    /// pay for it once. Any other error reply fails the batch, typed.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn per_node<T, R, A, P, F, Fut>(
        &self,
        command: &'static str,
        items: &[T],
        key: impl Fn(&T) -> &str,
        bytes: impl Fn(&T) -> usize + Copy,
        add: A,
        parse: P,
        send: F,
    ) -> Result<Vec<R>>
    where
        T: Copy,
        R: Default,
        A: Fn(&mut redis::Pipeline, &[T]) -> usize,
        P: Fn(Vec<redis::Value>, &[T]) -> std::result::Result<Vec<R>, RedisError>,
        F: Fn(ClusterConnection, Vec<T>) -> Fut,
        Fut: Future<Output = std::result::Result<Vec<R>, RedisError>>,
    {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let shards = self.groups().await?;
        let deadline = Instant::now() + self.options.command_timeout;
        let groups = by_slot(items, &key);
        let mut pieces = Vec::new();
        for (group, (_, slot_items)) in groups.iter().enumerate() {
            let slot = slot_of(slot_items, &key);
            for items in chunks(slot_items, bytes) {
                pieces.push(Piece { group, slot, items });
            }
        }
        let node = NodeSend {
            command,
            add: &add,
            parse: &parse,
            send: &send,
            deadline,
        };
        let sends = node_pipelines(pieces, |slot| shards.of_slot(slot), bytes)
            .into_iter()
            .map(|(g, pieces)| self.on_node(&shards, g, pieces, &node));
        let mut answers: Vec<Vec<R>> = groups.iter().map(|_| Vec::new()).collect();
        // Every node to the end, even after one failed: a node's commands
        // are not abandoned half-sent (a healthy shard's stores are made
        // whatever a failed shard does); the first error is the batch's.
        for node in futures_util::future::join_all(sends).await {
            for (group, values) in node? {
                if let Some(answer) = answers.get_mut(group) {
                    answer.extend(values);
                }
            }
        }
        Ok(scatter(items.len(), &groups, answers))
    }

    /// One node's pieces: one pipeline (when there is more than one piece),
    /// then each piece it did not answer on its own. Per piece, its group and
    /// its answers.
    async fn on_node<T, R, A, P, F, Fut>(
        &self,
        shards: &Arc<Groups>,
        g: usize,
        pieces: Vec<Piece<'_, T>>,
        node: &NodeSend<'_, A, P, F>,
    ) -> Result<Vec<(usize, Vec<R>)>>
    where
        T: Copy,
        A: Fn(&mut redis::Pipeline, &[T]) -> usize,
        P: Fn(Vec<redis::Value>, &[T]) -> std::result::Result<Vec<R>, RedisError>,
        F: Fn(ClusterConnection, Vec<T>) -> Fut,
        Fut: Future<Output = std::result::Result<Vec<R>, RedisError>>,
    {
        let piped = if pieces.len() > 1 {
            self.pipeline(shards, g, &pieces, node).await?
        } else {
            pieces.iter().map(|_| None).collect()
        };
        let each = pieces.iter().zip(piped).map(|(piece, piped)| async move {
            let answers = match piped {
                Some(answers) => answers,
                None => {
                    self.run_until(shards, node.command, piece.slot, node.deadline, |c| {
                        (node.send)(c, piece.items.to_vec())
                    })
                    .await?
                }
            };
            Ok::<_, Error>((piece.group, answers))
        });
        try_join_all(each).await
    }

    /// The pipeline of [`on_node`](Self::on_node), routed to the primary of
    /// its first slot: per piece, its answers, or `None` when its reply was
    /// an error or the pipeline was not answered: those go on their own. A
    /// node that does not answer by the deadline is a timeout, as in
    /// [`run`](Self::run).
    async fn pipeline<T, R, A, P, F>(
        &self,
        shards: &Arc<Groups>,
        g: usize,
        pieces: &[Piece<'_, T>],
        node: &NodeSend<'_, A, P, F>,
    ) -> Result<Vec<Option<Vec<R>>>>
    where
        A: Fn(&mut redis::Pipeline, &[T]) -> usize,
        P: Fn(Vec<redis::Value>, &[T]) -> std::result::Result<Vec<R>, RedisError>,
    {
        let unanswered = || pieces.iter().map(|_| None).collect();
        let group = shards.group(g);
        let replaced = group.replaced();
        let mut pipe = redis::Pipeline::with_capacity(pieces.len());
        let counts: Vec<usize> = pieces
            .iter()
            .map(|p| (node.add)(&mut pipe, p.items))
            .collect();
        let total: usize = counts.iter().sum();
        let route = SingleNodeRoutingInfo::SpecificNode(Route::new(
            pieces.first().map_or(0, |p| p.slot),
            SlotAddr::Master,
        ));
        let mut conn = group.connection();
        let left = node.deadline.saturating_duration_since(Instant::now());
        let sent = tokio::select! {
            sent = tokio::time::timeout(
                left + Duration::from_millis(50),
                conn.route_pipeline(pipe, 0, total, route),
            ) => sent,
            // The node's primary failed over while this waited on it.
            () = replaced => return Ok(unanswered()),
        };
        let timed_out = || {
            shards.suspect(g);
            Error::CommandTimeout {
                command: node.command,
                server: self.server.clone(),
                timeout: self.options.command_timeout,
            }
        };
        let replies = match sent {
            Ok(Ok(replies)) if replies.len() == total => replies,
            Ok(Err(e)) if e.is_timeout() => return Err(timed_out()),
            Err(_) => return Err(timed_out()),
            // Not answered (redis-rs, after its retries of the whole
            // pipeline, returns the first redirection or busy reply), or
            // answered short: each piece on its own.
            Ok(Err(e)) => {
                self.note_moved(shards, &e);
                return Ok(unanswered());
            }
            Ok(Ok(_)) => return Ok(unanswered()),
        };
        let mut replies = replies.into_iter();
        let mut answers = Vec::with_capacity(pieces.len());
        for (&n, piece) in counts.iter().zip(pieces) {
            let own: Vec<redis::Value> = replies.by_ref().take(n).collect();
            match (node.parse)(own, piece.items) {
                Ok(answer) => answers.push(Some(answer)),
                Err(e) if send_alone(&e) => {
                    self.note_moved(shards, &e);
                    answers.push(None);
                }
                // Refused for good (NOPERM, OOM, WRONGTYPE...): sending it
                // again would be refused again.
                Err(e) => return Err(self.redis_error(e)),
            }
        }
        Ok(answers)
    }

    /// A `MOVED` reply (a slot's, or the pipeline's after redis-rs's
    /// retries) regroups the slots by their primaries now
    /// ([`Groups::regroup`]), so the next batches group them right.
    fn note_moved(&self, shards: &Arc<Groups>, e: &RedisError) {
        if e.code() == Some("MOVED") {
            shards.regroup();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_pipelines_group_slots_by_shard_and_bound_keys() {
        let keys: Vec<&str> = (0..MAX_KEYS_PER_COMMAND).map(|_| "k").collect();
        let piece = |group, slot, n: usize| Piece {
            group,
            slot,
            items: &keys[..n],
        };
        // Slots 0-2 on shard 0, 3-5 on shard 1.
        let shard_of = |slot: u16| usize::from(slot >= 3);
        let pieces = vec![
            piece(0, 0, 10),
            piece(1, 3, 20),
            piece(2, 1, 300),
            piece(3, 4, 5),
            // Shard 0 is at 310 keys: this one opens its second pipeline.
            piece(4, 2, 200),
            piece(4, 2, 100),
        ];
        let got = node_pipelines(pieces, shard_of, |_| 0);
        let shape: Vec<(usize, Vec<usize>)> = got
            .iter()
            .map(|(shard, ps)| (*shard, ps.iter().map(|p| p.group).collect()))
            .collect();
        assert_eq!(
            shape,
            vec![(0, vec![0, 2]), (1, vec![1, 3]), (0, vec![4, 4])],
            "{got:?}"
        );
        for (_, ps) in &got {
            let keys: usize = ps.iter().map(|p| p.items.len()).sum();
            assert!(keys <= MAX_KEYS_PER_PIPELINE, "{keys}");
        }
        // Order within a slot group is kept: 200 then 100.
        assert_eq!(got[2].1[0].items.len(), 200);
        assert_eq!(got[2].1[1].items.len(), 100);
        assert!(node_pipelines(Vec::<Piece<'_, &str>>::new(), shard_of, |_| 0).is_empty());
        // By bytes: three 2 MiB values on one shard make two pipelines.
        let big = vec![0u8; 2 * 1024 * 1024];
        let values: Vec<&[u8]> = vec![&big; 3];
        let pieces = (0..3)
            .map(|i| Piece {
                group: i,
                slot: 0,
                items: &values[i..=i],
            })
            .collect();
        let got = node_pipelines(pieces, shard_of, |v: &&[u8]| v.len());
        let groups: Vec<Vec<usize>> = got
            .iter()
            .map(|(_, ps)| ps.iter().map(|p| p.group).collect())
            .collect();
        assert_eq!(groups, vec![vec![0, 1], vec![2]]);
    }
}
