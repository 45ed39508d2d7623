//! `overlord.max_pending_per_user`: how many unfinished requests one user may
//! hold in one formation. The requests this process accepted or runs are
//! tracked per (formation, user); a new one is admitted under the same lock
//! that counts them, so concurrent submits cannot overshoot the cap. Only
//! formations with a cap are tracked, so what is held is bounded by the caps
//! (a cap set by a reload counts the requests accepted from then on).
//!
//! A request accepted here may be taken on and ended by another replica, where
//! this process does not see its end: the sweeper asks the store about the
//! [`PerUser::settled`] ones now and then, and releases those that ended.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Default)]
pub struct PerUser {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// (formation, user) -> ids of their unfinished requests here.
    held: HashMap<(String, String), HashSet<String>>,
    /// id -> its (formation, user), and when it was first counted.
    owner: HashMap<String, ((String, String), Instant)>,
}

impl PerUser {
    /// Counts request `id` for (`formation`, `user`) if it fits under `cap`
    /// (`None`: no cap); `Err(cap)` when the user is at the cap already.
    pub fn admit(&self, formation: &str, user: &str, id: &str, cap: Option<u32>) -> Result<(), u32> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let key = (formation.to_string(), user.to_string());
        let held = inner.held.entry(key.clone()).or_default();
        if !held.contains(id) {
            if let Some(cap) = cap {
                if held.len() >= cap as usize {
                    return Err(cap);
                }
            }
            held.insert(id.to_string());
        }
        inner.owner.entry(id.to_string()).or_insert((key, Instant::now()));
        Ok(())
    }

    /// Up to `limit` of the ids counted for longer than `for_at_least`, oldest
    /// first (ids are time-ordered). A younger one may not be in the store yet.
    pub fn settled(&self, for_at_least: Duration, limit: usize) -> Vec<String> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut ids: Vec<&String> =
            inner.owner.iter().filter(|(_, (_, since))| since.elapsed() >= for_at_least).map(|(id, _)| id).collect();
        if ids.len() > limit {
            ids.select_nth_unstable(limit);
            ids.truncate(limit);
        }
        ids.sort_unstable();
        ids.into_iter().cloned().collect()
    }

    /// Stops counting request `id` (it ended here, or never started).
    pub fn release(&self, id: &str) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let Some((key, _)) = inner.owner.remove(id) else { return };
        if let Some(held) = inner.held.get_mut(&key) {
            held.remove(id);
            if held.is_empty() {
                inner.held.remove(&key);
            }
        }
    }

    /// How many requests (`formation`, `user`) holds here.
    #[cfg(test)]
    pub fn count(&self, formation: &str, user: &str) -> usize {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.held.get(&(formation.to_string(), user.to_string())).map_or(0, HashSet::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_up_to_the_cap_and_frees_on_release() {
        let users = PerUser::default();
        assert_eq!(users.admit("f", "u", "r1", Some(2)), Ok(()));
        assert_eq!(users.admit("f", "u", "r2", Some(2)), Ok(()));
        assert_eq!(users.admit("f", "u", "r3", Some(2)), Err(2));
        assert_eq!(users.admit("f", "u", "r2", Some(2)), Ok(()), "one already counted is not counted twice");
        assert_eq!(users.admit("f", "v", "r4", Some(2)), Ok(()), "other users have their own count");
        assert_eq!(users.admit("g", "u", "r5", Some(2)), Ok(()), "and other formations");
        users.release("r1");
        users.release("r1");
        assert_eq!(users.count("f", "u"), 1);
        assert_eq!(users.admit("f", "u", "r3", Some(2)), Ok(()));
        assert_eq!(users.admit("f", "u", "r6", None), Ok(()), "no cap: always");
    }

    #[test]
    fn settled_ids_are_the_oldest_counted_long_enough() {
        let users = PerUser::default();
        for id in ["r3", "r1", "r2"] {
            users.admit("f", "u", id, None).unwrap();
        }
        assert!(users.settled(Duration::from_secs(60), 10).is_empty(), "none counted that long");
        assert_eq!(users.settled(Duration::ZERO, 10), ["r1", "r2", "r3"]);
        assert_eq!(users.settled(Duration::ZERO, 2), ["r1", "r2"]);
        users.release("r1");
        assert_eq!(users.settled(Duration::ZERO, 2), ["r2", "r3"]);
    }
}
