//! The cheap tiers of the tiergate cascade, as plain Rust with no Python in it.
//!
//! Each module is one tier or one building block of a tier; the PyO3 layer in
//! `rust_core/py` only converts types and releases the GIL around these calls.

pub mod envelope;
pub mod error;
pub mod text;

// Rules tier.
pub mod rules;

// Hashed linear tier.
pub mod hashing;

pub mod linear;

// Semantic cache tier.
pub mod ann;

pub mod cache;

pub use error::{Error, Result};
