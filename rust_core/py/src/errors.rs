//! The one place where core errors become Python exceptions.
//!
//! All tiergate exceptions derive from `TiergateError`, itself a `ValueError`,
//! so callers that already catch `ValueError` keep working; OS failures stay
//! `OSError` (with the path in the message) as Python users expect.

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use tiergate_core::Error;

pyo3::create_exception!(
    tiergate._core,
    TiergateError,
    PyValueError,
    "Base class of every error raised by tiergate's Rust tiers."
);
pyo3::create_exception!(
    tiergate._core,
    ConfigError,
    TiergateError,
    "A rule file, model parameter or other configuration is invalid."
);
pyo3::create_exception!(
    tiergate._core,
    InputError,
    TiergateError,
    "A request input is invalid (empty or oversized text, bad vector, unknown id, ...)."
);
pyo3::create_exception!(
    tiergate._core,
    FormatError,
    TiergateError,
    "A file is truncated, corrupt, or of an unsupported format version."
);

pub fn to_py(err: Error) -> PyErr {
    let msg = err.to_string();
    match err {
        Error::Config(_) => ConfigError::new_err(msg),
        Error::Input(_) => InputError::new_err(msg),
        Error::Format { .. } => FormatError::new_err(msg),
        Error::Io { .. } => PyOSError::new_err(msg),
    }
}

/// `core_result.py()?` converts at the boundary without a `map_err` at every call.
pub trait IntoPyResult<T> {
    fn py(self) -> PyResult<T>;
}

impl<T> IntoPyResult<T> for tiergate_core::Result<T> {
    fn py(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("TiergateError", py.get_type::<TiergateError>())?;
    m.add("ConfigError", py.get_type::<ConfigError>())?;
    m.add("InputError", py.get_type::<InputError>())?;
    m.add("FormatError", py.get_type::<FormatError>())?;
    Ok(())
}
