//! Any text as a YAML or JSON rule file: a config error or a rule set that
//! matches, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tiergate_core::rules::spec::{parse_json, parse_yaml};
use tiergate_core::rules::{RuleLimits, RuleSet};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let limits = RuleLimits::default();
    for parsed in [parse_yaml(text, &limits), parse_json(text, &limits)] {
        if let Ok(rules) = parsed {
            if let Ok(set) = RuleSet::compile(rules, &limits, 4096) {
                let mut scratch = set.scratch();
                let _ = set.match_text("I want a refund from my lawyer", &mut scratch);
            }
        }
    }
});
