//! Request ids: time-ordered, so that new rows append to the store's indexes.

/// A new id: `prefix`, then a UUIDv7 (RFC 9562) in 32 lowercase hex digits:
/// 48 bits of Unix milliseconds, a 12-bit counter that orders the ids made in
/// the same millisecond (the RFC's section 6.2, method 1), then 62 random
/// bits. The ids one process makes are strictly increasing, so new rows append
/// to the store's indexes instead of dirtying a random page each.
pub fn time_ordered_id(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    /// The last id's milliseconds and counter, as `ms << 12 | counter`. A
    /// counter past 4095 carries into the milliseconds: beyond 4 million ids a
    /// second, the ids' time runs ahead of the clock until the rate falls.
    static LAST: AtomicU64 = AtomicU64::new(0);
    const COUNTER_BITS: u32 = 12;
    let now = u64::try_from(crate::time::now_ms()).unwrap_or(0) << COUNTER_BITS;
    let next = |last: u64| now.max(last + 1);
    let previous = LAST.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| Some(next(last)));
    let stamp = next(previous.unwrap_or_else(|last| last));
    let (ms, counter) = (stamp >> COUNTER_BITS, stamp & 0xfff);
    let high = (ms << 16) | (0x7 << 12) | counter;
    let low = (rand::random::<u64>() >> 2) | (0b10 << 62);
    let mut id = String::with_capacity(prefix.len() + 32);
    id.push_str(prefix);
    for word in [high, low] {
        for shift in (0..16).rev() {
            id.push(char::from(b"0123456789abcdef"[((word >> (shift * 4)) & 0xf) as usize]));
        }
    }
    id
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_are_the_prefix_and_32_hex_digits_in_creation_order() {
        let ids: Vec<String> = (0..1_000).map(|_| super::time_ordered_id("req_")).collect();
        for id in &ids {
            let hex = id.strip_prefix("req_").expect("prefix");
            assert!(hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()), "{id}");
        }
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "not strictly increasing");
    }

    #[test]
    fn ids_are_uuid_v7_with_the_time_of_their_making() {
        let before = crate::time::now_ms();
        let id = super::time_ordered_id("req_");
        let after = crate::time::now_ms();
        let uuid = uuid::Uuid::parse_str(id.strip_prefix("req_").unwrap()).expect("a UUID");
        assert_eq!(uuid.get_version_num(), 7, "{id}");
        assert_eq!(uuid.get_variant(), uuid::Variant::RFC4122, "{id}");
        let (secs, nanos) = uuid.get_timestamp().expect("a v7 timestamp").to_unix();
        let ms = i64::try_from(secs * 1000 + u64::from(nanos / 1_000_000)).unwrap();
        // Other tests on other threads (`cargo test` runs them in one process)
        // may have carried the milliseconds a little ahead of the clock by
        // making more than 4,096 ids in a millisecond.
        assert!(before <= ms && ms <= after + 50, "{before} <= {ms} <= {after} + 50");
    }

    #[test]
    fn ids_made_on_many_threads_are_distinct_and_each_thread_sees_them_increase() {
        let threads: Vec<_> = (0..4)
            .map(|_| std::thread::spawn(|| (0..20_000).map(|_| super::time_ordered_id("")).collect::<Vec<_>>()))
            .collect();
        let mut all = Vec::new();
        for thread in threads {
            let ids = thread.join().unwrap();
            assert!(ids.windows(2).all(|w| w[0] < w[1]), "not increasing within a thread");
            all.extend(ids);
        }
        let made = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), made, "an id was made twice");
    }
}
