//! Webhooks: telling a caller that its async request ended.
//!
//! When a request with a webhook URL ends, the store writes an outbox row in the
//! same transaction ([`crate::store::Store::finish`]); the [`Dispatcher`] sends it,
//! retrying with backoff, until it is delivered or given up on.
//!
//! - [`payload`]: the JSON body, with both the MUXI SDK's and the MUXI docs' keys.
//! - [`sign`]: `X-Muxi-Signature` and Standard Webhooks signatures over the exact bytes sent.
//! - [`target`]: which URLs may be called at all (no loopback, private, metadata, ...),
//!   and the DNS-rebinding-safe resolver the HTTP client uses.
//! - [`deliver`]: one attempt, and what its outcome means.
//! - [`dispatcher`]: the outbox loop.
//!
//! Secrets are never logged, and URLs only by host (their paths and queries often
//! carry tokens).

pub mod deliver;
pub mod dispatcher;
pub mod payload;
pub mod sign;
pub mod target;

pub use deliver::{attempt, webhook_client, AttemptResult};
pub use dispatcher::{Dispatcher, FormationLookup};
pub use payload::completion_payload;
pub use target::check_target;
