//! The integration suite, one test binary: each module is what used to be a
//! file of its own under `tests/` (run one with `cargo test --test suite --
//! faults_holder::`). One binary links the crate and compiles `support/` once
//! instead of two dozen times, which is most of the suite's build.
//!
//! Left out as binaries of their own: `tests/metrics.rs` and
//! `tests/telemetry.rs`, which install a process-wide recorder and subscriber.

#[path = "../support/mod.rs"]
mod support;

#[cfg(feature = "http")]
#[path = "../support/http.rs"]
mod http_fixtures;

mod acl;
mod adaptive;
mod behaviour;
mod cluster;
mod cluster_locks;
mod config;
mod credentials;
mod decode_fuzz;
mod error_shapes;
mod faults_cancel;
mod faults_connections;
mod faults_eviction;
mod faults_holder;
mod faults_input;
mod faults_loader;
mod faults_masters;
mod faults_network;
mod freshness;
mod http_layer;
mod http_rules;
mod lock;
mod lock_memory;
mod lock_rw;
mod lock_semaphore;
mod lock_toolkit;
mod many;
mod near_cache;
mod sentinel;
mod tags;
mod wakeups;
