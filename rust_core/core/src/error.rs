//! The one error type of the core crate.
//!
//! Few variants on purpose: the Python layer maps each to one exception class
//! (`ConfigError`, `InputError`, `FormatError`, `OSError`), so the message has to
//! carry the detail: what was wrong, where (rule id, text index, file path), and
//! with which value.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A rule file, model parameter or other configuration is invalid.
    #[error("{0}")]
    Config(String),
    /// A request input is invalid: empty or oversized text, wrong vector
    /// dimension, NaN, duplicate or unknown id.
    #[error("{0}")]
    Input(String),
    /// A file exists but its content is truncated, corrupt or of an unknown version.
    #[error("{path}: {reason}")]
    Format { path: PathBuf, reason: String },
    /// The operating system refused a read or write.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub fn config(msg: impl Into<String>) -> Self {
        Error::Config(msg.into())
    }

    pub fn input(msg: impl Into<String>) -> Self {
        Error::Input(msg.into())
    }

    pub fn format(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            reason: reason.into(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
