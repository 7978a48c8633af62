//! Hot reload: the schemas folder is looked at every second; when a file appears, changes or
//! goes away, the registry is rebuilt and swapped in whole.
//!
//! A file that does not parse, lacks its header, or does not compile is refused: its last good
//! version (if it had one) stays loaded ([`LastGood`]), the problem is logged with the file and counted
//! (`sluice_schema_refused_files`), and every other change applies.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::files::{collect_json_files, read_schema_file, SchemaFile, Schemas};
use super::live::Live;
use super::registry::{compile, Registry};
use crate::diagnostic::Diagnostic;
use crate::folder_watch::{self, LastGood};
use crate::metrics::SchemaMetrics;

/// Reads a schemas folder, keeping the last good version of every file across reloads.
pub struct Loader {
    dir: PathBuf,
    files: LastGood<SchemaFile>,
}

impl Loader {
    pub fn new(dir: &Path) -> Loader {
        Loader {
            dir: dir.to_path_buf(),
            files: LastGood::default(),
        }
    }

    /// Whether the folder changed since the last load.
    pub fn changed(&self) -> bool {
        let mut paths = Vec::new();
        collect_json_files(&self.dir, &mut paths, &mut Vec::new());
        self.files.changed(paths)
    }

    /// Reads the folder: every file that loads and compiles replaces its last good version;
    /// a file that is gone is dropped. Returns the files in force and the problems found.
    pub fn load(&mut self) -> (Schemas, Registry, Vec<Diagnostic>) {
        let mut problems = Vec::new();
        let mut paths = Vec::new();
        collect_json_files(&self.dir, &mut paths, &mut problems);
        problems.extend(self.files.reload(paths, |path| {
            let file = read_schema_file(path).map_err(|p| vec![p])?;
            match compile(&file.schema) {
                Ok(_) => Ok(file),
                Err(e) => Err(vec![Diagnostic::at(
                    &file.path,
                    &file.text,
                    super::registry::locate(&file.text, &e.pointer),
                    format!("schema does not compile: {}", e.message),
                )]),
            }
        }));
        let (schemas, mut conflicts) = Schemas::from_files(self.files.files().cloned());
        let (registry, mut compile_problems) = Registry::build(&schemas);
        problems.append(&mut conflicts);
        problems.append(&mut compile_problems);
        (schemas, registry, problems)
    }
}

/// Reloads the registry in `live` whenever the folder changes, until `stop` is dropped.
pub fn spawn(
    mut loader: Loader,
    live: Arc<Live>,
    metrics: Arc<SchemaMetrics>,
    stop: std::sync::mpsc::Receiver<()>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    folder_watch::spawn("sluice-schema-watch", stop, move || {
        if loader.changed() {
            let (schemas, registry, problems) = loader.load();
            folder_watch::record_reload(
                "schema",
                &problems,
                &metrics.reloads,
                &metrics.refused_files,
            );
            tracing::info!(
                schemas = registry.len(),
                refused = problems.len(),
                "schemas reloaded"
            );
            live.replace(schemas, registry);
        }
        true
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocabulary::MessageType;

    fn schema(required: &str) -> String {
        format!(
            r#"{{"x-sluice":{{"type":"track","event":"Signed Up","version":1}},"type":"object","required":["{required}"]}}"#
        )
    }

    #[test]
    fn a_broken_edit_keeps_the_last_good_version_and_other_changes_apply() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("signup.json"), schema("plan")).unwrap();
        let mut loader = Loader::new(dir.path());
        let (_, registry, problems) = loader.load();
        assert!(problems.is_empty());
        assert!(!loader.changed());
        let required = |r: &Registry, field: &str| {
            let v = serde_json::json!({ field: "x" });
            matches!(
                r.check(MessageType::Track, Some("Signed Up"), &v),
                crate::schema::Verdict::Valid
            )
        };
        assert!(required(&registry, "plan"));

        // Broken JSON, and a new file beside it.
        std::fs::write(dir.path().join("signup.json"), "{ not json").unwrap();
        std::fs::write(
            dir.path().join("page.json"),
            r#"{"x-sluice":{"type":"page"},"type":"object"}"#,
        )
        .unwrap();
        assert!(loader.changed());
        let (schemas, registry, problems) = loader.load();
        assert_eq!(problems.len(), 1);
        assert!(problems[0].to_string().contains("signup.json"));
        assert!(problems[0].message.contains("last good version stays"));
        assert!(
            required(&registry, "plan"),
            "the old version is still enforced"
        );
        assert_eq!(schemas.all().count(), 2, "the new page schema applies");

        // Fixed, with a change: the new version applies.
        std::fs::write(dir.path().join("signup.json"), schema("source")).unwrap();
        let (_, registry, problems) = loader.load();
        assert!(problems.is_empty());
        assert!(required(&registry, "source") && !required(&registry, "plan"));

        // Removed: gone from the registry.
        std::fs::remove_file(dir.path().join("signup.json")).unwrap();
        let (_, registry, _) = loader.load();
        assert!(registry
            .lookup(MessageType::Track, Some("Signed Up"))
            .is_none());
    }
}
