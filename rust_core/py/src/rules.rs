//! Python wrapper: `RuleSet` and `RuleMatch`, the rules tier.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use numpy::{IntoPyArray, PyArray1};
use pyo3::prelude::*;
use pyo3::types::PyString;
use tiergate_core::rules::{self, spec, MatchScratch, RuleLimits};
use tiergate_core::text::DEFAULT_MAX_TEXT_BYTES;

use crate::errors::IntoPyResult;
use crate::gil;
use crate::input;

/// ``(winner rule index or -1, confidence or 0)`` per text.
type MatchArrays<'py> = (Bound<'py, PyArray1<i32>>, Bound<'py, PyArray1<f32>>);

/// Regex and whole-word keyword rules compiled into one matcher.
///
/// Build it from a list of rule dicts, ``RuleSet.from_file(path)`` (YAML or
/// JSON), ``from_yaml`` or ``from_json``. Matching returns the winning rule
/// (highest priority among matched rules that have a label; the earlier rule
/// on a tie) and the union of the risk tags of every matched rule. Invalid
/// rules raise ``ConfigError`` naming the rule and field.
#[pyclass(module = "tiergate._core", frozen, name = "RuleSet")]
pub struct PyRuleSet {
    inner: Arc<rules::RuleSet>,
    /// Reused match buffers (the regex engine's lazy DFA lives in them, so a
    /// fresh one per call would rebuild DFA states every time).
    scratch: Mutex<Vec<MatchScratch>>,
}

impl PyRuleSet {
    /// Parses with the default limits (GIL released), then compiles: the one
    /// path every constructor takes.
    fn load(
        py: Python<'_>,
        max_text_bytes: usize,
        parse: impl FnOnce(&RuleLimits) -> tiergate_core::Result<Vec<rules::Rule>> + Send,
    ) -> PyResult<Self> {
        let limits = RuleLimits::default();
        let parsed = py.detach(|| parse(&limits)).py()?;
        let inner = rules::RuleSet::compile(parsed, &limits, max_text_bytes).py()?;
        Ok(PyRuleSet {
            inner: Arc::new(inner),
            scratch: Mutex::new(Vec::new()),
        })
    }

    fn with_scratch<T>(&self, f: impl FnOnce(&mut MatchScratch) -> T) -> T {
        let taken = self.scratch.lock().ok().and_then(|mut pool| pool.pop());
        let mut scratch = taken.unwrap_or_else(|| self.inner.scratch());
        let out = f(&mut scratch);
        if let Ok(mut pool) = self.scratch.lock() {
            pool.push(scratch);
        }
        out
    }

    fn to_py_match(&self, m: rules::RuleMatch) -> PyRuleMatch {
        PyRuleMatch {
            set: Arc::clone(&self.inner),
            m,
        }
    }
}

#[pymethods]
impl PyRuleSet {
    #[new]
    #[pyo3(signature = (rules, *, max_text_bytes = DEFAULT_MAX_TEXT_BYTES))]
    #[pyo3(text_signature = "(rules, *, max_text_bytes=1048576)")]
    fn new(py: Python<'_>, rules: &Bound<'_, PyAny>, max_text_bytes: usize) -> PyResult<Self> {
        if rules.is_instance_of::<PyString>() {
            return Err(pyo3::exceptions::PyTypeError::new_err(
                "rules must be a list of rule dicts; use RuleSet.from_yaml / from_json for text",
            ));
        }
        // Python values go through JSON so that dicts, YAML and JSON files
        // all meet the same schema validation in the core crate.
        let json: String = py
            .import("json")?
            .call_method1("dumps", (rules,))?
            .extract()?;
        Self::load(py, max_text_bytes, |limits| {
            spec::parse_rule_list(&json, limits)
        })
    }

    /// Loads rules from a ``.yaml``, ``.yml`` or ``.json`` file.
    #[staticmethod]
    #[pyo3(signature = (path, *, max_text_bytes = DEFAULT_MAX_TEXT_BYTES))]
    #[pyo3(text_signature = "(path, *, max_text_bytes=1048576)")]
    fn from_file(py: Python<'_>, path: PathBuf, max_text_bytes: usize) -> PyResult<Self> {
        Self::load(py, max_text_bytes, |limits| spec::read_file(&path, limits))
    }

    /// Parses a YAML rule document (``{version: 1, rules: [...]}``).
    #[staticmethod]
    #[pyo3(signature = (text, *, max_text_bytes = DEFAULT_MAX_TEXT_BYTES))]
    #[pyo3(text_signature = "(text, *, max_text_bytes=1048576)")]
    fn from_yaml(py: Python<'_>, text: &Bound<'_, PyAny>, max_text_bytes: usize) -> PyResult<Self> {
        let text = input::text(text, "text")?;
        Self::load(py, max_text_bytes, |limits| spec::parse_yaml(&text, limits))
    }

    /// Parses a JSON rule document (``{"version": 1, "rules": [...]}``).
    #[staticmethod]
    #[pyo3(signature = (text, *, max_text_bytes = DEFAULT_MAX_TEXT_BYTES))]
    #[pyo3(text_signature = "(text, *, max_text_bytes=1048576)")]
    fn from_json(py: Python<'_>, text: &Bound<'_, PyAny>, max_text_bytes: usize) -> PyResult<Self> {
        let text = input::text(text, "text")?;
        Self::load(py, max_text_bytes, |limits| spec::parse_json(&text, limits))
    }

    /// Matches one text. Empty or whitespace-only text, or text over
    /// ``max_text_bytes``, raises ``InputError``. Holds the GIL for a text under
    /// ``KEEP_GIL_BELOW_BYTES`` (see `gil`).
    #[pyo3(name = "match")]
    fn match_one(&self, py: Python<'_>, text: &Bound<'_, PyAny>) -> PyResult<PyRuleMatch> {
        let text = input::text(text, "text")?;
        self.inner.check(&text, None).py()?;
        let m = gil::one_text(py, &text, || {
            self.with_scratch(|s| self.inner.match_text(&text, s))
        });
        Ok(self.to_py_match(m))
    }

    /// Matches a batch of texts, one ``RuleMatch`` each. Every text is
    /// checked before any is matched; the error names the first bad one.
    fn match_batch(&self, py: Python<'_>, texts: &Bound<'_, PyAny>) -> PyResult<Vec<PyRuleMatch>> {
        let texts = input::text_batch(texts, "texts")?;
        let matches = py
            .detach(|| self.with_scratch(|s| self.inner.match_batch(&texts, s)))
            .py()?;
        Ok(matches.into_iter().map(|m| self.to_py_match(m)).collect())
    }

    /// The hot-path form of ``match_batch``: ``(winner, confidence)`` arrays
    /// (int32 rule index or -1, float32 confidence or 0). Risk tags are not
    /// returned here; use ``match_batch`` when they matter.
    fn match_arrays<'py>(
        &self,
        py: Python<'py>,
        texts: &Bound<'py, PyAny>,
    ) -> PyResult<MatchArrays<'py>> {
        let texts = input::text_batch(texts, "texts")?;
        let (winners, confidences) = py
            .detach(|| -> tiergate_core::Result<(Vec<i32>, Vec<f32>)> {
                for (i, t) in texts.iter().enumerate() {
                    self.inner.check(t, Some(i))?;
                }
                Ok(self.with_scratch(|s| {
                    texts
                        .iter()
                        .map(|t| match self.inner.match_text(t, s).winner {
                            Some(w) => (w as i32, self.inner.rules()[w as usize].confidence),
                            None => (-1, 0.0),
                        })
                        .unzip()
                }))
            })
            .py()?;
        Ok((winners.into_pyarray(py), confidences.into_pyarray(py)))
    }

    /// Rule ids, in file order (``match_arrays`` indexes into this).
    #[getter]
    fn rule_ids(&self) -> Vec<String> {
        self.inner.rules().iter().map(|r| r.id.clone()).collect()
    }

    /// Rule labels, in file order (None for tag-only rules).
    #[getter]
    fn labels(&self) -> Vec<Option<String>> {
        self.inner.rules().iter().map(|r| r.label.clone()).collect()
    }

    /// Declared rule confidences, in file order.
    #[getter]
    fn confidences(&self) -> Vec<f32> {
        self.inner.rules().iter().map(|r| r.confidence).collect()
    }

    /// Every risk tag the rules can raise, sorted.
    #[getter]
    fn risk_tags(&self) -> Vec<String> {
        self.inner.tags().to_vec()
    }

    /// Texts longer than this many UTF-8 bytes are refused.
    #[getter]
    fn max_text_bytes(&self) -> usize {
        self.inner.max_text_bytes()
    }

    fn __len__(&self) -> usize {
        self.inner.rules().len()
    }

    fn __repr__(&self) -> String {
        format!(
            "RuleSet({} rules, risk_tags={:?})",
            self.inner.rules().len(),
            self.inner.tags()
        )
    }
}

/// The outcome of matching one text against a ``RuleSet``. Truthy when a
/// labelled rule decided; ``risk_tags`` may be non-empty either way.
#[pyclass(module = "tiergate._core", frozen, name = "RuleMatch")]
pub struct PyRuleMatch {
    set: Arc<rules::RuleSet>,
    m: rules::RuleMatch,
}

impl PyRuleMatch {
    fn winner(&self) -> Option<&rules::Rule> {
        self.m.winner.map(|w| &self.set.rules()[w as usize])
    }
}

#[pymethods]
impl PyRuleMatch {
    /// Id of the deciding rule, or None.
    #[getter]
    fn rule_id(&self) -> Option<String> {
        self.winner().map(|r| r.id.clone())
    }

    /// Label of the deciding rule, or None when no labelled rule matched.
    #[getter]
    fn label(&self) -> Option<String> {
        self.winner().and_then(|r| r.label.clone())
    }

    /// Confidence of the deciding rule, or None.
    #[getter]
    fn confidence(&self) -> Option<f32> {
        self.winner().map(|r| r.confidence)
    }

    /// Priority of the deciding rule, or None.
    #[getter]
    fn priority(&self) -> Option<i32> {
        self.winner().map(|r| r.priority)
    }

    /// Union of the risk tags of every matched rule, sorted.
    #[getter]
    fn risk_tags(&self) -> Vec<String> {
        self.m
            .tags
            .iter()
            .map(|&t| self.set.tags()[t as usize].clone())
            .collect()
    }

    /// Ids of every rule that matched, in file order.
    #[getter]
    fn matched_rule_ids(&self) -> Vec<String> {
        self.m
            .matched
            .iter()
            .map(|&i| self.set.rules()[i as usize].id.clone())
            .collect()
    }

    fn __bool__(&self) -> bool {
        self.m.winner.is_some()
    }

    fn __repr__(&self) -> String {
        format!(
            "RuleMatch(label={:?}, rule_id={:?}, confidence={:?}, risk_tags={:?})",
            self.label(),
            self.rule_id(),
            self.confidence(),
            self.risk_tags()
        )
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyRuleSet>()?;
    m.add_class::<PyRuleMatch>()
}
