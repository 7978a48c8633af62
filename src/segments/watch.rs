//! Hot reload of `segments/`: the folder is looked at every second; when a file appears,
//! changes or goes away, the whole set is rebuilt and handed to the profile stage, which
//! backfills what changed.
//!
//! A file that does not parse or whose rule does not compile is refused: its last good version
//! (if it had one) stays loaded, the problem is logged with file:line:col and counted.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::Arc;

use super::files::{self, SegmentFile};
use super::rules::SegmentSet;
use crate::diagnostic::Diagnostic;
use crate::folder_watch::{self, LastGood};
use crate::metrics::ProfileStageMetrics;

pub struct Loader {
    dir: PathBuf,
    files: LastGood<SegmentFile>,
}

impl Loader {
    pub fn new(dir: &Path) -> Loader {
        Loader {
            dir: dir.to_path_buf(),
            files: LastGood::default(),
        }
    }

    pub fn changed(&self) -> bool {
        self.files.changed(folder_watch::toml_files(&self.dir))
    }

    /// Reads the folder; every file that reads and compiles replaces its last good version.
    pub fn load(&mut self) -> (SegmentSet, Vec<Diagnostic>) {
        let mut problems = self
            .files
            .reload(folder_watch::toml_files(&self.dir), |path| {
                let file = files::read(path)?;
                let (_, problems) = SegmentSet::build(vec![file.clone()], None);
                if problems.is_empty() {
                    Ok(file)
                } else {
                    Err(problems)
                }
            });
        let mut good: Vec<SegmentFile> = self.files.files().cloned().collect();
        good.sort_by(|a, b| a.key.cmp(&b.key));
        let (set, mut more) = SegmentSet::build(good, None);
        problems.append(&mut more);
        (set, problems)
    }
}

/// Sends a new set on `sets` whenever the folder changes, until `stop` is dropped.
pub fn spawn(
    mut loader: Loader,
    sets: SyncSender<Arc<SegmentSet>>,
    metrics: Arc<ProfileStageMetrics>,
    stop: Receiver<()>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    folder_watch::spawn("sluice-segment-watch", stop, move || {
        if !loader.changed() {
            return true;
        }
        let (set, problems) = loader.load();
        folder_watch::record_reload(
            "segment",
            &problems,
            &metrics.reloads,
            &metrics.refused_files,
        );
        tracing::info!(
            segments = set.len(),
            refused = problems.len(),
            "segments reloaded"
        );
        sets.send(Arc::new(set)).is_ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_rule_keeps_the_last_good_version() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.toml");
        std::fs::write(&file, "rule = 'user.did(\"A\")'").unwrap();
        let mut loader = Loader::new(dir.path());
        let (set, problems) = loader.load();
        assert!(problems.is_empty(), "{problems:?}");
        let first = set.segments[0].fingerprint;
        std::fs::write(&file, "rule = 'user.did(\"A\") &&'").unwrap();
        std::fs::write(dir.path().join("b.toml"), "rule = 'true'").unwrap();
        assert!(loader.changed());
        let (set, problems) = loader.load();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].to_string().contains("a.toml:1:"),
            "{}",
            problems[0]
        );
        assert!(problems[0]
            .message
            .contains("last good version stays loaded"));
        assert_eq!(set.len(), 2);
        assert_eq!(set.segments[set.position("a").unwrap()].fingerprint, first);
    }
}
