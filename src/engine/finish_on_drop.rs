//! A future that is finished even when its caller stops waiting for it.
//!
//! The caller awaits it in place, in its own task. If the caller is dropped
//! first (an HTTP client that disconnects drops its handler's future), the rest
//! of the work is spawned as a task of its own and runs to its end. The usual
//! case, a caller that waits, so costs no task, no join handle and no second
//! wake-up; a task per call did (3.6k instructions an accept, measured).

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::FutureExt;

type Work<T> = Pin<Box<dyn Future<Output = Result<T, Box<dyn Any + Send>>> + Send>>;

/// See the module's comment. Yields the work's output, or its panic's payload
/// if it panicked (as a task's join handle would).
pub(super) struct FinishOnDrop<T: Send + 'static> {
    /// `None` once the work has ended.
    work: Option<Work<T>>,
}

impl<T: Send + 'static> FinishOnDrop<T> {
    pub(super) fn new(work: impl Future<Output = T> + Send + 'static) -> Self {
        FinishOnDrop { work: Some(Box::pin(AssertUnwindSafe(work).catch_unwind())) }
    }
}

impl<T: Send + 'static> Future for FinishOnDrop<T> {
    type Output = Result<T, Box<dyn Any + Send>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(work) = self.work.as_mut() else {
            // Polled again after its end: a bug of the caller's, answered as a panic would be.
            return Poll::Ready(Err(Box::new("FinishOnDrop polled after its end")));
        };
        let out = std::task::ready!(work.as_mut().poll(cx));
        self.work = None;
        Poll::Ready(out)
    }
}

impl<T: Send + 'static> Drop for FinishOnDrop<T> {
    fn drop(&mut self) {
        if let Some(rest) = self.work.take() {
            // Outside a runtime (the runtime itself going away) nothing can run it.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(rest);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn awaited_in_place_it_yields_the_output() {
        assert_eq!(FinishOnDrop::new(async { 7 }).await.ok(), Some(7));
    }

    #[tokio::test]
    async fn dropped_midway_the_rest_still_runs() {
        let (go, gate) = tokio::sync::oneshot::channel::<()>();
        let finished = Arc::new(AtomicBool::new(false));
        let flag = finished.clone();
        let mut work = FinishOnDrop::new(async move {
            let _ = gate.await;
            flag.store(true, Ordering::SeqCst);
        });
        // Started, then abandoned while it waits.
        assert!(futures::poll!(&mut work).is_pending());
        drop(work);
        go.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), async {
            while !finished.load(Ordering::SeqCst) {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the abandoned work ran to its end");
    }

    #[tokio::test]
    async fn a_panic_is_yielded_not_propagated() {
        let out = FinishOnDrop::new(async { panic!("boom") }).await;
        let panic = out.expect_err("the panic");
        assert_eq!(panic.downcast_ref::<&str>(), Some(&"boom"));
    }
}
