//! Approximate nearest-neighbour index: HNSW for large sets, exact search for
//! small ones, with a versioned, checksummed file format ([`file`]).
//!
//! The engine is the `usearch` crate rather than an HNSW of our own: it meets
//! the recall and speed targets (measured against hnswlib in
//! `benchmarks/micro/ann.py`), dispatches SIMD kernels at run time (AVX2 /
//! AVX-512 where the CPU has them, without a native-only build), supports
//! removal, concurrent inserts and searches, and int8 storage.
//!
//! Concurrency: searches share a read lock and run in parallel with each other
//! and with inserts (the engine locks per node); writers (add / remove) are
//! serialised among themselves so a batch is validated and applied as a unit,
//! and only growing the engine's capacity takes the write lock.

pub mod file;
mod flat;

use parking_lot::{Mutex, RwLock};
use rayon::prelude::*;
use usearch::{Index, IndexOptions, MetricKind, ScalarKind};

use crate::{Error, Result};
use flat::FlatStore;

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
        if self.storage == Storage::I8 && self.metric != Metric::Cosine {
            return Err(Error::config(
                "dtype 'i8' is only supported with metric 'cosine'",
            ));
        }
        Ok(())
    }

    fn engine_options(&self) -> IndexOptions {
        IndexOptions {
            dimensions: self.dim,
            metric: match self.metric {
                Metric::Cosine => MetricKind::Cos,
                Metric::InnerProduct => MetricKind::IP,
            },
            quantization: match self.storage {
                Storage::F32 => ScalarKind::F32,
                Storage::I8 => ScalarKind::I8,
            },
            connectivity: self.connectivity,
            expansion_add: self.ef_construction,
            expansion_search: self.ef_search,
            multi: false,
        }
    }
}

/// Search results for a batch of queries, row-major `(n_queries, k)`.
/// Missing slots (fewer than `k` entries) have id -1 and score -inf.
#[derive(Debug, Clone, PartialEq)]
pub struct Neighbours {
    pub k: usize,
    pub ids: Vec<i64>,
    /// Similarities: cosine similarity, or the inner product; higher is closer.
    pub scores: Vec<f32>,
}

pub struct AnnIndex {
    config: AnnConfig,
    engine: RwLock<Index>,
    /// A plain copy of the vectors for exact search, kept until the index first
    /// reaches `exact_below` entries (then dropped, to not hold them twice).
    flat: RwLock<Option<FlatStore>>,
    writer: Mutex<()>,
    /// Serialises searches that ask for a non-default ef (the engine's ef is
    /// index-wide, so it is set, used and restored under this lock).
    custom_ef: Mutex<()>,
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
    if vectors.len() % dim != 0 {
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
        if metric == Metric::Cosine && v.iter().all(|&x| x == 0.0) {
            return Err(Error::input(format!(
                "{what}[{row}] is the zero vector, which has no cosine similarity"
            )));
        }
    }
    Ok(vectors.len() / dim)
}

fn engine_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::input(format!("{what}: {e}"))
}

impl AnnIndex {
    pub fn new(config: AnnConfig) -> Result<Self> {
        config.validate()?;
        let engine = Index::new(&config.engine_options())
            .map_err(|e| Error::config(format!("the ANN engine refused the settings: {e}")))?;
        engine
            .reserve(64)
            .map_err(|e| Error::config(format!("could not reserve index memory: {e}")))?;
        let flat = (config.exact_below > 0).then(|| FlatStore::new(config.dim));
        Ok(AnnIndex {
            config,
            engine: RwLock::new(engine),
            flat: RwLock::new(flat),
            writer: Mutex::new(()),
            custom_ef: Mutex::new(()),
        })
    }

    pub fn config(&self) -> &AnnConfig {
        &self.config
    }

    pub fn dim(&self) -> usize {
        self.config.dim
    }

    pub fn len(&self) -> usize {
        self.engine.read().size()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, id: u64) -> bool {
        self.engine.read().contains(id)
    }

    /// Checks a row-major batch of vectors against this index; see [`check_vectors`].
    pub fn check_vectors(&self, vectors: &[f32], what: &str) -> Result<usize> {
        check_vectors(vectors, self.config.dim, self.config.metric, what)
    }

    /// Adds `ids[i]` with row `i` of `vectors`. The whole batch is checked
    /// first (shape, values, ids new and distinct); on any error nothing is added.
    pub fn add(&self, ids: &[u64], vectors: &[f32]) -> Result<()> {
        let n = self.check_vectors(vectors, "vectors")?;
        if n != ids.len() {
            return Err(Error::input(format!("{} ids for {n} vectors", ids.len())));
        }
        let _writer = self.writer.lock();
        let mut seen = std::collections::HashSet::with_capacity(ids.len());
        {
            let engine = self.engine.read();
            for (i, &id) in ids.iter().enumerate() {
                if id == u64::MAX {
                    return Err(Error::input(format!(
                        "ids[{i}] = 2**64-1 is reserved by the index engine"
                    )));
                }
                if !seen.insert(id) {
                    return Err(Error::input(format!(
                        "ids[{i}] = {id} appears twice in the batch"
                    )));
                }
                if engine.contains(id) {
                    return Err(Error::input(format!(
                        "ids[{i}] = {id} is already in the index"
                    )));
                }
            }
        }
        self.reserve_for(n)?;
        let engine = self.engine.read();
        let add = |(id, v): (&u64, &[f32])| {
            engine
                .add(*id, v)
                .map_err(|e| engine_error(&format!("adding id {id}"), e))
        };
        // The engine's inserts are thread-safe: large batches use every core.
        if n >= 256 {
            ids.par_iter()
                .zip(vectors.par_chunks(self.config.dim))
                .try_for_each(add)?;
        } else {
            ids.iter()
                .zip(vectors.chunks(self.config.dim))
                .try_for_each(add)?;
        }
        let mut flat = self.flat.write();
        if engine.size() >= self.config.exact_below {
            *flat = None;
        } else if let Some(store) = flat.as_mut() {
            for (id, v) in ids.iter().zip(vectors.chunks(self.config.dim)) {
                store.push(*id, &self.prepare(v));
            }
        }
        Ok(())
    }

    /// A vector as the flat store keeps it: unit length under cosine.
    fn prepare(&self, v: &[f32]) -> Vec<f32> {
        match self.config.metric {
            Metric::Cosine => {
                let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                v.iter().map(|x| x / norm).collect()
            }
            Metric::InnerProduct => v.to_vec(),
        }
    }

    /// Grows capacity geometrically so that `extra` more entries fit.
    fn reserve_for(&self, extra: usize) -> Result<()> {
        let needed = self.engine.read().size() + extra;
        if needed <= self.engine.read().capacity() {
            return Ok(());
        }
        let engine = self.engine.write();
        let target = needed.max(engine.capacity() * 2);
        engine
            .reserve(target)
            .map_err(|e| Error::input(format!("could not grow the index to {target} entries: {e}")))
    }

    /// Removes ids; every id must be present (checked before anything is removed).
    pub fn remove(&self, ids: &[u64]) -> Result<()> {
        let _writer = self.writer.lock();
        let engine = self.engine.read();
        for (i, &id) in ids.iter().enumerate() {
            if !engine.contains(id) {
                return Err(Error::input(format!("ids[{i}] = {id} is not in the index")));
            }
        }
        let mut flat = self.flat.write();
        for &id in ids {
            engine
                .remove(id)
                .map_err(|e| engine_error(&format!("removing id {id}"), e))?;
            if let Some(store) = flat.as_mut() {
                store.remove(id);
            }
        }
        Ok(())
    }

    /// The `k` nearest entries of each query (row-major), best first.
    /// `ef` widens (or narrows) the graph search for this call; it must be >= k.
    pub fn search(&self, queries: &[f32], k: usize, ef: Option<usize>) -> Result<Neighbours> {
        if k == 0 {
            return Err(Error::input("k must be at least 1"));
        }
        if let Some(ef) = ef {
            if ef < k {
                return Err(Error::input(format!("ef ({ef}) must be at least k ({k})")));
            }
        }
        let n = self.check_vectors(queries, "queries")?;
        let mut out = Neighbours {
            k,
            ids: vec![-1; n * k],
            scores: vec![f32::NEG_INFINITY; n * k],
        };
        let custom_ef_guard = match ef {
            Some(ef) if ef != self.config.ef_search => {
                let guard = self.custom_ef.lock();
                self.engine.read().change_expansion_search(ef);
                Some(guard)
            }
            _ => None,
        };
        let result = self.search_into(queries, k, &mut out);
        if custom_ef_guard.is_some() {
            self.engine
                .read()
                .change_expansion_search(self.config.ef_search);
        }
        result.map(|_| out)
    }

    fn search_into(&self, queries: &[f32], k: usize, out: &mut Neighbours) -> Result<()> {
        let engine = self.engine.read();
        let exact = engine.size() < self.config.exact_below;
        let flat = self.flat.read();
        if let (true, Some(store)) = (exact, flat.as_ref()) {
            for (q, query) in queries.chunks(self.config.dim).enumerate() {
                let range = q * k..(q + 1) * k;
                let prepared = self.prepare(query);
                store.search(
                    &prepared,
                    k,
                    &mut out.ids[range.clone()],
                    &mut out.scores[range],
                );
            }
            return Ok(());
        }
        for (q, query) in queries.chunks(self.config.dim).enumerate() {
            let found = if exact {
                engine.exact_search(query, k)
            } else {
                engine.search(query, k)
            }
            .map_err(|e| engine_error(&format!("searching query {q}"), e))?;
            for (j, (&id, &distance)) in found.keys.iter().zip(&found.distances).enumerate() {
                out.ids[q * k + j] = id as i64;
                // The engine reports distances: 1 - cosine, or 1 - dot.
                out.scores[q * k + j] = 1.0 - distance;
            }
        }
        Ok(())
    }

    /// The stored vector of `id` (as the engine stores it: normalised for
    /// cosine, quantised for i8), or None.
    pub fn get(&self, id: u64) -> Option<Vec<f32>> {
        let engine = self.engine.read();
        if !engine.contains(id) {
            return None;
        }
        let mut buf = vec![0.0f32; self.config.dim];
        engine.get(id, &mut buf).ok().map(|_| buf)
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

    #[test]
    fn growth_past_initial_capacity() {
        let idx = AnnIndex::new(AnnConfig::new(4)).unwrap();
        let data = rng_vectors(500, 4, 3);
        for (i, v) in data.chunks(4).enumerate() {
            idx.add(&[i as u64], v).unwrap();
        }
        assert_eq!(idx.len(), 500);
    }
}
