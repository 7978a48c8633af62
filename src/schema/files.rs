//! Finding, reading and indexing the schema files. Every version of an event is kept, oldest
//! first. Files named `*.examples.json` are example messages for tests, not schemas.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::diagnostic::Diagnostic;
use crate::vocabulary::MessageType;

/// One schema file.
#[derive(Debug, Clone)]
pub struct SchemaFile {
    pub path: PathBuf,
    /// The file's text, to point problems at lines.
    pub text: String,
    pub kind: MessageType,
    /// The event name for track; `None` for the other types (one schema each).
    pub event: Option<String>,
    pub version: u64,
    pub schema: Value,
}

/// Every schema file found, by (type, event), versions oldest first.
#[derive(Debug, Clone, Default)]
pub struct Schemas {
    by_event: BTreeMap<(String, Option<String>), Vec<SchemaFile>>,
}

impl Schemas {
    #[cfg(test)]
    /// Reads every `*.json` under `dir` (recursively). A missing folder is an empty registry;
    /// files that cannot be used are left out and reported.
    pub fn load_dir(dir: &Path) -> (Schemas, Vec<Diagnostic>) {
        let mut schemas = Schemas::default();
        let mut problems = Vec::new();
        let mut paths = Vec::new();
        collect_json_files(dir, &mut paths, &mut problems);
        paths.sort();
        for path in paths {
            match read_schema_file(&path) {
                Ok(file) => schemas.insert(file, &mut problems),
                Err(d) => problems.push(d),
            }
        }
        (schemas, problems)
    }

    fn insert(&mut self, file: SchemaFile, problems: &mut Vec<Diagnostic>) {
        let key = (file.kind.as_str().to_string(), file.event.clone());
        let versions = self.by_event.entry(key).or_default();
        if let Some(other) = versions.iter().find(|v| v.version == file.version) {
            problems.push(Diagnostic::file(
                &file.path,
                format!(
                    "version {} is also declared by {}",
                    file.version,
                    other.path.display()
                ),
            ));
            return;
        }
        versions.push(file);
        versions.sort_by_key(|v| v.version);
    }

    /// The versions of a track event's schema, oldest first.
    pub fn track(&self, event: &str) -> Option<&[SchemaFile]> {
        self.by_event
            .get(&("track".to_string(), Some(event.to_string())))
            .map(Vec::as_slice)
    }

    /// Every track event with a schema, and its versions.
    pub fn tracks(&self) -> impl Iterator<Item = (&str, &[SchemaFile])> {
        self.by_event
            .iter()
            .filter(|((kind, _), _)| kind == "track")
            .map(|((_, event), versions)| (event.as_deref().unwrap_or(""), versions.as_slice()))
    }

    pub fn is_empty(&self) -> bool {
        self.by_event.is_empty()
    }

    /// Every (type, event) with its versions, oldest first.
    pub fn all(&self) -> impl Iterator<Item = (MessageType, Option<&str>, &[SchemaFile])> {
        self.by_event.values().map(|versions| {
            let newest = &versions[versions.len() - 1];
            (newest.kind, newest.event.as_deref(), versions.as_slice())
        })
    }

    /// The files, as read, of every version of every event.
    pub fn files(&self) -> impl Iterator<Item = &SchemaFile> {
        self.by_event.values().flatten()
    }

    /// Builds the index from files already read (as the hot reloader keeps them).
    pub fn from_files(files: impl IntoIterator<Item = SchemaFile>) -> (Schemas, Vec<Diagnostic>) {
        let mut schemas = Schemas::default();
        let mut problems = Vec::new();
        let mut files: Vec<SchemaFile> = files.into_iter().collect();
        files.sort_by(|a, b| a.path.cmp(&b.path));
        for file in files {
            schemas.insert(file, &mut problems);
        }
        (schemas, problems)
    }
}

pub(crate) fn collect_json_files(
    dir: &Path,
    out: &mut Vec<PathBuf>,
    problems: &mut Vec<Diagnostic>,
) {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            problems.push(Diagnostic::file(
                dir,
                format!("cannot read the schemas folder: {e}"),
            ));
            return;
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_json_files(&path, out, problems);
        } else if path.extension().is_some_and(|e| e == "json")
            && !path.to_string_lossy().ends_with(".examples.json")
        {
            out.push(path);
        }
    }
}

pub(crate) fn read_schema_file(path: &Path) -> Result<SchemaFile, Diagnostic> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Diagnostic::file(path, format!("cannot read: {e}")))?;
    parse_schema_file(path, text)
}

/// A schema file's text, as if read from `path`.
pub fn parse_schema_file(path: &Path, text: String) -> Result<SchemaFile, Diagnostic> {
    let schema: Value = serde_json::from_str(&text).map_err(|e| {
        let offset = offset_of(&text, e.line(), e.column());
        Diagnostic::at(path, &text, offset, format!("not JSON: {e}"))
    })?;
    let header = schema.get("x-sluice").ok_or_else(|| {
        Diagnostic::file(
            path,
            "no `x-sluice` header naming the type, event and version",
        )
    })?;
    let kind = header
        .get("type")
        .and_then(Value::as_str)
        .and_then(MessageType::parse)
        .ok_or_else(|| {
            Diagnostic::file(
                path,
                "`x-sluice.type` must be track, identify, page, screen, group or alias",
            )
        })?;
    let event = header
        .get("event")
        .and_then(Value::as_str)
        .map(str::to_string);
    if kind == MessageType::Track && event.as_deref().is_none_or(str::is_empty) {
        return Err(Diagnostic::file(
            path,
            "a track schema needs `x-sluice.event`",
        ));
    }
    let version = match header.get("version") {
        None => 1,
        Some(v) => v.as_u64().filter(|v| *v >= 1).ok_or_else(|| {
            Diagnostic::file(path, "`x-sluice.version` must be a whole number from 1")
        })?,
    };
    Ok(SchemaFile {
        path: path.to_path_buf(),
        text,
        kind,
        event,
        version,
        schema,
    })
}

/// Byte offset of a 1-based line and column, as serde_json reports them.
pub(crate) fn offset_of(text: &str, line: usize, column: usize) -> usize {
    let line_start: usize = text
        .split_inclusive('\n')
        .take(line.saturating_sub(1))
        .map(str::len)
        .sum();
    line_start + column.saturating_sub(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn indexes_versions_and_reports_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "orders/v2.json",
            r#"{"x-sluice":{"type":"track","event":"Order Completed","version":2},"type":"object"}"#,
        );
        write(
            dir.path(),
            "orders/v1.json",
            r#"{"x-sluice":{"type":"track","event":"Order Completed","version":1},"type":"object"}"#,
        );
        write(
            dir.path(),
            "traits.json",
            r#"{"x-sluice":{"type":"identify"},"type":"object"}"#,
        );
        write(dir.path(), "broken.json", "{\n  \"x-sluice\": ,\n}");
        write(dir.path(), "headless.json", r#"{"type":"object"}"#);
        write(
            dir.path(),
            "dup.json",
            r#"{"x-sluice":{"type":"track","event":"Order Completed","version":2}}"#,
        );
        write(dir.path(), "notes.txt", "ignored");
        let (schemas, problems) = Schemas::load_dir(dir.path());
        let versions: Vec<u64> = schemas
            .track("Order Completed")
            .unwrap()
            .iter()
            .map(|v| v.version)
            .collect();
        assert_eq!(versions, vec![1, 2]);
        assert_eq!(schemas.tracks().count(), 1);
        let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(text.len(), 3, "{text:#?}");
        assert!(
            text.iter()
                .any(|t| t.contains("broken.json:2:") && t.contains("not JSON")),
            "{text:#?}"
        );
        assert!(text
            .iter()
            .any(|t| t.contains("headless.json") && t.contains("x-sluice")));
        assert!(text
            .iter()
            .any(|t| t.contains("version 2 is also declared")));
        assert!(Schemas::load_dir(&dir.path().join("missing")).0.is_empty());
    }
}
