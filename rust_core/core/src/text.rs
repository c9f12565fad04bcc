//! Limits every tier applies to incoming text before doing work on it.

use crate::{Error, Result};

/// Default cap on one text, in UTF-8 bytes. Classifier inputs are sentences or
/// tickets; a multi-megabyte "text" is a client bug or an attack, and is refused
/// rather than scanned.
pub const DEFAULT_MAX_TEXT_BYTES: usize = 1 << 20;

/// Checks one text of a batch against the limits a classifier needs: not empty
/// (nothing to classify) and not over `max_bytes`. `index` names the text in
/// the error message.
pub fn check_classifiable(text: &str, index: usize, max_bytes: usize) -> Result<()> {
    if text.trim().is_empty() {
        return Err(Error::input(format!(
            "text {index} is empty or only whitespace: there is nothing to classify"
        )));
    }
    check_size(text, index, max_bytes)
}

/// Checks only the size limit (feature extraction accepts empty text, as
/// scikit-learn does, and returns an empty row for it).
pub fn check_size(text: &str, index: usize, max_bytes: usize) -> Result<()> {
    if text.len() > max_bytes {
        return Err(Error::input(format!(
            "text {index} is {} bytes, over the limit of {max_bytes} bytes (max_text_bytes)",
            text.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_whitespace_are_refused_with_index() {
        let err = check_classifiable(" \t\n", 3, 10).unwrap_err();
        assert!(err.to_string().contains("text 3 is empty"), "{err}");
    }

    #[test]
    fn oversized_text_names_size_and_limit() {
        let err = check_classifiable("abcdef", 0, 4).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("6 bytes") && msg.contains("limit of 4"),
            "{msg}"
        );
        assert!(check_size("", 0, 4).is_ok());
        assert!(check_classifiable("ok", 0, 4).is_ok());
    }
}
