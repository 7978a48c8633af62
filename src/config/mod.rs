//! `sluice.toml`: the deployment's one config file.
//!
//! Loading is parse → read → validate, all without side effects, and reports every problem at
//! once as `file:line:col: message`. Defaults are embedded here, so a config file only says what
//! differs. Relative paths resolve from the config file's folder. The config is passed down to each
//! stage; nothing reads it from a global.

pub(crate) mod reader;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::diagnostic::{Diagnostic, Diagnostics};
pub use reader::{interpolate, parse_size};
use reader::{Reader, Section};

/// The whole configuration, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from.
    pub path: PathBuf,
    pub server: ServerConfig,
    pub sources: Vec<SourceConfig>,
    pub storage: StorageConfig,
    pub log: LogConfig,
    pub dedup: DedupConfig,
    pub schemas: SchemasConfig,
    pub segments: FolderConfig,
    pub profiles: ProfilesConfig,
    pub destinations: DestinationsConfig,
    pub query: QueryConfig,
}

const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Bearer token for `/admin/*`; `None` turns the admin API off.
    pub admin_token: Option<String>,
    /// HTTP worker threads; defaults to the cores this process may run on.
    pub workers: Option<usize>,
    /// How long shutdown may take before it gives up on what is left.
    pub shutdown_timeout: Duration,
    /// The address clients reach this server at (behind a proxy, the proxy's): what
    /// analytics.js is pointed at. Unset, the request's own `Host` is used; forwarded host
    /// headers never are.
    pub public_url: Option<url::Url>,
    /// How long a request's body may take to arrive, whole: a client that trickles it is answered
    /// 408 rather than holding a connection.
    pub body_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub name: String,
    pub write_key: String,
    /// Messages per second, with a burst of one second's worth; `None` is unlimited.
    pub rate_limit: Option<NonZeroU32>,
    /// Overrides of `schemas.unplanned` and `schemas.violations` for this source.
    pub unplanned: Option<Unplanned>,
    pub violations: Option<Violations>,
}

#[derive(Debug, Clone)]
pub struct StorageConfig {
    /// `file://`, `s3://`, `gs://`, `az://` or `memory://`; a relative `file://` path is resolved.
    pub url: String,
    pub flush_interval: Duration,
    /// How often closed partitions are compacted.
    pub compaction_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub dir: PathBuf,
    /// A segment file is sealed and a new one started past this size.
    pub segment_size: u64,
    /// Appends are refused (503 at the edge) while the log holds more than this.
    pub max_size: u64,
}

#[derive(Debug, Clone)]
pub struct DedupConfig {
    /// A messageId seen again within this time of its first acceptance is a duplicate.
    pub window: Duration,
    /// At most this many ids are remembered; past it the oldest are forgotten early.
    pub max_ids: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unplanned {
    Allow,
    Block,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violations {
    Flag,
    Block,
}

#[derive(Debug, Clone)]
pub struct SchemasConfig {
    pub dir: PathBuf,
    pub unplanned: Unplanned,
    pub violations: Violations,
}

#[derive(Debug, Clone)]
pub struct QueryConfig {
    /// Memory one query may use before it fails.
    pub memory_limit: u64,
    /// Time one query may run before it is stopped.
    pub timeout: Duration,
    /// Rows one `POST /admin/query` answers at most.
    pub max_rows: usize,
    /// Bytes of JSON one `POST /admin/query` answers at most.
    pub max_result_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct ProfilesConfig {
    /// Where the profile store lives.
    pub dir: PathBuf,
    /// Profiles kept decoded in memory, at most; the rest are kept cold (encoded) within
    /// `cache_memory`, or read from the store when needed.
    pub cache_size: usize,
    /// What profiles in memory may take, at most: the decoded ones (estimated from their
    /// contents) and, in what they leave, more in their stored encoding.
    pub cache_memory: u64,
    /// The store's block cache.
    pub store_cache: u64,
    /// How often the profile stage saves (commits durably) what it has done.
    pub save_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct DestinationsConfig {
    /// The destination files.
    pub dir: PathBuf,
    /// Each destination's queue and dead letter.
    pub state: PathBuf,
}

#[derive(Debug, Clone)]
pub struct FolderConfig {
    pub dir: PathBuf,
}

impl Config {
    /// Reads and validates the file at `path`, taking `${VAR}` values from the process environment.
    pub fn load(path: &Path) -> Result<Config, Diagnostics> {
        Self::load_with_env(path, &|name| std::env::var(name).ok())
    }

    pub fn load_with_env(
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, Diagnostics> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Diagnostics(vec![Diagnostic::file(
                path,
                format!("cannot read config: {e}"),
            )])
        })?;
        Self::parse(path, &text, env)
    }

    /// Parses config text as if it were the file at `path` (which sets where relative paths start).
    pub fn parse(
        path: &Path,
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, Diagnostics> {
        let doc = toml_edit::Document::parse(text).map_err(|e| {
            let offset = e.span().map_or(0, |s| s.start);
            let message = e.message().trim().to_string();
            Diagnostics(vec![Diagnostic::at(path, text, offset, message)])
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let base = if base.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            base
        };
        let mut r = Reader::new(path, text, env);
        let mut root = Section::new(doc.as_table(), String::new(), None);
        let config = read_config(&mut r, &mut root, path, &base);
        r.finish(root);
        if r.diagnostics.is_empty() {
            Ok(config)
        } else {
            r.diagnostics.sort_by_key(|d| (d.line, d.col));
            Err(Diagnostics(r.diagnostics))
        }
    }

    /// The source with this write key.
    pub fn source_by_write_key(&self, key: &str) -> Option<&SourceConfig> {
        self.sources.iter().find(|s| s.write_key == key)
    }
}

fn read_config(r: &mut Reader, root: &mut Section, path: &Path, base: &Path) -> Config {
    let server = match r.section(root, "server") {
        Some(mut s) => {
            let listen = r
                .string(&mut s, "listen")
                .and_then(|l| match l.value.parse() {
                    Ok(addr) => Some(addr),
                    Err(_) => {
                        r.error(
                            l.span,
                            format!(
                                "`server.listen`: `{}` is not an address such as 127.0.0.1:8088",
                                l.value
                            ),
                        );
                        None
                    }
                });
            let admin_token = r.string(&mut s, "admin_token").map(|t| t.value);
            let workers = r.integer(&mut s, "workers").and_then(|w| {
                if w.value == 0 || w.value > 1024 {
                    r.error(w.span, "`server.workers` must be between 1 and 1024");
                    None
                } else {
                    Some(w.value as usize)
                }
            });
            let shutdown_timeout = r.duration(&mut s, "shutdown_timeout");
            let body_timeout = r.duration(&mut s, "body_timeout");
            let public_url = r.string(&mut s, "public_url").and_then(|u| {
                match url::Url::parse(&u.value) {
                    Ok(url)
                        if matches!(url.scheme(), "http" | "https")
                            && url.host().is_some()
                            && url.query().is_none()
                            && url.fragment().is_none() =>
                    {
                        Some(url)
                    }
                    _ => {
                        r.error(
                            u.span,
                            format!(
                                "`server.public_url`: `{}` is not an http:// or https:// address such as https://events.example.com",
                                u.value
                            ),
                        );
                        None
                    }
                }
            });
            r.finish(s);
            ServerConfig {
                listen: listen.unwrap_or_else(default_listen),
                admin_token: admin_token.filter(|t| !t.is_empty()),
                workers,
                shutdown_timeout: shutdown_timeout.unwrap_or(Duration::from_secs(30)),
                public_url,
                body_timeout: body_timeout.unwrap_or(DEFAULT_BODY_TIMEOUT),
            }
        }
        None => ServerConfig {
            listen: default_listen(),
            admin_token: None,
            workers: None,
            shutdown_timeout: Duration::from_secs(30),
            public_url: None,
            body_timeout: DEFAULT_BODY_TIMEOUT,
        },
    };

    let mut sources = Vec::new();
    let mut names = HashSet::new();
    let mut keys = HashSet::new();
    for mut s in r.sections(root, "sources") {
        let span = s.span();
        let name = r.string(&mut s, "name");
        let write_key = r.string(&mut s, "write_key");
        let unplanned = r.choice(&mut s, "unplanned", UNPLANNED);
        let violations = r.choice(&mut s, "violations", VIOLATIONS);
        let rate_limit = r.integer(&mut s, "rate_limit").and_then(|n| {
            match u32::try_from(n.value).ok().and_then(NonZeroU32::new) {
                Some(v) => Some(v),
                None => {
                    r.error(
                        n.span,
                        "`sources.rate_limit` must be between 1 and 4294967295 messages per second",
                    );
                    None
                }
            }
        });
        r.finish(s);
        let name = match name {
            Some(n) if n.value.is_empty() => {
                r.error(n.span, "`sources.name` must not be empty");
                None
            }
            Some(n) if n.value == crate::vocabulary::SOURCE => {
                r.error(
                    n.span,
                    "`sluice` is reserved: it is the source of the messages Sluice emits itself",
                );
                None
            }
            Some(n) if !names.insert(n.value.clone()) => {
                r.error(n.span, format!("two sources are named `{}`", n.value));
                None
            }
            Some(n) => Some(n.value),
            None => {
                r.error(span.clone(), "a source needs a `name`");
                None
            }
        };
        let write_key = match write_key {
            Some(k) if k.value.is_empty() => {
                r.error(
                    k.span,
                    "`sources.write_key` is empty (is its environment variable set?)",
                );
                None
            }
            Some(k) if !keys.insert(k.value.clone()) => {
                r.error(k.span, "two sources share this write key");
                None
            }
            Some(k) => Some(k.value),
            None => {
                r.error(span, "a source needs a `write_key`");
                None
            }
        };
        if let (Some(name), Some(write_key)) = (name, write_key) {
            sources.push(SourceConfig {
                name,
                write_key,
                rate_limit,
                unplanned,
                violations,
            });
        }
    }

    let storage = {
        let mut url = None;
        let mut flush_interval = None;
        let mut compaction_interval = None;
        if let Some(mut s) = r.section(root, "storage") {
            url = r
                .string(&mut s, "url")
                .and_then(|u| match resolve_storage_url(&u.value, base) {
                    Ok(url) => Some(url),
                    Err(e) => {
                        r.error(u.span, format!("`storage.url`: {e}"));
                        None
                    }
                });
            flush_interval = r.duration(&mut s, "flush_interval");
            compaction_interval = r.duration(&mut s, "compaction_interval");
            r.finish(s);
        }
        StorageConfig {
            url: url.unwrap_or_else(|| {
                resolve_storage_url("file://./data/lake", base).expect("default url is valid")
            }),
            flush_interval: flush_interval.unwrap_or(Duration::from_secs(10)),
            compaction_interval: compaction_interval.unwrap_or(Duration::from_secs(600)),
        }
    };

    let log = {
        let (mut dir, mut segment_size, mut max_size) = (None, None, None);
        if let Some(mut s) = r.section(root, "log") {
            dir = r.string(&mut s, "dir").map(|d| resolve(base, &d.value));
            segment_size = r.size(&mut s, "segment_size");
            max_size = r.size(&mut s, "max_size");
            let (size, max) = (
                segment_size.unwrap_or(DEFAULT_SEGMENT_SIZE),
                max_size.unwrap_or(DEFAULT_LOG_MAX_SIZE),
            );
            if size < 4096 {
                r.error(s.span(), "`log.segment_size` must be at least 4096 bytes");
            } else if max < size {
                r.error(
                    s.span(),
                    "`log.max_size` must be at least `log.segment_size`",
                );
            }
            r.finish(s);
        }
        LogConfig {
            dir: dir.unwrap_or_else(|| resolve(base, "data/log")),
            segment_size: segment_size.unwrap_or(DEFAULT_SEGMENT_SIZE),
            max_size: max_size.unwrap_or(DEFAULT_LOG_MAX_SIZE),
        }
    };

    let dedup = {
        let (mut window, mut max_ids) = (None, None);
        if let Some(mut s) = r.section(root, "dedup") {
            window = r.duration(&mut s, "window");
            max_ids = r.integer(&mut s, "max_ids").map(|n| n.value as usize);
            r.finish(s);
        }
        DedupConfig {
            window: window.unwrap_or(Duration::from_secs(24 * 3600)),
            max_ids: max_ids.unwrap_or(250_000_000),
        }
    };

    let schemas = {
        let (mut dir, mut unplanned, mut violations) = (None, None, None);
        if let Some(mut s) = r.section(root, "schemas") {
            dir = r.string(&mut s, "dir").map(|d| resolve(base, &d.value));
            unplanned = r.choice(&mut s, "unplanned", UNPLANNED);
            violations = r.choice(&mut s, "violations", VIOLATIONS);
            r.finish(s);
        }
        SchemasConfig {
            dir: dir.unwrap_or_else(|| resolve(base, "schemas")),
            unplanned: unplanned.unwrap_or(Unplanned::Allow),
            violations: violations.unwrap_or(Violations::Flag),
        }
    };

    let segments = read_folder(r, root, "segments", base);
    let destinations = {
        let (mut dir, mut state) = (None, None);
        if let Some(mut s) = r.section(root, "destinations") {
            dir = r.string(&mut s, "dir").map(|d| resolve(base, &d.value));
            state = r.string(&mut s, "state").map(|d| resolve(base, &d.value));
            r.finish(s);
        }
        DestinationsConfig {
            dir: dir.unwrap_or_else(|| resolve(base, "destinations")),
            state: state.unwrap_or_else(|| resolve(base, "data/destinations")),
        }
    };

    let profiles = {
        let (mut dir, mut cache_size, mut cache_memory, mut store_cache, mut save_interval) =
            (None, None, None, None, None);
        if let Some(mut s) = r.section(root, "profiles") {
            dir = r.string(&mut s, "dir").map(|d| resolve(base, &d.value));
            cache_size = r.integer(&mut s, "cache_size").map(|n| n.value as usize);
            cache_memory = r.size(&mut s, "cache_memory");
            store_cache = r.size(&mut s, "store_cache");
            save_interval = r.duration(&mut s, "save_interval");
            r.finish(s);
        }
        ProfilesConfig {
            dir: dir.unwrap_or_else(|| resolve(base, "data/profiles")),
            cache_size: cache_size.unwrap_or(100_000),
            cache_memory: cache_memory.unwrap_or(768 << 20),
            store_cache: store_cache.unwrap_or(64 << 20),
            save_interval: save_interval.unwrap_or(Duration::from_secs(5)),
        }
    };

    let query = {
        let (mut memory_limit, mut timeout) = (None, None);
        let (mut max_rows, mut max_result_bytes) = (None, None);
        if let Some(mut s) = r.section(root, "query") {
            memory_limit = r.size(&mut s, "memory_limit");
            timeout = r.duration(&mut s, "timeout");
            max_rows = r.integer(&mut s, "max_rows").map(|n| n.value as usize);
            max_result_bytes = r.size(&mut s, "max_result_bytes");
            r.finish(s);
        }
        QueryConfig {
            memory_limit: memory_limit.unwrap_or(1 << 30),
            timeout: timeout.unwrap_or(Duration::from_secs(60)),
            max_rows: max_rows.unwrap_or(100_000),
            max_result_bytes: max_result_bytes.unwrap_or(64 << 20),
        }
    };

    Config {
        path: path.to_path_buf(),
        server,
        sources,
        storage,
        log,
        dedup,
        schemas,
        segments,
        profiles,
        destinations,
        query,
    }
}

fn read_folder(r: &mut Reader, root: &mut Section, key: &'static str, base: &Path) -> FolderConfig {
    let mut dir = None;
    if let Some(mut s) = r.section(root, key) {
        dir = r.string(&mut s, "dir").map(|d| resolve(base, &d.value));
        r.finish(s);
    }
    FolderConfig {
        dir: dir.unwrap_or_else(|| resolve(base, key)),
    }
}

/// `path` taken from the config's folder, without `./` noise.
fn resolve(base: &Path, path: &str) -> PathBuf {
    let joined = base.join(path);
    let mut out = PathBuf::new();
    for part in joined.components() {
        if part != std::path::Component::CurDir || out.as_os_str().is_empty() {
            out.push(part);
        }
    }
    out
}

const UNPLANNED: &[(&str, Unplanned)] = &[("allow", Unplanned::Allow), ("block", Unplanned::Block)];
const VIOLATIONS: &[(&str, Violations)] =
    &[("flag", Violations::Flag), ("block", Violations::Block)];

const DEFAULT_SEGMENT_SIZE: u64 = 64 << 20;
const DEFAULT_LOG_MAX_SIZE: u64 = 10 << 30;

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8088))
}

/// Checks the scheme and makes a relative `file://` path absolute against the config's folder.
fn resolve_storage_url(url: &str, base: &Path) -> Result<String, String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(format!(
            "`{url}` is not a URL (file://, s3://, gs://, az:// or memory://)"
        ));
    };
    match scheme {
        "file" => {
            let path = Path::new(rest);
            let path = if path.is_absolute() {
                path.to_path_buf()
            } else {
                let base = std::path::absolute(base).map_err(|e| e.to_string())?;
                base.join(path.strip_prefix("./").unwrap_or(path))
            };
            Ok(format!("file://{}", path.display()))
        }
        "s3" | "gs" | "az" | "memory" => Ok(url.to_string()),
        other => Err(format!(
            "unknown scheme `{other}://` (file://, s3://, gs://, az:// or memory://)"
        )),
    }
}

#[cfg(test)]
mod tests;
