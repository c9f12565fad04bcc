//! When a call gives the GIL up while it works.
//!
//! Batches always do. A front end's one-text calls (`LinearModel.top1` and
//! `proba`, `RuleSet.match`) keep it for a text under `KEEP_GIL_BELOW_BYTES`: giving the
//! GIL up costs more than such work where another thread wants it. With the
//! intent model running in the front end's process, getting the GIL back after
//! `top1` took up to 0.3 ms at p99 and 8 ms at worst (CLINC bench, 150 req/s,
//! 2 cores); holding it, the whole call took 0.08 ms at p99 and 0.4 ms at worst.
//! The event loop waits for the call either way; holding the GIL only keeps
//! other threads (the model's) waiting too, so longer texts, whose work is
//! longer, give it up: `top1` on the CLINC bundle (2 x 2^18 hashed features, 151
//! classes) takes ~0.02 ms on 64 bytes, ~0.2 ms on 1 KiB, ~0.6 ms on 4 KiB.

use pyo3::prelude::*;

/// Texts this long or longer give the GIL up, even alone.
pub const KEEP_GIL_BELOW_BYTES: usize = 1024;

/// Runs `work` on `text`, giving the GIL up only when the text is long.
pub fn one_text<T: Send>(py: Python<'_>, text: &str, work: impl FnOnce() -> T + Send) -> T {
    if text.len() < KEEP_GIL_BELOW_BYTES {
        work()
    } else {
        py.detach(work)
    }
}
