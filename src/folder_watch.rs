//! What the hot-reloaded folders (`schemas/`, `segments/`) share: telling that a folder's files
//! changed, keeping the last good version of each file, a thread that looks every second, and how
//! a reload is logged and counted.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};

use crate::diagnostic::Diagnostic;
use crate::metrics::{ReloadLabels, ReloadOutcome};

/// How often a folder is looked at.
pub const POLL_EVERY: Duration = Duration::from_secs(1);

/// Each file with its modification time and length, sorted: equal when nothing changed.
pub type Fingerprint = Vec<(PathBuf, Option<SystemTime>, u64)>;

pub fn fingerprint(paths: Vec<PathBuf>) -> Fingerprint {
    let mut out: Fingerprint = paths
        .into_iter()
        .map(|p| {
            let meta = std::fs::metadata(&p).ok();
            let modified = meta.as_ref().and_then(|m| m.modified().ok());
            (p, modified, meta.map_or(0, |m| m.len()))
        })
        .collect();
    out.sort();
    out
}

/// The `*.toml` files of `dir` (not recursive), sorted.
pub fn toml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml") && p.is_file())
        .collect();
    out.sort();
    out
}

/// The names (file stems) of the `*.toml` files of `dir`: segment keys, destination names.
pub fn toml_names(dir: &Path) -> std::collections::HashSet<String> {
    toml_files(dir)
        .iter()
        .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .collect()
}

/// The last good version of each file of a folder, across reloads: a file that reads replaces
/// its version, a file that is gone is dropped, and a file refused keeps the version it had (its
/// problems say so), so one broken edit never takes the rest of the folder down.
pub struct LastGood<T> {
    good: HashMap<PathBuf, T>,
    fingerprint: Fingerprint,
}

impl<T> Default for LastGood<T> {
    fn default() -> Self {
        LastGood {
            good: HashMap::new(),
            fingerprint: Vec::new(),
        }
    }
}

impl<T> LastGood<T> {
    /// Whether `paths` (the folder's files now) changed since the last reload.
    pub fn changed(&self, paths: Vec<PathBuf>) -> bool {
        fingerprint(paths) != self.fingerprint
    }

    /// Reads each of `paths` with `read`; returns the problems of the files refused.
    pub fn reload(
        &mut self,
        paths: Vec<PathBuf>,
        mut read: impl FnMut(&Path) -> Result<T, Vec<Diagnostic>>,
    ) -> Vec<Diagnostic> {
        self.fingerprint = fingerprint(paths.clone());
        self.good.retain(|path, _| paths.contains(path));
        let mut problems = Vec::new();
        for path in paths {
            match read(&path) {
                Ok(file) => {
                    self.good.insert(path, file);
                }
                Err(found) => {
                    let kept = if self.good.contains_key(&path) {
                        "; its last good version stays loaded"
                    } else {
                        ""
                    };
                    problems.extend(found.into_iter().map(|d| Diagnostic {
                        message: format!("{}{kept}", d.message),
                        ..d
                    }));
                }
            }
        }
        problems
    }

    /// The files in force.
    pub fn files(&self) -> impl Iterator<Item = &T> {
        self.good.values()
    }
}

/// Calls `poll` every [`POLL_EVERY`] on a thread named `name`, until `stop` is dropped or `poll`
/// returns false.
pub fn spawn(
    name: &str,
    stop: Receiver<()>,
    mut poll: impl FnMut() -> bool + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            while let Err(RecvTimeoutError::Timeout) = stop.recv_timeout(POLL_EVERY) {
                if !poll() {
                    return;
                }
            }
        })
}

/// Logs every refused file of a reload of `kind` files and counts the reload.
pub fn record_reload(
    kind: &'static str,
    problems: &[Diagnostic],
    reloads: &Family<ReloadLabels, Counter>,
    refused_files: &Gauge,
) {
    for p in problems {
        tracing::error!(problem = %p, kind, "file refused; its last good version stays");
    }
    let outcome = if problems.is_empty() {
        ReloadOutcome::Applied
    } else {
        ReloadOutcome::PartlyRefused
    };
    reloads.get_or_create(&ReloadLabels { outcome }).inc();
    refused_files.set(problems.len() as i64);
}
