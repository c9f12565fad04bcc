//! Python wrapper: The hashed linear classifier: calibrated softmax over hashed features, fused with hashing for raw texts.

use pyo3::prelude::*;

pub fn register(_m: &Bound<'_, PyModule>) -> PyResult<()> {
    Ok(())
}
