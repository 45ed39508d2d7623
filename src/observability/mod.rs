//! What an operator watches: Prometheus metrics ([`metrics`], served by
//! [`endpoint`], HTTP ones recorded by [`http`]) and logs ([`logs`]).

pub mod endpoint;
pub mod http;
pub mod logs;
pub mod metrics;
