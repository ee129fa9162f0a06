//!
//! How locked-cache works, how to deploy and configure it, what it guarantees,
//! how it fails and what it costs. Each chapter is a Markdown file in
//! `src/guide/`, rendered here by `cargo doc` (and readable as it is in the
//! repository); its Rust examples are doctests.
//!
//! Read in this order, or jump to the one you need:
//!
//! 1. [How it works](crate::guide::how_it_works): one call followed from the
//!    cache to the Redis command, the stored format, connections.
//! 2. [Around an expiry](crate::guide::around_an_expiry): stale-while-revalidate,
//!    fail-safe, early refresh, negative caching, jitter, timeouts, detached
//!    loads ([`CallOptions`](crate::CallOptions)).
//! 3. [Caching bytes](crate::guide::caching_bytes): blobs and byte fields
//!    without a byte-by-byte decode.
//! 4. [Near cache](crate::guide::near_cache): decoded values kept in process,
//!    and its staleness bound.
//! 5. [Tags and clear](crate::guide::tags_and_clear): invalidating groups of
//!    entries, or a whole cache, in every process; Redis memory per key.
//! 6. [Deployments](crate::guide::deployments): one server, Redlock masters, a
//!    value server, Redis Cluster, managed offerings, the key layout.
//! 7. [Configuration](crate::guide::configuration): every builder option, its
//!    default and what changing it trades; eviction policies.
//! 8. [TLS and ACL users](crate::guide::tls_and_acl): `rediss://`, private CAs,
//!    client certificates, the ACL rules the cache needs.
//! 9. [In a web service](crate::guide::web_service): the axum example, and what
//!    to choose for a request path.
//! 10. [Observability](crate::guide::observability): outcomes, spans and their
//!    fields, metrics, counters.
//! 11. [Locks](crate::guide::locks): the lock toolkit on its own (exclusive,
//!     reader-writer, semaphore, run once, multi-key), fencing tokens,
//!     inspection.
//! 12. [Guarantees](crate::guide::guarantees): what locked-cache promises, and
//!     what it cannot.
//! 13. [Failure modes](crate::guide::failure_modes): every fault tested, what
//!     happens, and the test.
//! 14. [Performance](crate::guide::performance): every benchmark table, with its
//!     command and date.
//! 15. [Development](crate::guide::development): the test suites, valkey, CI,
//!     the workspace.

// Links in the guide are full paths (`crate::guide::<chapter>`, `crate::<Item>`):
// a chapter's `#[doc]` is an outer attribute, so rustdoc resolves its links
// from this module rather than from the chapter, and bare chapter names in
// this module's own docs did not resolve either (they follow the outer doc of
// `pub mod guide;` in lib.rs).

#[doc = include_str!("how_it_works.md")]
pub mod how_it_works {}

#[doc = include_str!("around_an_expiry.md")]
pub mod around_an_expiry {}

#[doc = include_str!("caching_bytes.md")]
pub mod caching_bytes {}

#[doc = include_str!("many_keys.md")]
pub mod many_keys {}

#[doc = include_str!("near_cache.md")]
pub mod near_cache {}

#[doc = include_str!("tags_and_clear.md")]
pub mod tags_and_clear {}

#[doc = include_str!("deployments.md")]
pub mod deployments {}

#[doc = include_str!("configuration.md")]
pub mod configuration {}

#[doc = include_str!("tls_and_acl.md")]
pub mod tls_and_acl {}

#[doc = include_str!("web_service.md")]
pub mod web_service {}

#[doc = include_str!("observability.md")]
pub mod observability {}

#[doc = include_str!("locks.md")]
pub mod locks {}

#[doc = include_str!("guarantees.md")]
pub mod guarantees {}

#[doc = include_str!("failure_modes.md")]
pub mod failure_modes {}

#[doc = include_str!("performance.md")]
pub mod performance {}

#[doc = include_str!("development.md")]
pub mod development {}
