//! Extraction of Python text arguments into owned Rust strings.
//!
//! Owned copies let the work run with the GIL released. Every failure names the
//! argument and the position in the batch, so a caller with 10,000 texts knows
//! which one was bad.

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyString, PyTuple};

use crate::errors::InputError;

/// One `str` argument. A lone surrogate (possible in Python strings, impossible
/// in UTF-8) raises `InputError` rather than a codec error from deep inside.
pub fn text(obj: &Bound<'_, PyAny>, arg: &str) -> PyResult<String> {
    let s = obj
        .cast::<PyString>()
        .map_err(|_| PyTypeError::new_err(format!("{arg} must be str, not {}", type_name(obj))))?;
    match s.to_str() {
        Ok(t) => Ok(t.to_owned()),
        Err(_) => Err(InputError::new_err(format!(
            "{arg} is not valid Unicode text: it contains a lone surrogate, which cannot be encoded as UTF-8"
        ))),
    }
}

/// A batch of texts: a list or tuple (or any sequence) of `str`. A bare `str`
/// is refused, since iterating it would classify single characters.
pub fn text_batch(obj: &Bound<'_, PyAny>, arg: &str) -> PyResult<Vec<String>> {
    if obj.is_instance_of::<PyString>() {
        return Err(PyTypeError::new_err(format!(
            "{arg} must be a sequence of str, not a single str; wrap it in a list"
        )));
    }
    if obj.is_instance_of::<PyTuple>() || obj.hasattr("__len__")? {
        let mut out = Vec::with_capacity(obj.len().unwrap_or(0));
        for (i, item) in obj.try_iter()?.enumerate() {
            out.push(text(&item?, &format!("{arg}[{i}]"))?);
        }
        return Ok(out);
    }
    Err(PyTypeError::new_err(format!(
        "{arg} must be a sequence of str, not {}",
        type_name(obj)
    )))
}

pub fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "<unknown type>".to_owned())
}
