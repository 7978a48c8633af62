//! The registry: every schema compiled once, the newest version of each event enforced.
//!
//! A message is looked up by its type and name: a track by `event`; a page or screen by `name`,
//! falling back to the type's schema without an event; identify and group by type (their schema
//! describes `traits`). Alias messages carry no payload and are never checked.

use std::collections::HashMap;

use jsonschema::Validator;
use serde::Serialize;
use serde_json::Value;

use super::files::{SchemaFile, Schemas};
use crate::diagnostic::Diagnostic;
use crate::vocabulary::MessageType;

/// One error of a message against its schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// JSON pointer into the checked object (`properties` or `traits`), `""` for the object itself.
    pub path: String,
    pub message: String,
}

/// What the registry says of a message's payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No schema for this message.
    Unplanned,
    Valid,
    Invalid(Vec<Violation>),
}

/// The enforced schema of one (type, event).
pub struct Compiled {
    pub kind: MessageType,
    pub event: Option<String>,
    /// Every version, oldest first; the last is enforced.
    pub versions: Vec<SchemaFile>,
    validator: Validator,
}

/// Compiled schemas by (type, event).
#[derive(Default)]
pub struct Registry {
    by_key: HashMap<(MessageType, Option<String>), Compiled>,
}

/// Why a schema does not compile, and where in it (a JSON pointer).
#[derive(Debug, Clone)]
pub struct CompileError {
    pub message: String,
    pub pointer: String,
}

/// Compiles a schema as draft 2020-12 with `format` asserted (so that a `date-time` or `email`
/// that is not one is a violation, not a comment).
pub fn compile(schema: &Value) -> Result<Validator, CompileError> {
    jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(schema)
        .map_err(|e| CompileError {
            message: e.to_string(),
            pointer: e.instance_path().to_string(),
        })
}

/// The byte offset in a schema file's text of the value at a JSON pointer, found by looking for
/// each key in turn; the start of the file when it cannot be found.
pub fn locate(text: &str, pointer: &str) -> usize {
    let mut at = 0;
    for key in pointer.split('/').skip(1) {
        let key = key.replace("~1", "/").replace("~0", "~");
        if key.parse::<usize>().is_ok() {
            continue;
        }
        match text[at..].find(&format!("\"{key}\"")) {
            Some(i) => at += i,
            None => return at,
        }
    }
    at
}

impl Registry {
    /// Compiles every version of every event. A version that does not compile is reported; the
    /// event is then enforced by its newest version that does.
    pub fn build(schemas: &Schemas) -> (Registry, Vec<Diagnostic>) {
        let mut registry = Registry::default();
        let mut problems = Vec::new();
        for (kind, event, versions) in schemas.all() {
            let mut enforced = None;
            for file in versions {
                match compile(&file.schema) {
                    Ok(v) => enforced = Some(v),
                    Err(e) => problems.push(Diagnostic::at(
                        &file.path,
                        &file.text,
                        locate(&file.text, &e.pointer),
                        format!("schema does not compile: {}", e.message),
                    )),
                }
            }
            if let Some(validator) = enforced {
                registry.by_key.insert(
                    (kind, event.map(str::to_string)),
                    Compiled {
                        kind,
                        event: event.map(str::to_string),
                        versions: versions.to_vec(),
                        validator,
                    },
                );
            }
        }
        (registry, problems)
    }

    /// The schema that applies to a message of `kind` with this event (track) or name
    /// (page/screen).
    pub fn lookup(&self, kind: MessageType, event_or_name: Option<&str>) -> Option<&Compiled> {
        match kind {
            MessageType::Alias => None,
            MessageType::Track => self.by_key.get(&(kind, event_or_name.map(str::to_string))),
            MessageType::Page | MessageType::Screen => event_or_name
                .and_then(|name| self.by_key.get(&(kind, Some(name.to_string()))))
                .or_else(|| self.by_key.get(&(kind, None))),
            MessageType::Identify | MessageType::Group => self.by_key.get(&(kind, None)),
        }
    }

    /// Checks a payload (`properties` or `traits`; absent is `{}`).
    pub fn check(
        &self,
        kind: MessageType,
        event_or_name: Option<&str>,
        payload: &Value,
    ) -> Verdict {
        match self.lookup(kind, event_or_name) {
            None => Verdict::Unplanned,
            Some(compiled) => compiled.check(payload),
        }
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// Every enforced schema.
    pub fn entries(&self) -> impl Iterator<Item = &Compiled> {
        self.by_key.values()
    }
}

/// Violations kept per message: they are stored with it (`context.violations`, or the quarantine
/// reason), so a hostile payload must not multiply its size.
pub const MAX_VIOLATIONS: usize = 20;
/// A violation's path and message are cut to this many bytes: messages quote the offending value.
const MAX_VIOLATION_TEXT: usize = 300;

fn clip(text: String) -> String {
    if text.len() <= MAX_VIOLATION_TEXT {
        return text;
    }
    let mut text = crate::text::clip(text, MAX_VIOLATION_TEXT);
    text.push('…');
    text
}

impl Compiled {
    pub fn check(&self, payload: &Value) -> Verdict {
        if self.validator.is_valid(payload) {
            return Verdict::Valid;
        }
        let mut errors = self.validator.iter_errors(payload);
        let mut violations: Vec<Violation> = errors
            .by_ref()
            .take(MAX_VIOLATIONS)
            .map(|e| Violation {
                path: clip(e.instance_path().to_string()),
                message: clip(e.to_string()),
            })
            .collect();
        let more = errors.count();
        if more > 0 {
            violations.push(Violation {
                path: String::new(),
                message: format!("and {more} more violations"),
            });
        }
        Verdict::Invalid(violations)
    }

    /// The enforced version number.
    pub fn version(&self) -> u64 {
        self.versions.last().map_or(0, |v| v.version)
    }

    /// `track` events by name; other types by their type name, or `page:<name>` for a named
    /// page or screen schema. Used as a metric label: configuration, never user data.
    pub fn label(&self) -> String {
        match (&self.kind, &self.event) {
            (MessageType::Track, Some(event)) => event.clone(),
            (kind, Some(name)) => format!("{}:{name}", kind.as_str()),
            (kind, None) => kind.as_str().to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(kind: MessageType, event: Option<&str>, version: u64, schema: Value) -> SchemaFile {
        SchemaFile {
            path: format!("{version}.json").into(),
            text: serde_json::to_string_pretty(&schema).unwrap(),
            kind,
            event: event.map(str::to_string),
            version,
            schema,
        }
    }

    fn broken_line(d: &Diagnostic) -> String {
        let text = serde_json::to_string_pretty(&{
            let mut b = order(2, &[]);
            b.schema["properties"]["revenue"]["type"] = serde_json::json!("numeric");
            b.schema
        })
        .unwrap();
        text.lines().nth(d.line - 1).unwrap_or("").to_string()
    }

    #[test]
    fn locate_follows_the_pointer() {
        let text =
            "{\n  \"properties\": {\n    \"a\": {\"type\": 1},\n    \"b\": {\"type\": 2}\n  }\n}";
        let at = locate(text, "/properties/b/type");
        assert!(text[at..].starts_with("\"type\": 2"));
        assert_eq!(locate(text, "/nothing/here"), 0);
    }

    fn registry(files: Vec<SchemaFile>) -> (Registry, Vec<Diagnostic>) {
        let (schemas, problems) = Schemas::from_files(files);
        assert!(problems.is_empty());
        Registry::build(&schemas)
    }

    fn order(version: u64, required: &[&str]) -> SchemaFile {
        file(
            MessageType::Track,
            Some("Order Completed"),
            version,
            serde_json::json!({
                "x-sluice": {"type": "track", "event": "Order Completed", "version": version},
                "type": "object",
                "properties": {"order_id": {"type": "string"}, "revenue": {"type": "number", "minimum": 0},
                               "email": {"type": "string", "format": "email"}},
                "required": required
            }),
        )
    }

    #[test]
    fn the_newest_version_is_enforced_with_every_error_named() {
        let (r, problems) = registry(vec![order(1, &[]), order(2, &["order_id"])]);
        assert!(problems.is_empty());
        assert_eq!(
            r.lookup(MessageType::Track, Some("Order Completed"))
                .unwrap()
                .version(),
            2
        );
        let ok = serde_json::json!({"order_id": "o1", "revenue": 3});
        assert_eq!(
            r.check(MessageType::Track, Some("Order Completed"), &ok),
            Verdict::Valid
        );
        let bad = serde_json::json!({"revenue": -1, "email": "not an email"});
        match r.check(MessageType::Track, Some("Order Completed"), &bad) {
            Verdict::Invalid(v) => {
                let paths: Vec<&str> = v.iter().map(|v| v.path.as_str()).collect();
                assert!(
                    paths.contains(&"/revenue") && paths.contains(&"/email") && paths.contains(&""),
                    "{v:?}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            r.check(MessageType::Track, Some("Other"), &ok),
            Verdict::Unplanned
        );
        assert_eq!(r.check(MessageType::Alias, None, &ok), Verdict::Unplanned);
    }

    #[test]
    fn violations_are_bounded_in_number_and_length() {
        let items = file(
            MessageType::Track,
            Some("Listed"),
            1,
            serde_json::json!({"type": "object",
                "properties": {"ids": {"type": "array", "items": {"type": "number"}}}}),
        );
        let (r, _) = registry(vec![items]);
        let long = "x".repeat(5_000);
        let bad = serde_json::json!({ "ids": vec![long; 500] });
        let Verdict::Invalid(v) = r.check(MessageType::Track, Some("Listed"), &bad) else {
            panic!("invalid")
        };
        assert_eq!(v.len(), MAX_VIOLATIONS + 1);
        assert_eq!(v[MAX_VIOLATIONS].message, "and 480 more violations");
        assert!(v.iter().all(|v| v.message.len() <= MAX_VIOLATION_TEXT + 3));
    }

    #[test]
    fn pages_fall_back_to_the_type_schema() {
        let named = file(
            MessageType::Page,
            Some("Pricing"),
            1,
            serde_json::json!({"type": "object", "required": ["plan"]}),
        );
        let any = file(
            MessageType::Page,
            None,
            1,
            serde_json::json!({"type": "object", "required": ["path"]}),
        );
        let (r, _) = registry(vec![named, any]);
        let path_only = serde_json::json!({"path": "/"});
        assert_eq!(
            r.check(MessageType::Page, Some("Home"), &path_only),
            Verdict::Valid
        );
        assert!(matches!(
            r.check(MessageType::Page, Some("Pricing"), &path_only),
            Verdict::Invalid(_)
        ));
        assert!(matches!(
            r.check(MessageType::Page, None, &serde_json::json!({})),
            Verdict::Invalid(_)
        ));
        assert_eq!(
            r.check(MessageType::Screen, None, &path_only),
            Verdict::Unplanned
        );
    }

    #[test]
    fn a_version_that_does_not_compile_is_reported_and_the_last_good_one_enforced() {
        let mut broken = order(2, &[]);
        broken.schema["properties"]["revenue"]["type"] = serde_json::json!("numeric");
        broken.text = serde_json::to_string_pretty(&broken.schema).unwrap();
        let (r, problems) = registry(vec![order(1, &["order_id"]), broken]);
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].message.contains("does not compile"),
            "{}",
            problems[0]
        );
        let line = broken_line(&problems[0]);
        assert!(
            line.contains("\"type\": \"numeric\""),
            "points at the bad keyword: {line}"
        );
        let compiled = r
            .lookup(MessageType::Track, Some("Order Completed"))
            .unwrap();
        assert!(
            matches!(compiled.check(&serde_json::json!({})), Verdict::Invalid(_)),
            "v1 still enforced"
        );
    }
}
