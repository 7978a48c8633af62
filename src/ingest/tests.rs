use super::*;
use crate::config::{Config, DedupConfig};
use crate::intake_log::dedup::Dedup;
use crate::intake_log::{Appender, IntakeLog, LogOptions, Record};
use crate::metrics::{DedupMetrics, LogMetrics};
use chrono::{DateTime, Utc};

struct Fixture {
    _dir: tempfile::TempDir,
    log: Arc<IntakeLog>,
    ingest: Ingest,
}

fn fixture(config_text: &str) -> Fixture {
    fixture_with_plan(config_text, crate::schema::Live::empty())
}

fn fixture_with_plan(config_text: &str, plan: crate::schema::Live) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let config = Config::parse(&dir.path().join("sluice.toml"), config_text, &|_| None).unwrap();
    let log = Arc::new(
        IntakeLog::open(
            LogOptions {
                dir: dir.path().join("log"),
                segment_size: 1 << 20,
                max_size: 1 << 30,
            },
            Arc::new(LogMetrics::default()),
        )
        .unwrap(),
    );
    let dedup = Arc::new(Dedup::new(
        &DedupConfig {
            window: Duration::from_secs(3600),
            max_ids: 1000,
        },
        dir.path().join("log/dedup"),
        Arc::new(DedupMetrics::default()),
    ));
    let now: DateTime<Utc> = "2026-03-01T10:00:00Z".parse().unwrap();
    let metrics = crate::metrics::Metrics::default();
    let ingest = Ingest::new(
        &config,
        Parts {
            log: Arc::new(Appender::new(log.clone(), dedup)),
            plan: Arc::new(plan),
            metrics: metrics.ingest,
            schema_metrics: metrics.schema,
            clock: Arc::new(move || now),
        },
    );
    Fixture {
        _dir: dir,
        log,
        ingest,
    }
}

const SOURCES: &str = r#"
[[sources]]
name = "web"
write_key = "wk"
"#;

fn entries(log: &IntakeLog) -> Vec<(Status, String, String, Value)> {
    log.reader(0)
        .read(usize::MAX)
        .unwrap()
        .iter()
        .map(|Record { payload, .. }| {
            let e = Entry::decode(payload).unwrap();
            let body: Value = serde_json::from_slice(e.body).unwrap();
            (e.status, e.source.to_string(), e.reason.to_string(), body)
        })
        .collect()
}

fn track(id: &str) -> String {
    format!(r#"{{"type":"track","event":"Clicked","userId":"u1","messageId":"{id}"}}"#)
}

#[tokio::test]
async fn a_single_message_is_stored_enriched() {
    let f = fixture(SOURCES);
    let report = f
        .ingest
        .handle(
            Shape::Single(MessageType::Track),
            br#"{"event":"Clicked","userId":"u1","messageId":"m1"}"#,
            Some("wk"),
        )
        .await
        .unwrap();
    assert_eq!(
        report,
        Report {
            accepted: 1,
            rejected: vec![]
        }
    );
    let stored = entries(&f.log);
    assert_eq!(stored.len(), 1);
    let (status, source, _, body) = &stored[0];
    assert_eq!(*status, Status::Accepted);
    assert_eq!(source, "web");
    assert_eq!(body["type"], "track");
    assert_eq!(body["receivedAt"], "2026-03-01T10:00:00Z");
}

#[tokio::test]
async fn the_write_key_may_come_in_the_body() {
    let f = fixture(SOURCES);
    let single = br#"{"event":"E","userId":"u","writeKey":"wk"}"#;
    assert!(f
        .ingest
        .handle(Shape::Single(MessageType::Track), single, None)
        .await
        .is_ok());
    let batch = format!(r#"{{"writeKey":"wk","batch":[{}]}}"#, track("b1"));
    assert!(f
        .ingest
        .handle(Shape::Batch, batch.as_bytes(), None)
        .await
        .is_ok());
    let stored = entries(&f.log);
    assert_eq!(stored.len(), 2);
    assert!(!serde_json::to_string(&stored[0].3)
        .unwrap()
        .contains("writeKey"));
}

#[tokio::test]
async fn missing_or_unknown_write_keys_are_unauthorized() {
    let f = fixture(SOURCES);
    let batch = format!(r#"{{"batch":[{}]}}"#, track("x"));
    for key in [None, Some(""), Some("nope")] {
        let err = f
            .ingest
            .handle(Shape::Batch, batch.as_bytes(), key)
            .await
            .unwrap_err();
        assert!(
            matches!(err, IngestError::Unauthorized(_)),
            "{key:?}: {err}"
        );
    }
    assert!(entries(&f.log).is_empty());
}

#[tokio::test]
async fn a_partial_batch_stores_the_good_and_quarantines_the_bad() {
    let f = fixture(SOURCES);
    let big = format!(
        r#"{{"type":"track","event":"Big","userId":"u","messageId":"big","properties":{{"blob":"{}"}}}}"#,
        "x".repeat(MAX_MESSAGE_BYTES)
    );
    let batch = format!(
        r#"{{"batch":[{},{{"type":"track","userId":"u","messageId":"no-event"}},{},{big}]}}"#,
        track("ok1"),
        track("ok2")
    );
    let report = f
        .ingest
        .handle(Shape::Batch, batch.as_bytes(), Some("wk"))
        .await
        .unwrap();
    assert_eq!(report.accepted, 2);
    assert_eq!(
        report.rejected,
        vec![
            Rejection {
                index: 1,
                message_id: Some("no-event".into()),
                error: "track needs `event`".into()
            },
            Rejection {
                index: 3,
                message_id: Some("big".into()),
                error: Limit::Message.describe().into()
            },
        ]
    );
    let stored = entries(&f.log);
    let statuses: Vec<Status> = stored.iter().map(|s| s.0).collect();
    assert_eq!(
        statuses,
        vec![
            Status::Accepted,
            Status::Rejected,
            Status::Accepted,
            Status::Rejected
        ]
    );
    assert_eq!(stored[1].2, "track needs `event`");
    assert_eq!(
        stored[1].3["messageId"], "no-event",
        "the raw message is kept"
    );
    assert_eq!(stored[3].3["messageId"], "big");
}

#[tokio::test]
async fn every_message_rejected_is_an_error_with_the_detail() {
    let f = fixture(SOURCES);
    let batch = r#"{"batch":[{"type":"track","userId":"u"},{"type":"page"}]}"#;
    match f
        .ingest
        .handle(Shape::Batch, batch.as_bytes(), Some("wk"))
        .await
    {
        Err(IngestError::AllRejected(report)) => {
            assert_eq!(report.accepted, 0);
            assert_eq!(report.rejected.len(), 2);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(entries(&f.log).len(), 2, "both kept for the quarantine");
}

#[tokio::test]
async fn malformed_json_and_missing_batch_are_refused_and_store_nothing() {
    let f = fixture(SOURCES);
    for (shape, body) in [
        (Shape::Batch, &b"{\"batch\": [}"[..]),
        (Shape::Batch, b"{}"),
        (Shape::Batch, b"not json"),
        (Shape::Single(MessageType::Track), b"{\"event\":"),
    ] {
        let err = f.ingest.handle(shape, body, Some("wk")).await.unwrap_err();
        assert!(matches!(err, IngestError::Malformed(_)), "{err}");
    }
    assert!(entries(&f.log).is_empty());
}

/// A batch's context is merged into each of its messages: a small request must not be able to
/// store a large multiple of itself.
#[tokio::test]
async fn a_batch_context_cannot_multiply_a_request_in_the_log() {
    let f = fixture(SOURCES);
    let messages = vec![r#"{"type":"screen","userId":"u"}"#; MAX_BATCH_MESSAGES].join(",");
    // 30 KB of context for each of 2,500 messages: 75 MB from a 110 KB request.
    let context = format!(r#"{{"pad":"{}"}}"#, "x".repeat(30 * 1024));
    let body = format!(r#"{{"batch":[{messages}],"context":{context}}}"#);
    assert!(body.len() < MAX_REQUEST_BYTES);
    let err = f
        .ingest
        .handle(Shape::Batch, body.as_bytes(), Some("wk"))
        .await
        .unwrap_err();
    assert!(matches!(err, IngestError::TooLarge(Limit::Stored)), "{err}");
    assert!(entries(&f.log).is_empty(), "nothing of it is stored");

    // Over 32 KB of batch-level context and integrations, together, is refused outright.
    let half = format!(r#"{{"pad":"{}"}}"#, "x".repeat(17 * 1024));
    let body = format!(
        r#"{{"batch":[{}],"context":{half},"integrations":{half}}}"#,
        track("one")
    );
    let err = f
        .ingest
        .handle(Shape::Batch, body.as_bytes(), Some("wk"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, IngestError::TooLarge(Limit::BatchContext)),
        "{err}"
    );
    let body = format!(
        r#"{{"batch":[{}],"context":"not an object"}}"#,
        track("two")
    );
    let err = f
        .ingest
        .handle(Shape::Batch, body.as_bytes(), Some("wk"))
        .await
        .unwrap_err();
    assert!(matches!(err, IngestError::Malformed(_)), "{err}");

    // An ordinary batch context still merges into every message.
    let body = format!(
        r#"{{"batch":[{},{}],"context":{{"library":{{"name":"x"}}}}}}"#,
        track("three"),
        track("four")
    );
    f.ingest
        .handle(Shape::Batch, body.as_bytes(), Some("wk"))
        .await
        .unwrap();
    let stored = entries(&f.log);
    assert_eq!(stored.len(), 2);
    assert!(stored
        .iter()
        .all(|e| e.3["context"]["library"]["name"] == "x"));
}

#[tokio::test]
async fn limits_on_message_size_and_batch_count() {
    let f = fixture(SOURCES);
    let big = format!(
        r#"{{"event":"E","userId":"u","properties":{{"b":"{}"}}}}"#,
        "x".repeat(MAX_MESSAGE_BYTES)
    );
    let err = f
        .ingest
        .handle(
            Shape::Single(MessageType::Track),
            big.as_bytes(),
            Some("wk"),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, IngestError::TooLarge(Limit::Message)));
    let many = format!(
        r#"{{"batch":[{}]}}"#,
        vec![r#"{"type":"screen","userId":"u"}"#; MAX_BATCH_MESSAGES + 1].join(",")
    );
    let err = f
        .ingest
        .handle(Shape::Batch, many.as_bytes(), Some("wk"))
        .await
        .unwrap_err();
    assert!(matches!(err, IngestError::TooLarge(Limit::BatchCount)));
    let just = format!(
        r#"{{"batch":[{}]}}"#,
        vec![r#"{"type":"screen","userId":"u"}"#; MAX_BATCH_MESSAGES].join(",")
    );
    assert_eq!(
        f.ingest
            .handle(Shape::Batch, just.as_bytes(), Some("wk"))
            .await
            .unwrap()
            .accepted,
        MAX_BATCH_MESSAGES
    );
}

#[tokio::test]
async fn duplicates_are_acknowledged_but_stored_once() {
    let f = fixture(SOURCES);
    let batch = format!(r#"{{"batch":[{},{}]}}"#, track("d1"), track("d1"));
    let report = f
        .ingest
        .handle(Shape::Batch, batch.as_bytes(), Some("wk"))
        .await
        .unwrap();
    assert_eq!(report.accepted, 2);
    let again = format!(r#"{{"batch":[{}]}}"#, track("d1"));
    assert_eq!(
        f.ingest
            .handle(Shape::Batch, again.as_bytes(), Some("wk"))
            .await
            .unwrap()
            .accepted,
        1
    );
    assert_eq!(entries(&f.log).len(), 1);
}

#[tokio::test]
async fn rate_limits_count_messages() {
    let f = fixture(
        r#"
[[sources]]
name = "web"
write_key = "wk"
rate_limit = 3
"#,
    );
    let two = format!(r#"{{"batch":[{},{}]}}"#, track("r1"), track("r2"));
    assert!(f
        .ingest
        .handle(Shape::Batch, two.as_bytes(), Some("wk"))
        .await
        .is_ok());
    let err = f
        .ingest
        .handle(Shape::Batch, two.as_bytes(), Some("wk"))
        .await
        .unwrap_err();
    match err {
        IngestError::RateLimited { retry_after, .. } => {
            assert!(retry_after <= Duration::from_secs(1))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(entries(&f.log).len(), 2);
}

#[tokio::test]
async fn a_message_that_is_not_an_object_is_rejected_not_malformed() {
    let f = fixture(SOURCES);
    let batch = format!(r#"{{"batch":[{}, 5, "text"]}}"#, track("o1"));
    let report = f
        .ingest
        .handle(Shape::Batch, batch.as_bytes(), Some("wk"))
        .await
        .unwrap();
    assert_eq!(report.accepted, 1);
    assert_eq!(report.rejected.len(), 2);
    assert!(
        !report.rejected[0].error.contains("line"),
        "{}",
        report.rejected[0].error
    );
}

fn order_plan() -> crate::schema::Live {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("order.json"),
        r#"{"x-sluice":{"type":"track","event":"Order Completed","version":1},
            "type":"object","required":["order_id"]}"#,
    )
    .unwrap();
    let (schemas, registry, problems) = crate::schema::watch::Loader::new(dir.path()).load();
    assert!(problems.is_empty());
    crate::schema::Live::new(schemas, registry)
}

#[tokio::test]
async fn a_blocked_message_is_acknowledged_and_quarantined_as_enriched() {
    let f = fixture_with_plan(
        r#"
[schemas]
violations = "block"
unplanned = "block"

[[sources]]
name = "web"
write_key = "wk"

[[sources]]
name = "lenient"
write_key = "lk"
unplanned = "allow"
violations = "flag"
"#,
        order_plan(),
    );
    let batch = r#"{"batch":[
        {"type":"track","event":"Order Completed","userId":"u","messageId":"ok","properties":{"order_id":"1"}},
        {"type":"track","event":"Order Completed","userId":"u","messageId":"bad","properties":{}},
        {"type":"track","event":"Unknown","userId":"u","messageId":"unplanned"}]}"#;
    let report = f
        .ingest
        .handle(Shape::Batch, batch.as_bytes(), Some("wk"))
        .await
        .unwrap();
    assert_eq!(
        report,
        Report {
            accepted: 3,
            rejected: vec![]
        },
        "a schema verdict is not an HTTP error"
    );
    let stored = entries(&f.log);
    assert_eq!(stored.len(), 3);
    assert_eq!(stored[0].0, Status::Accepted);
    assert_eq!(stored[1].0, Status::Rejected);
    assert!(
        stored[1].2.starts_with("schema: Order Completed v1:"),
        "{}",
        stored[1].2
    );
    assert_eq!(
        stored[1].3["receivedAt"], "2026-03-01T10:00:00Z",
        "kept as enriched, for replay"
    );
    assert!(stored[2].2.starts_with("unplanned:"));

    // The same messages from the lenient source: stored, the violation flagged.
    let lenient = batch
        .replace("\"ok\"", "\"ok2\"")
        .replace("\"bad\"", "\"bad2\"")
        .replace("\"unplanned\"", "\"u2\"");
    let report = f
        .ingest
        .handle(Shape::Batch, lenient.as_bytes(), Some("lk"))
        .await
        .unwrap();
    assert_eq!(report.accepted, 3);
    let stored = entries(&f.log);
    assert!(stored[3..].iter().all(|e| e.0 == Status::Accepted));
    assert!(stored[4].3["context"]["violations"].is_array());
}

/// What every stage after the edge must be able to parse is decided here, once: a message nested
/// too deep or holding a number no reader can hold is rejected with the reason (it used to pass
/// and fail later: dead letters, typed rows left out, a profile's traits lost).
#[tokio::test]
async fn json_past_what_readers_hold_is_rejected_at_the_edge() {
    let f = fixture(SOURCES);
    let deep = format!(
        r#"{{"type":"track","event":"E","userId":"u","messageId":"deep","properties":{{"a":{}1{}}}}}"#,
        "[".repeat(200),
        "]".repeat(200)
    );
    let huge =
        r#"{"type":"track","event":"E","userId":"u","messageId":"huge","properties":{"n":1e400}}"#;
    let batch = format!(r#"{{"batch":[{deep},{huge},{}]}}"#, track("fine"));
    let report = f
        .ingest
        .handle(Shape::Batch, batch.as_bytes(), Some("wk"))
        .await
        .unwrap();
    assert_eq!(report.accepted, 1);
    let reasons: Vec<(usize, &str)> = report
        .rejected
        .iter()
        .map(|r| (r.index, r.error.as_str()))
        .collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(
        reasons[0].1.contains("nested deeper than 64"),
        "{reasons:?}"
    );
    assert!(reasons[1].1.contains("out of range"), "{reasons:?}");
}

/// Numeric ids keep the text they were sent as: above 2^53 two users' ids used to become one
/// float, and so one profile.
#[tokio::test]
async fn large_numeric_ids_stay_distinct() {
    let f = fixture(SOURCES);
    let batch = r#"{"batch":[
        {"type":"identify","userId":18446744073709551617,"messageId":"a"},
        {"type":"identify","userId":18446744073709551618,"messageId":"b"}]}"#;
    f.ingest
        .handle(Shape::Batch, batch.as_bytes(), Some("wk"))
        .await
        .unwrap();
    let users: Vec<String> = entries(&f.log)
        .iter()
        .map(|e| e.3["userId"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(users, vec!["18446744073709551617", "18446744073709551618"]);
}
