//! The rules tier: regex and whole-word keyword rules compiled into one
//! matcher, raising labels and risk tags.
//!
//! All regexes of a rule set run as one multi-pattern regex (one pass over
//! the text reports every pattern that matches), and all keywords as one
//! Aho-Corasick automaton per case mode; a text costs two or three linear
//! scans whatever the number of rules. See [`spec`] for the file format.

mod keywords;
pub mod spec;

use regex_automata::meta;
use regex_automata::util::syntax;
use regex_automata::{Input, MatchKind, PatternSet};

use crate::text::check_classifiable;
use crate::{Error, Result};
use keywords::KeywordMatcher;
pub use spec::{Pattern, Rule, RuleLimits};

/// The outcome of matching one text.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RuleMatch {
    /// The deciding rule: highest priority among matched rules that have a
    /// label, the earliest in the file on a tie. None when no labelled rule matched.
    pub winner: Option<u32>,
    /// Every rule that matched, in file order.
    pub matched: Vec<u32>,
    /// The union of the risk tags of every matched rule, as indices into
    /// [`RuleSet::tags`] (sorted by name).
    pub tags: Vec<u16>,
}

/// Per-thread buffers for matching.
pub struct MatchScratch {
    lowered: String,
    hits: Vec<bool>,
    tag_hits: Vec<bool>,
    patterns: PatternSet,
    cache: Option<meta::Cache>,
}

#[derive(Debug)]
pub struct RuleSet {
    rules: Vec<Rule>,
    tags: Vec<String>,
    rule_tags: Vec<Vec<u16>>,
    regexes: Option<meta::Regex>,
    /// Pattern id in `regexes` -> rule index.
    regex_owner: Vec<u32>,
    folded_keywords: Option<KeywordMatcher>,
    exact_keywords: Option<KeywordMatcher>,
    max_text_bytes: usize,
}

impl RuleSet {
    pub fn compile(rules: Vec<Rule>, limits: &RuleLimits, max_text_bytes: usize) -> Result<Self> {
        if max_text_bytes == 0 {
            return Err(Error::config("max_text_bytes must be positive"));
        }
        let mut tags: Vec<String> = rules.iter().flat_map(|r| r.risk_tags.clone()).collect();
        tags.sort();
        tags.dedup();
        let rule_tags = rules
            .iter()
            .map(|r| {
                r.risk_tags
                    .iter()
                    .map(|t| tags.binary_search(t).expect("tag collected above") as u16)
                    .collect()
            })
            .collect();

        let mut regex_sources = Vec::new();
        let mut regex_owner = Vec::new();
        let mut folded = Vec::new();
        let mut exact = Vec::new();
        for (i, rule) in rules.iter().enumerate() {
            for (p, pattern) in rule.patterns.iter().enumerate() {
                match pattern {
                    Pattern::Regex(source) => {
                        check_regex(rule, p, source, limits)?;
                        let flagged = if rule.case_insensitive {
                            format!("(?i:{source})")
                        } else {
                            format!("(?:{source})")
                        };
                        regex_sources.push(flagged);
                        regex_owner.push(i as u32);
                    }
                    Pattern::Keywords(words) => {
                        for w in words {
                            if rule.case_insensitive {
                                folded.push((w.to_lowercase(), i as u32));
                            } else {
                                exact.push((w.clone(), i as u32));
                            }
                        }
                    }
                }
            }
        }
        let regexes = if regex_sources.is_empty() {
            None
        } else {
            // MatchKind::All: report every pattern that matches anywhere,
            // not only the leftmost-first one (what RegexSet does too).
            let config = meta::Regex::config()
                .match_kind(MatchKind::All)
                .nfa_size_limit(Some(limits.max_regex_compiled_bytes.saturating_mul(64)))
                .hybrid_cache_capacity(limits.max_dfa_bytes)
                .dfa_size_limit(Some(limits.max_dfa_bytes));
            let built = meta::Builder::new()
                .configure(config)
                .syntax(syntax::Config::new().nest_limit(limits.max_regex_nesting))
                .build_many(&regex_sources)
                .map_err(|e| {
                    Error::config(format!(
                        "the rule set's {} regexes together are too large to compile: {e}",
                        regex_sources.len()
                    ))
                })?;
            Some(built)
        };
        let keyword_matcher = |words: Vec<(String, u32)>| -> Result<Option<KeywordMatcher>> {
            if words.is_empty() {
                Ok(None)
            } else {
                KeywordMatcher::new(words).map(Some)
            }
        };
        Ok(RuleSet {
            folded_keywords: keyword_matcher(folded)?,
            exact_keywords: keyword_matcher(exact)?,
            rules,
            tags,
            rule_tags,
            regexes,
            regex_owner,
            max_text_bytes,
        })
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Every risk tag any rule can raise, sorted.
    pub fn tags(&self) -> &[String] {
        &self.tags
    }

    pub fn max_text_bytes(&self) -> usize {
        self.max_text_bytes
    }

    pub fn scratch(&self) -> MatchScratch {
        MatchScratch {
            lowered: String::new(),
            hits: vec![false; self.rules.len()],
            tag_hits: vec![false; self.tags.len()],
            patterns: PatternSet::new(self.regex_owner.len()),
            cache: self.regexes.as_ref().map(|r| r.create_cache()),
        }
    }

    /// Checks a text against the tier's limits: number `index` of a batch, or
    /// (None) the one text of a call.
    pub fn check(&self, text: &str, index: Option<usize>) -> Result<()> {
        check_classifiable(text, index, self.max_text_bytes)
    }

    /// Matches every text after checking them all: a bad text fails the batch
    /// before any work is done. Reusing `scratch` across calls matters: it
    /// holds the regex engine's lazily built DFA states.
    pub fn match_batch<S: AsRef<str>>(
        &self,
        texts: &[S],
        scratch: &mut MatchScratch,
    ) -> Result<Vec<RuleMatch>> {
        for (i, t) in texts.iter().enumerate() {
            self.check(t.as_ref(), Some(i))?;
        }
        Ok(texts
            .iter()
            .map(|t| self.match_text(t.as_ref(), scratch))
            .collect())
    }

    /// Matches one already-checked text.
    pub fn match_text(&self, text: &str, scratch: &mut MatchScratch) -> RuleMatch {
        let hits = &mut scratch.hits;
        hits.iter_mut().for_each(|h| *h = false);
        if let (Some(re), Some(cache)) = (&self.regexes, scratch.cache.as_mut()) {
            scratch.patterns.clear();
            re.which_overlapping_matches_with(cache, &Input::new(text), &mut scratch.patterns);
            for pid in scratch.patterns.iter() {
                hits[self.regex_owner[pid.as_usize()] as usize] = true;
            }
        }
        if let Some(exact) = &self.exact_keywords {
            exact.for_each_rule(text, |r| hits[r as usize] = true);
        }
        if let Some(folded) = &self.folded_keywords {
            let lowered = &mut scratch.lowered;
            lowered.clear();
            if text.is_ascii() {
                lowered.push_str(text);
                lowered.make_ascii_lowercase();
            } else {
                lowered.push_str(&text.to_lowercase());
            }
            folded.for_each_rule(lowered, |r| hits[r as usize] = true);
        }

        let mut out = RuleMatch::default();
        let mut best: Option<(i32, u32)> = None;
        let tag_hits = &mut scratch.tag_hits;
        tag_hits.iter_mut().for_each(|h| *h = false);
        for (i, _) in hits.iter().enumerate().filter(|(_, &h)| h) {
            let rule = &self.rules[i];
            out.matched.push(i as u32);
            for &t in &self.rule_tags[i] {
                tag_hits[t as usize] = true;
            }
            if rule.label.is_some() && best.is_none_or(|(p, _)| rule.priority > p) {
                best = Some((rule.priority, i as u32));
            }
        }
        out.winner = best.map(|(_, i)| i);
        out.tags = tag_hits
            .iter()
            .enumerate()
            .filter(|(_, &h)| h)
            .map(|(t, _)| t as u16)
            .collect();
        out
    }
}

/// Compiles one regex on its own so that an error names its rule and pattern.
fn check_regex(rule: &Rule, p: usize, source: &str, limits: &RuleLimits) -> Result<()> {
    regex::RegexBuilder::new(source)
        .case_insensitive(rule.case_insensitive)
        .size_limit(limits.max_regex_compiled_bytes)
        .nest_limit(limits.max_regex_nesting)
        .build()
        .map(|_| ())
        .map_err(|e| {
            Error::config(format!(
                "rule {:?}: patterns[{p}] is not a valid regex: {e}",
                rule.id
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(json: &str) -> RuleSet {
        let limits = RuleLimits::default();
        RuleSet::compile(
            spec::parse_rule_list(json, &limits).unwrap(),
            &limits,
            1 << 20,
        )
        .unwrap()
    }

    fn ids(set: &RuleSet, m: &RuleMatch) -> Vec<String> {
        m.matched
            .iter()
            .map(|&i| set.rules()[i as usize].id.clone())
            .collect()
    }

    const RULES: &str = r#"[
        {"id": "refund", "label": "refund", "priority": 5, "confidence": 0.9,
         "patterns": [{"keywords": ["refund", "money back"]}], "risk_tags": ["finance"]},
        {"id": "chargeback", "label": "dispute", "priority": 9,
         "patterns": [{"regex": "charge ?backs?"}], "risk_tags": ["finance", "legal"]},
        {"id": "ssn", "patterns": [{"regex": "\\b\\d{3}-\\d{2}-\\d{4}\\b"}], "risk_tags": ["pii"]},
        {"id": "refund-too", "label": "refund_dup", "priority": 5,
         "patterns": [{"keywords": ["REFUND"]}], "case_insensitive": false},
        {"id": "école", "label": "school", "patterns": [{"keywords": ["ÉCOLE"]}]}
    ]"#;

    #[test]
    fn highest_priority_wins_and_tags_union() {
        let s = set(RULES);
        let mut scratch = s.scratch();
        let m = s.match_text(
            "I want a Refund or a chargeback, ssn 123-45-6789",
            &mut scratch,
        );
        assert_eq!(ids(&s, &m), vec!["refund", "chargeback", "ssn"]);
        assert_eq!(m.winner, Some(1));
        let tags: Vec<&str> = m
            .tags
            .iter()
            .map(|&t| s.tags()[t as usize].as_str())
            .collect();
        assert_eq!(tags, vec!["finance", "legal", "pii"]);
    }

    #[test]
    fn ties_go_to_the_earlier_rule_and_case_modes_differ() {
        let s = set(RULES);
        let mut scratch = s.scratch();
        let m = s.match_text("REFUND now", &mut scratch);
        assert_eq!(ids(&s, &m), vec!["refund", "refund-too"]);
        assert_eq!(m.winner, Some(0));
        let m = s.match_text("Refund now", &mut scratch);
        assert_eq!(ids(&s, &m), vec!["refund"]);
    }

    #[test]
    fn tag_only_rules_never_win() {
        let s = set(RULES);
        let m = s.match_text("my ssn is 123-45-6789", &mut s.scratch());
        assert_eq!(m.winner, None);
        assert_eq!(m.tags.len(), 1);
    }

    #[test]
    fn unicode_case_folding_for_keywords_and_regexes() {
        let s = set(RULES);
        let mut scratch = s.scratch();
        assert_eq!(s.match_text("à l'école", &mut scratch).winner, Some(4));
        assert_eq!(s.match_text("CHARGE BACKS", &mut scratch).winner, Some(1));
        assert_eq!(
            s.match_text("nothing here", &mut scratch),
            RuleMatch::default()
        );
    }

    #[test]
    fn invalid_regex_names_rule_and_error() {
        let limits = RuleLimits::default();
        let rules = spec::parse_rule_list(
            r#"[{"id": "bad", "patterns": [{"keywords": ["x"]}, {"regex": "a(b"}]}]"#,
            &limits,
        )
        .unwrap();
        let e = RuleSet::compile(rules, &limits, 100)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"bad\"") && e.contains("patterns[1]") && e.contains("unclosed"),
            "{e}"
        );
    }

    #[test]
    fn oversized_regex_is_refused() {
        let limits = RuleLimits {
            max_regex_compiled_bytes: 10_000,
            ..RuleLimits::default()
        };
        let rules = spec::parse_rule_list(
            r#"[{"id": "huge", "patterns": [{"regex": "\\w{1000}"}]}]"#,
            &limits,
        )
        .unwrap();
        let e = RuleSet::compile(rules, &limits, 100)
            .unwrap_err()
            .to_string();
        assert!(e.contains("huge") && e.contains("size limit"), "{e}");
    }

    #[test]
    fn batch_checks_every_text_first() {
        let s = set(RULES);
        let mut scratch = s.scratch();
        let e = s
            .match_batch(&["refund", ""], &mut scratch)
            .unwrap_err()
            .to_string();
        assert!(e.contains("text 1"), "{e}");
        assert_eq!(
            s.match_batch(&["refund"], &mut scratch).unwrap()[0].winner,
            Some(0)
        );
    }
}
