//! The cache shape every firmware source shares: per key (a firmware name, an image reference),
//! the outcome of the last load and when it was checked. A source decides when an outcome is
//! fresh (its own re-check rule) and how to load; this holds the outcomes and makes loads of one
//! key single-flight, so a thousand devices asking at once cause one load.
//!
//! Public so that sources in other crates (`ajour-hawkbit`) cache the same way.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, RwLock};
use std::time::Instant;
use tokio::sync::{Mutex, OwnedMutexGuard};

/// An outcome of a load, and when it was made.
#[derive(Clone)]
pub struct Checked<V> {
    pub value: V,
    pub checked_at: Instant,
}

/// One key's outcome, and the lock its loads take.
pub struct Slot<V> {
    checked: RwLock<Option<Checked<V>>>,
    loading: Arc<Mutex<()>>,
}

impl<V> Default for Slot<V> {
    fn default() -> Self {
        Self {
            checked: RwLock::default(),
            loading: Arc::default(),
        }
    }
}

impl<V: Clone> Slot<V> {
    /// The last outcome, fresh or not.
    pub fn last(&self) -> Option<Checked<V>> {
        self.checked.read().unwrap().clone()
    }

    /// The last outcome, when `is_fresh` says it still holds.
    pub fn fresh(&self, is_fresh: impl FnOnce(&Checked<V>) -> bool) -> Option<V> {
        let checked = self.checked.read().unwrap();
        checked
            .as_ref()
            .filter(|checked| is_fresh(checked))
            .map(|checked| checked.value.clone())
    }

    /// Wait for the right to load this key. Whoever holds it may [`Self::store`]; callers that
    /// waited should look at [`Self::fresh`] again before loading themselves.
    pub async fn lock_loading(&self) -> OwnedMutexGuard<()> {
        self.loading.clone().lock_owned().await
    }

    /// The right to load, if nobody is loading now (a background re-check).
    pub fn try_lock_loading(&self) -> Option<OwnedMutexGuard<()>> {
        self.loading.clone().try_lock_owned().ok()
    }

    /// Remember `value` as checked now.
    pub fn store(&self, value: V) {
        *self.checked.write().unwrap() = Some(Checked {
            value,
            checked_at: Instant::now(),
        });
    }
}

/// The slots of all keys asked for so far.
pub struct CheckedCache<K, V> {
    slots: RwLock<HashMap<K, Arc<Slot<V>>>>,
}

impl<K, V> Default for CheckedCache<K, V> {
    fn default() -> Self {
        Self {
            slots: RwLock::default(),
        }
    }
}

impl<K: Eq + Hash + Clone, V> CheckedCache<K, V> {
    pub fn slot(&self, key: &K) -> Arc<Slot<V>> {
        if let Some(slot) = self.slots.read().unwrap().get(key) {
            return slot.clone();
        }
        self.slots
            .write()
            .unwrap()
            .entry(key.clone())
            .or_default()
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn loads_of_one_key_are_single_flight() {
        let cache: Arc<CheckedCache<&str, u32>> = Arc::default();
        let loads = Arc::new(AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..32 {
            let (cache, loads) = (cache.clone(), loads.clone());
            tasks.spawn(async move {
                let slot = cache.slot(&"fw");
                if let Some(value) = slot.fresh(|_| true) {
                    return value;
                }
                let _loading = slot.lock_loading().await;
                if let Some(value) = slot.fresh(|_| true) {
                    return value;
                }
                loads.fetch_add(1, Ordering::SeqCst);
                tokio::task::yield_now().await;
                slot.store(7);
                7
            });
        }
        while let Some(value) = tasks.join_next().await {
            assert_eq!(value.unwrap(), 7);
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        // A stale outcome is not fresh, but still there.
        let slot = cache.slot(&"fw");
        assert_eq!(slot.fresh(|_| false), None);
        assert_eq!(slot.last().map(|c| c.value), Some(7));
    }
}
