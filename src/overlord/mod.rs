//! Per-formation policy, as pure functions: how long a request will take
//! ([`estimate`]) and how long to wait before retrying it ([`backoff`]).

pub mod backoff;
pub mod estimate;
