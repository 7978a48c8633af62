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
    let mut notes = Vec::new();
    let segments = check_segments(&config, &mut problems, &mut notes);
    let (destinations, mut found) =
        crate::destinations::load(&config, &|name| std::env::var(name).ok());
    problems.append(&mut found);
    for p in problems.iter().chain(&notes) {
        writeln!(out, "{p}")?;
    }
    if !problems.is_empty() {
        return Ok(false);
    }
    writeln!(
        out,
        "{}: ok ({} source{}, {} track event{} with a schema, {segments} segment{}, {} destination{}, log in {})",
        config_path.display(),
        config.sources.len(),
        if config.sources.len() == 1 { "" } else { "s" },
        schemas.tracks().count(),
        if schemas.tracks().count() == 1 {
            ""
        } else {
            "s"
        },
        if segments == 1 { "" } else { "s" },
        destinations.len(),
        if destinations.len() == 1 { "" } else { "s" },
        config.log.dir.display()
    )?;
    Ok(true)
}

/// Reads and compiles every segment file, checks the destinations they name exist, and runs their
/// test cases. Returns how many segments loaded; `notes` gets what is worth knowing about the
/// rules that load (it fails nothing).
fn check_segments(
    config: &Config,
    problems: &mut Vec<crate::diagnostic::Diagnostic>,
    notes: &mut Vec<crate::diagnostic::Diagnostic>,
) -> usize {
    use crate::segments::{cases, files, SegmentSet};
    let mut loaded = Vec::new();
    for path in crate::folder_watch::toml_files(&config.segments.dir) {
        match files::read(&path) {
            Ok(file) => loaded.push(file),
            Err(mut found) => problems.append(&mut found),
        }
    }
    let destinations = crate::folder_watch::toml_names(&config.destinations.dir);
    let (set, mut found) = SegmentSet::build(loaded, Some(&destinations));
    problems.append(&mut found);
    problems.extend(cases::run_all(&set));
    notes.extend(set.notes());
    set.len()
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

/// `sluice replay quarantine`: asks the running server (the log has one writer) to re-admit the
/// quarantined messages that its tracking plan now lets through, and prints its report.
pub fn replay_quarantine(
    config: &Config,
    request: &crate::replay::ReplayRequest,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let body = serde_json::json!({ "event": request.event, "since": request.since }).to_string();
    admin_post(config, "/admin/replay/quarantine", &body, out)
}

/// `sluice replay <destination>`: asks the running server to deliver the destination's dead
/// letters again.
pub fn replay_destination(config: &Config, name: &str, out: &mut dyn Write) -> anyhow::Result<()> {
    if !crate::destinations::files::valid_name(name) {
        anyhow::bail!("`{name}` is not a destination name");
    }
    admin_post(
        config,
        &format!("/admin/destinations/{name}/replay"),
        "{}",
        out,
    )
}

/// POSTs to the running server's admin API and prints its answer.
fn admin_post(config: &Config, path: &str, body: &str, out: &mut dyn Write) -> anyhow::Result<()> {
    let token = config.server.admin_token.as_deref().ok_or_else(|| {
        anyhow::anyhow!("replay goes through the admin API: set server.admin_token")
    })?;
    let mut addr = config.server.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let (status, answer) = post_json(addr, path, token, body)
        .map_err(|e| anyhow::anyhow!("cannot reach sluice at {addr} (is it serving?): {e}"))?;
    if status != 200 {
        anyhow::bail!("the server answered {status}: {answer}");
    }
    writeln!(out, "{answer}")?;
    Ok(())
}

/// One POST over a fresh connection; the status and the body.
fn post_json(
    addr: std::net::SocketAddr,
    path: &str,
    token: &str,
    body: &str,
) -> io::Result<(u16, String)> {
    use std::io::Read;
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(600)))?;
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw)?;
    let (head, rest) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, rest.to_string()))
}

/// `sluice receive`: a webhook receiver on `listen` that answers every POST with 200 and prints
/// each message it carries (a `{"batch":[...]}` body's messages each on a line of their own) to
/// stdout, until `shutdown`. For seeing what a destination sends; the demo's `destinations/demo.toml`
/// posts to its default address.
pub async fn receive(
    listen: std::net::SocketAddr,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    use actix_web::{web, App, HttpResponse, HttpServer};
    let server = HttpServer::new(|| {
        App::new()
            .app_data(web::PayloadConfig::new(16 << 20))
            .default_service(web::to(|body: web::Bytes| async move {
                print_received(&body);
                HttpResponse::Ok().json(serde_json::json!({ "success": true }))
            }))
    })
    .workers(1)
    .disable_signals()
    .bind(listen)?;
    for address in server.addrs() {
        eprintln!("receiving on http://{address}/ (Ctrl-C to stop)");
    }
    let server = server.run();
    let handle = server.handle();
    let task = tokio::spawn(server);
    shutdown.await;
    handle.stop(true).await;
    task.await??;
    Ok(())
}

/// One line per message received.
fn print_received(body: &[u8]) {
    let mut out = io::stdout().lock();
    let value: serde_json::Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(_) => {
            let _ = writeln!(out, "{}", String::from_utf8_lossy(body));
            return;
        }
    };
    match value.get("batch").and_then(|b| b.as_array()) {
        Some(messages) => {
            for m in messages {
                let _ = writeln!(out, "{m}");
            }
        }
        None => {
            let _ = writeln!(out, "{value}");
        }
    }
    let _ = out.flush();
}
