//! `tiergate._core`: PyO3 wrappers around `tiergate_core`.
//!
//! Each module here wraps one concept and only converts arguments, releases the
//! GIL (`py.detach`) around the real work (`gil` says when a one-text call keeps
//! it), and converts errors via `errors`.

mod errors;
mod gil;
mod input;

// Rules tier.
mod rules;

// Hashed linear tier.
mod hashing;

mod linear;

// Semantic cache tier.
mod ann;

mod cache;

use pyo3::prelude::*;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add(
        "DEFAULT_MAX_TEXT_BYTES",
        tiergate_core::text::DEFAULT_MAX_TEXT_BYTES,
    )?;
    m.add("KEEP_GIL_BELOW_BYTES", gil::KEEP_GIL_BELOW_BYTES)?;
    errors::register(m)?;

    rules::register(m)?;

    hashing::register(m)?;

    linear::register(m)?;

    ann::register(m)?;

    cache::register(m)?;

    Ok(())
}
