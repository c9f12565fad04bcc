//! Any text through the request-path tiers: the rules matcher and the n-gram
//! hasher either refuse it (empty, too long) or answer, never panic.
#![no_main]
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tiergate_core::hashing::{Analyzer, FeatureHasher, HasherConfig};
use tiergate_core::rules::spec::parse_yaml;
use tiergate_core::rules::{RuleLimits, RuleSet};

const RULES: &str = r#"
version: 1
rules:
  - id: refund
    label: refund
    patterns: [{keywords: ["refund", "money back", "ünïcödé"]}, {regex: '\brefund(s|ed)?\b'}]
    risk_tags: [finance]
  - id: legal
    patterns: [{regex: '(?i)(lawyer|sue|court)\s+\w{1,20}'}]
    risk_tags: [legal]
  - id: card
    patterns: [{regex: '\b\d{4}[ -]?\d{4}[ -]?\d{4}[ -]?\d{4}\b'}]
    risk_tags: [pii]
"#;

fn tiers() -> &'static (RuleSet, Vec<FeatureHasher>) {
    static TIERS: OnceLock<(RuleSet, Vec<FeatureHasher>)> = OnceLock::new();
    TIERS.get_or_init(|| {
        let limits = RuleLimits::default();
        let rules = RuleSet::compile(parse_yaml(RULES, &limits).unwrap(), &limits, 4096).unwrap();
        let word = HasherConfig {
            ngram_range: (1, 3),
            ..HasherConfig::default()
        };
        let chars = HasherConfig {
            analyzer: Analyzer::CharWb,
            ngram_range: (2, 5),
            ..HasherConfig::default()
        };
        let hashers = [word, chars]
            .into_iter()
            .map(|c| FeatureHasher::new(c, 4096).unwrap())
            .collect();
        (rules, hashers)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (rules, hashers) = tiers();
    if rules.check(text, None).is_ok() {
        let mut scratch = rules.scratch();
        let _ = rules.match_text(text, &mut scratch);
    }
    for h in hashers {
        let _ = h.transform(&[text]);
    }
});
