//! A short-lived cache of API-key lookups, so a busy chat edge does not query the database on
//! every request. Only keys that exist are cached (garbage keys cannot grow it); revocation by
//! another pod takes effect within the TTL of the read, by this pod at once (its writes clear
//! the cache, and a lookup that read before such a write caches nothing). A check repeated on a
//! period (an open stream's) takes a lookup only as old as the TTL less that period, so it too
//! ends within the TTL of a change made on another pod.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::models::ApiKeyGrant;

/// Entries kept at most; reaching it empties the cache (it refills from the database).
const MAX_ENTRIES: usize = 10_000;

/// What the database said about one key, re-judged against the clock on every use.
#[derive(Debug, Clone)]
pub(super) struct CachedKey {
    pub(super) grant: ApiKeyGrant,
    pub(super) enabled: bool,
    pub(super) expires_at_ms: Option<i64>,
}

/// Taken before a database lookup and handed to [`AuthCache::put`]: the lookup's row is kept
/// only if no write cleared the cache since, and it ages from when the read began.
#[derive(Debug, Clone, Copy)]
pub(super) struct Ticket {
    generation: u64,
    at: Instant,
}

#[derive(Debug, Default)]
struct Entries {
    /// Keyed by the key's SHA-256 (the raw key is never kept).
    keys: HashMap<String, (CachedKey, Instant)>,
    /// Bumped by every clear.
    generation: u64,
}

#[derive(Debug)]
pub(super) struct AuthCache {
    ttl: Duration,
    entries: Mutex<Entries>,
}

impl AuthCache {
    pub(super) fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Mutex::new(Entries::default()),
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The lookup of `hash` if it is younger than the TTL and than `max_age` (a check repeated
    /// on a period bounds it, so that the period plus the age of what it is told stays within
    /// the TTL).
    pub(super) fn get(&self, hash: &str, max_age: Duration) -> Option<CachedKey> {
        let max_age = self.ttl.min(max_age);
        if max_age.is_zero() {
            return None;
        }
        let entries = self.entries();
        let (key, at) = entries.keys.get(hash)?;
        (at.elapsed() < max_age).then(|| key.clone())
    }

    /// Before the database read whose row goes to [`Self::put`].
    pub(super) fn ticket(&self) -> Ticket {
        Ticket {
            generation: self.entries().generation,
            at: Instant::now(),
        }
    }

    /// Keeps a row read under `ticket`, unless a write cleared the cache since (the row may
    /// predate that write: a key disabled meanwhile would be accepted again for a TTL).
    pub(super) fn put(&self, hash: String, key: CachedKey, ticket: Ticket) {
        if self.ttl.is_zero() {
            return;
        }
        let mut entries = self.entries();
        if entries.generation != ticket.generation {
            return;
        }
        if entries.keys.len() >= MAX_ENTRIES {
            entries.keys.clear();
        }
        entries.keys.insert(hash, (key, ticket.at));
    }

    /// After a write to API keys or tenants in this process.
    pub(super) fn clear(&self) {
        let mut entries = self.entries();
        entries.keys.clear();
        entries.generation = entries.generation.wrapping_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> CachedKey {
        CachedKey {
            grant: ApiKeyGrant {
                tenant_id: "t".into(),
                key_id: "k".into(),
                permissions: Vec::new(),
            },
            enabled: true,
            expires_at_ms: None,
        }
    }

    #[test]
    fn entries_live_for_the_ttl_and_clear_empties() {
        let cache = AuthCache::new(Duration::from_millis(50));
        cache.put("h".into(), key(), cache.ticket());
        assert_eq!(
            cache.get("h", Duration::MAX).map(|k| k.grant.key_id),
            Some("k".into())
        );
        assert!(cache.get("other", Duration::MAX).is_none());
        cache.clear();
        assert!(cache.get("h", Duration::MAX).is_none());
        cache.put("h".into(), key(), cache.ticket());
        std::thread::sleep(Duration::from_millis(60));
        assert!(
            cache.get("h", Duration::MAX).is_none(),
            "stale after the ttl"
        );
    }

    /// A lookup that read the row before an admin write (a key disabled meanwhile) must not put
    /// the old row back after the write cleared the cache.
    #[test]
    fn a_read_older_than_a_clear_is_not_kept() {
        let cache = AuthCache::new(Duration::from_secs(60));
        let before = cache.ticket();
        cache.clear();
        cache.put("h".into(), key(), before);
        assert!(
            cache.get("h", Duration::MAX).is_none(),
            "the row read before the clear"
        );
        cache.put("h".into(), key(), cache.ticket());
        assert!(
            cache.get("h", Duration::MAX).is_some(),
            "a read after the clear is kept"
        );
    }

    /// An entry ages from when its read began, not from when the read came back.
    #[test]
    fn an_entry_ages_from_its_read() {
        let cache = AuthCache::new(Duration::from_millis(50));
        let read = cache.ticket();
        std::thread::sleep(Duration::from_millis(60));
        cache.put("h".into(), key(), read);
        assert!(
            cache.get("h", Duration::MAX).is_none(),
            "older than the ttl when it came back"
        );
    }

    /// A check that bounds the age it accepts reads the key again sooner than the TTL.
    #[test]
    fn a_bounded_get_refuses_an_older_entry() {
        let cache = AuthCache::new(Duration::from_secs(60));
        cache.put("h".into(), key(), cache.ticket());
        std::thread::sleep(Duration::from_millis(30));
        assert!(cache.get("h", Duration::from_millis(20)).is_none());
        assert!(cache.get("h", Duration::ZERO).is_none());
        assert!(cache.get("h", Duration::from_secs(1)).is_some());
    }

    #[test]
    fn a_zero_ttl_caches_nothing() {
        let cache = AuthCache::new(Duration::ZERO);
        cache.put("h".into(), key(), cache.ticket());
        assert!(cache.get("h", Duration::MAX).is_none());
    }

    #[test]
    fn the_size_is_bounded() {
        let cache = AuthCache::new(Duration::from_secs(60));
        for i in 0..=MAX_ENTRIES {
            cache.put(format!("h{i}"), key(), cache.ticket());
        }
        assert!(cache.entries().keys.len() <= MAX_ENTRIES);
        assert!(cache
            .get(&format!("h{MAX_ENTRIES}"), Duration::MAX)
            .is_some());
    }
}
