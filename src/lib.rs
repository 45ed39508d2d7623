//! muxi-rt: a runtime for MUXI agent formations.
//!
//! The path of one request (see `docs/architecture.md`):
//! `api` (keys, parsing, envelope) -> `registry` (formation id -> live snapshot)
//! -> `overlord` (sync or async?) -> `store` (persist before answering)
//! -> `engine` (workers, timeouts, retries, cancel) -> `agents` (the work)
//! -> `store` (progress, result) -> `webhooks` (signed delivery from an outbox).

pub mod agents;
pub mod allocator;
pub mod api;
pub mod cli;
pub mod console;
pub mod data_lock;
pub mod engine;
pub mod error;
pub mod formation;
pub mod http_server;
pub mod keys;
pub mod mcp;
pub mod observability;
pub mod overlord;
pub mod registry;
pub mod server;
pub mod store;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod time;
pub mod triggers;
pub mod webhooks;
