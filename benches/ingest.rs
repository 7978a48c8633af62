//! Hot paths of intake: parsing a message and applying the field rules, and appending to the
//! durable log with group commits of 1 to 1,000 records.
//!
//! ```text
//! cargo bench --bench ingest
//! ```

use std::sync::Arc;

use chrono::Utc;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use sluice::entry::{Entry, Status};
use sluice::ingest::message::RawMessage;
use sluice::ingest::rules::{self, BatchDefaults};
use sluice::intake_log::{IntakeLog, LogOptions, RecordBatch};
use sluice::metrics::LogMetrics;

/// A track of about 400 bytes with six properties and a realistic context.
fn message(n: u64) -> String {
    format!(
        r#"{{"type":"track","event":"Order Completed","userId":"user-{n}","anonymousId":"anon-{n}","messageId":"bench-{n}","timestamp":"2026-11-22T04:00:00.000Z","properties":{{"order_id":"o-{n}","revenue":42.5,"currency":"EUR","items":3,"coupon":"WINTER","shipping":"express"}},"context":{{"library":{{"name":"analytics-node","version":"2.1.0"}},"ip":"203.0.113.7","userAgent":"Mozilla/5.0 (Macintosh; Intel Mac OS X 14_0)","locale":"en-US"}}}}"#
    )
}

fn parse_and_rules(c: &mut Criterion) {
    let text = message(1);
    let mut group = c.benchmark_group("parse_and_rules");
    group.throughput(Throughput::Elements(1));
    group.bench_function("track_400_bytes", |b| {
        let defaults = BatchDefaults::default();
        let mut out = Vec::with_capacity(1024);
        b.iter(|| {
            // As at the edge: the request is parsed (and so checked) once, then each message read.
            let raw = RawMessage::read(serde_json::from_str(&text).unwrap()).unwrap();
            let m = rules::apply(raw, None, &defaults, Utc::now()).unwrap();
            out.clear();
            Entry::encode(
                &mut out,
                Status::Accepted,
                m.received_at,
                "web",
                &m.message_id,
                "",
                |o| m.write_json(o, &[]),
            );
            out.len()
        })
    });
    group.finish();
}

fn log_append(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let log = IntakeLog::open(
        LogOptions {
            dir: dir.path().to_path_buf(),
            segment_size: 256 << 20,
            max_size: 1 << 40,
        },
        Arc::new(LogMetrics::default()),
    )
    .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let payload = {
        let mut out = Vec::new();
        Entry::encode(
            &mut out,
            Status::Accepted,
            Utc::now(),
            "web",
            "bench-1",
            "",
            |o| o.extend_from_slice(message(1).as_bytes()),
        );
        out
    };
    let mut group = c.benchmark_group("log_append_fsync");
    for records in [1u64, 10, 100, 1000] {
        group.throughput(Throughput::Elements(records));
        group.bench_function(format!("group_of_{records}"), |b| {
            b.iter_batched(
                || {
                    let mut batch =
                        RecordBatch::with_capacity(payload.len() * records as usize + 64);
                    for _ in 0..records {
                        batch.push(&payload);
                    }
                    batch
                },
                |batch| runtime.block_on(log.append(batch)).unwrap(),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

/// A typical 10-property schema and a message payload that satisfies it.
fn ten_property_plan() -> (sluice::schema::Registry, serde_json::Value) {
    let schema = serde_json::json!({
        "x-sluice": {"type": "track", "event": "Order Completed", "version": 1},
        "type": "object",
        "properties": {
            "order_id": {"type": "string", "minLength": 1},
            "revenue": {"type": "number", "minimum": 0},
            "currency": {"type": "string", "pattern": "^[A-Z]{3}$"},
            "items": {"type": "integer", "minimum": 1},
            "coupon": {"type": ["string", "null"]},
            "shipping": {"type": "string", "enum": ["standard", "express", "pickup"]},
            "gift": {"type": "boolean"},
            "discount": {"type": "number", "minimum": 0},
            "store": {"type": "string"},
            "placed_at": {"type": "string"}
        },
        "required": ["order_id", "revenue", "currency"]
    });
    let file = sluice::schema::SchemaFile {
        path: "order.json".into(),
        text: schema.to_string(),
        kind: sluice::vocabulary::MessageType::Track,
        event: Some("Order Completed".into()),
        version: 1,
        schema,
    };
    let (schemas, _) = sluice::schema::Schemas::from_files([file]);
    let (registry, problems) = sluice::schema::Registry::build(&schemas);
    assert!(problems.is_empty());
    let payload = serde_json::json!({
        "order_id": "o-1234", "revenue": 42.5, "currency": "EUR", "items": 3, "coupon": null,
        "shipping": "express", "gift": false, "discount": 5.0, "store": "berlin-1", "placed_at": "2026-11-22T04:00:00Z"
    });
    (registry, payload)
}

fn schema_validation(c: &mut Criterion) {
    use sluice::vocabulary::MessageType;
    let (registry, payload) = ten_property_plan();
    let text = payload.to_string();
    let mut group = c.benchmark_group("schema_validation");
    group.throughput(Throughput::Elements(1));
    group.bench_function("ten_properties_valid", |b| {
        b.iter(|| registry.check(MessageType::Track, Some("Order Completed"), &payload))
    });
    group.bench_function("ten_properties_parse_and_validate", |b| {
        b.iter(|| {
            let value: serde_json::Value = serde_json::from_str(&text).unwrap();
            registry.check(MessageType::Track, Some("Order Completed"), &value)
        })
    });
    let mut invalid = payload.clone();
    invalid["revenue"] = serde_json::json!(-1);
    invalid["currency"] = serde_json::json!("euro");
    group.bench_function("ten_properties_invalid_with_errors", |b| {
        b.iter(|| registry.check(MessageType::Track, Some("Order Completed"), &invalid))
    });
    group.finish();
}

criterion_group!(benches, parse_and_rules, schema_validation, log_append);
criterion_main!(benches);
