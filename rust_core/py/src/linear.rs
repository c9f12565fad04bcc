//! Python wrapper: `LinearModel`, the hashed linear classifier.

use numpy::ndarray::Array2;
use numpy::{AllowTypeChange, IntoPyArray, PyArray1, PyArray2, PyArrayLike1, PyArrayLike2};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use tiergate_core::linear::{self, top_k};

use crate::errors::{InputError, IntoPyResult};
use crate::gil;
use crate::hashing::PyFeatureHasher;
use crate::input;

/// ``(indices, probabilities)`` of the best classes per text.
type TopK<'py> = (Bound<'py, PyArray2<i32>>, Bound<'py, PyArray2<f32>>);

/// A linear classifier over hashed features, with calibrated probabilities.
///
/// ``coef`` and ``intercept`` are a scikit-learn linear model's ``coef_``
/// ``(n_classes, n_features)`` (one row for a binary model) and
/// ``intercept_``, trained on the features of ``hashers`` (one
/// ``FeatureHasher``, or several whose outputs were concatenated with
/// ``scipy.sparse.hstack`` in that order). Probabilities are
/// ``softmax(z / temperature)`` (a sigmoid for binary models), so
/// ``temperature=1`` reproduces ``LogisticRegression.predict_proba``.
#[pyclass(module = "tiergate._core", frozen, name = "LinearModel")]
pub struct PyLinearModel {
    inner: linear::LinearModel,
}

impl PyLinearModel {
    /// `top_k` over the calibrated probabilities, flat (`k.min(n_classes)` per
    /// text); a text with fewer than `min_known` known features gets -1 and 0.
    fn best(
        &self,
        texts: &[String],
        k: usize,
        min_known: u32,
    ) -> tiergate_core::Result<(Vec<i32>, Vec<f32>)> {
        let c = self.inner.n_classes();
        if min_known == 0 {
            return self
                .inner
                .predict_proba(texts)
                .map(|probs| top_k(&probs, c, k));
        }
        self.inner
            .predict_proba_with_support(texts)
            .map(|(probs, support)| {
                let (mut idx, mut val) = top_k(&probs, c, k);
                let width = k.min(c);
                for (i, _) in support.iter().enumerate().filter(|(_, &n)| n < min_known) {
                    idx[i * width..(i + 1) * width].fill(-1);
                    val[i * width..(i + 1) * width].fill(0.0);
                }
                (idx, val)
            })
    }
}

#[pymethods]
impl PyLinearModel {
    #[new]
    #[pyo3(signature = (hashers, coef, intercept, labels, *, temperature = 1.0))]
    fn new(
        hashers: &Bound<'_, PyAny>,
        coef: PyArrayLike2<'_, f32, AllowTypeChange>,
        intercept: PyArrayLike1<'_, f32, AllowTypeChange>,
        labels: &Bound<'_, PyAny>,
        temperature: f32,
    ) -> PyResult<Self> {
        let hashers = extract_hashers(hashers)?;
        let labels = input::text_batch(labels, "labels")?;
        let view = coef.as_array();
        let n_outputs = view.nrows();
        // Read a C-contiguous array in place: a CLINC150 model's coef is 317 MB.
        let copied: Vec<f32>;
        let coef = match view.as_slice() {
            Some(values) => values,
            None => {
                copied = view.iter().copied().collect();
                &copied
            }
        };
        let intercept = intercept.as_array().iter().copied().collect::<Vec<f32>>();
        Ok(PyLinearModel {
            inner: linear::LinearModel::new(
                hashers,
                coef,
                n_outputs,
                &intercept,
                labels,
                temperature,
            )
            .py()?,
        })
    }

    /// Calibrated class probabilities, float32 ``(len(texts), n_classes)``,
    /// columns in ``labels`` order. Hashing and scoring are fused. Empty or
    /// whitespace-only text, or text over the hashers' ``max_text_bytes``,
    /// raises ``InputError`` naming its position.
    fn predict_proba<'py>(
        &self,
        py: Python<'py>,
        texts: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let texts = input::text_batch(texts, "texts")?;
        let probs = py.detach(|| self.inner.predict_proba(&texts)).py()?;
        matrix(py, probs, texts.len(), self.inner.n_classes())
    }

    /// Raw scores before calibration, float32 ``(len(texts), n_outputs)``
    /// (scikit-learn's ``decision_function``; one column for binary models).
    fn decision_function<'py>(
        &self,
        py: Python<'py>,
        texts: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let texts = input::text_batch(texts, "texts")?;
        let z = py.detach(|| self.inner.decision_function(&texts)).py()?;
        let width = if texts.is_empty() {
            0
        } else {
            z.len() / texts.len()
        };
        matrix(py, z, texts.len(), width)
    }

    /// Probabilities for rows already hashed into the model's (concatenated)
    /// feature space, given as CSR arrays; indices are bounds-checked.
    fn predict_proba_csr<'py>(
        &self,
        py: Python<'py>,
        data: PyArrayLike1<'py, f64, AllowTypeChange>,
        indices: PyArrayLike1<'py, i64, AllowTypeChange>,
        indptr: PyArrayLike1<'py, i64, AllowTypeChange>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let data: Vec<f64> = data.as_array().iter().copied().collect();
        let indices: Vec<i64> = indices.as_array().iter().copied().collect();
        let indptr: Vec<i64> = indptr.as_array().iter().copied().collect();
        let probs = py
            .detach(|| self.inner.predict_proba_csr(&data, &indices, &indptr))
            .py()?;
        matrix(
            py,
            probs,
            indptr.len().saturating_sub(1),
            self.inner.n_classes(),
        )
    }

    /// The ``k`` most probable classes per text, best first: ``(indices, probs)``
    /// as int32 and float32 arrays of shape ``(len(texts), min(k, n_classes))``;
    /// ``labels[i]`` names index ``i``. A text with fewer than ``min_known``
    /// features that training saw gets index -1 and probability 0 throughout: the
    /// model knows nothing of it (its scores would be the intercepts alone).
    #[pyo3(signature = (texts, k = 1, min_known = 0))]
    fn top_k<'py>(
        &self,
        py: Python<'py>,
        texts: &Bound<'py, PyAny>,
        k: usize,
        min_known: u32,
    ) -> PyResult<TopK<'py>> {
        if k == 0 {
            return Err(InputError::new_err("k must be at least 1"));
        }
        let texts = input::text_batch(texts, "texts")?;
        let (idx, val) = py.detach(|| self.best(&texts, k, min_known)).py()?;
        let width = k.min(self.inner.n_classes());
        Ok((
            matrix(py, idx, texts.len(), width)?,
            matrix(py, val, texts.len(), width)?,
        ))
    }

    /// The most probable class of one text and its probability, ``(index,
    /// prob)``: ``top_k([text], 1, min_known)`` as two Python numbers, for the
    /// front end's one-text path (no list to build, no arrays to index). Holds
    /// the GIL for a text under ``KEEP_GIL_BELOW_BYTES`` (see `gil`).
    #[pyo3(signature = (text, min_known = 0))]
    fn top1(
        &self,
        py: Python<'_>,
        text: &Bound<'_, PyAny>,
        min_known: u32,
    ) -> PyResult<(i32, f32)> {
        let texts = [input::text(text, "text")?];
        let (idx, val) = gil::one_text(py, &texts[0], || self.best(&texts, 1, min_known))
            // A refused text is checked again, off the hot path, for an error that
            // names it as the one text rather than a batch's first.
            .or_else(|e| self.inner.check_text(&texts[0]).and(Err(e)))
            .py()?;
        Ok((idx[0], val[0]))
    }

    /// One text's probabilities, float32 ``(n_classes,)``: ``predict_proba([text])[0]``
    /// for the front end's one-text path (the intent tier's calibration mixes them
    /// in). Holds the GIL for a text under ``KEEP_GIL_BELOW_BYTES`` (see `gil`).
    fn proba<'py>(
        &self,
        py: Python<'py>,
        text: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let texts = [input::text(text, "text")?];
        let probs = gil::one_text(py, &texts[0], || self.inner.predict_proba(&texts))
            .or_else(|e| self.inner.check_text(&texts[0]).and(Err(e)))
            .py()?;
        Ok(probs.into_pyarray(py))
    }

    /// The same weights with another calibration temperature.
    fn with_temperature(&self, temperature: f32) -> PyResult<Self> {
        Ok(PyLinearModel {
            inner: self.inner.with_temperature(temperature).py()?,
        })
    }

    /// Class labels, in column order.
    #[getter]
    fn labels(&self) -> Vec<String> {
        self.inner.labels().to_vec()
    }

    /// Number of classes (columns of ``predict_proba``).
    #[getter]
    fn n_classes(&self) -> usize {
        self.inner.n_classes()
    }

    /// Total number of features across the hashers.
    #[getter]
    fn n_features(&self) -> usize {
        self.inner.n_features()
    }

    /// How many features training saw: only their weight rows are held in memory.
    #[getter]
    fn seen_features(&self) -> usize {
        self.inner.seen_features()
    }

    /// The calibration temperature.
    #[getter]
    fn temperature(&self) -> f32 {
        self.inner.temperature()
    }

    /// The hashers, in feature-block order.
    #[getter]
    fn hashers(&self) -> Vec<PyFeatureHasher> {
        self.inner
            .hashers()
            .iter()
            .map(|h| PyFeatureHasher { inner: h.clone() })
            .collect()
    }

    fn __repr__(&self) -> String {
        format!(
            "LinearModel(n_classes={}, n_features={}, hashers={}, temperature={})",
            self.inner.n_classes(),
            self.inner.n_features(),
            self.inner.hashers().len(),
            self.inner.temperature()
        )
    }
}

fn extract_hashers(obj: &Bound<'_, PyAny>) -> PyResult<Vec<tiergate_core::hashing::FeatureHasher>> {
    if let Ok(h) = obj.cast::<PyFeatureHasher>() {
        return Ok(vec![h.get().inner.clone()]);
    }
    let mut out = Vec::new();
    let items = obj.try_iter().map_err(|_| {
        PyTypeError::new_err(format!(
            "hashers must be a FeatureHasher or a sequence of them, not {}",
            input::type_name(obj)
        ))
    })?;
    for (i, item) in items.enumerate() {
        let item = item?;
        let h = item.cast::<PyFeatureHasher>().map_err(|_| {
            PyTypeError::new_err(format!(
                "hashers[{i}] must be a FeatureHasher, not {}",
                input::type_name(&item)
            ))
        })?;
        out.push(h.get().inner.clone());
    }
    Ok(out)
}

fn matrix<T: numpy::Element>(
    py: Python<'_>,
    v: Vec<T>,
    rows: usize,
    cols: usize,
) -> PyResult<Bound<'_, PyArray2<T>>> {
    let arr = Array2::from_shape_vec((rows, cols), v).map_err(|e| {
        pyo3::exceptions::PyRuntimeError::new_err(format!("internal shape error: {e}"))
    })?;
    Ok(arr.into_pyarray(py))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyLinearModel>()
}
