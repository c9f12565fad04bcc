//! Python wrapper: Approximate nearest-neighbour index (HNSW, plus exact search for small sets) with a versioned, checksummed file format.

use pyo3::prelude::*;

pub fn register(_m: &Bound<'_, PyModule>) -> PyResult<()> {
    Ok(())
}
