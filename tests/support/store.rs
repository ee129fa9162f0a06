//! A [`Store`] that reports every operation to a hook after it answered: for
//! counting commands (the stampede bench) or for running test code at an exact
//! point between two operations (the lost-wake-up test).

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use locked_cache::{Publish, Result, SharedStore, Store, Stored};
use tokio::sync::mpsc;

/// The operations of the [`Store`] trait, in a fixed order ([`Op::index`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Get,
    Set,
    Delete,
    SetNx,
    Release,
    Extend,
    GetOrFence,
    SetFenced,
    Subscribe,
    Publish,
}

impl Op {
    /// Every operation, in index order.
    pub const ALL: [Op; 10] = [
        Op::Get,
        Op::Set,
        Op::Delete,
        Op::SetNx,
        Op::Release,
        Op::Extend,
        Op::GetOrFence,
        Op::SetFenced,
        Op::Subscribe,
        Op::Publish,
    ];

    /// Position in [`Op::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The trait method's name.
    pub const fn name(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::Set => "set",
            Op::Delete => "delete",
            Op::SetNx => "set_nx",
            Op::Release => "release",
            Op::Extend => "extend",
            Op::GetOrFence => "get_or_fence",
            Op::SetFenced => "set_fenced",
            Op::Subscribe => "subscribe",
            Op::Publish => "publish",
        }
    }
}

/// Called after each operation, in the caller's task; the operation's answer
/// is returned once the hook's future completes.
pub type Hook = Arc<dyn Fn(Op) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// Wraps a store and calls a [`Hook`] after each of its operations.
pub struct Observed {
    inner: SharedStore,
    hook: Hook,
}

impl Observed {
    pub fn new(inner: SharedStore, hook: Hook) -> Observed {
        Observed { inner, hook }
    }

    async fn after<T>(&self, op: Op, answer: T) -> T {
        (self.hook)(op).await;
        answer
    }
}

impl fmt::Debug for Observed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Observed")
            .field("inner", &self.inner)
            .finish()
    }
}

#[async_trait]
impl Store for Observed {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.after(Op::Get, self.inner.get(key).await).await
    }

    async fn get_with_ttl(&self, key: &str) -> Result<Option<Stored>> {
        self.after(Op::Get, self.inner.get_with_ttl(key).await)
            .await
    }

    async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> Result<()> {
        self.after(Op::Set, self.inner.set(key, value, ttl).await)
            .await
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        self.after(Op::Delete, self.inner.delete(key).await).await
    }

    async fn set_nx(&self, key: &str, token: &[u8], expiry: Duration) -> Result<bool> {
        let answer = self.inner.set_nx(key, token, expiry).await;
        self.after(Op::SetNx, answer).await
    }

    async fn release(&self, key: &str, token: &[u8], channel: Option<&str>) -> Result<bool> {
        let answer = self.inner.release(key, token, channel).await;
        self.after(Op::Release, answer).await
    }

    async fn extend(&self, key: &str, token: &[u8], expiry: Duration) -> Result<bool> {
        let answer = self.inner.extend(key, token, expiry).await;
        self.after(Op::Extend, answer).await
    }

    async fn get_or_fence(
        &self,
        key: &str,
        fence_key: &str,
        token: &[u8],
        fence_expiry: Duration,
    ) -> Result<Option<Stored>> {
        let answer = self
            .inner
            .get_or_fence(key, fence_key, token, fence_expiry)
            .await;
        self.after(Op::GetOrFence, answer).await
    }

    async fn set_fenced(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
        fence_key: &str,
        token: &[u8],
        publish: Option<Publish<'_>>,
    ) -> Result<bool> {
        let answer = self
            .inner
            .set_fenced(key, value, ttl, fence_key, token, publish)
            .await;
        self.after(Op::SetFenced, answer).await
    }

    async fn subscribe(&self, channel: &str) -> Result<mpsc::Receiver<Vec<u8>>> {
        let answer = self.inner.subscribe(channel).await;
        self.after(Op::Subscribe, answer).await
    }

    async fn publish(&self, channel: &str, payload: &str) -> Result<()> {
        let answer = self.inner.publish(channel, payload).await;
        self.after(Op::Publish, answer).await
    }

    async fn ping(&self) -> Result<()> {
        self.inner.ping().await
    }

    fn server(&self) -> &str {
        self.inner.server()
    }
}
