//! Fuzz targets: one function per kind of input Sluice reads from outside, each taking raw bytes,
//! never panicking on any of them, and checking what must hold of what it makes. The coverage-
//! guided fuzzer (`fuzz/`, run by `tools/fuzz.sh`) calls these; `cargo test` runs each over its
//! seeds and a few thousand random mutations of them, as a smoke test.
//!
//! | target | input |
//! |---|---|
//! | [`body`] | an HTTP request body (raw or gzip) through ingestion into a real log |
//! | [`sdk_payloads`] | real SDK payloads mutated structurally (values, types, depth, sizes) |
//! | [`config`] | `sluice.toml` |
//! | [`schema`] | a schema file, compiled and used |
//! | [`segment`] | a segment file, its Rhai rule compiled and evaluated on a profile |
//! | [`destination`] | a destination file, its filter and transform run on a message |
//! | [`log_record`] | one intake-log record, and a log segment file |
//! | [`stored_profile`] | a profile as the store keeps it |
//! | [`queue_entry`] | a destination queue's parked message, dead letter and user state |
//! | [`rhai`] | a Rhai rule or transform under the sandbox |
//!
//! Compiled in every build (it is small) so that the tests and the fuzz crate share it; nothing
//! else calls it.

use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde_json::Value;

use crate::config::{Config, DedupConfig};
use crate::entry::{Entry, Status};
use crate::ingest::{Ingest, Parts, Shape};
use crate::intake_log::{Consumer, IntakeLog, LogOptions};
use crate::metrics::Metrics;
use crate::profiles::profile::{Observed, Profile};
use crate::segments::rules::{SegmentSet, Trigger};

/// A message rich enough for scripts to find something in.
const MESSAGE: &str = r#"{"type":"track","event":"Order Completed","userId":"u1","anonymousId":"a1","messageId":"m1","timestamp":"2026-01-01T00:00:00Z","receivedAt":"2026-01-01T00:00:00Z","properties":{"revenue":12.5,"currency":"EUR","items":[{"sku":"s","n":2}],"coupon":null},"context":{"library":{"name":"analytics.js","version":"1"},"page":{"url":"https://example.com/"}}}"#;

/// The HTTP body path: the first byte chooses the endpoint (a single track, or a batch) and
/// whether the rest is gzip; the rest is the body. What the log then holds must decode, and every
/// accepted message must be JSON within the edge's bounds.
pub fn body(data: &[u8]) {
    let Some((&choice, body)) = data.split_first() else {
        return;
    };
    let body = if choice & 2 != 0 {
        match crate::http::gunzip(body) {
            Ok(b) => b,
            Err(_) => return,
        }
    } else {
        body.to_vec()
    };
    let shape = match choice & 1 {
        0 => Shape::Batch,
        _ => Shape::Single(crate::vocabulary::MessageType::Track),
    };
    ingest(shape, &body);
}

/// Real SDK payloads (analytics-python, analytics-node, analytics.js), mutated by the input: each
/// pair of bytes picks a place in the payload and what to put there. Then the body path.
pub fn sdk_payloads(data: &[u8]) {
    let Some(value) = sdk_payload(data) else {
        return;
    };
    let body = value.to_string();
    let shape = if value.get("batch").is_some() {
        Shape::Batch
    } else {
        Shape::Single(crate::vocabulary::MessageType::Track)
    };
    ingest(shape, body.as_bytes());
}

/// The real SDK payload the first byte picks, with the mutations the other bytes say.
fn sdk_payload(data: &[u8]) -> Option<Value> {
    let (&seed, ops) = data.split_first()?;
    let seeds = sdk_seeds();
    let mut value: Value = serde_json::from_str(seeds[seed as usize % seeds.len()]).unwrap();
    for op in ops.chunks(2) {
        let (place, what) = (op[0], op.get(1).copied().unwrap_or(0));
        mutate(&mut value, place as usize, what);
    }
    Some(value)
}

/// `sluice.toml`, with every `${VAR}` unset.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = Config::parse(Path::new("/fuzz/sluice.toml"), text, &|_| None);
}

/// A schema file: parsed, compiled with the registry, and used on a message's properties.
pub fn schema(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(file) = crate::schema::files::parse_schema_file(Path::new("fuzz.json"), text.into())
    else {
        return;
    };
    let (kind, event) = (file.kind, file.event.clone());
    let (schemas, _) = crate::schema::files::Schemas::from_files([file]);
    let (registry, _) = crate::schema::registry::Registry::build(&schemas);
    let message: Value = serde_json::from_str(MESSAGE).unwrap();
    let _ = registry.check(kind, event.as_deref(), &message["properties"]);
}

/// A segment file: parsed, its rule compiled and evaluated on a profile as messages arrive and
/// time passes.
pub fn segment(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(file) = crate::segments::files::parse(Path::new("fuzzed.toml"), text) else {
        return;
    };
    let (set, _) = SegmentSet::build(vec![file], None);
    evaluate(&set);
}

/// A destination file: parsed, its routing, filter and transform run on a message.
pub fn destination(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(file) =
        crate::destinations::files::parse(Path::new("destinations/fuzz.toml"), text, &|_| None)
    else {
        return;
    };
    let Ok(route) = crate::destinations::route::Route::compile(&file) else {
        return;
    };
    shape(&route, MESSAGE.as_bytes());
}

/// One intake-log record (decoded, printed as `sluice log dump` does), and the same bytes as a
/// log segment file (read record by record, its torn tail cut).
pub fn log_record(data: &[u8]) {
    if let Ok(entry) = Entry::decode(data) {
        // JSON by its grammar: a stored body may hold a number no f64 can take (1e666), which
        // is still JSON, so the line is checked without converting its numbers.
        #[derive(serde::Deserialize)]
        struct Line {
            offset: u64,
        }
        let line: Line = serde_json::from_str(&entry.to_json_line(7)).expect("dump lines are JSON");
        assert_eq!(line.offset, 7);
    }
    let dir = scratch_dir();
    let path = dir.join(crate::intake_log::segment::file_name(0));
    std::fs::write(&path, data).unwrap();
    if let Ok(mut reader) = crate::intake_log::segment::RecordReader::open(&path, 0) {
        for _ in 0..10_000 {
            match reader.next(data.len() as u64) {
                Ok(crate::intake_log::segment::Next::Record(..)) => {}
                _ => break,
            }
        }
    }
    let segment = crate::intake_log::segment::SegmentFile {
        base: 0,
        path: path.clone(),
        size: data.len() as u64,
    };
    if let Ok(recovered) = crate::intake_log::segment::recover_tail(&segment) {
        assert!(recovered.valid_len <= data.len() as u64);
    }
}

/// A profile as the store keeps it: what decodes encodes back to the same bytes. (Bytes, not
/// profiles: a corrupt store can hold a NaN, which is not equal to itself.)
pub fn stored_profile(data: &[u8]) {
    use crate::profiles::codec;
    let words = stored_words();
    if let Ok(profile) = codec::decode(data, words) {
        let mut again = Vec::new();
        codec::encode(&profile, words, &mut again);
        let decoded = codec::decode(&again, words).expect("an encoded profile decodes");
        let mut third = Vec::new();
        codec::encode(&decoded, words, &mut third);
        assert_eq!(third, again, "encode(decode(x)) round trips");
    }
}

/// The names [`stored_profile`]'s inputs may refer to by number.
fn stored_words() -> &'static crate::profiles::dictionary::Dictionary {
    static WORDS: std::sync::OnceLock<crate::profiles::dictionary::Dictionary> =
        std::sync::OnceLock::new();
    WORDS.get_or_init(|| {
        crate::profiles::dictionary::Dictionary::with_saved(vec!["plan".into(), "vip".into()])
    })
}

/// A destination queue's entries: a parked message, a dead letter, a user's retry state.
pub fn queue_entry(data: &[u8]) {
    use crate::destinations::queue::{Dead, UserState};
    use crate::destinations::sender::Outgoing;
    if let Ok(m) = postcard::from_bytes::<Outgoing>(data) {
        let again = postcard::to_stdvec(&m).unwrap();
        assert_eq!(postcard::from_bytes::<Outgoing>(&again).unwrap(), m);
    }
    let _ = postcard::from_bytes::<Dead>(data);
    let _ = postcard::from_bytes::<UserState>(data);
}

/// A Rhai script under the sandbox: the first byte chooses a segment rule or a destination
/// transform; the rest is the script.
pub fn rhai(data: &[u8]) {
    let Some((&choice, script)) = data.split_first() else {
        return;
    };
    let Ok(script) = std::str::from_utf8(script) else {
        return;
    };
    if choice & 1 == 0 {
        let text = format!("rule = {}\n", toml_string(script));
        if let Ok(file) = crate::segments::files::parse(Path::new("rule.toml"), &text) {
            let (set, _) = SegmentSet::build(vec![file], None);
            evaluate(&set);
        }
    } else {
        let text = format!(
            "type = \"webhook\"\nurl = \"http://127.0.0.1:9/\"\ntransform = {}\n",
            toml_string(script)
        );
        if let Ok(file) =
            crate::destinations::files::parse(Path::new("destinations/t.toml"), &text, &|_| None)
        {
            if let Ok(route) = crate::destinations::route::Route::compile(&file) {
                shape(&route, MESSAGE.as_bytes());
            }
        }
    }
}

/// `text` as a TOML basic string.
fn toml_string(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn shape(route: &crate::destinations::route::Route, body: &[u8]) {
    if let crate::destinations::route::Shaped::Send(out) = route.shape(body) {
        let v: Value = serde_json::from_slice(&out).expect("a shaped message is JSON");
        assert!(v.is_object());
    }
}

/// Evaluates `set` on a profile that takes a few messages, and at times after them.
fn evaluate(set: &SegmentSet) {
    let mut profile = Profile::new(1);
    let t0 = 1_767_225_600_000;
    let message: Value = serde_json::from_str(MESSAGE).unwrap();
    let properties = serde_json::value::to_raw_value(&message["properties"]).unwrap();
    let traits =
        serde_json::value::RawValue::from_string(r#"{"plan":"pro","seats":3}"#.into()).unwrap();
    for (i, (kind, event)) in [
        (
            crate::vocabulary::MessageType::Track,
            Some("Order Completed"),
        ),
        (crate::vocabulary::MessageType::Identify, None),
        (crate::vocabulary::MessageType::Track, Some("Signed Up")),
    ]
    .into_iter()
    .enumerate()
    {
        let at = t0 + i as i64 * 60_000;
        let observed = Observed {
            kind,
            event,
            at,
            properties: (kind != crate::vocabulary::MessageType::Identify).then_some(&*properties),
            traits: (kind == crate::vocabulary::MessageType::Identify).then_some(&*traits),
        };
        profile.apply(&observed, &set.retention, at);
        let _ = set.evaluate(&mut profile, Trigger::All(None), at);
    }
    for later in [3_600_000, 86_400_000 * 40] {
        let _ = set.evaluate(&mut profile, Trigger::All(None), t0 + later);
    }
}

/// What the body targets share: an ingest stage over a real log in a scratch folder (on tmpfs
/// when there is one: the log fsyncs every append).
struct Edge {
    runtime: tokio::runtime::Runtime,
    ingest: Ingest,
    log: Arc<IntakeLog>,
    consumer: Mutex<Consumer>,
}

fn edge() -> &'static Edge {
    static EDGE: OnceLock<Edge> = OnceLock::new();
    EDGE.get_or_init(|| {
        let dir = scratch_dir().join("log");
        let _ = std::fs::remove_dir_all(&dir);
        let text = "[[sources]]\nname = \"web\"\nwrite_key = \"wk\"\n";
        let config = Config::parse(Path::new("/fuzz/sluice.toml"), text, &|_| None).unwrap();
        let log = Arc::new(
            IntakeLog::open(
                LogOptions {
                    dir,
                    segment_size: 8 << 20,
                    max_size: 1 << 30,
                },
                Default::default(),
            )
            .unwrap(),
        );
        let consumer = log.consumer("fuzz").unwrap();
        let metrics = Metrics::default();
        let dedup = crate::intake_log::dedup::Dedup::new(
            &DedupConfig {
                window: Duration::from_secs(3600),
                max_ids: 100_000,
            },
            scratch_dir().join("dedup"),
            Default::default(),
        );
        let ingest = Ingest::new(
            &config,
            Parts {
                log: Arc::new(crate::intake_log::Appender::new(
                    log.clone(),
                    Arc::new(dedup),
                )),
                plan: Arc::new(crate::schema::Live::empty()),
                metrics: metrics.ingest,
                schema_metrics: metrics.schema,
                clock: crate::clock::system(),
            },
        );
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        Edge {
            runtime,
            ingest,
            log,
            consumer: Mutex::new(consumer),
        }
    })
}

/// Runs one request through the edge, then checks every record it added to the log.
fn ingest(shape: Shape, body: &[u8]) {
    let edge = edge();
    let start = edge.log.end();
    let _ = edge
        .runtime
        .block_on(edge.ingest.handle(shape, body, Some("wk")));
    for record in edge.log.reader(start).read(usize::MAX).unwrap() {
        let entry = Entry::decode(&record.payload).expect("the edge writes records that decode");
        if entry.status == Status::Accepted {
            let message: Value =
                serde_json::from_slice(entry.body).expect("an accepted message is JSON");
            assert!(message.is_object());
            crate::ingest::bounds::check(entry.body, 0).expect("within the edge's bounds");
        }
    }
    // Let the log trim what the checks have read.
    let mut consumer = edge.consumer.lock().unwrap();
    let end = edge.log.end();
    if end > consumer.committed() + 10_000 {
        consumer.commit(end).unwrap();
    }
}

/// A folder for this process's scratch files: on tmpfs when there is one.
fn scratch_dir() -> &'static Path {
    static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() {
            std::path::PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("sluice-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    })
}

/// Every target by name, with the random cases `cargo test` runs it for.
#[allow(clippy::type_complexity)]
pub const TARGETS: &[(&str, fn(&[u8]), usize)] = &[
    ("body", body, 2_000),
    ("sdk_payloads", sdk_payloads, 2_000),
    ("config", config, 2_000),
    ("schema", schema, 2_000),
    ("segment", segment, 1_000),
    ("destination", destination, 1_000),
    ("log_record", log_record, 2_000),
    ("stored_profile", stored_profile, 2_000),
    ("queue_entry", queue_entry, 2_000),
    ("rhai", rhai, 1_000),
];

/// Where a target's fuzzing starts from: the repository's shipped examples and real payloads.
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let payloads: Vec<Vec<u8>> = sdk_seeds().iter().map(|s| s.as_bytes().to_vec()).collect();
    let prefixed = |prefix: u8, seeds: &[Vec<u8>]| -> Vec<Vec<u8>> {
        seeds
            .iter()
            .map(|s| std::iter::once(prefix).chain(s.iter().copied()).collect())
            .collect()
    };
    let mut record = Vec::new();
    Entry::encode(
        &mut record,
        Status::Accepted,
        chrono::DateTime::from_timestamp(1_767_225_600, 0).unwrap(),
        "web",
        "m1",
        "",
        |b| b.extend_from_slice(MESSAGE.as_bytes()),
    );
    match target {
        "body" => {
            let mut out = prefixed(0, &payloads);
            out.extend(prefixed(1, &payloads));
            let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            std::io::Write::write_all(&mut gzip, &payloads[0]).unwrap();
            out.extend(prefixed(2, &[gzip.finish().unwrap()]));
            out
        }
        "sdk_payloads" => vec![vec![0, 1, 2, 3], vec![1, 9, 14, 40, 12], vec![2, 7, 8]],
        "config" => vec![std::fs::read(repo.join("sluice.toml")).unwrap()],
        "schema" => files(&repo.join("schemas")),
        "segment" => files(&repo.join("segments")),
        "destination" => destination_seeds(),
        "log_record" => {
            let mut framed = Vec::new();
            crate::intake_log::segment::frame_into(&mut framed, |b| b.extend_from_slice(&record));
            vec![record, framed]
        }
        "stored_profile" => {
            let mut p = Profile::new(7);
            p.traits.insert("plan".into(), "pro".into());
            p.memberships.insert("vip", Default::default());
            let mut stored = Vec::new();
            crate::profiles::codec::encode(&p, stored_words(), &mut stored);
            vec![stored]
        }
        "queue_entry" => {
            let parked = crate::destinations::sender::Outgoing {
                offset: 1,
                user: "u".into(),
                message_id: "m".into(),
                accepted_micros: 2,
                body: MESSAGE.as_bytes().to_vec(),
            };
            vec![postcard::to_stdvec(&parked).unwrap()]
        }
        "rhai" => vec![
            b"\0user.did(\"Order Completed\", days(1)) && user.traits.plan == \"pro\"".to_vec(),
            b"\x01msg.properties.revenue = msg.properties.revenue * 2; msg".to_vec(),
        ],
        _ => Vec::new(),
    }
}

/// Every file under `dir` but READMEs.
fn files(dir: &Path) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files(&path));
        } else if !path.ends_with("README.md") {
            out.extend(std::fs::read(path));
        }
    }
    out
}

/// Destination files of each type, with scripts.
fn destination_seeds() -> Vec<Vec<u8>> {
    [
        r#"type = "webhook"
url = "http://127.0.0.1:9/hook"
secret = "s"
events = ["Order Completed", "identify"]
filter = 'msg.properties.revenue > 10'
transform = '''
msg.properties.doubled = msg.properties.revenue * 2;
msg'''
[delivery]
batch_size = 10
rate_limit = 50
max_retry_age = "4h"
"#,
        r#"type = "segment"
url = "http://127.0.0.1:9"
write_key = "k"
segments = ["vip"]
[delivery]
timeout = "5s"
"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

/// Payloads as the official SDKs send them.
fn sdk_seeds() -> [&'static str; 3] {
    [
        // analytics-python
        r#"{"batch":[{"type":"track","event":"Order Completed","userId":"u1","properties":{"revenue":42.5,"items":[1,2]},"context":{"library":{"name":"analytics-python","version":"2.3.2"}},"timestamp":"2026-01-01T00:00:00.123+00:00","messageId":"5b2b2f47-4d8a-4fd2-9d45-6d6b7c1e1a11","integrations":{}}],"sentAt":"2026-01-01T00:00:01.000+00:00"}"#,
        // @segment/analytics-node
        r#"{"batch":[{"type":"identify","userId":"u2","traits":{"email":"a@example.com","plan":"pro"},"messageId":"node-next-1","timestamp":"2026-01-01T00:00:00.000Z","context":{"library":{"name":"@segment/analytics-node","version":"2.1.0"}},"_metadata":{"jsRuntime":"node"}}],"writeKey":"wk","sentAt":"2026-01-01T00:00:00.100Z"}"#,
        // @segment/analytics-next (/v1/t)
        r#"{"type":"track","event":"Viewed","properties":{"path":"/"},"anonymousId":"8f6e2b1c","messageId":"ajs-next-1","timestamp":"2026-01-01T00:00:00.000Z","context":{"page":{"path":"/","url":"http://localhost/","title":"t"},"userAgent":"Mozilla/5.0","locale":"en-US","library":{"name":"analytics.js","version":"npm:next-1.70.0"}},"integrations":{},"writeKey":"wk","sentAt":"2026-01-01T00:00:00.010Z","_metadata":{"bundled":["Segment.io"],"unbundled":[]}}"#,
    ]
}

/// About the JSON bytes a mutated payload may grow to, twice the 500 KB a request may be.
/// Mutation 16 doubles what it replaces, so a few dozen of them would build gigabytes in the
/// harness before the edge saw a byte (the campaign's `sdk_payloads` timeouts and out-of-memory
/// reports were that).
const MAX_MUTATED_BYTES: usize = 1_000_000;

/// Changes the `place`-th value of `value` (in a walk of the tree) into something chosen by `what`.
fn mutate(value: &mut Value, place: usize, what: u8) {
    if json_size(value) > MAX_MUTATED_BYTES {
        return;
    }
    let nodes = count(value);
    let mut counter = 0;
    if let Some(target) = nth(value, place % nodes, &mut counter) {
        *target = replacement(target, what);
    }
}

/// About the length of `v` as JSON text (at least one byte a value, so it bounds `count` too).
fn json_size(v: &Value) -> usize {
    match v {
        Value::Array(a) => 2 + a.iter().map(|v| 1 + json_size(v)).sum::<usize>(),
        Value::Object(o) => {
            2 + o
                .iter()
                .map(|(k, v)| k.len() + 4 + json_size(v))
                .sum::<usize>()
        }
        Value::String(s) => s.len() + 2,
        _ => 8,
    }
}

fn count(v: &Value) -> usize {
    1 + match v {
        Value::Array(a) => a.iter().map(count).sum(),
        Value::Object(o) => o.values().map(count).sum(),
        _ => 0,
    }
}

fn nth<'v>(v: &'v mut Value, n: usize, counter: &mut usize) -> Option<&'v mut Value> {
    if *counter == n {
        return Some(v);
    }
    *counter += 1;
    match v {
        Value::Array(a) => a.iter_mut().find_map(|c| nth(c, n, counter)),
        Value::Object(o) => o.values_mut().find_map(|c| nth(c, n, counter)),
        _ => None,
    }
}

fn replacement(old: &Value, what: u8) -> Value {
    let nested = |depth: usize| {
        let mut v = Value::from(1);
        for _ in 0..depth {
            v = Value::Array(vec![v]);
        }
        v
    };
    match what % 24 {
        0 => Value::Null,
        1 => Value::Bool(what > 128),
        2 => Value::from(i64::MAX),
        3 => Value::from(u64::MAX),
        4 => Value::from(-0.0),
        5 => serde_json::from_str("1e308").unwrap(),
        6 => Value::from(""),
        7 => Value::from("\u{0}\u{1f}\u{7f}\u{2028}\u{feff}é😀"),
        8 => Value::from("x".repeat(40_000)),
        9 => Value::from("2026-13-45T99:99:99Z"),
        10 => Value::from("9999-12-31T23:59:59Z"),
        11 => Value::from("0000-01-01T00:00:00+14:00"),
        12 => nested(60),
        13 => nested(70),
        14 => Value::Array(vec![Value::from(1); 3_000]),
        15 => Value::Object(
            (0..300)
                .map(|i| (format!("k{i}"), Value::from(i)))
                .collect(),
        ),
        16 => Value::Array(vec![old.clone(), old.clone()]),
        17 => serde_json::json!({ "nested": old }),
        18 => Value::from(
            [
                "track", "identify", "page", "screen", "group", "alias", "bogus",
            ][what as usize % 7],
        ),
        19 => serde_json::json!({ "sluice": { "audience": what } }),
        20 => Value::from(format!("{}", u128::MAX)),
        21 => Value::from(f64::MIN_POSITIVE),
        22 => Value::Object(Default::default()),
        _ => Value::from(what),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `target` over `seeds` and `n` random mutations of them: bit flips, cut and repeated
    /// pieces, bytes spliced from another seed.
    fn smoke(target: fn(&[u8]), seeds: &[Vec<u8>], n: usize) {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for seed in seeds {
            target(seed);
        }
        for _ in 0..n {
            let mut input = seeds[next() as usize % seeds.len()].clone();
            for _ in 0..1 + next() % 4 {
                let len = input.len().max(1);
                match next() % 5 {
                    0 if !input.is_empty() => {
                        let i = next() as usize % len;
                        input[i] ^= 1 << (next() % 8);
                    }
                    1 if !input.is_empty() => {
                        let i = next() as usize % len;
                        input.truncate(i);
                    }
                    2 => {
                        let i = next() as usize % (input.len() + 1);
                        input.insert(i, next() as u8);
                    }
                    3 if !input.is_empty() => {
                        let (a, b) = (next() as usize % len, next() as usize % len);
                        let piece: Vec<u8> = input[a.min(b)..a.max(b)].to_vec();
                        input.extend_from_slice(&piece);
                    }
                    _ => {
                        let other = &seeds[next() as usize % seeds.len()];
                        let at = next() as usize % (other.len() + 1);
                        input.extend_from_slice(&other[at..]);
                    }
                }
            }
            target(&input);
        }
    }

    /// What the campaign found, kept: each of these failed its target once.
    #[test]
    fn the_campaigns_findings_stay_fixed() {
        // A stored body with a number out of f64's range (6666666666666E666666666666).
        log_record(b"\x01\x00\x00@ FHG\x06\x00\x03\x00web\x02\x00m1\x00\x00\x00\x006666666666666E666666666666\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n");
        // A stored profile whose history holds a NaN.
        stored_profile(b"\x01\x00\x00\x02\x00\x01\x00\x00\x01\x01\x00\x00\x01\x08&\x01\x09\x00\x07\xcd&\xf3\xff\xff\xff\x00");
        // What `sdk_payloads` found: its own mutations building gigabytes before the edge saw a
        // byte (timeouts, out of memory). Growth now stops past MAX_MUTATED_BYTES.
        let grown_within_bound = |input: &[u8]| {
            let grown = sdk_payload(input).unwrap();
            let size = json_size(&grown);
            assert!(size <= 2 * MAX_MUTATED_BYTES + 16, "{size} bytes");
            sdk_payloads(input);
        };
        // Thirty doublings (mutation 16) of one value.
        grown_within_bound(
            &[
                [0x10; 31].as_slice(),
                &[0x6b],
                &[0x10; 26],
                b"\x6b\x39\x34\xff\x19",
            ]
            .concat(),
        );
        // The same with 'X' (88, also mutation 16).
        grown_within_bound(
            &[
                b"=@W\xcc\xff=@W\xcc\xff".as_slice(),
                &[b'X'; 30],
                b"\x00\xce\x00\xce",
            ]
            .concat(),
        );
        // A 40,000-byte string (mutation 8), then doublings: few values, many bytes.
        grown_within_bound(
            &[
                b"k\xff71\xff1".as_slice(),
                &[0xa0; 8],
                b" ",
                &[0xa0; 65],
                b"\x97\x00\x00\x00\x00\xff",
            ]
            .concat(),
        );
    }

    #[test]
    fn every_target_survives_its_seeds_and_random_mutations() {
        let out = std::env::var_os("SLUICE_FUZZ_SEEDS");
        for (name, target, cases) in TARGETS {
            let seeds = seeds(name);
            if let Some(out) = &out {
                // tools/fuzz.sh asks for the seeds as files, to start its corpus from.
                let dir = Path::new(out).join(name);
                std::fs::create_dir_all(&dir).unwrap();
                for (i, seed) in seeds.iter().enumerate() {
                    std::fs::write(dir.join(format!("seed-{i}")), seed).unwrap();
                }
            }
            smoke(*target, &seeds, *cases);
        }
    }
}
