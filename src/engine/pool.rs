//! A formation's worker pool: at most N requests run at once; the rest wait, in
//! the order they came (tokio's semaphore is fair).
//!
//! The pool also counts the requests this process has taken on for the
//! formation (running, or waiting here for a slot), so the sweeper takes
//! queued requests out of the store only as slots can be had: a long queue
//! stays in the store, not in memory.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub struct Pool {
    slots: Arc<Semaphore>,
    size: Mutex<usize>,
    /// Requests taken on here: see [`Pool::take_on`].
    taken: Arc<AtomicUsize>,
}

/// One request taken on by a pool; counted until dropped.
pub struct TakenOn(Arc<AtomicUsize>);

impl Drop for TakenOn {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pool {
    pub fn new(size: usize) -> Pool {
        Pool { slots: Arc::new(Semaphore::new(size)), size: Mutex::new(size), taken: Arc::default() }
    }

    /// Counts a request as taken on until the returned guard drops.
    pub fn take_on(&self) -> TakenOn {
        self.taken.fetch_add(1, Ordering::Relaxed);
        TakenOn(self.taken.clone())
    }

    /// How many more requests it can take on before one would wait for a slot.
    pub fn room(&self) -> usize {
        let size = *self.size.lock().unwrap_or_else(|e| e.into_inner());
        size.saturating_sub(self.taken.load(Ordering::Relaxed))
    }

    /// Waits for a free slot; the slot is freed when the permit drops.
    pub async fn acquire(&self) -> OwnedSemaphorePermit {
        self.slots.clone().acquire_owned().await.expect("pool semaphore is never closed")
    }

    /// Follows a changed `max_concurrent_requests` after a reload. Shrinking
    /// takes slots away as running requests give them back.
    /// Returns whether the size changed.
    pub fn resize(&self, new_size: usize) -> bool {
        let mut size = self.size.lock().unwrap_or_else(|e| e.into_inner());
        if new_size == *size {
            return false;
        }
        if new_size > *size {
            self.slots.add_permits(new_size - *size);
        } else if new_size < *size {
            let surplus = (*size - new_size) as u32;
            let slots = self.slots.clone();
            tokio::spawn(async move {
                if let Ok(permits) = slots.acquire_many_owned(surplus).await {
                    permits.forget();
                }
            });
        }
        *size = new_size;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn holds_at_most_size_slots_and_follows_resizes() {
        let pool = Pool::new(2);
        let a = pool.acquire().await;
        let _b = pool.acquire().await;
        assert_eq!(pool.slots.available_permits(), 0);
        drop(a);
        assert_eq!(pool.slots.available_permits(), 1);
        pool.resize(4);
        assert_eq!(pool.slots.available_permits(), 3);
        pool.resize(1);
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        assert_eq!(pool.slots.available_permits(), 0);
    }
}
