//! Python wrapper: Feature hashing bit-identical to scikit-learn's HashingVectorizer (signed MurmurHash3, word / char / char_wb n-grams).

use pyo3::prelude::*;

pub fn register(_m: &Bound<'_, PyModule>) -> PyResult<()> {
    Ok(())
}
