//! Feature hashing bit-identical to scikit-learn's `HashingVectorizer`.
//!
//! A model trained in Python on `HashingVectorizer` features (or on this
//! module's output, which is the same matrix) loads straight into
//! [`crate::linear::LinearModel`]. "The same" means equal CSR arrays: the same
//! tokens, the same signed MurmurHash3 indices, duplicates summed with explicit
//! zeros kept (as scipy's `sum_duplicates` does), the same normalisation with
//! the same summation order.
//!
//! Python text semantics are reproduced rather than Rust's where they differ:
//! `\w` is `str.isalnum() or "_"` (letters and numbers only, no combining
//! marks), whitespace is `str.isspace()` (which adds U+001C..U+001F to
//! Unicode's White_Space), and lowercasing is `str.lower()` (full case mapping
//! with the final-sigma rule, which Rust's `to_lowercase` shares). Fidelity is
//! exact for characters that the running Python's Unicode database assigns;
//! for characters assigned only in a newer Unicode version the two runtimes may
//! classify them differently.

use unicode_general_category::{get_general_category, GeneralCategory as Gc};

use crate::text::check_size;
use crate::{Error, Result};

/// How a text becomes tokens before hashing (scikit-learn's `analyzer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Analyzer {
    /// Word n-grams over tokens matching `(?u)\b\w\w+\b`, joined by one space.
    Word,
    /// Character n-grams over the whole text, runs of 2+ whitespace folded to one space.
    Char,
    /// Character n-grams inside each whitespace-separated word padded with spaces.
    CharWb,
}

impl Analyzer {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "word" => Ok(Analyzer::Word),
            "char" => Ok(Analyzer::Char),
            "char_wb" => Ok(Analyzer::CharWb),
            other => Err(Error::config(format!(
                "analyzer must be 'word', 'char' or 'char_wb', not {other:?}"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Analyzer::Word => "word",
            Analyzer::Char => "char",
            Analyzer::CharWb => "char_wb",
        }
    }
}

/// Row normalisation (scikit-learn's `norm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Norm {
    L1,
    L2,
}

impl Norm {
    pub fn parse(name: Option<&str>) -> Result<Option<Self>> {
        match name {
            None => Ok(None),
            Some("l2") => Ok(Some(Norm::L2)),
            Some("l1") => Ok(Some(Norm::L1)),
            Some(other) => Err(Error::config(format!(
                "norm must be 'l2', 'l1' or None, not {other:?}"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Norm::L1 => "l1",
            Norm::L2 => "l2",
        }
    }
}

/// The settings of one hasher; the defaults are scikit-learn's.
#[derive(Debug, Clone, PartialEq)]
pub struct HasherConfig {
    pub n_features: usize,
    pub analyzer: Analyzer,
    pub ngram_range: (usize, usize),
    pub lowercase: bool,
    pub norm: Option<Norm>,
    pub alternate_sign: bool,
    pub binary: bool,
}

impl Default for HasherConfig {
    fn default() -> Self {
        HasherConfig {
            n_features: 1 << 20,
            analyzer: Analyzer::Word,
            ngram_range: (1, 1),
            lowercase: true,
            norm: Some(Norm::L2),
            alternate_sign: true,
            binary: false,
        }
    }
}

/// Longest n-gram accepted: longer ones are never useful features and would
/// let one request make quadratic work out of a long word.
pub const MAX_NGRAM: usize = 32;

/// A sparse matrix in CSR form, with the dtypes scipy gives `HashingVectorizer`
/// output (float64 data, int32 indices and indptr).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Csr {
    pub data: Vec<f64>,
    pub indices: Vec<i32>,
    pub indptr: Vec<i32>,
}

/// Reusable buffers for one thread, so hashing a text allocates nothing once warm.
#[derive(Default)]
pub struct Scratch {
    lowered: String,
    joined: String,
    bounds: Vec<usize>,
    tokens: Vec<(usize, usize)>,
    features: Vec<(u32, f64)>,
}

#[derive(Debug, Clone)]
pub struct FeatureHasher {
    config: HasherConfig,
    max_text_bytes: usize,
}

impl FeatureHasher {
    pub fn new(config: HasherConfig, max_text_bytes: usize) -> Result<Self> {
        if config.n_features == 0 || config.n_features > i32::MAX as usize {
            return Err(Error::config(format!(
                "n_features must be between 1 and 2**31-1, not {}",
                config.n_features
            )));
        }
        let (lo, hi) = config.ngram_range;
        if lo == 0 || lo > hi || hi > MAX_NGRAM {
            return Err(Error::config(format!(
                "ngram_range must satisfy 1 <= min_n <= max_n <= {MAX_NGRAM}, not ({lo}, {hi})"
            )));
        }
        if max_text_bytes == 0 {
            return Err(Error::config("max_text_bytes must be positive"));
        }
        Ok(FeatureHasher {
            config,
            max_text_bytes,
        })
    }

    pub fn config(&self) -> &HasherConfig {
        &self.config
    }

    pub fn max_text_bytes(&self) -> usize {
        self.max_text_bytes
    }

    pub fn n_features(&self) -> usize {
        self.config.n_features
    }

    /// Checks `text` (number `index` of its batch) against this hasher's limits.
    pub fn check(&self, text: &str, index: usize) -> Result<()> {
        check_size(text, Some(index), self.max_text_bytes)
    }

    /// The final row of `text`: sorted indices, summed values (explicit zeros
    /// kept), binarised and normalised as configured, left in `scratch` and
    /// returned as a slice. The caller has checked the text's size.
    pub fn row<'s>(&self, text: &str, scratch: &'s mut Scratch) -> &'s [(u32, f64)] {
        let mut features = std::mem::take(&mut scratch.features);
        features.clear();
        let n = self.config.n_features as u32;
        let alternate = self.config.alternate_sign;
        self.for_each_token(text, scratch, |token| {
            let h = murmur3_x86_32(token.as_bytes(), 0) as i32;
            let index = if h == i32::MIN {
                // abs(i32::MIN) overflows; scikit-learn defines it as this value.
                ((i32::MAX as u32) - (n - 1)) % n
            } else {
                h.unsigned_abs() % n
            };
            let sign = if alternate && h < 0 { -1.0 } else { 1.0 };
            features.push((index, sign));
        });
        sum_duplicates(&mut features);
        if self.config.binary {
            features.iter_mut().for_each(|f| f.1 = 1.0);
        }
        match self.config.norm {
            Some(Norm::L2) => {
                let sum: f64 = features.iter().fold(0.0, |acc, f| acc + f.1 * f.1);
                if sum != 0.0 {
                    let norm = sum.sqrt();
                    features.iter_mut().for_each(|f| f.1 /= norm);
                }
            }
            Some(Norm::L1) => {
                let sum: f64 = features.iter().fold(0.0, |acc, f| acc + f.1.abs());
                if sum != 0.0 {
                    features.iter_mut().for_each(|f| f.1 /= sum);
                }
            }
            None => {}
        }
        scratch.features = features;
        &scratch.features
    }

    /// Hashes a batch into one CSR matrix. Checks every text first, so an
    /// oversized text fails the batch before any work is done.
    pub fn transform<S: AsRef<str>>(&self, texts: &[S]) -> Result<Csr> {
        for (i, t) in texts.iter().enumerate() {
            self.check(t.as_ref(), i)?;
        }
        let mut scratch = Scratch::default();
        let mut csr = Csr {
            indptr: Vec::with_capacity(texts.len() + 1),
            ..Csr::default()
        };
        csr.indptr.push(0);
        for t in texts {
            for &(index, value) in self.row(t.as_ref(), &mut scratch) {
                csr.indices.push(index as i32);
                csr.data.push(value);
            }
            let nnz = i32::try_from(csr.data.len()).map_err(|_| {
                Error::input("batch produces over 2**31 features; split it into smaller batches")
            })?;
            csr.indptr.push(nnz);
        }
        Ok(csr)
    }

    /// Calls `emit` with every token (n-gram) of `text`, in no particular order.
    fn for_each_token(&self, text: &str, scratch: &mut Scratch, mut emit: impl FnMut(&str)) {
        let mut lowered = std::mem::take(&mut scratch.lowered);
        lowered.clear();
        if self.config.lowercase && text.is_ascii() {
            // Most traffic is ASCII: lowercase in place, no allocation.
            lowered.push_str(text);
            lowered.make_ascii_lowercase();
        } else if self.config.lowercase {
            lowered.push_str(&text.to_lowercase());
        } else {
            lowered.push_str(text);
        }
        let (lo, hi) = self.config.ngram_range;
        match self.config.analyzer {
            Analyzer::Word => word_ngrams(&lowered, lo, hi, scratch, &mut emit),
            Analyzer::Char => {
                let folded = fold_whitespace_runs(&lowered);
                char_ngrams(&folded, lo, hi, &mut scratch.bounds, &mut emit);
            }
            Analyzer::CharWb => {
                let mut padded = std::mem::take(&mut scratch.joined);
                for word in lowered.split(is_py_space).filter(|w| !w.is_empty()) {
                    padded.clear();
                    padded.push(' ');
                    padded.push_str(word);
                    padded.push(' ');
                    char_wb_ngrams(&padded, lo, hi, &mut scratch.bounds, &mut emit);
                }
                scratch.joined = padded;
            }
        }
        scratch.lowered = lowered;
    }
}

/// Python's `str.isspace()`: Unicode White_Space plus the ASCII information
/// separators U+001C..U+001F, which Python counts and Rust does not.
pub fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's regex `\w` on `str`: `str.isalnum()` (general category L* or N*) or `_`.
pub fn is_py_word(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_alphanumeric() || c == '_';
    }
    matches!(
        get_general_category(c),
        Gc::UppercaseLetter
            | Gc::LowercaseLetter
            | Gc::TitlecaseLetter
            | Gc::ModifierLetter
            | Gc::OtherLetter
            | Gc::DecimalNumber
            | Gc::LetterNumber
            | Gc::OtherNumber
    )
}

/// `re.sub(r"\s\s+", " ", text)`: runs of two or more whitespace characters
/// become one space; a lone whitespace character is kept as it is.
fn fold_whitespace_runs(text: &str) -> std::borrow::Cow<'_, str> {
    let mut chars = text.chars().peekable();
    let mut needs_fold = false;
    while let Some(c) = chars.next() {
        if is_py_space(c) && chars.peek().is_some_and(|&d| is_py_space(d)) {
            needs_fold = true;
            break;
        }
    }
    if !needs_fold {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut run = String::new();
    for c in text.chars() {
        if is_py_space(c) {
            run.push(c);
        } else {
            flush_space_run(&mut out, &mut run);
            out.push(c);
        }
    }
    flush_space_run(&mut out, &mut run);
    std::borrow::Cow::Owned(out)
}

fn flush_space_run(out: &mut String, run: &mut String) {
    if run.chars().nth(1).is_some() {
        out.push(' ');
    } else {
        out.push_str(run);
    }
    run.clear();
}

fn word_ngrams(
    text: &str,
    lo: usize,
    hi: usize,
    scratch: &mut Scratch,
    emit: &mut impl FnMut(&str),
) {
    // Tokens are the maximal runs of word characters two or more characters
    // long: exactly what `findall(r"\b\w\w+\b")` returns.
    let tokens = &mut scratch.tokens;
    tokens.clear();
    let mut start = None;
    let mut chars_in_run = 0usize;
    for (i, c) in text.char_indices() {
        if is_py_word(c) {
            if start.is_none() {
                start = Some(i);
                chars_in_run = 0;
            }
            chars_in_run += 1;
        } else if let Some(s) = start.take() {
            if chars_in_run >= 2 {
                tokens.push((s, i));
            }
        }
    }
    if let Some(s) = start {
        if chars_in_run >= 2 {
            tokens.push((s, text.len()));
        }
    }
    if lo == 1 {
        for &(s, e) in tokens.iter() {
            emit(&text[s..e]);
        }
    }
    let joined = &mut scratch.joined;
    for n in lo.max(2)..=hi.min(tokens.len()) {
        for window in tokens.windows(n) {
            joined.clear();
            for (k, &(s, e)) in window.iter().enumerate() {
                if k > 0 {
                    joined.push(' ');
                }
                joined.push_str(&text[s..e]);
            }
            emit(joined);
        }
    }
}

/// Byte offsets of every character boundary, end included, so that character
/// n-grams are slices of the text rather than new strings.
fn char_bounds(text: &str, bounds: &mut Vec<usize>) {
    bounds.clear();
    bounds.extend(text.char_indices().map(|(i, _)| i));
    bounds.push(text.len());
}

fn char_ngrams(
    text: &str,
    lo: usize,
    hi: usize,
    bounds: &mut Vec<usize>,
    emit: &mut impl FnMut(&str),
) {
    char_bounds(text, bounds);
    let len = bounds.len() - 1;
    for n in lo..=hi.min(len) {
        for i in 0..=(len - n) {
            emit(&text[bounds[i]..bounds[i + n]]);
        }
    }
}

fn char_wb_ngrams(
    padded: &str,
    lo: usize,
    hi: usize,
    bounds: &mut Vec<usize>,
    emit: &mut impl FnMut(&str),
) {
    char_bounds(padded, bounds);
    let len = bounds.len() - 1;
    for n in lo..=hi {
        if len < n {
            // scikit-learn counts a word shorter than n once, as a whole,
            // and then stops growing n for that word.
            emit(padded);
            break;
        }
        for i in 0..=(len - n) {
            emit(&padded[bounds[i]..bounds[i + n]]);
        }
        if len == n {
            break;
        }
    }
}

/// Sorts by index and sums duplicates in place, keeping explicit zeros
/// (scipy's `sum_duplicates` keeps an index whose values cancel out).
fn sum_duplicates(features: &mut Vec<(u32, f64)>) {
    features.sort_unstable_by_key(|f| f.0);
    let mut write = 0;
    for read in 0..features.len() {
        if write > 0 && features[write - 1].0 == features[read].0 {
            features[write - 1].1 += features[read].1;
        } else {
            features[write] = features[read];
            write += 1;
        }
    }
    features.truncate(write);
}

/// MurmurHash3 x86_32, the hash scikit-learn uses (`murmurhash3_32`).
///
/// Written here rather than taken from a crate: the maintained `murmur3` crate
/// hashes through `std::io::Read`, which costs more than the hash itself on the
/// 3-to-20-byte tokens of this hot path; the algorithm is short and fixed, and
/// the tests pin it to published vectors and to scikit-learn's output.
pub fn murmur3_x86_32(data: &[u8], seed: u32) -> u32 {
    const C1: u32 = 0xcc9e_2d51;
    const C2: u32 = 0x1b87_3593;
    let mut h = seed;
    let mut blocks = data.chunks_exact(4);
    for block in blocks.by_ref() {
        let mut k = u32::from_le_bytes([block[0], block[1], block[2], block[3]]);
        k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
        h ^= k;
        h = h.rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64);
    }
    let tail = blocks.remainder();
    if !tail.is_empty() {
        let mut k = 0u32;
        for (i, &b) in tail.iter().enumerate() {
            k |= (b as u32) << (8 * i);
        }
        k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
        h ^= k;
    }
    h ^= data.len() as u32;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(config: HasherConfig, text: &str) -> Vec<String> {
        let hasher = FeatureHasher::new(config, 1 << 20).unwrap();
        let mut scratch = Scratch::default();
        let mut out = Vec::new();
        hasher.for_each_token(text, &mut scratch, |t| out.push(t.to_owned()));
        out.sort();
        out
    }

    fn cfg(analyzer: Analyzer, lo: usize, hi: usize) -> HasherConfig {
        HasherConfig {
            analyzer,
            ngram_range: (lo, hi),
            ..HasherConfig::default()
        }
    }

    #[test]
    fn murmur3_matches_published_vectors() {
        assert_eq!(murmur3_x86_32(b"", 0), 0);
        assert_eq!(murmur3_x86_32(b"", 1), 0x514e_28b7);
        assert_eq!(murmur3_x86_32(b"hello", 0), 0x248b_fa47);
        assert_eq!(murmur3_x86_32(b"Hello, world!", 1234), 0xfaf6_cdb3);
        assert_eq!(
            murmur3_x86_32(b"The quick brown fox jumps over the lazy dog", 0),
            0x2e4f_f723
        );
    }

    #[test]
    fn word_tokens_are_runs_of_two_or_more_word_chars() {
        let t = tokens(cfg(Analyzer::Word, 1, 1), "I paid $5 to Bob_2, a-b!");
        assert_eq!(t, vec!["bob_2", "paid", "to"]);
    }

    #[test]
    fn combining_marks_split_words_as_in_python() {
        // U+0301 is a mark (Mn): not `\w` in Python, so "cafe\u{301}s" is two runs.
        let t = tokens(cfg(Analyzer::Word, 1, 1), "cafe\u{301}s ok");
        assert_eq!(t, vec!["cafe", "ok"]);
    }

    #[test]
    fn word_bigrams_join_with_one_space() {
        let t = tokens(cfg(Analyzer::Word, 2, 2), "refund, my   order now");
        assert_eq!(t, vec!["my order", "order now", "refund my"]);
        assert!(tokens(cfg(Analyzer::Word, 3, 3), "too short").is_empty());
    }

    #[test]
    fn final_sigma_lowercases_like_python() {
        let t = tokens(cfg(Analyzer::Word, 1, 1), "ΟΔΟΣ ΣΑ");
        assert_eq!(t, vec!["οδος", "σα"]);
    }

    #[test]
    fn information_separators_are_whitespace_for_char_wb() {
        let t = tokens(cfg(Analyzer::CharWb, 3, 3), "ab\u{1c}cd");
        assert_eq!(t, vec![" ab", " cd", "ab ", "cd "]);
    }

    #[test]
    fn char_wb_counts_a_short_word_once_then_stops() {
        // " a " has 3 chars: n=2 gives " a", "a "; n=3 gives " a " and stops.
        let t = tokens(cfg(Analyzer::CharWb, 2, 5), "a");
        assert_eq!(t, vec![" a", " a ", "a "]);
        // n larger than the padded word: the whole padded word, once.
        let t = tokens(cfg(Analyzer::CharWb, 4, 6), "a");
        assert_eq!(t, vec![" a "]);
    }

    #[test]
    fn char_analyzer_folds_only_runs_of_whitespace() {
        let t = tokens(cfg(Analyzer::Char, 2, 2), "a\tb  c");
        assert_eq!(t, vec!["\tb", " c", "a\t", "b "]);
    }

    #[test]
    fn rows_sum_duplicates_and_keep_explicit_zeros() {
        let mut f = vec![(3, 1.0), (1, 2.0), (3, -1.0)];
        sum_duplicates(&mut f);
        assert_eq!(f, vec![(1, 2.0), (3, 0.0)]);
    }

    #[test]
    fn l2_rows_have_unit_norm_and_empty_rows_stay_empty() {
        let hasher = FeatureHasher::new(HasherConfig::default(), 1 << 20).unwrap();
        let csr = hasher.transform(&["hello world hello", "", "x"]).unwrap();
        assert_eq!(csr.indptr, vec![0, 2, 2, 2]);
        let norm: f64 = csr.data.iter().map(|v| v * v).sum();
        assert!((norm - 1.0).abs() < 1e-12);
    }

    #[test]
    fn invalid_settings_are_config_errors() {
        let bad = |c: HasherConfig| FeatureHasher::new(c, 10).unwrap_err().to_string();
        assert!(bad(cfg(Analyzer::Word, 2, 1)).contains("ngram_range"));
        assert!(bad(cfg(Analyzer::Word, 0, 1)).contains("ngram_range"));
        let zero = HasherConfig {
            n_features: 0,
            ..HasherConfig::default()
        };
        assert!(bad(zero).contains("n_features"));
        assert!(Analyzer::parse("chars").is_err());
        assert!(Norm::parse(Some("l3")).is_err());
    }

    #[test]
    fn oversized_text_fails_the_batch_with_its_index() {
        let hasher = FeatureHasher::new(HasherConfig::default(), 8).unwrap();
        let err = hasher.transform(&["short", "far too long"]).unwrap_err();
        assert!(err.to_string().contains("text 1"), "{err}");
    }
}
