//! A formation's worker pool: at most N requests run at once; the rest wait, in
//! the order they came (tokio's semaphore is fair).

use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub struct Pool {
    slots: Arc<Semaphore>,
    size: Mutex<usize>,
}

impl Pool {
    pub fn new(size: usize) -> Pool {
        Pool { slots: Arc::new(Semaphore::new(size)), size: Mutex::new(size) }
    }

    /// Waits for a free slot; the slot is freed when the permit drops.
    pub async fn acquire(&self) -> OwnedSemaphorePermit {
        self.slots.clone().acquire_owned().await.expect("pool semaphore is never closed")
    }

    /// Follows a changed `max_concurrent_requests` after a reload. Shrinking
    /// takes slots away as running requests give them back.
    pub fn resize(&self, new_size: usize) {
        let mut size = self.size.lock().unwrap_or_else(|e| e.into_inner());
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
