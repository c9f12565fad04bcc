//! Python wrapper: The rules tier: regex and whole-word keyword rules compiled into one matcher, raising labels and risk tags.

use pyo3::prelude::*;

pub fn register(_m: &Bound<'_, PyModule>) -> PyResult<()> {
    Ok(())
}
