//! Python wrapper: `FeatureHasher`, scikit-learn's `HashingVectorizer` in Rust.

use numpy::{IntoPyArray, PyArray1};
use pyo3::prelude::*;
use tiergate_core::hashing::{self, Analyzer, HasherConfig, Norm};
use tiergate_core::text::DEFAULT_MAX_TEXT_BYTES;

use crate::errors::IntoPyResult;
use crate::input;

type CsrArrays<'py> = (
    Bound<'py, PyArray1<f64>>,
    Bound<'py, PyArray1<i32>>,
    Bound<'py, PyArray1<i32>>,
);

/// Hashes texts into sparse features, bit-identical to scikit-learn's
/// ``HashingVectorizer`` with the same settings (``analyzer`` 'word', 'char'
/// or 'char_wb', ``ngram_range``, ``lowercase``, ``norm`` 'l2', 'l1' or None,
/// ``alternate_sign``, ``binary``; default token pattern). Empty text gives an
/// empty row, as in scikit-learn; text over ``max_text_bytes`` raises
/// ``InputError``.
#[pyclass(module = "tiergate._core", frozen, name = "FeatureHasher")]
pub struct PyFeatureHasher {
    pub(crate) inner: hashing::FeatureHasher,
}

#[pymethods]
impl PyFeatureHasher {
    #[new]
    #[pyo3(signature = (
        n_features = 1 << 20,
        *,
        analyzer = "word",
        ngram_range = (1, 1),
        lowercase = true,
        norm = Some("l2"),
        alternate_sign = true,
        binary = false,
        max_text_bytes = DEFAULT_MAX_TEXT_BYTES,
    ))]
    #[pyo3(
        text_signature = "(n_features=1048576, *, analyzer='word', ngram_range=(1, 1), lowercase=True, norm='l2', alternate_sign=True, binary=False, max_text_bytes=1048576)"
    )]
    #[allow(clippy::too_many_arguments)] // mirrors scikit-learn's keyword arguments
    fn new(
        n_features: usize,
        analyzer: &str,
        ngram_range: (usize, usize),
        lowercase: bool,
        norm: Option<&str>,
        alternate_sign: bool,
        binary: bool,
        max_text_bytes: usize,
    ) -> PyResult<Self> {
        let config = HasherConfig {
            n_features,
            analyzer: Analyzer::parse(analyzer).py()?,
            ngram_range,
            lowercase,
            norm: Norm::parse(norm).py()?,
            alternate_sign,
            binary,
        };
        Ok(PyFeatureHasher {
            inner: hashing::FeatureHasher::new(config, max_text_bytes).py()?,
        })
    }

    /// Hashes a sequence of texts into CSR arrays ``(data, indices, indptr)``
    /// (float64, int32, int32), equal to the arrays of
    /// ``HashingVectorizer.transform`` (sorted indices, explicit zeros kept).
    /// ``scipy.sparse.csr_matrix((data, indices, indptr), shape=(len(texts),
    /// n_features))`` rebuilds the matrix.
    fn transform<'py>(
        &self,
        py: Python<'py>,
        texts: &Bound<'py, PyAny>,
    ) -> PyResult<CsrArrays<'py>> {
        let texts = input::text_batch(texts, "texts")?;
        let csr = py.detach(|| self.inner.transform(&texts)).py()?;
        Ok((
            csr.data.into_pyarray(py),
            csr.indices.into_pyarray(py),
            csr.indptr.into_pyarray(py),
        ))
    }

    /// Number of hashed features (columns).
    #[getter]
    fn n_features(&self) -> usize {
        self.inner.n_features()
    }

    /// 'word', 'char' or 'char_wb'.
    #[getter]
    fn analyzer(&self) -> &'static str {
        self.inner.config().analyzer.name()
    }

    /// ``(min_n, max_n)`` of the n-grams.
    #[getter]
    fn ngram_range(&self) -> (usize, usize) {
        self.inner.config().ngram_range
    }

    /// Whether text is lowercased (``str.lower``) before tokenising.
    #[getter]
    fn lowercase(&self) -> bool {
        self.inner.config().lowercase
    }

    /// 'l2', 'l1' or None.
    #[getter]
    fn norm(&self) -> Option<&'static str> {
        self.inner.config().norm.map(Norm::name)
    }

    /// Whether the hash's sign alternates feature values (scikit-learn's default).
    #[getter]
    fn alternate_sign(&self) -> bool {
        self.inner.config().alternate_sign
    }

    /// Whether every non-zero count becomes 1 before normalising.
    #[getter]
    fn binary(&self) -> bool {
        self.inner.config().binary
    }

    /// Texts longer than this many UTF-8 bytes are refused.
    #[getter]
    fn max_text_bytes(&self) -> usize {
        self.inner.max_text_bytes()
    }

    /// The settings as keyword arguments of the constructor (for manifests).
    fn get_params<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, pyo3::types::PyDict>> {
        let d = pyo3::types::PyDict::new(py);
        d.set_item("n_features", self.n_features())?;
        d.set_item("analyzer", self.analyzer())?;
        d.set_item("ngram_range", self.ngram_range())?;
        d.set_item("lowercase", self.lowercase())?;
        d.set_item("norm", self.norm())?;
        d.set_item("alternate_sign", self.alternate_sign())?;
        d.set_item("binary", self.binary())?;
        d.set_item("max_text_bytes", self.max_text_bytes())?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        let c = self.inner.config();
        format!(
            "FeatureHasher(n_features={}, analyzer='{}', ngram_range={:?}, lowercase={}, norm={}, alternate_sign={}, binary={})",
            c.n_features,
            c.analyzer.name(),
            c.ngram_range,
            py_bool(c.lowercase),
            c.norm.map_or("None".to_owned(), |n| format!("'{}'", n.name())),
            py_bool(c.alternate_sign),
            py_bool(c.binary),
        )
    }
}

fn py_bool(b: bool) -> &'static str {
    if b {
        "True"
    } else {
        "False"
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyFeatureHasher>()
}
