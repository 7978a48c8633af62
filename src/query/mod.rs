//! SQL over the lake with DataFusion: `sluice query` and `POST /admin/query`.
//!
//! Every query gets a fresh session whose tables (`events`, `quarantine`, and `tracks.<event_slug>`
//! for each track event with a schema) are listings of the lake's folders with the hive partition column `date` (a `DATE`), so a filter on `date` prunes
//! whole folders and a query always sees the files present when it starts. The JSON columns are
//! read with the functions of `datafusion-functions-json` (`json_get_str(properties, 'plan')`,
//! `properties->>'plan'`, ...). A query is bounded by a memory pool and a timeout, and it only
//! reads: DDL (`CREATE`, `DROP`), DML (`INSERT`, `COPY ... TO`) and statements (`SET`) are refused
//! before they are planned, whoever asks. [`QueryEngine::stream`] hands rows out as they come, for
//! answers bounded in rows and bytes by their caller.

use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::catalog::MemorySchemaProvider;
use datafusion::common::{ScalarValue, TableReference};
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::error::DataFusionError;
use datafusion::execution::context::SQLOptions;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::prelude::{SessionConfig, SessionContext};

use crate::lake::tables::Table;
use crate::lake::typed::TypedSource;
use crate::lake::view::CompactedView;
use crate::lake::LakeStore;

/// How much a query may take.
#[derive(Debug, Clone)]
pub struct QueryLimits {
    pub memory: usize,
    pub timeout: Duration,
}

impl Default for QueryLimits {
    fn default() -> Self {
        QueryLimits {
            memory: 1 << 30,
            timeout: Duration::from_secs(60),
        }
    }
}

/// What a statement may do: read.
fn read_only() -> SQLOptions {
    SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
}

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The statement is wrong: bad syntax, an unknown table or column, a type error.
    #[error("{0}")]
    Invalid(String),
    /// Running it failed: a file could not be read, memory ran out.
    #[error("{0}")]
    Failed(String),
    #[error("the query ran longer than {0:?} and was stopped")]
    Timeout(Duration),
}

impl From<DataFusionError> for QueryError {
    fn from(e: DataFusionError) -> Self {
        match e.find_root() {
            DataFusionError::SQL(..)
            | DataFusionError::Plan(_)
            | DataFusionError::SchemaError(..) => QueryError::Invalid(e.to_string()),
            _ => QueryError::Failed(e.to_string()),
        }
    }
}

/// What a query returned.
pub struct QueryResult {
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
}

impl QueryResult {
    pub fn rows(&self) -> usize {
        self.batches.iter().map(|b| b.num_rows()).sum()
    }
}

/// Runs SQL over one lake.
#[derive(Clone)]
pub struct QueryEngine {
    store: LakeStore,
    typed: Arc<TypedSource>,
    limits: QueryLimits,
}

impl QueryEngine {
    /// `typed` gives the typed track tables in force, registered as `tracks.<event_slug>`.
    pub fn new(store: LakeStore, typed: Arc<TypedSource>, limits: QueryLimits) -> Self {
        QueryEngine {
            store,
            typed,
            limits,
        }
    }

    /// A session with the lake's tables registered.
    pub async fn session(&self) -> Result<SessionContext, QueryError> {
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_limit(self.limits.memory, 1.0)
            .build_arc()?;
        let config = SessionConfig::new()
            .with_information_schema(true)
            .with_default_catalog_and_schema("sluice", "lake");
        let mut ctx = SessionContext::new_with_config_rt(config, runtime);
        // Listings through the view never show a row twice while compaction replaces files.
        let view = CompactedView::new(self.store.store.clone());
        ctx.register_object_store(&self.store.root_url, Arc::new(view));
        datafusion_functions_json::register_all(&mut ctx)?;
        for table in [Table::Events, Table::Quarantine] {
            self.register(&ctx, table.name().into(), table.name(), table.schema())?;
        }
        let typed = self.typed.current();
        if !typed.is_empty() {
            let catalog = ctx.catalog("sluice").expect("the default catalog exists");
            catalog.register_schema("tracks", Arc::new(MemorySchemaProvider::new()))?;
            for table in typed.values() {
                let name = TableReference::partial("tracks", table.slug.as_str());
                self.register(&ctx, name, &table.folder(), table.schema.clone())?;
            }
        }
        Ok(ctx)
    }

    fn register(
        &self,
        ctx: &SessionContext,
        name: TableReference,
        folder: &str,
        schema: SchemaRef,
    ) -> Result<(), QueryError> {
        let url = ListingTableUrl::parse(self.store.table_url(folder))?;
        let options = ListingOptions::new(Arc::new(ParquetFormat::default()))
            .with_file_extension(".parquet")
            .with_table_partition_cols(vec![("date".to_string(), DataType::Date32)]);
        let config = ListingTableConfig::new(url)
            .with_listing_options(options)
            .with_schema(schema);
        ctx.register_table(name, Arc::new(ListingTable::try_new(config)?))?;
        Ok(())
    }

    /// Runs one statement and collects its result.
    pub async fn sql(&self, sql: &str) -> Result<QueryResult, QueryError> {
        self.sql_with_params(sql, Vec::new()).await
    }

    /// Runs one statement with `$1`, `$2`, ... bound to `params`.
    pub async fn sql_with_params(
        &self,
        sql: &str,
        params: Vec<ScalarValue>,
    ) -> Result<QueryResult, QueryError> {
        let ctx = self.session().await?;
        let run = async {
            let mut frame = ctx.sql_with_options(sql, read_only()).await?;
            if !params.is_empty() {
                frame = frame.with_param_values(params)?;
            }
            let schema = frame.schema().inner().clone();
            let batches = frame.collect().await?;
            Ok::<_, QueryError>(QueryResult { schema, batches })
        };
        match tokio::time::timeout(self.limits.timeout, run).await {
            Err(_) => Err(QueryError::Timeout(self.limits.timeout)),
            Ok(Err(QueryError::Failed(message))) if message.contains("Parquet error") => {
                // DataFusion does not say which file; find out, so the operator can act.
                let bad = self.unreadable_files().await;
                if bad.is_empty() {
                    Err(QueryError::Failed(message))
                } else {
                    Err(QueryError::Failed(format!(
                        "{message}; unreadable file(s) in the lake: {}",
                        bad.join(", ")
                    )))
                }
            }
            Ok(result) => result,
        }
    }

    /// Plans one statement and starts it: its rows, at most `max_rows` of them (`None`: all), as
    /// they come. The lake's files are listed by the time this returns. The caller bounds the
    /// time (dropping the stream stops the query).
    pub async fn stream(
        &self,
        sql: &str,
        max_rows: Option<usize>,
    ) -> Result<SendableRecordBatchStream, QueryError> {
        let ctx = self.session().await?;
        let mut frame = ctx.sql_with_options(sql, read_only()).await?;
        if let Some(max_rows) = max_rows {
            frame = frame.limit(0, Some(max_rows))?;
        }
        Ok(frame.execute_stream().await?)
    }

    /// How long a query may run.
    pub fn timeout(&self) -> Duration {
        self.limits.timeout
    }

    /// Parquet files of the lake whose footer cannot be read.
    async fn unreadable_files(&self) -> Vec<String> {
        use futures_util::TryStreamExt;
        let listing = self.store.store.list(Some(&self.store.prefix));
        let Ok(objects) = listing.try_collect::<Vec<_>>().await else {
            return Vec::new();
        };
        let mut bad = Vec::new();
        for object in objects {
            if object.location.as_ref().ends_with(".parquet")
                && !self.footer_readable(&object.location, object.size).await
            {
                bad.push(object.location.to_string());
            }
        }
        bad
    }

    async fn footer_readable(&self, path: &object_store::path::Path, size: u64) -> bool {
        use datafusion::parquet::file::metadata::{FooterTail, ParquetMetaDataReader};
        use object_store::ObjectStoreExt;
        let store = &self.store.store;
        let Some(tail_start) = size.checked_sub(8) else {
            return false;
        };
        let Ok(tail) = store.get_range(path, tail_start..size).await else {
            return false;
        };
        let Ok(tail) = FooterTail::try_new(tail.as_ref().try_into().expect("8 bytes")) else {
            return false;
        };
        let Some(start) = tail_start.checked_sub(tail.metadata_length() as u64) else {
            return false;
        };
        match store.get_range(path, start..tail_start).await {
            Ok(meta) => ParquetMetaDataReader::decode_metadata(&meta).is_ok(),
            Err(_) => false,
        }
    }
}

/// How `sluice query` prints a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    /// One JSON object per row, one per line.
    Json,
    Csv,
}

/// Writes a result in the given format.
pub fn write(
    result: &QueryResult,
    format: Format,
    out: &mut dyn std::io::Write,
) -> std::io::Result<()> {
    use datafusion::arrow::{csv, json, util::pretty};
    let to_io = |e: datafusion::arrow::error::ArrowError| std::io::Error::other(e.to_string());
    match format {
        Format::Table => {
            // With no batches at all, a batch of no rows still gives the header.
            let empty = [RecordBatch::new_empty(result.schema.clone())];
            let batches = if result.batches.is_empty() {
                &empty[..]
            } else {
                &result.batches
            };
            let table = pretty::pretty_format_batches(batches).map_err(to_io)?;
            writeln!(out, "{table}")?;
            writeln!(
                out,
                "{} row{}",
                result.rows(),
                if result.rows() == 1 { "" } else { "s" }
            )
        }
        Format::Json => {
            let mut writer = json::LineDelimitedWriter::new(out);
            for batch in &result.batches {
                writer.write(batch).map_err(to_io)?;
            }
            writer.finish().map_err(to_io)
        }
        Format::Csv => {
            let mut writer = csv::WriterBuilder::new().with_header(true).build(out);
            if result.batches.is_empty() {
                let empty = RecordBatch::new_empty(result.schema.clone());
                return writer.write(&empty).map_err(to_io);
            }
            for batch in &result.batches {
                writer.write(batch).map_err(to_io)?;
            }
            Ok(())
        }
    }
}

/// Appends a batch's rows to a JSON array being written: `,` before each row but the array's
/// first (`first` says whether none was written yet). Nulls are left out, as in [`to_json_rows`].
pub fn append_json_rows(
    batch: &RecordBatch,
    first: &mut bool,
    out: &mut Vec<u8>,
) -> Result<(), QueryError> {
    use datafusion::arrow::json;
    let mut lines = Vec::new();
    let mut writer = json::LineDelimitedWriter::new(&mut lines);
    writer
        .write(batch)
        .and_then(|()| writer.finish())
        .map_err(|e| QueryError::Failed(e.to_string()))?;
    for line in lines.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        if !std::mem::take(first) {
            out.push(b',');
        }
        out.extend_from_slice(line);
    }
    Ok(())
}

/// A result as JSON rows, for the admin API.
pub fn to_json_rows(result: &QueryResult) -> Result<serde_json::Value, QueryError> {
    let mut buf = Vec::new();
    write(result, Format::Json, &mut buf).map_err(|e| QueryError::Failed(e.to_string()))?;
    let rows: Result<Vec<serde_json::Value>, _> = buf
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(serde_json::from_slice)
        .collect();
    rows.map(serde_json::Value::Array)
        .map_err(|e| QueryError::Failed(e.to_string()))
}

#[cfg(test)]
mod tests;
