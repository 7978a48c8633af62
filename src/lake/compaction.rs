//! Compaction: the small files of a closed partition merged into larger ones.
//!
//! A partition (`<table>/date=D`) is closed once `D` is before today (UTC): new messages are
//! received, and so filed, today. Only files that the lake writer has committed (their log range
//! ends at or before its cursor) are touched, so a flush being redone after a crash is never
//! merged. Files sorted by log range are grouped into runs of consecutive files up to the target
//! size; a run of two or more is read, written as one file named after the union of its ranges,
//! made durable, and then its inputs are deleted. Readers that list through
//! [`super::view::CompactedView`] (Sluice's queries) never see a row twice in between; engines that
//! list the folder themselves can see both for the moment between the merged file's appearance and
//! the inputs' deletion. A crash in that moment leaves superseded inputs, which the next pass
//! deletes first.

use std::sync::Arc;

use chrono::NaiveDate;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use datafusion::parquet::arrow::AsyncArrowWriter;
use futures_util::TryStreamExt;
use object_store::buffered::BufWriter;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStoreExt};

use super::store::{LakeStore, StoreError};
use super::tables::Table;
use super::view::superseded;
use super::writer::{parse_file_name, writer_properties};

/// Merged files aim at this size.
pub const TARGET_FILE_BYTES: u64 = 128 << 20;

#[derive(Debug, thiserror::Error)]
pub enum CompactError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("compaction: {0}")]
    Parquet(#[from] datafusion::parquet::errors::ParquetError),
    #[error("compaction: {0}")]
    Arrow(#[from] datafusion::arrow::error::ArrowError),
}

impl From<object_store::Error> for CompactError {
    fn from(e: object_store::Error) -> Self {
        CompactError::Store(StoreError::ObjectStore(e))
    }
}

/// What one pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pass {
    pub files_merged: usize,
    pub files_written: usize,
    pub superseded_deleted: usize,
}

/// A lake file with its log range.
#[derive(Debug, Clone)]
struct RangeFile {
    meta: ObjectMeta,
    start: u64,
    end: u64,
}

pub struct Compactor {
    store: LakeStore,
    target_bytes: u64,
}

impl Compactor {
    pub fn new(store: LakeStore) -> Self {
        Compactor {
            store,
            target_bytes: TARGET_FILE_BYTES,
        }
    }

    pub fn with_target_bytes(mut self, bytes: u64) -> Self {
        self.target_bytes = bytes;
        self
    }

    /// One pass over every closed partition. `committed` is the lake writer's log cursor.
    pub async fn run_once(&self, today: NaiveDate, committed: u64) -> Result<Pass, CompactError> {
        let mut pass = Pass::default();
        for table in [Table::Events, Table::Quarantine] {
            let table_path = self.store.path(table.name());
            let listing = self
                .store
                .store
                .list_with_delimiter(Some(&table_path))
                .await?;
            for folder in listing.common_prefixes {
                let Some(date) = folder
                    .filename()
                    .and_then(|n| n.strip_prefix("date="))
                    .and_then(|d| d.parse::<NaiveDate>().ok())
                else {
                    continue;
                };
                if date < today {
                    self.compact_partition(table, &folder, committed, &mut pass)
                        .await?;
                }
            }
        }
        Ok(pass)
    }

    async fn compact_partition(
        &self,
        table: Table,
        folder: &Path,
        committed: u64,
        pass: &mut Pass,
    ) -> Result<(), CompactError> {
        let objects: Vec<ObjectMeta> = self.store.store.list(Some(folder)).try_collect().await?;
        // A crash between writing a merged file and deleting its inputs leaves the inputs behind.
        let hidden = superseded(&objects);
        let mut files = Vec::new();
        for (meta, hidden) in objects.into_iter().zip(hidden) {
            if hidden {
                self.store.store.delete(&meta.location).await?;
                pass.superseded_deleted += 1;
                continue;
            }
            let Some((start, end)) = meta.location.filename().and_then(parse_file_name) else {
                continue;
            };
            files.push(RangeFile { meta, start, end });
        }
        files.sort_by_key(|f| f.start);
        // Only what the writer has committed; a file past the cursor ends the candidates, so
        // that every run is contiguous.
        let committed_files: Vec<RangeFile> = files
            .into_iter()
            .take_while(|f| f.end <= committed)
            .collect();
        for run in runs(&committed_files, self.target_bytes) {
            if run.len() >= 2 {
                self.merge(table, folder, run).await?;
                pass.files_merged += run.len();
                pass.files_written += 1;
            }
        }
        Ok(())
    }

    async fn merge(
        &self,
        table: Table,
        folder: &Path,
        run: &[RangeFile],
    ) -> Result<(), CompactError> {
        let (start, end) = (run[0].start, run[run.len() - 1].end);
        let target = folder
            .clone()
            .join(format!("{start:020}-{end:020}.parquet"));
        let upload = BufWriter::new(self.store.store.clone(), target.clone());
        let mut writer =
            AsyncArrowWriter::try_new(upload, table.schema(), Some(writer_properties()))?;
        for file in run {
            let bytes = self
                .store
                .store
                .get(&file.meta.location)
                .await?
                .bytes()
                .await?;
            let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)?
                .with_batch_size(8192)
                .build()?;
            for batch in reader {
                writer.write(&batch?).await?;
            }
        }
        writer.close().await?;
        self.store.make_durable(&target)?;
        for file in run {
            self.store.store.delete(&file.meta.location).await?;
        }
        tracing::info!(partition = %folder, files = run.len(), start, end, "compacted");
        Ok(())
    }
}

/// Consecutive files grouped so that each group stays within `target` bytes (a single larger
/// file is a group of its own).
fn runs(files: &[RangeFile], target: u64) -> Vec<&[RangeFile]> {
    let mut out = Vec::new();
    let mut begin = 0;
    let mut size = 0;
    for (i, f) in files.iter().enumerate() {
        if i > begin && size + f.meta.size > target {
            out.push(&files[begin..i]);
            begin = i;
            size = 0;
        }
        size += f.meta.size;
    }
    if begin < files.len() {
        out.push(&files[begin..]);
    }
    out
}

/// Runs compaction passes on its own thread at a low CPU priority.
pub struct CompactionHandle {
    stop: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl CompactionHandle {
    pub fn start(
        compactor: Compactor,
        every: std::time::Duration,
        committed: Arc<dyn Fn() -> u64 + Send + Sync>,
        clock: crate::clock::Clock,
        runtime: tokio::runtime::Handle,
    ) -> std::io::Result<Self> {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("sluice-compactor".into())
            .spawn(move || {
                // SAFETY: setpriority on this thread only (on Linux, PRIO_PROCESS with a thread id).
                unsafe {
                    let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
                    libc::setpriority(libc::PRIO_PROCESS, tid, 10);
                }
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(every)
                {
                    let today = clock().date_naive();
                    match runtime.block_on(compactor.run_once(today, committed())) {
                        Ok(pass) if pass != Pass::default() => {
                            tracing::info!(?pass, "compaction pass")
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "compaction pass failed; will try again")
                        }
                    }
                }
            })?;
        Ok(CompactionHandle { stop, thread })
    }

    pub fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}
