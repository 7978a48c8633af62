//! Compatibility between consecutive versions of an event's schema: what a new version does that
//! breaks senders or readers of the previous one.
//!
//! - a property removed;
//! - a property newly required;
//! - a type narrowed (`number` to `integer`, `["string", "null"]` to `string`, ...);
//! - an enum narrowed (a value dropped, or an enum where there was none);
//! - a format changed or added.
//!
//! Nested objects and array items are compared the same way. Each finding points at the new
//! version's file, at the property.

use serde_json::{Map, Value};

use super::files::{SchemaFile, Schemas};
use super::registry::locate;
use crate::diagnostic::Diagnostic;

/// Every breaking change between consecutive versions of every event.
pub fn check(schemas: &Schemas) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    for (_, _, versions) in schemas.all() {
        for pair in versions.windows(2) {
            out.extend(breaking_changes(&pair[0], &pair[1]));
        }
    }
    out
}

/// What `next` breaks of `previous`.
pub fn breaking_changes(previous: &SchemaFile, next: &SchemaFile) -> Vec<Diagnostic> {
    let mut findings = Vec::new();
    compare(&previous.schema, &next.schema, "", &mut findings);
    findings
        .into_iter()
        .map(|(pointer, what)| {
            Diagnostic::at(
                &next.path,
                &next.text,
                locate(&next.text, &pointer),
                format!(
                    "version {} {what} (version {} did not)",
                    next.version, previous.version
                ),
            )
        })
        .collect()
}

fn properties(schema: &Value) -> Option<&Map<String, Value>> {
    schema.get("properties").and_then(Value::as_object)
}

fn required(schema: &Value) -> Vec<&str> {
    schema
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// The JSON types a schema allows; `None` when it does not say (anything goes).
fn types(schema: &Value) -> Option<Vec<&str>> {
    match schema.get("type")? {
        Value::String(t) => Some(vec![t.as_str()]),
        Value::Array(ts) => Some(ts.iter().filter_map(Value::as_str).collect()),
        _ => None,
    }
}

/// Whether a value of JSON type `t` is accepted by a schema allowing `allowed`.
fn allows(allowed: &[&str], t: &str) -> bool {
    allowed.contains(&t) || (t == "integer" && allowed.contains(&"number"))
}

fn compare(previous: &Value, next: &Value, at: &str, out: &mut Vec<(String, String)>) {
    let name = |key: &str| {
        if at.is_empty() {
            key.to_string()
        } else {
            format!("{at}.{key}")
        }
    };
    let pointer_of = |key: &str| format!("{}/properties/{key}", pointer(at));
    if let (Some(before), Some(after)) = (properties(previous), properties(next)) {
        for (key, old) in before {
            match after.get(key) {
                None => out.push((pointer(at), format!("removes property `{}`", name(key)))),
                Some(new) => compare_property(old, new, &name(key), &pointer_of(key), out),
            }
        }
    }
    let before = required(previous);
    for key in required(next) {
        if !before.contains(&key) {
            out.push((pointer_of(key), format!("makes `{}` required", name(key))));
        }
    }
}

fn pointer(at: &str) -> String {
    if at.is_empty() {
        String::new()
    } else {
        at.split('.').map(|k| format!("/properties/{k}")).collect()
    }
}

fn compare_property(
    old: &Value,
    new: &Value,
    name: &str,
    pointer: &str,
    out: &mut Vec<(String, String)>,
) {
    if let (Some(before), Some(after)) = (types(old), types(new)) {
        let narrowed: Vec<&str> = before
            .iter()
            .copied()
            .filter(|t| !allows(&after, t))
            .collect();
        if !narrowed.is_empty() {
            out.push((
                pointer.to_string(),
                format!(
                    "narrows the type of `{name}` from {} to {}",
                    before.join("|"),
                    after.join("|")
                ),
            ));
        }
    } else if types(old).is_none() && types(new).is_some() {
        out.push((
            pointer.to_string(),
            format!("restricts the type of `{name}`"),
        ));
    }
    match (
        old.get("enum").and_then(Value::as_array),
        new.get("enum").and_then(Value::as_array),
    ) {
        (Some(before), Some(after)) if before.iter().any(|v| !after.contains(v)) => {
            out.push((pointer.to_string(), format!("narrows the enum of `{name}`")))
        }
        (None, Some(_)) => out.push((pointer.to_string(), format!("adds an enum to `{name}`"))),
        _ => {}
    }
    let (before, after) = (old.get("format"), new.get("format"));
    if after.is_some() && before != after {
        out.push((
            pointer.to_string(),
            format!("changes the format of `{name}`"),
        ));
    }
    compare(old, new, name, out);
    if let (Some(a), Some(b)) = (old.get("items"), new.get("items")) {
        compare_property(a, b, &format!("{name}[]"), &format!("{pointer}/items"), out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocabulary::MessageType;

    fn version(v: u64, schema: Value) -> SchemaFile {
        SchemaFile {
            path: format!("v{v}.json").into(),
            text: serde_json::to_string_pretty(&schema).unwrap(),
            kind: MessageType::Track,
            event: Some("E".into()),
            version: v,
            schema,
        }
    }

    fn findings(before: Value, after: Value) -> Vec<String> {
        breaking_changes(&version(1, before), &version(2, after))
            .into_iter()
            .map(|d| d.message)
            .collect()
    }

    #[test]
    fn each_kind_of_break_is_found() {
        let v1 = serde_json::json!({
            "type": "object",
            "properties": {
                "a": {"type": "string"},
                "b": {"type": "number"},
                "c": {"type": "string", "enum": ["x", "y"]},
                "d": {"type": "string", "format": "date"},
                "e": {"type": "object", "properties": {"f": {"type": ["string", "null"]}}},
                "g": {"type": "array", "items": {"type": "number"}},
                "h": {"type": "string"}
            },
            "required": ["a"]
        });
        let v2 = serde_json::json!({
            "type": "object",
            "properties": {
                "b": {"type": "integer"},
                "c": {"type": "string", "enum": ["x"]},
                "d": {"type": "string", "format": "date-time"},
                "e": {"type": "object", "properties": {"f": {"type": "string"}}},
                "g": {"type": "array", "items": {"type": "integer"}},
                "h": {"type": "string", "enum": ["only"]},
                "new": {"type": "string"}
            },
            "required": ["a", "b"]
        });
        let found = findings(v1, v2);
        let expect = [
            "version 2 removes property `a` (version 1 did not)",
            "version 2 narrows the type of `b` from number to integer (version 1 did not)",
            "version 2 narrows the enum of `c` (version 1 did not)",
            "version 2 changes the format of `d` (version 1 did not)",
            "version 2 narrows the type of `e.f` from string|null to string (version 1 did not)",
            "version 2 narrows the type of `g[]` from number to integer (version 1 did not)",
            "version 2 adds an enum to `h` (version 1 did not)",
            "version 2 makes `b` required (version 1 did not)",
        ];
        for e in expect {
            assert!(found.iter().any(|f| f == e), "missing {e:?} in {found:#?}");
        }
        assert_eq!(found.len(), expect.len(), "{found:#?}");
    }

    #[test]
    fn compatible_changes_pass() {
        let v1 = serde_json::json!({"properties": {"a": {"type": "integer"}, "b": {"enum": ["x"]}}, "required": ["a"]});
        let v2 = serde_json::json!({"properties": {"a": {"type": "number"}, "b": {"enum": ["x", "y"]}, "c": {"type": "string"}}});
        assert!(findings(v1, v2).is_empty());
    }

    #[test]
    fn findings_point_at_the_property_in_the_new_file() {
        let v1 =
            serde_json::json!({"properties": {"a": {"type": "string"}, "b": {"type": "number"}}});
        let v2 =
            serde_json::json!({"properties": {"a": {"type": "string"}, "b": {"type": "integer"}}});
        let new = version(2, v2);
        let d = &breaking_changes(&version(1, v1), &new)[0];
        let line = new.text.lines().nth(d.line - 1).unwrap();
        assert!(line.contains("\"b\""), "{line}");
    }
}
