//! Literal keywords matched as whole words with one Aho-Corasick automaton.
//!
//! Why Aho-Corasick rather than folding keywords into the regex set: measured
//! in `benchmarks/micro/rules.py` (keyword rules vs the same rules written as
//! `\b(?:a|b)\b` regexes), the automaton stays flat as keyword lists grow into
//! the thousands, while a regex set pays for Unicode word boundaries, which its
//! lazy DFA cannot handle on non-ASCII text and hands to a slower engine.

use aho_corasick::{AhoCorasick, AhoCorasickKind, MatchKind};

use crate::hashing::is_py_word;
use crate::{Error, Result};

/// Whole-word keyword matcher. A keyword edge that is a word character must
/// not touch another word character in the text (word characters are
/// Unicode letters and numbers and `_`, as Python's `\w`); an edge that is
/// not a word character needs no boundary, so `c++` matches in "c++ code".
#[derive(Debug, Clone)]
pub struct KeywordMatcher {
    automaton: AhoCorasick,
    /// For each distinct keyword: the rules that list it.
    owners: Vec<Vec<u32>>,
    /// For each distinct keyword: whether its first / last char is a word char.
    word_edges: Vec<(bool, bool)>,
}

impl KeywordMatcher {
    /// `keywords` pairs each keyword (already case-folded if needed) with its rule.
    pub fn new(keywords: Vec<(String, u32)>) -> Result<Self> {
        let mut index = std::collections::HashMap::<String, usize>::new();
        let mut patterns: Vec<String> = Vec::new();
        let mut owners: Vec<Vec<u32>> = Vec::new();
        for (word, rule) in keywords {
            let slot = *index.entry(word.clone()).or_insert_with(|| {
                patterns.push(word);
                owners.push(Vec::new());
                patterns.len() - 1
            });
            if owners[slot].last() != Some(&rule) {
                owners[slot].push(rule);
            }
        }
        let word_edges = patterns
            .iter()
            .map(|p| {
                let first = p.chars().next().is_some_and(is_py_word);
                let last = p.chars().next_back().is_some_and(is_py_word);
                (first, last)
            })
            .collect();
        // Overlapping search needs standard match semantics; a DFA is the
        // fastest search for the pattern counts rule files have, at a memory
        // cost the builder bounds (it falls back to an NFA past its limit).
        let automaton = AhoCorasick::builder()
            .match_kind(MatchKind::Standard)
            .kind(Some(AhoCorasickKind::DFA))
            .build(&patterns)
            .or_else(|_| {
                AhoCorasick::builder()
                    .match_kind(MatchKind::Standard)
                    .build(&patterns)
            })
            .map_err(|e| Error::config(format!("keywords could not be compiled: {e}")))?;
        Ok(KeywordMatcher {
            automaton,
            owners,
            word_edges,
        })
    }

    /// Calls `hit(rule)` for every rule with a whole-word keyword in `text`
    /// (a rule may be reported more than once).
    pub fn for_each_rule(&self, text: &str, mut hit: impl FnMut(u32)) {
        for m in self.automaton.find_overlapping_iter(text) {
            let k = m.pattern().as_usize();
            let (first, last) = self.word_edges[k];
            if first
                && text[..m.start()]
                    .chars()
                    .next_back()
                    .is_some_and(is_py_word)
            {
                continue;
            }
            if last && text[m.end()..].chars().next().is_some_and(is_py_word) {
                continue;
            }
            for &rule in &self.owners[k] {
                hit(rule);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules_hit(words: &[(&str, u32)], text: &str) -> Vec<u32> {
        let m =
            KeywordMatcher::new(words.iter().map(|(w, r)| (w.to_string(), *r)).collect()).unwrap();
        let mut out = Vec::new();
        m.for_each_rule(text, |r| out.push(r));
        out.sort();
        out.dedup();
        out
    }

    #[test]
    fn whole_words_only() {
        let words = [("card", 0), ("credit card", 1), ("art", 2)];
        assert_eq!(rules_hit(&words, "my credit card"), vec![0, 1]);
        assert_eq!(rules_hit(&words, "cards and carts"), Vec::<u32>::new());
        assert_eq!(rules_hit(&words, "card_x card2 xcard"), Vec::<u32>::new());
        assert_eq!(rules_hit(&words, "(card)."), vec![0]);
    }

    #[test]
    fn non_word_edges_need_no_boundary() {
        let words = [("c++", 0), ("$$$", 1)];
        assert_eq!(rules_hit(&words, "c++11 and x$$$y"), vec![0, 1]);
        assert_eq!(rules_hit(&words, "abc++"), Vec::<u32>::new());
    }

    #[test]
    fn unicode_letters_are_word_characters() {
        let words = [("école", 0)];
        assert_eq!(rules_hit(&words, "l'école."), vec![0]);
        assert_eq!(rules_hit(&words, "écoleé"), Vec::<u32>::new());
    }

    #[test]
    fn a_keyword_shared_by_rules_reports_each() {
        assert_eq!(
            rules_hit(&[("fraud", 3), ("fraud", 1)], "fraud!"),
            vec![1, 3]
        );
    }
}
