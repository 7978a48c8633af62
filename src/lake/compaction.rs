//! Compaction: the small files of a closed partition merged into larger ones.
//!
//! A partition (`<table>/date=D`, typed tables included) is closed once `D` is before today (UTC): new messages are
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
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use datafusion::parquet::arrow::{parquet_to_arrow_schema, AsyncArrowWriter};
use datafusion::parquet::errors::ParquetError;
use datafusion::parquet::file::metadata::{FooterTail, ParquetMetaDataReader};
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

/// Compaction runs in the background on cold data, so it can afford stronger compression than a
/// flush (about 10 % smaller files for typical events).
pub const COMPACTION_ZSTD_LEVEL: i32 = 9;

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
    schema: Option<SchemaRef>,
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

    #[cfg(test)]
    pub fn with_target_bytes(mut self, bytes: u64) -> Self {
        self.target_bytes = bytes;
        self
    }

    /// One pass over every closed partition of every table (`events`, `quarantine` and each
    /// `tracks/<slug>`). `committed` is the lake writer's log cursor.
    pub async fn run_once(&self, today: NaiveDate, committed: u64) -> Result<Pass, CompactError> {
        let mut pass = Pass::default();
        let mut tables = vec![
            self.store.path(Table::Events.name()),
            self.store.path(Table::Quarantine.name()),
        ];
        let tracks = self
            .store
            .store
            .list_with_delimiter(Some(&self.store.path("tracks")))
            .await?;
        tables.extend(tracks.common_prefixes);
        for table in tables {
            let listing = self.store.store.list_with_delimiter(Some(&table)).await?;
            for folder in listing.common_prefixes {
                let Some(date) = folder
                    .filename()
                    .and_then(|n| n.strip_prefix("date="))
                    .and_then(|d| d.parse::<NaiveDate>().ok())
                else {
                    continue;
                };
                if date < today {
                    self.compact_partition(&folder, committed, &mut pass)
                        .await?;
                }
            }
        }
        Ok(pass)
    }

    async fn compact_partition(
        &self,
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
            files.push(RangeFile {
                meta,
                start,
                end,
                schema: None,
            });
        }
        files.sort_by_key(|f| f.start);
        // Only what the writer has committed; a file past the cursor ends the candidates, so
        // that every run is contiguous.
        let mut candidates: Vec<RangeFile> = files
            .into_iter()
            .take_while(|f| f.end <= committed)
            .collect();
        if candidates.len() < 2 {
            return Ok(());
        }
        // Files of a typed table written before and after a schema change differ; they are
        // merged only with files like them.
        for file in &mut candidates {
            file.schema = Some(self.schema_of(file).await?);
        }
        for run in runs(&candidates, self.target_bytes) {
            if run.len() >= 2 {
                self.merge(folder, run).await?;
                pass.files_merged += run.len();
                pass.files_written += 1;
            }
        }
        Ok(())
    }

    /// The Arrow schema of a Parquet file, from its footer.
    async fn schema_of(&self, file: &RangeFile) -> Result<SchemaRef, CompactError> {
        let store = &self.store.store;
        let size = file.meta.size;
        let bad = || ParquetError::General(format!("{}: not a Parquet file", file.meta.location));
        let tail_start = size.checked_sub(8).ok_or_else(bad)?;
        let tail = store
            .get_range(&file.meta.location, tail_start..size)
            .await?;
        let tail = FooterTail::try_new(tail.as_ref().try_into().map_err(|_| bad())?)?;
        let start = tail_start
            .checked_sub(tail.metadata_length() as u64)
            .ok_or_else(bad)?;
        let footer = store
            .get_range(&file.meta.location, start..tail_start)
            .await?;
        let metadata = ParquetMetaDataReader::decode_metadata(&footer)?;
        let file_metadata = metadata.file_metadata();
        let schema = parquet_to_arrow_schema(
            file_metadata.schema_descr(),
            file_metadata.key_value_metadata(),
        )?;
        Ok(Arc::new(schema))
    }

    async fn merge(&self, folder: &Path, run: &[RangeFile]) -> Result<(), CompactError> {
        let (start, end) = (run[0].start, run[run.len() - 1].end);
        let target = folder
            .clone()
            .join(format!("{start:020}-{end:020}.parquet"));
        let schema = run[0].schema.clone().expect("read before runs are formed");
        let upload = BufWriter::new(self.store.store.clone(), target.clone());
        let mut writer = AsyncArrowWriter::try_new(
            upload,
            schema,
            Some(writer_properties(COMPACTION_ZSTD_LEVEL)),
        )?;
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

/// Consecutive files of the same schema grouped so that each group stays within `target` bytes (a
/// single larger file is a group of its own).
fn runs(files: &[RangeFile], target: u64) -> Vec<&[RangeFile]> {
    let mut out = Vec::new();
    let mut begin = 0;
    let mut size = 0;
    for (i, f) in files.iter().enumerate() {
        if i > begin && (size + f.meta.size > target || f.schema != files[begin].schema) {
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
                crate::thread_priority::lower();
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
