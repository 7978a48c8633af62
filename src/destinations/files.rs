//! Destination files: `destinations/<name>.toml`, one live destination each.
//!
//! ```toml
//! type = "webhook"                          # picks the type; the type's own keys follow
//! url = "https://crm.example.com/hooks/sluice"
//! secret = "${CRM_SECRET}"
//! events = ["Order Completed", "identify"]  # default: every message; [] none
//! segments = ["stalled_signups"]            # entries and exits of these segments
//! filter = 'msg.properties.revenue > 100'   # optional Rhai predicate over `msg`
//! transform = '''msg.event = "Purchase"; msg'''   # optional Rhai: the payload, or () to drop
//! [delivery]
//! batch_size = 1
//! rate_limit = 50                           # requests per second
//! max_retry_age = "4h"
//! concurrency = 4                           # requests in flight
//! timeout = "10s"                           # one request
//! retry_backoff = "1s"                      # first retry delay, doubling up to 5 min
//! buffer = 10000                            # messages in memory before their first try
//! ```
//!
//! The keys every type shares are read here with their places; the rest of the file goes to the
//! type's own settings through serde ([`super::Kind`], `deny_unknown_fields`). Reading is pure;
//! Rhai is compiled in [`super::route`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::reader::{Env, Reader, Section};
use crate::diagnostic::Diagnostic;
use crate::script::code_start;

use super::Kind;

#[derive(Debug, Clone)]
pub struct DestinationFile {
    /// The file name without `.toml`: the destination's name everywhere (metrics, admin, cursor).
    pub name: String,
    pub path: PathBuf,
    pub text: String,
    pub kind: Kind,
    /// Track event names and message types; `None` means every message.
    pub events: Option<Vec<String>>,
    pub segments: Vec<String>,
    /// Rhai code and the byte offset where it starts in `text`.
    pub filter: Option<(String, usize)>,
    pub transform: Option<(String, usize)>,
    pub delivery: Delivery,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// Messages per request; 1 sends the message alone.
    pub batch_size: usize,
    /// Requests per second; `None` is unlimited.
    pub rate_limit: Option<u32>,
    /// How long a message is retried before it goes to the dead letter.
    pub max_retry_age: Duration,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// One request's deadline.
    pub timeout: Duration,
    /// The first retry's delay; each next one doubles, up to 5 minutes.
    pub retry_backoff: Duration,
    /// Messages held in memory before their first try. When it is full while the intake log
    /// fills up, what it holds moves to the destination's durable queue (see `pump`).
    pub buffer: usize,
}

impl Default for Delivery {
    fn default() -> Self {
        Delivery {
            batch_size: 1,
            rate_limit: None,
            max_retry_age: Duration::from_secs(4 * 3600),
            concurrency: 4,
            timeout: Duration::from_secs(10),
            retry_backoff: Duration::from_secs(1),
            buffer: 10_000,
        }
    }
}

/// The longest wait between two tries of a message.
pub const BACKOFF_CAP: Duration = Duration::from_secs(300);

/// The most messages one request may carry: the Segment API's batch limit.
pub const MAX_BATCH: usize = 2_500;

/// Whether `name` can name a destination: it is a label value, a cursor file and a URL segment.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Reads every `*.toml` of `dir`: the files that are good, and every problem of the others.
pub fn read_all(dir: &Path, env: Env<'_>) -> (Vec<DestinationFile>, Vec<Diagnostic>) {
    let (mut files, mut problems) = (Vec::new(), Vec::new());
    for path in crate::folder_watch::toml_files(dir) {
        match read(&path, env) {
            Ok(file) => files.push(file),
            Err(mut found) => problems.append(&mut found),
        }
    }
    (files, problems)
}

pub fn read(path: &Path, env: Env<'_>) -> Result<DestinationFile, Vec<Diagnostic>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![Diagnostic::file(
            path,
            format!("cannot read destination file: {e}"),
        )]
    })?;
    parse(path, &text, env)
}

pub fn parse(path: &Path, text: &str, env: Env<'_>) -> Result<DestinationFile, Vec<Diagnostic>> {
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !valid_name(&name) {
        return Err(vec![Diagnostic::file(
            path,
            format!(
                "`{name}` is not a destination name: name the file with letters, digits, `_` or `-`"
            ),
        )]);
    }
    let doc = toml_edit::Document::parse(text).map_err(|e| {
        let offset = e.span().map_or(0, |s| s.start);
        vec![Diagnostic::at(path, text, offset, e.message().trim())]
    })?;
    let mut r = Reader::new(path, text, env);
    let mut root = Section::new(doc.as_table(), String::new(), None);
    let events = r
        .strings(&mut root, "events")
        .map(|v| v.into_iter().map(|s| s.value).collect());
    let segments = r
        .strings(&mut root, "segments")
        .unwrap_or_default()
        .into_iter()
        .map(|s| s.value)
        .collect();
    let code = |r: &mut Reader, root: &mut Section, key| {
        r.raw_string(root, key).map(|s| {
            let offset = s.span.map_or(0, |span| code_start(text, span.start));
            (s.value, offset)
        })
    };
    let filter = code(&mut r, &mut root, "filter");
    let transform = code(&mut r, &mut root, "transform");
    let delivery = read_delivery(&mut r, &mut root);
    let kind = if doc.get("type").is_none() {
        r.error(None, "a destination needs a `type` (webhook | segment)");
        None
    } else {
        r.typed::<Kind>(root)
    };
    match kind {
        Some(kind) if r.diagnostics.is_empty() => Ok(DestinationFile {
            name,
            path: path.to_path_buf(),
            text: text.to_string(),
            kind,
            events,
            segments,
            filter,
            transform,
            delivery,
        }),
        _ => Err(r.diagnostics),
    }
}

fn read_delivery(r: &mut Reader, root: &mut Section) -> Delivery {
    let mut delivery = Delivery::default();
    let Some(mut s) = r.section(root, "delivery") else {
        return delivery;
    };
    if let Some(n) = r.integer(&mut s, "batch_size") {
        if (1..=MAX_BATCH as u64).contains(&n.value) {
            delivery.batch_size = n.value as usize;
        } else {
            r.error(
                n.span,
                format!("`delivery.batch_size` must be between 1 and {MAX_BATCH}"),
            );
        }
    }
    if let Some(n) = r.integer(&mut s, "rate_limit") {
        match u32::try_from(n.value) {
            Ok(v) if v > 0 => delivery.rate_limit = Some(v),
            _ => r.error(
                n.span,
                "`delivery.rate_limit` must be a positive number of requests per second",
            ),
        }
    }
    if let Some(n) = r.integer(&mut s, "concurrency") {
        if (1..=256).contains(&n.value) {
            delivery.concurrency = n.value as usize;
        } else {
            r.error(n.span, "`delivery.concurrency` must be between 1 and 256");
        }
    }
    if let Some(d) = r.duration(&mut s, "max_retry_age") {
        delivery.max_retry_age = d;
    }
    if let Some(d) = r.duration(&mut s, "timeout") {
        delivery.timeout = d.max(Duration::from_millis(1));
    }
    if let Some(n) = r.integer(&mut s, "buffer") {
        if (1..=1_000_000).contains(&n.value) {
            delivery.buffer = n.value as usize;
        } else {
            r.error(n.span, "`delivery.buffer` must be between 1 and 1000000");
        }
    }
    if let Some(d) = r.duration(&mut s, "retry_backoff") {
        delivery.retry_backoff = d.clamp(Duration::from_millis(1), BACKOFF_CAP);
    }
    r.finish(s);
    delivery
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "CRM_SECRET").then(|| "s3cret".to_string())
    }

    fn parse_text(text: &str) -> Result<DestinationFile, Vec<String>> {
        parse(Path::new("destinations/crm.toml"), text, &env)
            .map_err(|d| d.iter().map(|d| d.to_string()).collect())
    }

    #[test]
    fn reads_a_webhook_with_every_key() {
        let f = parse_text(
            r#"type = "webhook"
url = "http://127.0.0.1:9/hook"
secret = "${CRM_SECRET}"
headers = { "X-Team" = "growth" }
events = ["Order Completed", "identify"]
segments = ["stalled_signups"]
filter = 'msg.properties.revenue > 100'
[delivery]
batch_size = 100
rate_limit = 50
max_retry_age = "1h"
"#,
        )
        .unwrap();
        assert_eq!(f.name, "crm");
        let Kind::Webhook(w) = &f.kind else {
            panic!("{:?}", f.kind)
        };
        assert_eq!(w.secret.as_deref(), Some("s3cret"));
        assert_eq!(w.headers["X-Team"], "growth");
        assert_eq!(f.events.as_deref().unwrap().len(), 2);
        assert_eq!(f.segments, ["stalled_signups"]);
        let (code, offset) = f.filter.unwrap();
        assert_eq!(&f.text[offset..offset + code.len()], code);
        assert_eq!(f.delivery.batch_size, 100);
        assert_eq!(f.delivery.rate_limit, Some(50));
        assert_eq!(f.delivery.max_retry_age, Duration::from_secs(3600));
    }

    /// A header that could never be sent would fail every delivery: refused when the file is read.
    #[test]
    fn headers_that_cannot_be_sent_are_refused() {
        for headers in [
            r#"headers = { "X Team" = "growth" }"#,
            r#"headers = { "X-Team" = "line\nbreak" }"#,
        ] {
            let text = format!("type = \"webhook\"\nurl = \"http://127.0.0.1:9/\"\n{headers}\n");
            let problems = parse_text(&text).unwrap_err();
            assert!(problems[0].contains("header"), "{problems:?}");
        }
    }

    #[test]
    fn every_problem_has_its_place() {
        let problems = parse_text(
            "type = \"webhook\"\nurl = \"http://x\"\nsecrt = \"a\"\n[delivery]\nbatch_size = 0\n",
        )
        .unwrap_err();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].starts_with("destinations/crm.toml:5:14: `delivery.batch_size`"),
            "{problems:?}"
        );
        assert!(
            problems[1].starts_with("destinations/crm.toml:3:1: unknown field `secrt`"),
            "{problems:?}"
        );

        let problems = parse_text("type = \"carrier-pigeon\"\n").unwrap_err();
        assert!(
            problems[0].contains("1:1: unknown variant `carrier-pigeon`"),
            "{problems:?}"
        );
        let problems = parse_text("url = \"http://x\"\n").unwrap_err();
        assert!(problems[0].contains("needs a `type`"), "{problems:?}");
        let problems = parse_text("type = \"segment\"\nurl = \"http://x\"\n").unwrap_err();
        assert!(
            problems[0].contains("missing field `write_key`"),
            "{problems:?}"
        );
    }
}
