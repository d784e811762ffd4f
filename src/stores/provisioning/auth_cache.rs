//! A short-lived cache of API-key lookups, so a busy chat edge does not query the database on
//! every request. Only keys that exist are cached (garbage keys cannot grow it); revocation by
//! another pod takes effect within the TTL, by this pod at once (its writes clear the cache).

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

#[derive(Debug)]
pub(super) struct AuthCache {
    ttl: Duration,
    /// Keyed by the key's SHA-256 (the raw key is never kept).
    entries: Mutex<HashMap<String, (CachedKey, Instant)>>,
}

impl AuthCache {
    pub(super) fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, (CachedKey, Instant)>> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn get(&self, hash: &str) -> Option<CachedKey> {
        if self.ttl.is_zero() {
            return None;
        }
        let entries = self.entries();
        let (key, at) = entries.get(hash)?;
        (at.elapsed() < self.ttl).then(|| key.clone())
    }

    pub(super) fn put(&self, hash: String, key: CachedKey) {
        if self.ttl.is_zero() {
            return;
        }
        let mut entries = self.entries();
        if entries.len() >= MAX_ENTRIES {
            entries.clear();
        }
        entries.insert(hash, (key, Instant::now()));
    }

    /// After a write to API keys or tenants in this process.
    pub(super) fn clear(&self) {
        self.entries().clear();
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
        cache.put("h".into(), key());
        assert_eq!(cache.get("h").map(|k| k.grant.key_id), Some("k".into()));
        assert!(cache.get("other").is_none());
        cache.clear();
        assert!(cache.get("h").is_none());
        cache.put("h".into(), key());
        std::thread::sleep(Duration::from_millis(60));
        assert!(cache.get("h").is_none(), "stale after the ttl");
    }

    #[test]
    fn a_zero_ttl_caches_nothing() {
        let cache = AuthCache::new(Duration::ZERO);
        cache.put("h".into(), key());
        assert!(cache.get("h").is_none());
    }

    #[test]
    fn the_size_is_bounded() {
        let cache = AuthCache::new(Duration::from_secs(60));
        for i in 0..=MAX_ENTRIES {
            cache.put(format!("h{i}"), key());
        }
        assert!(cache.entries().len() <= MAX_ENTRIES);
        assert!(cache.get(&format!("h{MAX_ENTRIES}")).is_some());
    }
}
