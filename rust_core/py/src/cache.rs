//! Python wrapper: The semantic cache: per-namespace ANN lookups with a similarity threshold, TTL and LRU capacity.

use pyo3::prelude::*;

pub fn register(_m: &Bound<'_, PyModule>) -> PyResult<()> {
    Ok(())
}
