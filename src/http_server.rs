//! The HTTP/1.1 accept loop, in place of `axum::serve`, which exposes none of
//! hyper's connection limits: a client must finish its request headers within
//! [`read_timeout`] (else the connection is closed) and keep them under
//! [`MAX_HEADER_BYTES`] (the API answers a JSON 431 below that; hyper's bare 431
//! is the backstop at [`HYPER_MAX_HEADER_BYTES`]). Request bodies get the same
//! read timeout (see `api::body::RawBody`). Graceful shutdown: on
//! `shutdown`, stop accepting, let in-flight requests finish, close idle
//! keep-alive connections.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::Request;
use axum::response::Response;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tower::Service;

/// How long a client may take to send its request headers, or its body.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Request headers (request line included) larger than this are answered with
/// a JSON 431 `headers_too_large` by the API.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;

/// Past this, hyper itself answers 431 (without a body) and closes: the API
/// never sees such a request.
pub const HYPER_MAX_HEADER_BYTES: usize = 64 * 1024;

/// The header and body read timeout: [`DEFAULT_READ_TIMEOUT`], or
/// `MUXI_READ_TIMEOUT_SECS` (1 to 3600 seconds; other values are ignored with a
/// warning). Read once.
pub fn read_timeout() -> Duration {
    static TIMEOUT: OnceLock<Duration> = OnceLock::new();
    *TIMEOUT.get_or_init(|| {
        let Ok(text) = std::env::var("MUXI_READ_TIMEOUT_SECS") else { return DEFAULT_READ_TIMEOUT };
        match text.trim().parse::<f64>().ok().filter(|s| (1.0..=3600.0).contains(s)).and_then(crate::time::seconds) {
            Some(timeout) => timeout,
            None => {
                tracing::warn!(value = %text, "MUXI_READ_TIMEOUT_SECS must be 1 to 3600 seconds; using 30");
                DEFAULT_READ_TIMEOUT
            }
        }
    })
}

/// Serves `service` (a router, or the API's front door before one) on
/// `listener` until `shutdown` resolves, then waits for the connections to
/// finish their requests (the caller bounds that wait).
pub async fn serve<S>(
    listener: TcpListener,
    service: S,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    S: Service<Request<Incoming>, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(read_timeout()).max_header_size(HYPER_MAX_HEADER_BYTES);
    let stop = CancellationToken::new();
    // Each connection's task holds a sender; all of them gone means every
    // connection has ended (mini-redis's drop guard).
    let (open, mut all_closed) = tokio::sync::mpsc::channel::<()>(1);
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!(error = %err, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(service.clone());
        let connection = Graceful::new(builder.serve_connection(TokioIo::new(stream), service), &stop);
        let open = open.clone();
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "connection ended with an error");
            }
            drop(open);
        });
    }
    drop(listener);
    stop.cancel();
    drop(open);
    let _ = all_closed.recv().await;
    Ok(())
}

/// A connection that closes gracefully once `stop` is cancelled: a request in
/// flight is answered first, an idle keep-alive connection closes at once.
///
/// It asks to be woken by the signal on its first poll only; later polls read
/// the token's flag. hyper-util's `GracefulShutdown` polls a `watch` channel's
/// `changed()` at every wake-up of the connection, which takes the channel's
/// lock: about 340 instructions a request.
struct Graceful<C> {
    connection: Pin<Box<C>>,
    stop: CancellationToken,
    /// Holds this task's place among those woken by the signal.
    signal: Pin<Box<WaitForCancellationFutureOwned>>,
    state: Shutdown,
}

#[derive(Clone, Copy, PartialEq)]
enum Shutdown {
    /// Not polled yet: the signal does not know this task.
    Unregistered,
    /// The signal will wake this task.
    Registered,
    /// Asked to close once its request in flight is answered.
    Closing,
}

impl<C: GracefulConnection> Graceful<C> {
    fn new(connection: C, stop: &CancellationToken) -> Self {
        Graceful {
            connection: Box::pin(connection),
            stop: stop.clone(),
            signal: Box::pin(stop.clone().cancelled_owned()),
            state: Shutdown::Unregistered,
        }
    }
}

impl<C: GracefulConnection> Future for Graceful<C> {
    type Output = C::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let stopped = match this.state {
            Shutdown::Unregistered => {
                this.state = Shutdown::Registered;
                this.signal.as_mut().poll(cx).is_ready()
            }
            Shutdown::Registered => this.stop.is_cancelled(),
            Shutdown::Closing => false,
        };
        if stopped {
            this.state = Shutdown::Closing;
            this.connection.as_mut().graceful_shutdown();
        }
        this.connection.as_mut().poll(cx)
    }
}
