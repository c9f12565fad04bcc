//! Limits every tier applies to incoming text before doing work on it.

use crate::{Error, Result};

/// Default cap on one text, in UTF-8 bytes. Classifier inputs are sentences or
/// tickets; a multi-megabyte "text" is a client bug or an attack, and is refused
/// rather than scanned.
pub const DEFAULT_MAX_TEXT_BYTES: usize = 1 << 20;

/// How an error names the text: by its position in a batch, or as the one text a
/// call took.
fn subject(index: Option<usize>) -> String {
    match index {
        Some(i) => format!("text {i}"),
        None => "the text".to_owned(),
    }
}

/// Checks a text against the limits a classifier needs: not empty (nothing to
/// classify) and not over `max_bytes`. `index`, its position in a batch (None:
/// a call for one text), names it in the error message.
pub fn check_classifiable(text: &str, index: Option<usize>, max_bytes: usize) -> Result<()> {
    if text.trim().is_empty() {
        return Err(Error::input(format!(
            "{} is empty or only whitespace: there is nothing to classify",
            subject(index)
        )));
    }
    check_size(text, index, max_bytes)
}

/// Checks only the size limit (feature extraction accepts empty text, as
/// scikit-learn does, and returns an empty row for it).
pub fn check_size(text: &str, index: Option<usize>, max_bytes: usize) -> Result<()> {
    if text.len() > max_bytes {
        return Err(Error::input(format!(
            "{} is {} bytes, over the limit of {max_bytes} bytes (max_text_bytes)",
            subject(index),
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
        let err = check_classifiable(" \t\n", Some(3), 10).unwrap_err();
        assert!(err.to_string().contains("text 3 is empty"), "{err}");
        let err = check_classifiable("", None, 10).unwrap_err();
        assert!(err.to_string().starts_with("the text is empty"), "{err}");
    }

    #[test]
    fn oversized_text_names_size_and_limit() {
        let err = check_classifiable("abcdef", None, 4).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("the text is 6 bytes") && msg.contains("limit of 4"),
            "{msg}"
        );
        assert!(check_size("", Some(0), 4).is_ok());
        assert!(check_classifiable("ok", Some(0), 4).is_ok());
    }
}
