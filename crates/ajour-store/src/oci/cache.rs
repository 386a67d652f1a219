//! Blobs by digest, shared by every image and device, bounded by total bytes.
//!
//! A digest names its content, so a cached blob never goes stale; it only leaves when the cache
//! is over its byte budget, least recently used first. Loads are single-flight: callers asking
//! for a digest that is being loaded wait for that load instead of asking the registry again, so
//! the registry sees one request per digest however many devices need it.

use bytes::Bytes;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use tokio::sync::OnceCell;

pub struct BlobCache {
    max_bytes: u64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    slots: HashMap<String, Slot>,
    /// Bytes of the loaded blobs in `slots`.
    bytes: u64,
    /// Advances on every use; a slot's `last_used` orders eviction.
    clock: u64,
}

struct Slot {
    cell: Arc<OnceCell<Bytes>>,
    last_used: u64,
}

impl BlobCache {
    pub fn new(max_bytes: u64) -> Self {
        Self {
            max_bytes,
            state: Mutex::default(),
        }
    }

    /// The blob `digest`, from the cache or from `load` (run by one caller at a time per digest;
    /// a failed load is not kept, the next caller tries again).
    pub async fn get_or_load<F, Fut, E>(&self, digest: &str, load: F) -> Result<Bytes, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Bytes, E>>,
    {
        let cell = {
            let mut state = self.state.lock().unwrap();
            state.clock += 1;
            let now = state.clock;
            let slot = state.slots.entry(digest.to_string()).or_insert_with(|| Slot {
                cell: Arc::default(),
                last_used: now,
            });
            slot.last_used = now;
            slot.cell.clone()
        };
        if let Some(bytes) = cell.get() {
            return Ok(bytes.clone());
        }
        let mut loaded_here = false;
        let result = cell
            .get_or_try_init(|| {
                loaded_here = true;
                load()
            })
            .await
            .cloned();
        match &result {
            Ok(bytes) if loaded_here => self.admit(digest, &cell, bytes.len() as u64),
            Err(_) => self.forget_unloaded(digest, &cell),
            Ok(_) => {}
        }
        result
    }

    /// `(blobs, bytes)` held now.
    pub fn usage(&self) -> (usize, u64) {
        let state = self.state.lock().unwrap();
        let loaded = state.slots.values().filter(|s| s.cell.initialized()).count();
        (loaded, state.bytes)
    }

    fn admit(&self, digest: &str, cell: &Arc<OnceCell<Bytes>>, len: u64) {
        let mut state = self.state.lock().unwrap();
        self.admit_locked(&mut state, digest, cell, len);
        // `ajour_oci_blob_cache_bytes`: bytes held (of all OCI stores in the process).
        metrics::gauge!("ajour_oci_blob_cache_bytes").set(state.bytes as f64);
    }

    fn admit_locked(&self, state: &mut State, digest: &str, cell: &Arc<OnceCell<Bytes>>, len: u64) {
        let now = state.clock;
        match state.slots.get(digest) {
            Some(slot) if Arc::ptr_eq(&slot.cell, cell) => {}
            // Dropped by a failed load meanwhile: keep this one.
            None => {
                state.slots.insert(
                    digest.to_string(),
                    Slot {
                        cell: cell.clone(),
                        last_used: now,
                    },
                );
            }
            Some(_) => return,
        }
        state.bytes += len;
        if len > self.max_bytes {
            // Larger than the whole budget: served to this caller, not kept.
            tracing::warn!(
                digest,
                len,
                max = self.max_bytes,
                "blob larger than the OCI cache; not cached"
            );
            state.slots.remove(digest);
            state.bytes -= len;
            return;
        }
        while state.bytes > self.max_bytes {
            let victim = state
                .slots
                .iter()
                .filter(|(d, s)| d.as_str() != digest && s.cell.initialized())
                .min_by_key(|(_, s)| s.last_used)
                .map(|(d, _)| d.clone());
            let Some(victim) = victim else { break };
            if let Some(slot) = state.slots.remove(&victim) {
                let freed = slot.cell.get().map(|b| b.len() as u64).unwrap_or(0);
                state.bytes -= freed;
                tracing::debug!(digest = victim, freed, "blob evicted from the OCI cache");
            }
        }
    }

    fn forget_unloaded(&self, digest: &str, cell: &Arc<OnceCell<Bytes>>) {
        let mut state = self.state.lock().unwrap();
        if let Some(slot) = state.slots.get(digest) {
            if Arc::ptr_eq(&slot.cell, cell) && !slot.cell.initialized() {
                state.slots.remove(digest);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn concurrent_callers_share_one_load() {
        let cache = Arc::new(BlobCache::new(1 << 20));
        let loads = Arc::new(AtomicUsize::new(0));
        let (release, released) = tokio::sync::watch::channel(false);
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let (cache, loads, mut released) = (cache.clone(), loads.clone(), released.clone());
                tokio::spawn(async move {
                    cache
                        .get_or_load("sha256:a", || async move {
                            loads.fetch_add(1, Ordering::SeqCst);
                            let _ = released.wait_for(|r| *r).await;
                            Ok::<_, ()>(Bytes::from_static(b"blob"))
                        })
                        .await
                })
            })
            .collect();
        // Let every task start and block: one in the load, the others waiting for it.
        for _ in 0..5 {
            tokio::task::yield_now().await;
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        release.send(true).unwrap();
        for task in tasks {
            assert_eq!(task.await.unwrap().unwrap(), Bytes::from_static(b"blob"));
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        assert_eq!(cache.usage(), (1, 4));
    }

    #[tokio::test]
    async fn failures_are_not_kept_and_the_budget_evicts_least_recently_used() {
        let cache = BlobCache::new(10);
        let failed = cache
            .get_or_load("sha256:a", || async { Err::<Bytes, _>("down") })
            .await;
        assert_eq!(failed, Err("down"));
        assert_eq!(cache.usage(), (0, 0));
        let load = |data: &'static [u8]| move || async move { Ok::<_, ()>(Bytes::from_static(data)) };
        cache.get_or_load("sha256:a", load(b"aaaa")).await.unwrap();
        cache.get_or_load("sha256:b", load(b"bbbb")).await.unwrap();
        // Touch a: b is now the least recently used.
        cache.get_or_load("sha256:a", load(b"xxxx")).await.unwrap();
        cache.get_or_load("sha256:c", load(b"cccc")).await.unwrap();
        assert_eq!(cache.usage(), (2, 8));
        let reloaded = AtomicUsize::new(0);
        cache
            .get_or_load("sha256:b", || async {
                reloaded.fetch_add(1, Ordering::SeqCst);
                Ok::<_, ()>(Bytes::from_static(b"bbbb"))
            })
            .await
            .unwrap();
        assert_eq!(reloaded.load(Ordering::SeqCst), 1, "b was evicted");
        // Larger than the whole budget: served, not kept.
        let big = cache
            .get_or_load("sha256:big", load(b"0123456789abc"))
            .await
            .unwrap();
        assert_eq!(big.len(), 13);
        assert!(cache.usage().1 <= 10);
    }
}
