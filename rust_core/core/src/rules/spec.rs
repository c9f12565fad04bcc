//! The rule-file schema, its parsing, and the limits a hostile file meets.
//!
//! ```yaml
//! version: 1
//! rules:
//!   - id: refund-request          # unique, required
//!     label: refund               # optional: a rule without label only raises tags
//!     patterns:                   # at least one
//!       - keywords: [refund, money back]   # literal, matched as whole words
//!       - regex: '\bcharge ?backs?\b'      # Rust `regex` syntax
//!     case_insensitive: true      # default true (Unicode-aware)
//!     priority: 10                # default 0; highest wins
//!     confidence: 0.95            # default 1.0, in [0, 1]
//!     risk_tags: [finance]        # default none
//! ```
//! Unknown fields are errors: a typo such as `prioirty` must not silently
//! leave a rule at priority 0.

use std::collections::HashSet;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::{Error, Result};

/// Bounds on what one rule set may ask for. The defaults are generous for
/// hand-written rules and still keep a hostile file from exhausting memory.
#[derive(Debug, Clone)]
pub struct RuleLimits {
    pub max_file_bytes: usize,
    pub max_rules: usize,
    pub max_patterns_per_rule: usize,
    pub max_keywords: usize,
    pub max_pattern_bytes: usize,
    /// Compiled size of one regex (regex's `size_limit`).
    pub max_regex_compiled_bytes: usize,
    /// Lazy-DFA cache of the whole set (regex's `dfa_size_limit`).
    pub max_dfa_bytes: usize,
    pub max_regex_nesting: u32,
    pub max_tags_per_rule: usize,
}

impl Default for RuleLimits {
    fn default() -> Self {
        RuleLimits {
            max_file_bytes: 16 << 20,
            max_rules: 10_000,
            max_patterns_per_rule: 1_000,
            max_keywords: 500_000,
            max_pattern_bytes: 4_096,
            max_regex_compiled_bytes: 2 << 20,
            max_dfa_bytes: 32 << 20,
            max_regex_nesting: 64,
            max_tags_per_rule: 64,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    #[serde(default = "current_version")]
    version: u32,
    rules: Vec<Value>,
}

fn current_version() -> u32 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    id: String,
    #[serde(default)]
    label: Option<String>,
    patterns: Vec<PatternSpec>,
    #[serde(default = "yes")]
    case_insensitive: bool,
    #[serde(default)]
    priority: i32,
    #[serde(default = "one")]
    confidence: f64,
    #[serde(default)]
    risk_tags: Vec<String>,
    #[serde(default)]
    #[allow(dead_code)] // accepted so rule files can document themselves
    description: Option<String>,
}

fn yes() -> bool {
    true
}

fn one() -> f64 {
    1.0
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "lowercase")]
enum PatternSpec {
    Regex(String),
    Keywords(Vec<String>),
}

/// One pattern of a validated rule.
#[derive(Debug, Clone, PartialEq)]
pub enum Pattern {
    Regex(String),
    Keywords(Vec<String>),
}

/// A validated rule, ready to compile.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub id: String,
    pub label: Option<String>,
    pub patterns: Vec<Pattern>,
    pub case_insensitive: bool,
    pub priority: i32,
    pub confidence: f32,
    pub risk_tags: Vec<String>,
}

/// Parses a rule file: YAML for `.yaml`/`.yml`, JSON for `.json`.
pub fn read_file(path: &Path, limits: &RuleLimits) -> Result<Vec<Rule>> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.len() > limits.max_file_bytes as u64 {
        return Err(Error::config(format!(
            "{}: rule file is {} bytes, over the limit of {} bytes",
            path.display(),
            meta.len(),
            limits.max_file_bytes
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let parsed = match ext.to_ascii_lowercase().as_str() {
        "yaml" | "yml" => parse_yaml(&text, limits),
        "json" => parse_json(&text, limits),
        _ => Err(Error::config(
            "rule files must end in .yaml, .yml or .json".to_string(),
        )),
    };
    parsed.map_err(|e| Error::config(format!("{}: {e}", path.display())))
}

pub fn parse_yaml(text: &str, limits: &RuleLimits) -> Result<Vec<Rule>> {
    check_text_size(text, limits)?;
    let file: RuleFile = serde_saphyr::from_str(text)
        .map_err(|e| Error::config(format!("invalid YAML rule file: {e}")))?;
    from_file_doc(file, limits)
}

pub fn parse_json(text: &str, limits: &RuleLimits) -> Result<Vec<Rule>> {
    check_text_size(text, limits)?;
    let file: RuleFile = serde_json::from_str(text)
        .map_err(|e| Error::config(format!("invalid JSON rule file: {e}")))?;
    from_file_doc(file, limits)
}

/// Rules given as a JSON array of rule objects (what Python dicts become).
pub fn parse_rule_list(text: &str, limits: &RuleLimits) -> Result<Vec<Rule>> {
    check_text_size(text, limits)?;
    let rules: Vec<Value> = serde_json::from_str(text)
        .map_err(|e| Error::config(format!("rules must be a list of rule mappings: {e}")))?;
    validate(rules, limits)
}

fn check_text_size(text: &str, limits: &RuleLimits) -> Result<()> {
    if text.len() > limits.max_file_bytes {
        return Err(Error::config(format!(
            "rule definitions are {} bytes, over the limit of {} bytes",
            text.len(),
            limits.max_file_bytes
        )));
    }
    Ok(())
}

fn from_file_doc(file: RuleFile, limits: &RuleLimits) -> Result<Vec<Rule>> {
    if file.version != 1 {
        return Err(Error::config(format!(
            "rule file version {} is not supported (this tiergate reads version 1)",
            file.version
        )));
    }
    validate(file.rules, limits)
}

fn validate(values: Vec<Value>, limits: &RuleLimits) -> Result<Vec<Rule>> {
    if values.is_empty() {
        return Err(Error::config("a rule set needs at least one rule"));
    }
    if values.len() > limits.max_rules {
        return Err(Error::config(format!(
            "{} rules, over the limit of {}",
            values.len(),
            limits.max_rules
        )));
    }
    let mut ids = HashSet::new();
    let mut keywords = 0usize;
    let mut rules = Vec::with_capacity(values.len());
    for (index, value) in values.into_iter().enumerate() {
        let name = rule_name(index, &value);
        let spec: RuleSpec =
            serde_json::from_value(value).map_err(|e| Error::config(format!("{name}: {e}")))?;
        let rule = validate_rule(spec, &name, limits, &mut keywords)?;
        if !ids.insert(rule.id.clone()) {
            return Err(Error::config(format!("{name}: duplicate rule id")));
        }
        rules.push(rule);
    }
    Ok(rules)
}

/// How errors name a rule: by id when it has a readable one, by position always.
fn rule_name(index: usize, value: &Value) -> String {
    match value.get("id").and_then(Value::as_str) {
        Some(id) if !id.is_empty() => format!("rule {index} (id {id:?})"),
        _ => format!("rule {index}"),
    }
}

fn validate_rule(
    spec: RuleSpec,
    name: &str,
    limits: &RuleLimits,
    keywords_seen: &mut usize,
) -> Result<Rule> {
    let err = |what: String| Error::config(format!("{name}: {what}"));
    if spec.id.trim().is_empty() || spec.id.len() > 200 {
        return Err(err(
            "id must be a non-empty string of at most 200 bytes".into()
        ));
    }
    if let Some(label) = &spec.label {
        if label.trim().is_empty() {
            return Err(err(
                "label must not be empty (leave it out for a tag-only rule)".into(),
            ));
        }
    }
    if spec.patterns.is_empty() {
        return Err(err(
            "patterns must list at least one regex or keywords entry".into(),
        ));
    }
    if spec.patterns.len() > limits.max_patterns_per_rule {
        return Err(err(format!(
            "{} patterns, over the limit of {}",
            spec.patterns.len(),
            limits.max_patterns_per_rule
        )));
    }
    if !(spec.confidence.is_finite() && (0.0..=1.0).contains(&spec.confidence)) {
        return Err(err(format!(
            "confidence must be between 0 and 1, not {}",
            spec.confidence
        )));
    }
    if spec.risk_tags.len() > limits.max_tags_per_rule {
        return Err(err(format!(
            "{} risk_tags, over the limit of {}",
            spec.risk_tags.len(),
            limits.max_tags_per_rule
        )));
    }
    if spec.risk_tags.iter().any(|t| t.trim().is_empty()) {
        return Err(err("risk_tags must not contain empty tags".into()));
    }
    let mut patterns = Vec::with_capacity(spec.patterns.len());
    for (p, pattern) in spec.patterns.into_iter().enumerate() {
        match pattern {
            PatternSpec::Regex(re) => {
                if re.is_empty() || re.len() > limits.max_pattern_bytes {
                    return Err(err(format!(
                        "patterns[{p}]: regex must be 1 to {} bytes long, not {}",
                        limits.max_pattern_bytes,
                        re.len()
                    )));
                }
                patterns.push(Pattern::Regex(re));
            }
            PatternSpec::Keywords(words) => {
                if words.is_empty() {
                    return Err(err(format!("patterns[{p}]: keywords must not be empty")));
                }
                *keywords_seen += words.len();
                if *keywords_seen > limits.max_keywords {
                    return Err(err(format!(
                        "the rule set has over {} keywords in all",
                        limits.max_keywords
                    )));
                }
                for (k, w) in words.iter().enumerate() {
                    if w.trim().is_empty() || w.len() > limits.max_pattern_bytes {
                        return Err(err(format!(
                            "patterns[{p}].keywords[{k}] must be non-blank and at most {} bytes",
                            limits.max_pattern_bytes
                        )));
                    }
                }
                patterns.push(Pattern::Keywords(words));
            }
        }
    }
    let mut risk_tags = spec.risk_tags;
    risk_tags.sort();
    risk_tags.dedup();
    Ok(Rule {
        id: spec.id,
        label: spec.label,
        patterns,
        case_insensitive: spec.case_insensitive,
        priority: spec.priority,
        confidence: spec.confidence as f32,
        risk_tags,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(text: &str) -> Result<Vec<Rule>> {
        parse_rule_list(text, &RuleLimits::default())
    }

    #[test]
    fn yaml_and_json_files_give_the_same_rules() {
        let yaml = "rules:\n  - id: r1\n    label: refund\n    patterns:\n      - keywords: [refund]\n      - regex: 'money\\s+back'\n    risk_tags: [finance, finance]\n";
        let json_doc = r#"{"version": 1, "rules": [{"id": "r1", "label": "refund",
            "patterns": [{"keywords": ["refund"]}, {"regex": "money\\s+back"}],
            "risk_tags": ["finance"]}]}"#;
        let a = parse_yaml(yaml, &RuleLimits::default()).unwrap();
        let b = parse_json(json_doc, &RuleLimits::default()).unwrap();
        assert_eq!(a, b);
        assert_eq!(a[0].risk_tags, vec!["finance"]);
        assert!(a[0].case_insensitive);
        assert_eq!(a[0].confidence, 1.0);
    }

    #[test]
    fn typos_and_bad_values_name_the_rule() {
        let e = json(r#"[{"id": "a", "patterns": [{"keywords": ["x"]}], "prioirty": 3}]"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("rule 0 (id \"a\")") && e.contains("prioirty"),
            "{e}"
        );
        let e = json(r#"[{"id": "a", "patterns": [{"keywords": ["x"]}], "confidence": 1.5}]"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("confidence"), "{e}");
        let e = json(r#"[{"id": "a", "patterns": [{"keywords": ["x"]}]}, {"id": "a", "patterns": [{"regex": "y"}]}]"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("rule 1") && e.contains("duplicate"), "{e}");
        let e = json(r#"[{"patterns": [{"regex": "y"}]}]"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("rule 0") && e.contains("id"), "{e}");
        let e = json(r#"[{"id": "b", "patterns": []}]"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("at least one"), "{e}");
        let e = json(r#"[{"id": "b", "patterns": [{"glob": "*"}]}]"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("glob"), "{e}");
    }

    #[test]
    fn limits_are_enforced() {
        let limits = RuleLimits {
            max_rules: 1,
            max_pattern_bytes: 8,
            ..RuleLimits::default()
        };
        let two = r#"[{"id": "a", "patterns": [{"regex": "x"}]}, {"id": "b", "patterns": [{"regex": "y"}]}]"#;
        assert!(parse_rule_list(two, &limits)
            .unwrap_err()
            .to_string()
            .contains("over the limit of 1"));
        let long = r#"[{"id": "a", "patterns": [{"regex": "xxxxxxxxxxxxxxxx"}]}]"#;
        assert!(parse_rule_list(long, &limits)
            .unwrap_err()
            .to_string()
            .contains("1 to 8 bytes"));
        let tiny = RuleLimits {
            max_file_bytes: 10,
            ..RuleLimits::default()
        };
        assert!(parse_rule_list(two, &tiny)
            .unwrap_err()
            .to_string()
            .contains("over the limit"));
    }

    #[test]
    fn future_versions_are_refused() {
        let e = parse_json(r#"{"version": 2, "rules": []}"#, &RuleLimits::default()).unwrap_err();
        assert!(e.to_string().contains("version 2"), "{e}");
    }
}
