//! Segment files: `segments/<key>.toml`, each a name, a Rhai rule and optional test cases.
//!
//! ```toml
//! name = "Stalled signups"
//! description = "Signed up over an hour ago and have not started onboarding"
//! destinations = ["crm"]
//! backfill = true            # default: compute membership from history when loaded
//! rule = '''
//! let signup = user.first("Signed Up");
//! signup != () && signup.age() > hours(1) && !user.did("Onboarding Started")
//! '''
//! [[test]]
//! name = "two hours after signing up, not onboarding"
//! at = "2026-01-01T02:00:00Z"   # when the rule is evaluated; default: 1 s after the last message
//! messages = [{ type = "track", event = "Signed Up", timestamp = "2026-01-01T00:00:00Z" }]
//! expect = true
//! ```
//!
//! Reading is pure: it checks the file's shape and collects every problem with its place. Rules
//! are compiled in [`super::rules`].

use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::config::reader::{Reader, Section};
use crate::diagnostic::Diagnostic;
use crate::profiles::profile::Millis;

#[derive(Debug, Clone, PartialEq)]
pub struct SegmentFile {
    /// The file name without `.toml`.
    pub key: String,
    pub path: PathBuf,
    /// The whole file, to place problems found later.
    pub text: String,
    pub name: String,
    pub description: String,
    pub destinations: Vec<(String, Option<Range<usize>>)>,
    pub backfill: bool,
    pub rule: String,
    /// Byte offset in `text` where the rule's code starts.
    pub rule_offset: usize,
    pub tests: Vec<TestCase>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TestCase {
    pub name: String,
    /// Byte offset of the case in the file.
    pub offset: usize,
    pub at: Option<Millis>,
    pub messages: Vec<serde_json::Value>,
    pub expect: bool,
}

/// Whether `key` can name a segment: it appears in traits, properties and metric-free admin URLs.
pub fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 64
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

pub fn read(path: &Path) -> Result<SegmentFile, Vec<Diagnostic>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![Diagnostic::file(
            path,
            format!("cannot read segment file: {e}"),
        )]
    })?;
    parse(path, &text)
}

pub fn parse(path: &Path, text: &str) -> Result<SegmentFile, Vec<Diagnostic>> {
    let key = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !valid_key(&key) {
        return Err(vec![Diagnostic::file(
            path,
            format!("`{key}` is not a segment key: name the file with letters, digits, `_` or `-`"),
        )]);
    }
    let doc = toml_edit::Document::parse(text).map_err(|e| {
        let offset = e.span().map_or(0, |s| s.start);
        vec![Diagnostic::at(
            path,
            text,
            offset,
            e.message().trim().to_string(),
        )]
    })?;
    let no_env = |_: &str| None;
    let mut r = Reader::new(path, text, &no_env);
    let mut root = Section::new(doc.as_table(), String::new(), None);
    let name = r.raw_string(&mut root, "name");
    let description = r.raw_string(&mut root, "description");
    let destinations = r.strings(&mut root, "destinations").unwrap_or_default();
    let backfill = r.boolean(&mut root, "backfill").unwrap_or(true);
    let rule = r.raw_string(&mut root, "rule");
    let mut tests = Vec::new();
    for mut t in r.sections(&mut root, "test") {
        let offset = t.span().map_or(0, |s| s.start);
        let name = r.raw_string(&mut t, "name");
        let at = r
            .raw_string(&mut t, "at")
            .and_then(|at| match parse_time(&at.value) {
                Some(ms) => Some(ms),
                None => {
                    r.error(
                        at.span,
                        format!("`test.at`: `{}` is not an RFC 3339 time", at.value),
                    );
                    None
                }
            });
        let expect = r.boolean(&mut t, "expect");
        let messages = match r.json(&mut t, "messages") {
            Some(m) => match m.value {
                serde_json::Value::Array(items) if items.iter().all(|i| i.is_object()) => items,
                _ => {
                    r.error(
                        m.span,
                        "`test.messages` must be an array of tables (messages)",
                    );
                    Vec::new()
                }
            },
            None => Vec::new(),
        };
        if expect.is_none() {
            r.error(
                t.span(),
                "a test case needs `expect = true` or `expect = false`",
            );
        }
        r.finish(t);
        tests.push(TestCase {
            name: name.map_or_else(|| format!("case {}", tests.len() + 1), |n| n.value),
            offset,
            at,
            messages,
            expect: expect.unwrap_or(false),
        });
    }
    if rule.is_none() {
        r.error(None, "a segment needs a `rule`");
    }
    r.finish(root);
    if !r.diagnostics.is_empty() {
        return Err(r.diagnostics);
    }
    let rule = rule.expect("checked above");
    let rule_offset = rule
        .span
        .clone()
        .map_or(0, |s| crate::script::code_start(text, s.start));
    Ok(SegmentFile {
        name: name.map_or_else(|| key.clone(), |n| n.value),
        key,
        path: path.to_path_buf(),
        text: text.to_string(),
        description: description.map(|d| d.value).unwrap_or_default(),
        destinations: destinations
            .into_iter()
            .map(|d| (d.value, d.span))
            .collect(),
        backfill,
        rule: rule.value,
        rule_offset,
        tests,
    })
}

pub fn parse_time(text: &str) -> Option<Millis> {
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.timestamp_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_whole_file() {
        let text = r#"name = "Stalled"
destinations = ["crm"]
rule = '''
user.did("Signed Up")
'''
[[test]]
name = "signed up"
messages = [{ type = "track", event = "Signed Up", timestamp = "2026-01-01T00:00:00Z" }]
expect = true
"#;
        let f = parse(Path::new("segments/stalled.toml"), text).unwrap();
        assert_eq!(f.key, "stalled");
        assert_eq!(f.name, "Stalled");
        assert!(f.backfill);
        assert_eq!(f.destinations[0].0, "crm");
        assert_eq!(&text[f.rule_offset..f.rule_offset + 8], "user.did");
        assert_eq!(f.tests.len(), 1);
        assert_eq!(f.tests[0].messages[0]["event"], "Signed Up");
        assert!(f.tests[0].expect);
    }

    #[test]
    fn reports_every_problem_with_its_place() {
        let text = "name = 3\nbackfill = \"yes\"\nsurprise = 1\n[[test]]\nname = \"x\"\n";
        let problems = parse(Path::new("s/a.toml"), text).unwrap_err();
        let text: Vec<String> = problems.iter().map(|d| d.to_string()).collect();
        assert!(
            text.iter()
                .any(|d| d.starts_with("s/a.toml:1:8: `name` must be a string")),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|d| d.contains(":2:12: `backfill` must be true or false")),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|d| d.contains(":3:1: unknown key `surprise`")),
            "{text:?}"
        );
        assert!(text.iter().any(|d| d.contains("needs `expect")), "{text:?}");
        assert!(
            text.iter().any(|d| d.contains("needs a `rule`")),
            "{text:?}"
        );
        assert!(parse(Path::new("s/bad key.toml"), "rule = 'true'").is_err());
    }
}
