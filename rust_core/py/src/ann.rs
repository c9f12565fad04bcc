//! Python wrapper: `AnnIndex`, HNSW / exact nearest-neighbour search.

use std::path::PathBuf;

use numpy::ndarray::Array2;
use numpy::{AllowTypeChange, IntoPyArray, PyArray1, PyArray2, PyArrayLike1, PyArrayLikeDyn};
use pyo3::prelude::*;
use tiergate_core::ann::{self, AnnConfig, Metric, Storage};

use crate::errors::{InputError, IntoPyResult};

/// ``(ids int64 (n, k), scores float32 (n, k))``.
type SearchResult<'py> = (Bound<'py, PyArray2<i64>>, Bound<'py, PyArray2<f32>>);

/// Rows of a float32 matrix (or one vector) as a flat row-major Vec, with the
/// row count. `what` names the argument in errors.
pub fn rows(
    array: &PyArrayLikeDyn<'_, f32, AllowTypeChange>,
    dim: usize,
    what: &str,
) -> PyResult<(Vec<f32>, usize)> {
    let view = array.as_array();
    let n = match view.ndim() {
        1 => 1,
        2 => view.shape()[0],
        d => {
            return Err(InputError::new_err(format!(
                "{what} must be one vector (dim,) or a matrix (n, dim), not {d}-dimensional"
            )))
        }
    };
    let width = *view.shape().last().unwrap_or(&0);
    if width != dim {
        return Err(InputError::new_err(format!(
            "{what} has {width} columns but the index has dim={dim}"
        )));
    }
    Ok((view.iter().copied().collect(), n))
}

/// An approximate nearest-neighbour index over float32 vectors, keyed by
/// uint64 ids: HNSW search, exact search while it holds fewer than
/// ``exact_below`` entries. ``metric`` is 'cosine' or 'ip'; ``dtype`` 'f32' or
/// 'i8' (int8 storage, cosine only). Searches may run while other threads add;
/// a batch of queries is spread over every core.
#[pyclass(module = "tiergate._core", frozen, name = "AnnIndex")]
pub struct PyAnnIndex {
    inner: ann::AnnIndex,
}

#[pymethods]
impl PyAnnIndex {
    #[new]
    #[pyo3(signature = (dim, *, metric = "cosine", dtype = "f32", m = 16, ef_construction = 128, ef_search = 64, exact_below = 2048))]
    #[pyo3(
        text_signature = "(dim, *, metric='cosine', dtype='f32', m=16, ef_construction=128, ef_search=64, exact_below=2048)"
    )]
    fn new(
        dim: usize,
        metric: &str,
        dtype: &str,
        m: usize,
        ef_construction: usize,
        ef_search: usize,
        exact_below: usize,
    ) -> PyResult<Self> {
        let config = AnnConfig {
            dim,
            metric: Metric::parse(metric).py()?,
            storage: Storage::parse(dtype).py()?,
            connectivity: m,
            ef_construction,
            ef_search,
            exact_below,
        };
        Ok(PyAnnIndex {
            inner: ann::AnnIndex::new(config).py()?,
        })
    }

    /// Adds ``vectors`` (n, dim) under ``ids`` (n uint64). The batch is checked
    /// first (finite values, non-zero under cosine, ids new and distinct); on
    /// any error nothing is added.
    fn add(
        &self,
        py: Python<'_>,
        ids: PyArrayLike1<'_, u64, AllowTypeChange>,
        vectors: PyArrayLikeDyn<'_, f32, AllowTypeChange>,
    ) -> PyResult<()> {
        let ids: Vec<u64> = ids.as_array().iter().copied().collect();
        let (vectors, _) = rows(&vectors, self.inner.dim(), "vectors")?;
        py.detach(|| self.inner.add(&ids, &vectors)).py()
    }

    /// The ``k`` nearest entries of each query, best first:
    /// ``(ids, scores)`` of shape (n, k); a single (dim,) query gives (1, k).
    /// Scores are similarities (cosine, or inner product). Missing slots
    /// (fewer than ``k`` entries) have id -1 and score -inf. ``ef`` (>= k)
    /// sets the graph search breadth for this call.
    #[pyo3(signature = (queries, k = 10, ef = None))]
    fn search<'py>(
        &self,
        py: Python<'py>,
        queries: PyArrayLikeDyn<'py, f32, AllowTypeChange>,
        k: usize,
        ef: Option<usize>,
    ) -> PyResult<SearchResult<'py>> {
        let (queries, n) = rows(&queries, self.inner.dim(), "queries")?;
        let found = py.detach(|| self.inner.search(&queries, k, ef)).py()?;
        let shape_err = |e: numpy::ndarray::ShapeError| {
            pyo3::exceptions::PyRuntimeError::new_err(e.to_string())
        };
        let ids = Array2::from_shape_vec((n, k), found.ids).map_err(shape_err)?;
        let scores = Array2::from_shape_vec((n, k), found.scores).map_err(shape_err)?;
        Ok((ids.into_pyarray(py), scores.into_pyarray(py)))
    }

    /// Removes ``ids``; every id must be present (checked before removing any).
    fn remove(&self, py: Python<'_>, ids: PyArrayLike1<'_, u64, AllowTypeChange>) -> PyResult<()> {
        let ids: Vec<u64> = ids.as_array().iter().copied().collect();
        py.detach(|| self.inner.remove(&ids)).py()
    }

    /// The stored vector of ``id`` (normalised under cosine), or None.
    fn get<'py>(&self, py: Python<'py>, id: u64) -> Option<Bound<'py, PyArray1<f32>>> {
        self.inner.get(id).map(|v| v.into_pyarray(py))
    }

    /// Writes the index to ``path`` (atomically: a temporary file, then rename).
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        py.detach(|| self.inner.save(&path)).py()
    }

    /// Reads an index written by ``save``. A truncated, corrupt or foreign
    /// file raises ``FormatError`` naming the path.
    #[staticmethod]
    fn load(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        Ok(PyAnnIndex {
            inner: py.detach(|| ann::AnnIndex::load(&path)).py()?,
        })
    }

    /// Vector dimension.
    #[getter]
    fn dim(&self) -> usize {
        self.inner.dim()
    }

    /// 'cosine' or 'ip'.
    #[getter]
    fn metric(&self) -> &'static str {
        self.inner.config().metric.name()
    }

    /// Storage type: 'f32' or 'i8'.
    #[getter]
    fn dtype(&self) -> &'static str {
        self.inner.config().storage.name()
    }

    /// Default graph search breadth.
    #[getter]
    fn ef_search(&self) -> usize {
        self.inner.config().ef_search
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    fn __contains__(&self, id: u64) -> bool {
        self.inner.contains(id)
    }

    fn __repr__(&self) -> String {
        let c = self.inner.config();
        format!(
            "AnnIndex(dim={}, metric='{}', dtype='{}', len={})",
            c.dim,
            c.metric.name(),
            c.storage.name(),
            self.inner.len()
        )
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyAnnIndex>()
}
