//! The commands other than `serve`: each loads what it needs and prints for a person or a script.

use std::io::{self, BufWriter, Write};
use std::path::Path;

use crate::config::Config;
use crate::entry::Entry;
use crate::intake_log;
use crate::lake::LakeStore;
use crate::query::{self, Format, QueryEngine, QueryLimits};

/// `sluice check`: every problem in the deployment's files, one per line as `file:line:col:
/// message`. Returns whether everything is fine.
pub fn check(config_path: &Path, out: &mut dyn Write) -> io::Result<bool> {
    let config = match Config::load(config_path) {
        Ok(config) => config,
        Err(problems) => {
            for p in &problems.0 {
                writeln!(out, "{p}")?;
            }
            return Ok(false);
        }
    };
    let (schemas, _, mut problems) = crate::schema::watch::Loader::new(&config.schemas.dir).load();
    problems.extend(crate::schema::compat::check(&schemas));
    for p in &problems {
        writeln!(out, "{p}")?;
    }
    if !problems.is_empty() {
        return Ok(false);
    }
    writeln!(
        out,
        "{}: ok ({} source{}, {} track event{} with a schema, log in {})",
        config_path.display(),
        config.sources.len(),
        if config.sources.len() == 1 { "" } else { "s" },
        schemas.tracks().count(),
        if schemas.tracks().count() == 1 {
            ""
        } else {
            "s"
        },
        config.log.dir.display()
    )?;
    Ok(true)
}

/// Where `sluice log dump` starts.
#[derive(Debug, Clone)]
pub enum DumpFrom {
    Oldest,
    Offset(u64),
    Cursor(String),
}

/// `sluice log dump`: the intake log's records from a point on, one JSON object per line. Safe to
/// run beside a serving process: it only reads.
pub fn log_dump(log_dir: &Path, from: DumpFrom, out: &mut dyn Write) -> anyhow::Result<u64> {
    let (log, oldest) = intake_log::open_read_only(log_dir)?;
    let start = match from {
        DumpFrom::Oldest => oldest,
        DumpFrom::Offset(n) => n,
        DumpFrom::Cursor(name) => log.cursor(&name)?.ok_or_else(|| {
            anyhow::anyhow!("no consumer named `{name}` in {}", log_dir.display())
        })?,
    };
    let mut reader = log.reader(start);
    let mut out = BufWriter::new(out);
    let mut count = 0;
    loop {
        let records = reader.read(1024)?;
        if records.is_empty() {
            break;
        }
        for record in records {
            let line = match Entry::decode(&record.payload) {
                Ok(entry) => entry.to_json_line(record.offset),
                Err(e) => serde_json::json!({ "offset": record.offset, "error": e.to_string() })
                    .to_string(),
            };
            match writeln!(out, "{line}") {
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(count),
                other => other?,
            }
            count += 1;
        }
    }
    match out.flush() {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
        other => other?,
    }
    Ok(count)
}

/// `sluice query`: runs SQL over the lake and prints the result.
pub async fn query(
    config: &Config,
    sql: &str,
    format: Format,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let store = LakeStore::from_url(&config.storage.url)?;
    let limits = QueryLimits {
        memory: config.query.memory_limit as usize,
        timeout: config.query.timeout,
    };
    let (schemas, registry, _) = crate::schema::watch::Loader::new(&config.schemas.dir).load();
    let live = std::sync::Arc::new(crate::schema::Live::new(schemas, registry));
    let typed = std::sync::Arc::new(crate::lake::typed::TypedSource::new(live));
    let result = QueryEngine::new(store, typed, limits).sql(sql).await?;
    query::write(&result, format, out)?;
    Ok(())
}
