//! When a call gives the GIL up while it works.
//!
//! Batches always do. A front end's one-text calls (`LinearModel.top1`,
//! `RuleSet.match`) keep it for a short text: their work takes microseconds, and
//! giving the GIL up costs more where another thread wants it. With the intent
//! model running in the front end's process, getting the GIL back after `top1`
//! took up to 0.3 ms at p99 and 8 ms at worst (CLINC bench, 150 req/s, 2 cores);
//! holding it, the whole call took 0.08 ms at p99 and 0.4 ms at worst.

use pyo3::prelude::*;

/// Texts longer than this are worth giving the GIL up for, even alone.
pub const KEEP_GIL_BELOW_BYTES: usize = 4096;

/// Runs `work` on `text`, giving the GIL up only when the text is long.
pub fn one_text<T: Send>(py: Python<'_>, text: &str, work: impl FnOnce() -> T + Send) -> T {
    if text.len() < KEEP_GIL_BELOW_BYTES {
        work()
    } else {
        py.detach(work)
    }
}
