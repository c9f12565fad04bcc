//! Approximate nearest-neighbour index: HNSW for large sets, exact search for
//! small ones, with a versioned, checksummed file format ([`file`]).
//!
//! The HNSW is our own ([`hnsw`]) rather than the `usearch` crate it replaced.
//! On 100,000 x 384 unit vectors at recall@10 ~0.98 (ef=48, one thread)
//! usearch answered ~3,700 queries/s with f32 vectors and ~7,800 with bf16,
//! hnswlib ~8,500; the graphs were equally good (same recall per ef), so the
//! gap was the cost of each distance and the memory layout. Ours keeps a
//! node's layer-0 links and a half-precision copy of its vector in one
//! 64-byte-aligned block (960 bytes per visit at 384 dims, hnswlib 1,668),
//! converts with AVX-512 / F16C in the kernel, prefetches the next neighbour's
//! block while scoring the current one, and re-ranks the final candidates with
//! exact f32 dot products. Measured by `benchmarks/micro/ann.py` on a 2-core
//! Sapphire Rapids VM, two full runs: 12,800-14,500 queries/s at ef=48
//! (recall 0.978) against hnswlib's 8,250-9,550 (0.981) and usearch's
//! 3,200-3,650 in the same runs; 11,350-12,750 at ef=64 (recall 0.991).
//! Below `exact_below` entries no graph is built at all
//! and searches are exact ([`flat`]: 0.18 ms per query over 10,000 x 384,
//! numpy 0.57 ms).
//!
//! Concurrency: searches share a read lock and run in parallel with each other
//! and with inserts (see `store.rs` and `hnsw.rs` for the invariants); writers
//! (add / remove / save) are serialised among themselves so a batch is
//! validated and applied as a unit. Only growing the arrays, installing a newly
//! built graph and swapping in a compacted index take the write lock.
//!
//! Removed entries stay in the graph as tombstones (walked, never returned)
//! until they outnumber the live ones; the `remove` call that crosses that line
//! rebuilds the index from its live entries (about 1.2 s for 10,000 x 384 on
//! two cores), while searches go on against the old one.

pub mod file;
mod flat;
mod hnsw;
mod kernels;
mod store;

use std::collections::HashMap;

use parking_lot::{Mutex, RwLock};
use rayon::prelude::*;

use crate::{Error, Result};
use hnsw::Graph;
use store::{Codec, ExactCodes, Store, DELETED, LIVE};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// Cosine similarity; vectors need not be normalised, but must not be zero.
    Cosine,
    /// Inner product (for vectors the caller has normalised, or raw scores).
    InnerProduct,
}

impl Metric {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "cosine" | "cos" => Ok(Metric::Cosine),
            "ip" | "inner_product" | "dot" => Ok(Metric::InnerProduct),
            other => Err(Error::config(format!(
                "metric must be 'cosine' or 'ip', not {other:?}"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Metric::Cosine => "cosine",
            Metric::InnerProduct => "ip",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    F32,
    /// One byte per dimension: a quarter of the memory, for cosine only.
    I8,
}

impl Storage {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "f32" | "float32" => Ok(Storage::F32),
            "i8" | "int8" => Ok(Storage::I8),
            other => Err(Error::config(format!(
                "dtype must be 'f32' or 'i8', not {other:?}"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Storage::F32 => "f32",
            Storage::I8 => "i8",
        }
    }
}

/// Index settings; the defaults suit sentence embeddings (384 to 1024 dims).
#[derive(Debug, Clone, PartialEq)]
pub struct AnnConfig {
    pub dim: usize,
    pub metric: Metric,
    pub storage: Storage,
    /// HNSW links per node (M).
    pub connectivity: usize,
    pub ef_construction: usize,
    pub ef_search: usize,
    /// Below this many entries searches are exact (brute force with SIMD):
    /// as fast as the graph at that size, and never misses.
    pub exact_below: usize,
}

impl AnnConfig {
    pub fn new(dim: usize) -> Self {
        AnnConfig {
            dim,
            metric: Metric::Cosine,
            storage: Storage::F32,
            connectivity: 16,
            ef_construction: 128,
            ef_search: 64,
            exact_below: 2048,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.dim == 0 || self.dim > 65_536 {
            return Err(Error::config(format!(
                "dim must be between 1 and 65536, not {}",
                self.dim
            )));
        }
        if !(2..=256).contains(&self.connectivity) {
            return Err(Error::config(format!(
                "m (connectivity) must be between 2 and 256, not {}",
                self.connectivity
            )));
        }
        if self.ef_construction == 0 || self.ef_search == 0 {
            return Err(Error::config(
                "ef_construction and ef_search must be positive",
            ));
        }
        if self.ef_construction > MAX_EF || self.ef_search > MAX_EF {
            return Err(Error::config(format!(
                "ef_construction and ef_search must be at most {MAX_EF}"
            )));
        }
        if self.storage == Storage::I8 && self.metric != Metric::Cosine {
            return Err(Error::config(
                "dtype 'i8' is only supported with metric 'cosine'",
            ));
        }
        Ok(())
    }
}

/// Upper bound of ef and k: far beyond any useful setting, low enough that a
/// mistaken value is an error rather than an allocation that aborts the process.
pub const MAX_EF: usize = 1 << 16;
/// Upper bound of queries x k in one search call (the result arrays' length).
pub const MAX_RESULTS: usize = 1 << 27;
/// Largest magnitude a component may have under `ip`: the graph walks f16
/// copies, and beyond f16's range a value would become infinite.
pub const MAX_IP_COMPONENT: f32 = 65_504.0;

/// Search results for a batch of queries, row-major `(n_queries, k)`.
/// Missing slots (fewer than `k` entries) have id -1 and score -inf.
#[derive(Debug, Clone, PartialEq)]
pub struct Neighbours {
    pub k: usize,
    pub ids: Vec<i64>,
    /// Similarities: cosine similarity, or the inner product; higher is closer.
    pub scores: Vec<f32>,
}

/// Batches at least this large are written and linked on every core.
const PARALLEL_BATCH: usize = 256;
/// Queries of one batch are split into tasks of at least this many.
const QUERIES_PER_TASK: usize = 4;
/// Removed slots are reclaimed (the index rebuilt from its live entries) once
/// they number at least this many and at least as many as the live ones, so
/// the rebuild costs at most about one insert per removal.
const COMPACT_MIN: usize = 64;

/// Everything a search reads; replaced whole when the index is compacted.
struct Inner {
    store: Store,
    /// Built when the index first holds `exact_below` entries.
    graph: Option<Graph>,
    /// The int8 copy for exact search, kept until the graph is built.
    exact: Option<ExactCodes>,
    /// Live ids and their slots; changed only by writers.
    slots: RwLock<HashMap<u64, u32>>,
}

impl Inner {
    fn new(config: &AnnConfig, with_graph: bool) -> Self {
        let links = 1 + 2 * config.connectivity;
        let store = match config.storage {
            Storage::F32 => Store::new(config.dim, Codec::F16, true, links),
            Storage::I8 => Store::new(config.dim, Codec::I8, false, links),
        };
        let padded = store.padded;
        Inner {
            store,
            graph: with_graph.then(|| Graph::new(config.connectivity, config.ef_construction)),
            exact: (!with_graph).then(|| ExactCodes::new(padded)),
            slots: RwLock::new(HashMap::new()),
        }
    }

    fn grow(&mut self, slots: usize) {
        self.store.grow(slots);
        if let Some(g) = self.graph.as_mut() {
            g.grow(slots);
        }
        if let Some(e) = self.exact.as_mut() {
            e.grow(slots);
        }
    }

    /// Writes, publishes and links `ids` with their prepared rows. The caller
    /// holds the writer lock and has reserved the slots.
    fn insert(&self, ids: &[u64], rows: &[f32]) {
        let (n, dim) = (ids.len(), self.store.dim);
        let base = self.store.take_slots(n);
        let slack = flat::slack(self.store.padded);
        let write = |i: usize| {
            let v = &rows[i * dim..(i + 1) * dim];
            self.store.write(base + i, ids[i], v);
            if let Some(e) = &self.exact {
                e.write(base + i, &self.store.stored_form(v), slack);
            }
        };
        let parallel = n >= PARALLEL_BATCH;
        if parallel {
            (0..n).into_par_iter().for_each(write);
        } else {
            (0..n).for_each(write);
        }
        self.store.publish(base + n);
        if let Some(g) = &self.graph {
            let link = |i: usize| g.insert(&self.store, (base + i) as u32);
            if parallel {
                (0..n).into_par_iter().for_each(link);
            } else {
                (0..n).for_each(link);
            }
        }
        let mut slots = self.slots.write();
        for (i, &id) in ids.iter().enumerate() {
            self.store.set_state(base + i, LIVE);
            slots.insert(id, (base + i) as u32);
        }
    }

    /// The `k` nearest live slots to the prepared query `q`, best first.
    fn nearest(&self, q: &[f32], k: usize, ef: usize, exact_below: usize) -> Vec<(f32, usize)> {
        match (&self.graph, &self.exact) {
            (_, Some(exact)) => exact.search(&self.store, q, k),
            (Some(_), None) if self.store.live() < exact_below => flat::scan(&self.store, q, k),
            (Some(graph), None) => {
                let found = graph.search(&self.store, q, ef);
                if !self.store.keeps_f32() {
                    return found
                        .into_iter()
                        .take(k)
                        .map(|c| (c.sim, c.slot as usize))
                        .collect();
                }
                // The walk ranked by half precision; the answer is ranked
                // exactly. A candidate more than twice the codes' error below
                // the k-th cannot make the top k, so it is not re-scored.
                let cut = match found.get(k - 1) {
                    Some(kth) => {
                        let q_norm = q.iter().map(|x| x * x).sum::<f32>().sqrt();
                        kth.sim - 2.0 * self.store.sim_error(q_norm)
                    }
                    None => f32::NEG_INFINITY,
                };
                let close: Vec<usize> = found
                    .iter()
                    .take_while(|c| c.sim >= cut)
                    .map(|c| c.slot as usize)
                    .collect();
                let mut top = flat::TopK::new(k);
                for (i, &slot) in close.iter().enumerate() {
                    if let Some(&next) = close.get(i + 1) {
                        self.store.prefetch_exact(next);
                    }
                    top.push(self.store.exact_sim(q, slot), slot);
                }
                top.into_sorted()
            }
            (None, None) => Vec::new(),
        }
    }

    /// Live ids and their stored vectors (`dim` values each), in slot order.
    fn live_rows(&self) -> (Vec<u64>, Vec<f32>) {
        let dim = self.store.dim;
        let (mut ids, mut rows) = (Vec::new(), Vec::new());
        let mut buf = Vec::new();
        for s in 0..self.store.published() {
            if self.store.is_live(s) {
                ids.push(self.store.id(s));
                self.store.vector_into(s, &mut buf);
                rows.extend_from_slice(&buf[..dim]);
            }
        }
        (ids, rows)
    }
}

pub struct AnnIndex {
    config: AnnConfig,
    inner: RwLock<Inner>,
    writer: Mutex<()>,
}

impl std::fmt::Debug for AnnIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnnIndex")
            .field("config", &self.config)
            .field("len", &self.len())
            .finish()
    }
}

/// Checks a row-major batch of vectors: shape, finiteness, and non-zero norm
/// under cosine. Returns the number of rows; `what` names the argument in errors.
pub fn check_vectors(vectors: &[f32], dim: usize, metric: Metric, what: &str) -> Result<usize> {
    if !vectors.len().is_multiple_of(dim) {
        return Err(Error::input(format!(
            "{what} has {} values, not a multiple of dim={dim}",
            vectors.len()
        )));
    }
    for (row, v) in vectors.chunks(dim).enumerate() {
        if let Some(col) = v.iter().position(|x| !x.is_finite()) {
            return Err(Error::input(format!(
                "{what}[{row}, {col}] is {} (vectors must be finite)",
                v[col]
            )));
        }
        if metric == Metric::InnerProduct {
            if let Some(col) = v.iter().position(|x| x.abs() > MAX_IP_COMPONENT) {
                return Err(Error::input(format!(
                    "{what}[{row}, {col}] is {}: with metric 'ip' components must stay within \
                     +/-{MAX_IP_COMPONENT} (the index walks half-precision copies; scale the \
                     vectors down, which keeps their ranking)",
                    v[col]
                )));
            }
        }
        if metric == Metric::Cosine && v.iter().all(|&x| x == 0.0) {
            return Err(Error::input(format!(
                "{what}[{row}] is the zero vector, which has no cosine similarity"
            )));
        }
    }
    Ok(vectors.len() / dim)
}

impl AnnIndex {
    pub fn new(config: AnnConfig) -> Result<Self> {
        config.validate()?;
        let inner = Inner::new(&config, config.exact_below == 0);
        Ok(AnnIndex {
            config,
            inner: RwLock::new(inner),
            writer: Mutex::new(()),
        })
    }

    pub fn config(&self) -> &AnnConfig {
        &self.config
    }

    pub fn dim(&self) -> usize {
        self.config.dim
    }

    pub fn len(&self) -> usize {
        self.inner.read().store.live()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, id: u64) -> bool {
        self.inner.read().slots.read().contains_key(&id)
    }

    /// Checks a row-major batch of vectors against this index; see [`check_vectors`].
    pub fn check_vectors(&self, vectors: &[f32], what: &str) -> Result<usize> {
        check_vectors(vectors, self.config.dim, self.config.metric, what)
    }

    /// A vector as the index keeps it: unit length under cosine.
    fn prepare_into(&self, v: &[f32], out: &mut Vec<f32>) {
        out.clear();
        match self.config.metric {
            Metric::Cosine => {
                let norm = v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
                out.extend(v.iter().map(|&x| (f64::from(x) / norm) as f32));
            }
            Metric::InnerProduct => out.extend_from_slice(v),
        }
    }

    /// Adds `ids[i]` with row `i` of `vectors`. The whole batch is checked
    /// first (shape, values, ids new and distinct); on any error nothing is added.
    pub fn add(&self, ids: &[u64], vectors: &[f32]) -> Result<()> {
        let n = self.check_vectors(vectors, "vectors")?;
        if n != ids.len() {
            return Err(Error::input(format!("{} ids for {n} vectors", ids.len())));
        }
        let _writer = self.writer.lock();
        {
            let inner = self.inner.read();
            let slots = inner.slots.read();
            let mut seen = std::collections::HashSet::with_capacity(ids.len());
            for (i, &id) in ids.iter().enumerate() {
                if id == u64::MAX {
                    return Err(Error::input(format!(
                        "ids[{i}] = 2**64-1 is reserved (searches report it as -1, a missing slot)"
                    )));
                }
                if !seen.insert(id) {
                    return Err(Error::input(format!(
                        "ids[{i}] = {id} appears twice in the batch"
                    )));
                }
                if slots.contains_key(&id) {
                    return Err(Error::input(format!(
                        "ids[{i}] = {id} is already in the index"
                    )));
                }
            }
        }
        if n == 0 {
            return Ok(());
        }
        let mut rows = Vec::with_capacity(vectors.len());
        let mut buf = Vec::new();
        for v in vectors.chunks(self.config.dim) {
            self.prepare_into(v, &mut buf);
            rows.extend_from_slice(&buf);
        }
        self.reserve_for(n);
        self.inner.read().insert(ids, &rows);
        self.build_graph_if_due();
        Ok(())
    }

    /// Grows capacity geometrically so that `extra` more slots fit.
    fn reserve_for(&self, extra: usize) {
        let (needed, capacity) = {
            let inner = self.inner.read();
            (inner.store.used() + extra, inner.store.capacity())
        };
        if needed > capacity {
            let target = needed.max(capacity * 2).max(64);
            self.inner.write().grow(target);
        }
    }

    /// Builds the graph once the index holds `exact_below` entries (searches
    /// go on, exactly, while it is built); the caller holds the writer lock.
    fn build_graph_if_due(&self) {
        let graph = {
            let inner = self.inner.read();
            if inner.graph.is_some() || inner.store.live() < self.config.exact_below {
                return;
            }
            let mut graph = Graph::new(self.config.connectivity, self.config.ef_construction);
            graph.grow(inner.store.capacity());
            let live: Vec<u32> = (0..inner.store.published())
                .filter(|&s| inner.store.is_live(s))
                .map(|s| s as u32)
                .collect();
            live.par_iter()
                .with_min_len(PARALLEL_BATCH)
                .for_each(|&s| graph.insert(&inner.store, s));
            graph
        };
        let mut inner = self.inner.write();
        inner.graph = Some(graph);
        inner.exact = None;
    }

    /// Removes ids; every id must be present (checked before anything is removed).
    pub fn remove(&self, ids: &[u64]) -> Result<()> {
        let _writer = self.writer.lock();
        {
            let inner = self.inner.read();
            let mut slots = inner.slots.write();
            for (i, &id) in ids.iter().enumerate() {
                if !slots.contains_key(&id) {
                    return Err(Error::input(format!("ids[{i}] = {id} is not in the index")));
                }
            }
            for id in ids {
                if let Some(slot) = slots.remove(id) {
                    inner.store.set_state(slot as usize, DELETED);
                }
            }
        }
        self.compact_if_sparse();
        Ok(())
    }

    /// Rebuilds the index from its live entries once most slots are removed
    /// ones; searches go on against the old one meanwhile.
    fn compact_if_sparse(&self) {
        let fresh = {
            let inner = self.inner.read();
            let (used, live) = (inner.store.used(), inner.store.live());
            if used - live < COMPACT_MIN.max(live) {
                return;
            }
            let (ids, rows) = inner.live_rows();
            let with_graph = self.config.exact_below == 0 || live >= self.config.exact_below;
            let mut fresh = Inner::new(&self.config, with_graph);
            fresh.grow(live.max(64));
            if !ids.is_empty() {
                fresh.insert(&ids, &rows);
            }
            fresh
        };
        *self.inner.write() = fresh;
    }

    /// The `k` nearest entries of each query (row-major), best first.
    /// `ef` widens (or narrows) the graph search for this call; it must be >= k.
    pub fn search(&self, queries: &[f32], k: usize, ef: Option<usize>) -> Result<Neighbours> {
        if k == 0 {
            return Err(Error::input("k must be at least 1"));
        }
        if k > MAX_EF {
            return Err(Error::input(format!("k must be at most {MAX_EF}, not {k}")));
        }
        if let Some(ef) = ef {
            if ef < k {
                return Err(Error::input(format!("ef ({ef}) must be at least k ({k})")));
            }
            if ef > MAX_EF {
                return Err(Error::input(format!(
                    "ef must be at most {MAX_EF}, not {ef}"
                )));
            }
        }
        let n = self.check_vectors(queries, "queries")?;
        if n.saturating_mul(k) > MAX_RESULTS {
            return Err(Error::input(format!(
                "{n} queries x k={k} would return more than {MAX_RESULTS} results; split the batch"
            )));
        }
        let mut out = Neighbours {
            k,
            ids: vec![-1; n * k],
            scores: vec![f32::NEG_INFINITY; n * k],
        };
        let ef = ef.unwrap_or(self.config.ef_search).max(k);
        let inner = self.inner.read();
        let one = |query: &[f32], ids: &mut [i64], scores: &mut [f32]| {
            let mut q = Vec::with_capacity(inner.store.padded);
            self.prepare_into(query, &mut q);
            q.resize(inner.store.padded, 0.0);
            let found = inner.nearest(&q, k, ef, self.config.exact_below);
            for (j, (score, slot)) in found.into_iter().enumerate() {
                ids[j] = inner.store.id(slot) as i64;
                scores[j] = score;
            }
        };
        let dim = self.config.dim;
        if n < 2 * QUERIES_PER_TASK {
            // Handing a small batch to the thread pool costs more than it saves.
            for ((query, ids), scores) in queries
                .chunks(dim)
                .zip(out.ids.chunks_mut(k))
                .zip(out.scores.chunks_mut(k))
            {
                one(query, ids, scores);
            }
        } else {
            queries
                .par_chunks(dim)
                .zip(out.ids.par_chunks_mut(k))
                .zip(out.scores.par_chunks_mut(k))
                .with_min_len(QUERIES_PER_TASK)
                .for_each(|((query, ids), scores)| one(query, ids, scores));
        }
        Ok(out)
    }

    /// The stored vector of `id` (normalised for cosine, as decoded from int8
    /// for i8 storage), or None.
    pub fn get(&self, id: u64) -> Option<Vec<f32>> {
        let inner = self.inner.read();
        let slot = *inner.slots.read().get(&id)?;
        let mut v = Vec::new();
        inner.store.vector_into(slot as usize, &mut v);
        v.truncate(self.config.dim);
        Some(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng_vectors(n: usize, dim: usize, seed: u64) -> Vec<f32> {
        // A small xorshift: deterministic vectors without a rand dependency.
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n * dim)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s % 2000) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    fn brute_force(data: &[f32], dim: usize, q: &[f32], k: usize) -> Vec<u64> {
        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        let mut sims: Vec<(f32, u64)> = data
            .chunks(dim)
            .enumerate()
            .map(|(i, v)| {
                let dot: f32 = v.iter().zip(q).map(|(a, b)| a * b).sum();
                (dot / norm(v) / norm(q), i as u64)
            })
            .collect();
        sims.sort_by(|a, b| b.0.total_cmp(&a.0));
        sims.iter().take(k).map(|s| s.1).collect()
    }

    #[test]
    fn exact_search_is_exact_and_hnsw_recalls() {
        let dim = 32;
        let data = rng_vectors(3000, dim, 1);
        let ids: Vec<u64> = (0..3000).collect();
        let mut config = AnnConfig::new(dim);
        config.exact_below = 10_000;
        let exact = AnnIndex::new(config.clone()).unwrap();
        exact.add(&ids, &data).unwrap();
        config.exact_below = 0;
        config.ef_search = 128;
        let hnsw = AnnIndex::new(config).unwrap();
        hnsw.add(&ids, &data).unwrap();
        let queries = rng_vectors(50, dim, 2);
        let (mut hits, mut total) = (0, 0);
        for q in queries.chunks(dim) {
            let truth = brute_force(&data, dim, q, 10);
            let e = exact.search(q, 10, None).unwrap();
            let found: Vec<u64> = e.ids.iter().map(|&i| i as u64).collect();
            assert_eq!(found, truth);
            let h = hnsw.search(q, 10, None).unwrap();
            hits += h
                .ids
                .iter()
                .filter(|&&i| truth.contains(&(i as u64)))
                .count();
            total += 10;
        }
        assert!(hits as f64 / total as f64 > 0.9, "recall {hits}/{total}");
    }

    #[test]
    fn bad_vectors_and_ids_leave_the_index_unchanged() {
        let idx = AnnIndex::new(AnnConfig::new(3)).unwrap();
        idx.add(&[1], &[1.0, 0.0, 0.0]).unwrap();
        let err = |r: Result<()>| r.unwrap_err().to_string();
        assert!(err(idx.add(&[2, 3], &[1.0, 0.0, 0.0, f32::NAN, 0.0, 0.0]))
            .contains("vectors[1, 0] is NaN"));
        assert!(err(idx.add(&[2], &[0.0, 0.0, 0.0])).contains("zero vector"));
        assert!(err(idx.add(&[2, 2], &[1.0, 0.0, 0.0, 0.0, 1.0, 0.0])).contains("twice"));
        assert!(err(idx.add(&[5, 1], &[1.0, 0.0, 0.0, 0.0, 1.0, 0.0])).contains("already"));
        assert!(err(idx.add(&[2], &[1.0, 0.0])).contains("multiple of dim=3"));
        assert!(err(idx.remove(&[1, 9])).contains("ids[1] = 9 is not"));
        assert_eq!(idx.len(), 1);
        assert!(idx.contains(1) && !idx.contains(5));
        assert!(idx.search(&[1.0, 0.0, 0.0], 0, None).is_err());
        assert!(idx.search(&[1.0, 0.0, 0.0], 5, Some(2)).is_err());
    }

    #[test]
    fn missing_slots_and_removal() {
        let idx = AnnIndex::new(AnnConfig::new(2)).unwrap();
        idx.add(&[10, 11], &[1.0, 0.0, 0.0, 1.0]).unwrap();
        let r = idx.search(&[1.0, 0.1], 3, None).unwrap();
        assert_eq!(r.ids, vec![10, 11, -1]);
        assert!((r.scores[0] - 0.995).abs() < 0.01);
        assert_eq!(r.scores[2], f32::NEG_INFINITY);
        idx.remove(&[10]).unwrap();
        assert_eq!(idx.len(), 1);
        let r = idx.search(&[1.0, 0.1], 2, None).unwrap();
        assert_eq!(r.ids, vec![11, -1]);
    }

    #[test]
    fn inner_product_scores_are_dot_products() {
        let mut c = AnnConfig::new(2);
        c.metric = Metric::InnerProduct;
        let idx = AnnIndex::new(c).unwrap();
        idx.add(&[1], &[0.6, 0.8]).unwrap();
        let r = idx.search(&[0.6, 0.8], 1, None).unwrap();
        assert!((r.scores[0] - 1.0).abs() < 1e-5);
    }

    fn normalised(v: &[f32]) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    }

    fn dot(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn removed_ids_are_never_returned_and_can_be_added_again() {
        let dim = 16;
        let data = rng_vectors(1000, dim, 4);
        let mut config = AnnConfig::new(dim);
        config.exact_below = 0;
        let idx = AnnIndex::new(config).unwrap();
        idx.add(&(0..1000).collect::<Vec<_>>(), &data).unwrap();
        let removed: Vec<u64> = (0..1000).step_by(3).collect();
        idx.remove(&removed).unwrap();
        assert_eq!(idx.len(), 1000 - removed.len());
        let r = idx.search(&data[..50 * dim], 10, Some(64)).unwrap();
        assert!(r.ids.iter().all(|&i| i >= 0 && i % 3 != 0), "{:?}", r.ids);
        // Each live query vector finds itself.
        for q in (0..50).filter(|q| q % 3 != 0) {
            assert_eq!(r.ids[q * 10], q as i64);
        }
        // Re-added under a new vector, an id is found by that vector only.
        let fresh = rng_vectors(1, dim, 99);
        idx.add(&[0], &fresh).unwrap();
        assert!(idx.contains(0) && idx.len() == 1000 - removed.len() + 1);
        let r = idx.search(&fresh, 1, None).unwrap();
        assert_eq!(r.ids, vec![0]);
        assert!((r.scores[0] - 1.0).abs() < 1e-5);
        let got = idx.get(0).unwrap();
        assert!((dot(&got, &normalised(&fresh)) - 1.0).abs() < 1e-5);
    }

    #[test]
    fn compaction_reclaims_removed_slots_and_keeps_the_rest() {
        let dim = 8;
        let data = rng_vectors(600, dim, 5);
        let mut config = AnnConfig::new(dim);
        config.exact_below = 100;
        let idx = AnnIndex::new(config).unwrap();
        idx.add(&(0..600).collect::<Vec<_>>(), &data).unwrap();
        assert!(idx.inner.read().graph.is_some());
        idx.remove(&(0..560).collect::<Vec<_>>()).unwrap();
        {
            let inner = idx.inner.read();
            assert_eq!(inner.store.used(), 40, "removed slots are reclaimed");
            assert!(
                inner.graph.is_none(),
                "40 entries are searched exactly again"
            );
        }
        for i in 560..600 {
            let q = &data[i as usize * dim..(i as usize + 1) * dim];
            assert_eq!(idx.search(q, 1, None).unwrap().ids, vec![i]);
        }
        assert!(!idx.contains(3) && idx.contains(599) && idx.len() == 40);
        // Growing past exact_below again builds a new graph.
        idx.add(&(600..700).collect::<Vec<_>>(), &rng_vectors(100, dim, 6))
            .unwrap();
        assert!(idx.inner.read().graph.is_some());
        assert_eq!(idx.len(), 140);
    }

    #[test]
    fn searches_run_while_other_threads_insert() {
        let dim = 24;
        let n = 4000;
        let data = rng_vectors(n, dim, 7);
        let mut config = AnnConfig::new(dim);
        config.exact_below = 0;
        let idx = AnnIndex::new(config).unwrap();
        idx.add(&(0..300).collect::<Vec<_>>(), &data[..300 * dim])
            .unwrap();
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                // Large batches take the parallel path, small ones the serial one.
                let mut at = 300;
                for size in [700, 10, 1000, 7, 990, 300, 393, 300].into_iter().cycle() {
                    if at >= n {
                        break;
                    }
                    let end = (at + size).min(n);
                    let ids: Vec<u64> = (at as u64..end as u64).collect();
                    idx.add(&ids, &data[at * dim..end * dim]).unwrap();
                    at = end;
                }
                done.store(true, std::sync::atomic::Ordering::SeqCst);
            });
            for t in 0..2 {
                let (idx, data, done) = (&idx, &data, &done);
                s.spawn(move || {
                    let mut rounds = 0;
                    while !done.load(std::sync::atomic::Ordering::SeqCst) || rounds < 3 {
                        let q = &data[t * 8 * dim..(t + 1) * 8 * dim];
                        let r = idx.search(q, 5, None).unwrap();
                        for (j, (&id, &score)) in r.ids.iter().zip(&r.scores).enumerate() {
                            assert!(id >= 0 && (id as usize) < n, "{id}");
                            let v = &data[id as usize * dim..(id as usize + 1) * dim];
                            let want = dot(&normalised(v), &normalised(&q[j / 5 * dim..][..dim]));
                            assert!((score - want).abs() < 1e-4, "{score} vs {want}");
                        }
                        rounds += 1;
                    }
                });
            }
        });
        assert_eq!(idx.len(), n);
        let r = idx.search(&data[..200 * dim], 1, Some(64)).unwrap();
        let found = r
            .ids
            .iter()
            .enumerate()
            .filter(|(i, &id)| id == *i as i64)
            .count();
        assert!(found >= 198, "{found} of 200 vectors find themselves");
    }

    #[test]
    fn exact_search_is_exact_for_inner_product_and_near_ties() {
        let dim = 40;
        let base = rng_vectors(50, dim, 8);
        let noise = rng_vectors(3000, dim, 9);
        // Clusters of near-duplicates with norms from 0.1 to 10: many scores
        // within the int8 error of each other.
        let data: Vec<f32> = (0..3000)
            .flat_map(|i| {
                let scale = 0.1 + (i % 97) as f32 / 9.7;
                let (b, e) = (&base[(i % 50) * dim..][..dim], &noise[i * dim..][..dim]);
                b.iter().zip(e).map(move |(x, y)| scale * (x + 0.01 * y))
            })
            .collect();
        let mut config = AnnConfig::new(dim);
        config.metric = Metric::InnerProduct;
        config.exact_below = 100_000;
        let idx = AnnIndex::new(config).unwrap();
        idx.add(&(0..3000).collect::<Vec<_>>(), &data).unwrap();
        let queries = rng_vectors(30, dim, 10);
        let r = idx.search(&queries, 10, None).unwrap();
        for (qi, q) in queries.chunks(dim).enumerate() {
            let mut truth: Vec<f64> = data
                .chunks(dim)
                .map(|v| v.iter().zip(q).map(|(a, b)| *a as f64 * *b as f64).sum())
                .collect();
            truth.sort_by(|a, b| b.total_cmp(a));
            for (got, want) in r.scores[qi * 10..(qi + 1) * 10].iter().zip(&truth) {
                let got = f64::from(*got);
                assert!(
                    (got - want).abs() < 1e-4 * want.abs().max(1.0),
                    "{got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn int8_storage_keeps_scores_close() {
        let dim = 32;
        let data = rng_vectors(500, dim, 11);
        let mut config = AnnConfig::new(dim);
        config.storage = Storage::I8;
        for exact_below in [0, 10_000] {
            config.exact_below = exact_below;
            let idx = AnnIndex::new(config.clone()).unwrap();
            idx.add(&(0..500).collect::<Vec<_>>(), &data).unwrap();
            let r = idx.search(&data[..20 * dim], 1, None).unwrap();
            assert!(
                r.ids
                    .iter()
                    .enumerate()
                    .filter(|(i, &id)| id == *i as i64)
                    .count()
                    >= 19
            );
            assert!(
                r.scores.iter().all(|s| (s - 1.0).abs() < 0.02),
                "{:?}",
                r.scores
            );
        }
    }

    #[test]
    fn growth_past_initial_capacity() {
        let idx = AnnIndex::new(AnnConfig::new(4)).unwrap();
        let data = rng_vectors(500, 4, 3);
        for (i, v) in data.chunks(4).enumerate() {
            idx.add(&[i as u64], v).unwrap();
        }
        assert_eq!(idx.len(), 500);
    }

    #[test]
    fn oversized_k_ef_and_ip_values_are_errors_not_aborts() {
        let idx = AnnIndex::new(AnnConfig::new(4)).unwrap();
        idx.add(&[1, 2], &rng_vectors(2, 4, 5)).unwrap();
        let q = rng_vectors(1, 4, 6);
        let msg = |r: Result<Neighbours>| r.unwrap_err().to_string();
        assert!(msg(idx.search(&q, 1, Some(1 << 40))).contains("ef must be at most"));
        assert!(msg(idx.search(&q, 1 << 40, None)).contains("k must be at most"));
        let many = rng_vectors(5000, 4, 7);
        assert!(msg(idx.search(&many, MAX_EF, None)).contains("split the batch"));
        let mut config = AnnConfig::new(4);
        config.ef_construction = 1 << 50;
        assert!(AnnIndex::new(config).is_err());
        assert_eq!(idx.search(&q, 2, None).unwrap().ids.len(), 2); // still usable

        let mut ip = AnnConfig::new(2);
        ip.metric = Metric::InnerProduct;
        let ip = AnnIndex::new(ip).unwrap();
        let err = ip.add(&[1], &[1e5, 0.0]).unwrap_err().to_string();
        assert!(err.contains("vectors[0, 0] is 100000"), "{err}");
        ip.add(&[1], &[65_000.0, -65_000.0]).unwrap();
    }
}
