//! The semantic cache: answers a request with the stored value of an earlier,
//! similar enough one. Per-namespace (tenant) ANN lookups with a similarity
//! threshold, a TTL, and an LRU capacity.
//!
//! Snapshots (`save` / `restore`, in `file.rs`) carry the entries across a restart.
//!
//! Isolation is structural: every namespace has its own index and entry map,
//! so no lookup can ever reach another namespace's entries.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use lru::LruCache;
use parking_lot::{Mutex, RwLock};

use crate::ann::{check_vectors, AnnConfig, AnnIndex, Metric};
use crate::{Error, Result};

mod file;

/// Candidates examined per lookup: the best one may have expired.
const CANDIDATES: usize = 4;

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub dim: usize,
    pub metric: Metric,
    /// A lookup hits when the best similarity is at least this.
    pub threshold: f32,
    /// Entries older than this many seconds are misses (and are dropped).
    pub ttl_seconds: Option<f64>,
    /// Entries per namespace; the least recently used goes first.
    pub capacity: usize,
}

/// Counters of one namespace, or of all of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    pub expirations: u64,
    pub entries: u64,
}

struct Entry {
    value: Arc<[u8]>,
    stored_at: f64,
}

struct Namespace {
    index: AnnIndex,
    state: Mutex<NamespaceState>,
}

struct NamespaceState {
    entries: LruCache<u64, Entry>,
    stats: CacheStats,
}

/// Seconds on a monotonic clock; injectable so TTL tests need no sleeping.
pub type Clock = Box<dyn Fn() -> f64 + Send + Sync>;

pub struct SemanticCache {
    config: CacheConfig,
    namespaces: RwLock<HashMap<String, Arc<Namespace>>>,
    /// Misses on namespaces that hold nothing yet.
    unknown_misses: AtomicU64,
    /// The counters of dropped namespaces: the totals never go backwards.
    retired: Mutex<CacheStats>,
    next_id: AtomicU64,
    clock: Clock,
}

/// A cache hit: the stored value and how similar its request was.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub value: Arc<[u8]>,
    pub similarity: f32,
}

impl SemanticCache {
    pub fn new(config: CacheConfig) -> Result<Self> {
        let start = Instant::now();
        Self::with_clock(config, Box::new(move || start.elapsed().as_secs_f64()))
    }

    pub fn with_clock(config: CacheConfig, clock: Clock) -> Result<Self> {
        if config.capacity == 0 {
            return Err(Error::config(
                "capacity must be at least 1 entry per namespace",
            ));
        }
        if !(config.threshold.is_finite() && (-1.0..=1.0).contains(&config.threshold)) {
            return Err(Error::config(format!(
                "threshold must be a similarity between -1 and 1, not {}",
                config.threshold
            )));
        }
        if let Some(ttl) = config.ttl_seconds {
            if !(ttl.is_finite() && ttl > 0.0) {
                return Err(Error::config(format!(
                    "ttl_seconds must be a positive number of seconds (or None), not {ttl}"
                )));
            }
        }
        // Validates dim and metric once, up front.
        AnnIndex::new(Self::index_config(&config))?;
        Ok(SemanticCache {
            config,
            namespaces: RwLock::new(HashMap::new()),
            unknown_misses: AtomicU64::new(0),
            retired: Mutex::new(CacheStats::default()),
            next_id: AtomicU64::new(0),
            clock,
        })
    }

    fn index_config(config: &CacheConfig) -> AnnConfig {
        let mut c = AnnConfig::new(config.dim);
        c.metric = config.metric;
        c
    }

    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    fn namespace(&self, name: &str) -> Option<Arc<Namespace>> {
        self.namespaces.read().get(name).cloned()
    }

    fn namespace_or_create(&self, name: &str) -> Result<Arc<Namespace>> {
        if let Some(ns) = self.namespace(name) {
            return Ok(ns);
        }
        let mut all = self.namespaces.write();
        if let Some(ns) = all.get(name) {
            return Ok(Arc::clone(ns));
        }
        let ns = Arc::new(Namespace {
            index: AnnIndex::new(Self::index_config(&self.config))?,
            state: Mutex::new(NamespaceState {
                // Unbounded: eviction is done here so the index is kept in step.
                entries: LruCache::unbounded(),
                stats: CacheStats::default(),
            }),
        });
        all.insert(name.to_owned(), Arc::clone(&ns));
        Ok(ns)
    }

    fn expired(&self, entry: &Entry, now: f64) -> bool {
        self.config
            .ttl_seconds
            .is_some_and(|ttl| now - entry.stored_at >= ttl)
    }

    /// Stores `value` for the request embedded as `vector` in `namespace`,
    /// evicting the least recently used entry when the namespace is full.
    pub fn put(&self, namespace: &str, vector: &[f32], value: &[u8]) -> Result<()> {
        if check_vectors(vector, self.config.dim, self.config.metric, "vector")? != 1 {
            return Err(Error::input(format!(
                "vector must be one vector of dim {}",
                self.config.dim
            )));
        }
        self.insert(namespace, vector, value, (self.clock)())
    }

    /// Stores an entry as if it had been put at `stored_at` on the cache's clock.
    fn insert(&self, namespace: &str, vector: &[f32], value: &[u8], stored_at: f64) -> Result<()> {
        let ns = self.namespace_or_create(namespace)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut state = ns.state.lock();
        while state.entries.len() >= self.config.capacity {
            if let Some((old, _)) = state.entries.pop_lru() {
                ns.index.remove(&[old])?;
                state.stats.evictions += 1;
            }
        }
        ns.index.add(&[id], vector)?;
        state.entries.put(
            id,
            Entry {
                value: Arc::from(value),
                stored_at,
            },
        );
        state.stats.entries = state.entries.len() as u64;
        Ok(())
    }

    /// Looks up the request embedded as `vector`: the value of the most
    /// similar live entry of `namespace` if its similarity reaches the threshold.
    pub fn get(&self, namespace: &str, vector: &[f32]) -> Result<Option<Hit>> {
        // A bad vector is an error whether or not the namespace exists, never a miss.
        if vector.len() != self.config.dim {
            return Err(Error::input(format!(
                "vector must be one vector of dim {}, not {} values",
                self.config.dim,
                vector.len()
            )));
        }
        check_vectors(vector, self.config.dim, self.config.metric, "vector")?;
        let Some(ns) = self.namespace(namespace) else {
            self.unknown_misses.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        };
        let found = ns.index.search(vector, CANDIDATES, None)?;
        let now = (self.clock)();
        let mut state = ns.state.lock();
        let mut expired = Vec::new();
        let mut hit = None;
        for (&id, &similarity) in found.ids.iter().zip(&found.scores) {
            if id < 0 || similarity < self.config.threshold {
                break;
            }
            let id = id as u64;
            let Some(entry) = state.entries.peek(&id) else {
                continue; // evicted between the search and the lock
            };
            if self.expired(entry, now) {
                expired.push(id);
                continue;
            }
            let value = Arc::clone(&state.entries.get(&id).expect("peeked").value);
            hit = Some(Hit { value, similarity });
            break;
        }
        for id in expired {
            state.entries.pop(&id);
            ns.index.remove(&[id])?;
            state.stats.expirations += 1;
        }
        if hit.is_some() {
            state.stats.hits += 1;
        } else {
            state.stats.misses += 1;
        }
        state.stats.entries = state.entries.len() as u64;
        Ok(hit)
    }

    /// Drops every entry of `namespace` (its counters stay).
    pub fn clear(&self, namespace: &str) -> Result<()> {
        if let Some(ns) = self.namespace(namespace) {
            let mut state = ns.state.lock();
            let ids: Vec<u64> = state.entries.iter().map(|(&id, _)| id).collect();
            ns.index.remove(&ids)?;
            state.entries.clear();
            state.stats.entries = 0;
        }
        Ok(())
    }

    /// Removes `namespace` whole: its entries, its index and its own counters (which
    /// stay in the totals). For a namespace no request will read again, an old policy
    /// version's say, which `clear` would leave holding its index. Returns whether
    /// there was one.
    pub fn drop_namespace(&self, namespace: &str) -> bool {
        let Some(ns) = self.namespaces.write().remove(namespace) else {
            return false;
        };
        let dropped = ns.state.lock().stats;
        let mut retired = self.retired.lock();
        retired.hits += dropped.hits;
        retired.misses += dropped.misses;
        retired.evictions += dropped.evictions;
        retired.expirations += dropped.expirations;
        true
    }

    pub fn namespaces(&self) -> Vec<String> {
        let mut names: Vec<String> = self.namespaces.read().keys().cloned().collect();
        names.sort();
        names
    }

    pub fn len(&self) -> usize {
        self.namespaces
            .read()
            .values()
            .map(|ns| ns.state.lock().entries.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Counters per namespace, and the totals (which include lookups on
    /// namespaces that held nothing).
    pub fn stats(&self) -> (Vec<(String, CacheStats)>, CacheStats) {
        let mut per: Vec<(String, CacheStats)> = self
            .namespaces
            .read()
            .iter()
            .map(|(name, ns)| (name.clone(), ns.state.lock().stats))
            .collect();
        per.sort_by(|a, b| a.0.cmp(&b.0));
        let retired = *self.retired.lock();
        let mut total = CacheStats {
            misses: retired.misses + self.unknown_misses.load(Ordering::Relaxed),
            ..retired
        };
        for (_, s) in &per {
            total.hits += s.hits;
            total.misses += s.misses;
            total.evictions += s.evictions;
            total.expirations += s.expirations;
            total.entries += s.entries;
        }
        (per, total)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    /// A dim-3 cosine cache on a clock the test sets (seconds in the returned cell).
    pub(crate) fn cache(capacity: usize, ttl: Option<f64>) -> (SemanticCache, Arc<AtomicU64>) {
        let now = Arc::new(AtomicU64::new(0));
        let clock_now = Arc::clone(&now);
        let config = CacheConfig {
            dim: 3,
            metric: Metric::Cosine,
            threshold: 0.9,
            ttl_seconds: ttl,
            capacity,
        };
        let c = SemanticCache::with_clock(
            config,
            Box::new(move || clock_now.load(Ordering::SeqCst) as f64),
        )
        .unwrap();
        (c, now)
    }

    #[test]
    fn similar_hits_dissimilar_misses() {
        let (c, _) = cache(10, None);
        c.put("t1", &[1.0, 0.0, 0.0], b"refund").unwrap();
        let hit = c.get("t1", &[0.99, 0.05, 0.0]).unwrap().unwrap();
        assert_eq!(&*hit.value, b"refund");
        assert!(hit.similarity > 0.99);
        assert!(c.get("t1", &[0.0, 1.0, 0.0]).unwrap().is_none());
        let (_, total) = c.stats();
        assert_eq!((total.hits, total.misses, total.entries), (1, 1, 1));
    }

    #[test]
    fn namespaces_are_isolated() {
        let (c, _) = cache(10, None);
        c.put("tenant-a", &[1.0, 0.0, 0.0], b"a").unwrap();
        assert!(c.get("tenant-b", &[1.0, 0.0, 0.0]).unwrap().is_none());
        c.put("tenant-b", &[1.0, 0.0, 0.0], b"b").unwrap();
        assert_eq!(
            &*c.get("tenant-b", &[1.0, 0.0, 0.0]).unwrap().unwrap().value,
            b"b"
        );
        assert_eq!(
            &*c.get("tenant-a", &[1.0, 0.0, 0.0]).unwrap().unwrap().value,
            b"a"
        );
    }

    #[test]
    fn a_dropped_namespace_is_gone_and_its_counters_stay_in_the_totals() {
        let (c, _) = cache(2, None);
        c.put("old", &[1.0, 0.0, 0.0], b"x").unwrap();
        c.put("old", &[0.0, 1.0, 0.0], b"y").unwrap();
        c.put("old", &[0.0, 0.0, 1.0], b"z").unwrap(); // one eviction
        c.get("old", &[1.0, 0.0, 0.0]).unwrap(); // evicted: a miss
        c.get("old", &[0.0, 0.0, 1.0]).unwrap().unwrap(); // a hit
        c.put("new", &[1.0, 0.0, 0.0], b"n").unwrap();
        let (_, before) = c.stats();
        assert!(c.drop_namespace("old"));
        assert!(!c.drop_namespace("old"));
        assert_eq!(c.namespaces(), vec!["new".to_string()]);
        assert_eq!(c.len(), 1);
        let (per, after) = c.stats();
        assert_eq!(per.len(), 1);
        assert_eq!(
            after,
            CacheStats {
                entries: 1,
                ..before
            }
        );
        assert_eq!((after.hits, after.misses, after.evictions), (1, 1, 1));
        // Written to again, it starts empty, with counters of its own from zero.
        assert!(c.get("old", &[0.0, 0.0, 1.0]).unwrap().is_none());
        c.put("old", &[0.0, 0.0, 1.0], b"z").unwrap();
        assert_eq!(
            c.stats().0[0].1,
            CacheStats {
                entries: 1,
                ..CacheStats::default()
            }
        );
    }

    #[test]
    fn lru_eviction_respects_recency() {
        let (c, _) = cache(2, None);
        c.put("t", &[1.0, 0.0, 0.0], b"x").unwrap();
        c.put("t", &[0.0, 1.0, 0.0], b"y").unwrap();
        c.get("t", &[1.0, 0.0, 0.0]).unwrap().unwrap(); // x is now recent
        c.put("t", &[0.0, 0.0, 1.0], b"z").unwrap(); // evicts y
        assert!(c.get("t", &[0.0, 1.0, 0.0]).unwrap().is_none());
        assert!(c.get("t", &[1.0, 0.0, 0.0]).unwrap().is_some());
        let (per, _) = c.stats();
        assert_eq!(per[0].1.evictions, 1);
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn ttl_expires_entries() {
        let (c, now) = cache(10, Some(5.0));
        c.put("t", &[1.0, 0.0, 0.0], b"x").unwrap();
        now.store(4, Ordering::SeqCst);
        assert!(c.get("t", &[1.0, 0.0, 0.0]).unwrap().is_some());
        now.store(5, Ordering::SeqCst);
        assert!(c.get("t", &[1.0, 0.0, 0.0]).unwrap().is_none());
        let (_, total) = c.stats();
        assert_eq!((total.expirations, total.entries), (1, 0));
    }

    #[test]
    fn invalid_settings_and_vectors() {
        let bad = |capacity, threshold: f32, ttl| {
            SemanticCache::new(CacheConfig {
                dim: 3,
                metric: Metric::Cosine,
                threshold,
                ttl_seconds: ttl,
                capacity,
            })
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
        };
        assert!(bad(0, 0.9, None).contains("capacity"));
        assert!(bad(1, f32::NAN, None).contains("threshold"));
        assert!(bad(1, 1.5, None).contains("threshold"));
        assert!(bad(1, 0.9, Some(0.0)).contains("ttl"));
        let (c, _) = cache(2, None);
        assert!(c.put("t", &[1.0, 0.0], b"x").is_err());
        assert!(
            c.namespaces().is_empty(),
            "a refused put must not create a namespace"
        );
        assert!(c.get("nobody", &[f32::NAN, 0.0, 0.0]).is_err());
        assert!(c.is_empty());
    }
}
