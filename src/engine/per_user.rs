//! `overlord.max_pending_per_user`: how many unfinished requests one user may
//! hold in one formation. The requests this process accepted or runs are
//! tracked per (formation, user); a new one is admitted under the same lock
//! that counts them, so concurrent submits cannot overshoot the cap. Only
//! formations with a cap are tracked, so what is held is bounded by the caps
//! (a cap set by a reload counts the requests accepted from then on).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

#[derive(Default)]
pub struct PerUser {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// (formation, user) -> ids of their unfinished requests here.
    held: HashMap<(String, String), HashSet<String>>,
    /// id -> its (formation, user).
    owner: HashMap<String, (String, String)>,
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
        inner.owner.insert(id.to_string(), key);
        Ok(())
    }

    /// Stops counting request `id` (it ended here, or never started).
    pub fn release(&self, id: &str) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let Some(key) = inner.owner.remove(id) else { return };
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
}
