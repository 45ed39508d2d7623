//! Per-formation policy, as pure functions: whether to answer sync or async
//! ([`decide`]), how long a request will take ([`estimate`]) and how long to wait
//! before retrying it ([`backoff`]).

pub mod backoff;
pub mod decide;
pub mod estimate;
