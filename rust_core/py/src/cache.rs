//! Python wrapper: `SemanticCache`, per-tenant lookups by embedding similarity.

use std::path::PathBuf;

use numpy::{AllowTypeChange, PyArrayLikeDyn};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use tiergate_core::ann::Metric;
use tiergate_core::cache::{self, CacheConfig, CacheStats};

use crate::ann::rows;
use crate::errors::IntoPyResult;

/// ``(value, similarity)`` of a hit.
type PyHit<'py> = Option<(Bound<'py, PyBytes>, f32)>;

/// A semantic cache: stores a ``bytes`` value per request embedding, and
/// answers a later request whose embedding is at least ``threshold`` similar.
/// Each namespace (tenant) has its own index: no lookup ever sees another
/// namespace's entries. Entries expire after ``ttl_seconds`` (None: never), and
/// each namespace holds at most ``capacity`` entries (least recently used go first).
#[pyclass(module = "tiergate._core", frozen, name = "SemanticCache")]
pub struct PySemanticCache {
    inner: cache::SemanticCache,
}

#[pymethods]
impl PySemanticCache {
    #[new]
    #[pyo3(signature = (dim, *, threshold = 0.95, ttl_seconds = None, capacity = 10_000, metric = "cosine"))]
    #[pyo3(
        text_signature = "(dim, *, threshold=0.95, ttl_seconds=None, capacity=10000, metric='cosine')"
    )]
    fn new(
        dim: usize,
        threshold: f32,
        ttl_seconds: Option<f64>,
        capacity: usize,
        metric: &str,
    ) -> PyResult<Self> {
        let config = CacheConfig {
            dim,
            metric: Metric::parse(metric).py()?,
            threshold,
            ttl_seconds,
            capacity,
        };
        Ok(PySemanticCache {
            inner: cache::SemanticCache::new(config).py()?,
        })
    }

    /// Stores ``value`` for the request embedded as ``vector`` (dim,) in ``namespace``.
    fn put(
        &self,
        py: Python<'_>,
        namespace: &str,
        vector: PyArrayLikeDyn<'_, f32, AllowTypeChange>,
        value: &Bound<'_, PyBytes>,
    ) -> PyResult<()> {
        let (vector, _) = rows(&vector, self.inner.config().dim, "vector")?;
        let value = value.as_bytes().to_vec();
        py.detach(|| self.inner.put(namespace, &vector, &value))
            .py()
    }

    /// ``(value, similarity)`` of the most similar live entry of ``namespace``
    /// if it reaches the threshold, else None. An unknown namespace is a miss.
    /// Gives the GIL up: a search is tens of microseconds, but one that finds
    /// expired entries removes them, and a removal may rebuild a big index
    /// (0.2 s at 3,000 entries), which must not stop every Python thread.
    fn get<'py>(
        &self,
        py: Python<'py>,
        namespace: &str,
        vector: PyArrayLikeDyn<'py, f32, AllowTypeChange>,
    ) -> PyResult<PyHit<'py>> {
        let (vector, _) = rows(&vector, self.inner.config().dim, "vector")?;
        let hit = py.detach(|| self.inner.get(namespace, &vector)).py()?;
        Ok(hit.map(|h| (PyBytes::new(py, &h.value), h.similarity)))
    }

    /// ``get`` for each row of ``vectors`` (n, dim).
    fn get_batch<'py>(
        &self,
        py: Python<'py>,
        namespace: &str,
        vectors: PyArrayLikeDyn<'py, f32, AllowTypeChange>,
    ) -> PyResult<Vec<PyHit<'py>>> {
        let dim = self.inner.config().dim;
        let (vectors, _) = rows(&vectors, dim, "vectors")?;
        let hits = py
            .detach(|| {
                vectors
                    .chunks(dim)
                    .map(|v| self.inner.get(namespace, v))
                    .collect::<tiergate_core::Result<Vec<_>>>()
            })
            .py()?;
        Ok(hits
            .into_iter()
            .map(|h| h.map(|h| (PyBytes::new(py, &h.value), h.similarity)))
            .collect())
    }

    /// Drops every entry of ``namespace`` (its counters stay).
    fn clear(&self, py: Python<'_>, namespace: &str) -> PyResult<()> {
        py.detach(|| self.inner.clear(namespace)).py()
    }

    /// Removes ``namespace`` whole: entries, index and its own counters (they stay in
    /// the totals). For a namespace no request will read again (``clear`` leaves its
    /// index in memory). Returns whether there was one.
    fn drop_namespace(&self, py: Python<'_>, namespace: &str) -> bool {
        py.detach(|| self.inner.drop_namespace(namespace))
    }

    /// Writes every live entry to ``path`` (atomically); returns how many.
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<usize> {
        py.detach(|| self.inner.save(&path)).py()
    }

    /// Adds the entries of a snapshot written by ``save``; returns how many were
    /// still live (the time since the save counts against the TTL). A corrupt,
    /// truncated or foreign file, or one made for another dim or metric, raises
    /// ``FormatError`` naming the path and restores nothing.
    fn restore(&self, py: Python<'_>, path: PathBuf) -> PyResult<usize> {
        py.detach(|| self.inner.restore(&path)).py()
    }

    /// Namespaces that have held entries, sorted.
    fn namespaces(&self) -> Vec<String> {
        self.inner.namespaces()
    }

    /// Counters: ``{"total": {...}, "namespaces": {name: {...}}}`` with
    /// hits, misses, evictions, expirations and entries.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let (per, total) = self.inner.stats();
        let out = PyDict::new(py);
        out.set_item("total", stats_dict(py, total)?)?;
        let namespaces = PyDict::new(py);
        for (name, s) in per {
            namespaces.set_item(name, stats_dict(py, s)?)?;
        }
        out.set_item("namespaces", namespaces)?;
        Ok(out)
    }

    /// Similarity at or above which a lookup hits.
    #[getter]
    fn threshold(&self) -> f32 {
        self.inner.config().threshold
    }

    /// Embedding dimension.
    #[getter]
    fn dim(&self) -> usize {
        self.inner.config().dim
    }

    /// Entries per namespace.
    #[getter]
    fn capacity(&self) -> usize {
        self.inner.config().capacity
    }

    /// Entry lifetime in seconds, or None.
    #[getter]
    fn ttl_seconds(&self) -> Option<f64> {
        self.inner.config().ttl_seconds
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    fn __repr__(&self) -> String {
        let c = self.inner.config();
        format!(
            "SemanticCache(dim={}, threshold={}, ttl_seconds={:?}, capacity={}, entries={})",
            c.dim,
            c.threshold,
            c.ttl_seconds,
            c.capacity,
            self.inner.len()
        )
    }
}

fn stats_dict(py: Python<'_>, s: CacheStats) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("hits", s.hits)?;
    d.set_item("misses", s.misses)?;
    d.set_item("evictions", s.evictions)?;
    d.set_item("expirations", s.expirations)?;
    d.set_item("entries", s.entries)?;
    Ok(d)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PySemanticCache>()
}
