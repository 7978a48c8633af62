//! The tracking plan over HTTP: policies, hot reload under load, a broken file, the admin API.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::*;

fn order_schema(version: u64, required: &str) -> String {
    json!({
        "x-sluice": {"type": "track", "event": "Order Completed", "version": version},
        "type": "object",
        "properties": {"order_id": {"type": "string"}, "revenue": {"type": "number", "minimum": 0}},
        "required": [required]
    })
    .to_string()
}

/// Writes a file whole: a temporary file renamed over the old one, as editors and deploys do.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn plan_dir(files: &[(&str, String)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("schemas")).unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join("schemas").join(name), text).unwrap();
    }
    dir
}

fn admin(server: &Server, method: &str, path: &str, body: &str) -> Response {
    request(
        server.addr,
        method,
        path,
        &[("Authorization", &format!("Bearer {ADMIN_TOKEN}"))],
        body.as_bytes(),
    )
}

const BLOCKING: &str = r#"
[schemas]
unplanned = "block"
violations = "block"

[[sources]]
name = "lenient"
write_key = "lenient-key"
unplanned = "allow"
violations = "flag"
"#;

#[test]
fn blocked_messages_are_acknowledged_and_land_in_the_quarantine_with_their_errors() {
    let dir = plan_dir(&[("order.json", order_schema(1, "order_id"))]);
    let server = Server::start_in(
        dir,
        &format!("{BLOCKING}[storage]\nflush_interval = \"100ms\"\n"),
    );
    let batch = json!({"batch": [
        {"type": "track", "event": "Order Completed", "userId": "u", "messageId": "valid", "properties": {"order_id": "o1", "revenue": 3}},
        {"type": "track", "event": "Order Completed", "userId": "u", "messageId": "invalid", "properties": {"revenue": -1}},
        {"type": "track", "event": "Unplanned Thing", "userId": "u", "messageId": "unplanned"}
    ]});
    let r = server.send("/v1/batch", &batch.to_string());
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json(),
        json!({"success": true}),
        "schema verdicts are not HTTP errors"
    );
    // The same from the lenient source: all stored, the violation flagged.
    let lenient = batch
        .to_string()
        .replace("\"valid\"", "\"l-valid\"")
        .replace("\"invalid\"", "\"l-invalid\"")
        .replace("\"unplanned\"", "\"l-unplanned\"");
    let r = server.post(
        "/v1/batch",
        &[("Authorization", &basic("lenient-key"))],
        lenient.as_bytes(),
    );
    assert_eq!(r.json(), json!({"success": true}));

    let engine_rows = |sql: &str| -> Vec<Value> {
        let r = admin(
            &server,
            "POST",
            "/admin/query",
            &json!({"sql": sql}).to_string(),
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        r.json().as_array().unwrap().clone()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while engine_rows("SELECT message_id FROM events").len() < 4 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(100));
    }
    let events = engine_rows("SELECT message_id, violations FROM events ORDER BY message_id");
    let ids: Vec<&str> = events
        .iter()
        .map(|r| r["message_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["l-invalid", "l-unplanned", "l-valid", "valid"]);
    let flagged: Value = serde_json::from_str(events[0]["violations"].as_str().unwrap()).unwrap();
    assert!(
        flagged
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["path"] == "/revenue"),
        "{flagged}"
    );
    let quarantined =
        engine_rows("SELECT message_id, reason, raw FROM quarantine ORDER BY message_id");
    assert_eq!(quarantined.len(), 2);
    assert_eq!(quarantined[0]["message_id"], "invalid");
    let reason = quarantined[0]["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("schema: Order Completed v1:")
            && reason.contains("/revenue")
            && reason.contains("order_id"),
        "{reason}"
    );
    assert_eq!(
        quarantined[1]["reason"],
        "unplanned: no schema for track `Unplanned Thing`"
    );
    let raw: Value = serde_json::from_str(quarantined[0]["raw"].as_str().unwrap()).unwrap();
    assert!(
        raw["receivedAt"].is_string(),
        "kept enriched, ready for replay"
    );

    let metrics = String::from_utf8(server.get("/metrics").body).unwrap();
    assert!(
        metrics
            .contains(r#"sluice_schema_checks_total{event="Order Completed",outcome="blocked"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains(
        r#"sluice_schema_checks_total{event="unplanned",outcome="unplanned_blocked"} 1"#
    ));
    assert!(metrics.contains(r#"sluice_ingest_messages_total{source="web",outcome="blocked"} 2"#));
}

#[test]
fn hot_reload_under_load_never_mixes_registries_within_a_request() {
    let dir = plan_dir(&[("order.json", order_schema(1, "order_id"))]);
    let schema_path = dir.path().join("schemas/order.json");
    let server = Server::start_in(dir, "");
    let stop = Arc::new(AtomicBool::new(false));
    // Each batch: 50 copies of a message valid under v1 (order_id) and invalid under v2 (revenue).
    let senders: Vec<_> = (0..4)
        .map(|t| {
            let (addr, stop) = (server.addr, stop.clone());
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let batch: Vec<Value> = (0..50)
                        .map(|i| json!({"type": "track", "event": "Order Completed", "userId": "u",
                                        "messageId": format!("r{t}-{n}-{i}"), "properties": {"order_id": "o"}}))
                        .collect();
                    let r = request(addr, "POST", "/v1/batch", &[("Authorization", &basic(WRITE_KEY))], json!({"batch": batch}).to_string().as_bytes());
                    assert_eq!(r.status, 200);
                    n += 1;
                }
            })
        })
        .collect();
    for flip in 0..6 {
        std::thread::sleep(Duration::from_millis(600));
        let required = if flip % 2 == 0 { "revenue" } else { "order_id" };
        replace(&schema_path, &order_schema(1, required));
    }
    std::thread::sleep(Duration::from_millis(600));
    stop.store(true, Ordering::Relaxed);
    for s in senders {
        s.join().unwrap();
    }
    let mut batches: std::collections::HashMap<String, (usize, usize)> = Default::default();
    for record in dump(&server.log_dir()) {
        let id = record["messageId"].as_str().unwrap();
        let batch = id.rsplit_once('-').unwrap().0.to_string();
        let flagged = record["message"]["context"]["violations"].is_array();
        let e = batches.entry(batch).or_default();
        if flagged {
            e.1 += 1
        } else {
            e.0 += 1
        }
    }
    let both = batches
        .values()
        .filter(|(clean, flagged)| *clean > 0 && *flagged > 0)
        .count();
    let flagged_batches = batches.values().filter(|(_, f)| *f > 0).count();
    let clean_batches = batches.values().filter(|(c, _)| *c > 0).count();
    assert_eq!(both, 0, "a batch validated against two registries");
    assert!(
        flagged_batches > 0 && clean_batches > 0,
        "the reloads took effect ({flagged_batches} flagged, {clean_batches} clean)"
    );
    let metrics = String::from_utf8(server.get("/metrics").body).unwrap();
    assert!(
        metrics.contains(r#"sluice_schema_reloads_total{outcome="applied"}"#),
        "{metrics}"
    );
}

#[test]
fn a_broken_edit_is_refused_and_the_last_good_version_stays() {
    let dir = plan_dir(&[("order.json", order_schema(1, "order_id"))]);
    let schema_path = dir.path().join("schemas/order.json");
    let server = Server::start_in(dir, "[schemas]\nviolations = \"block\"\n");
    replace(&schema_path, "{ \"x-sluice\": broken");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = String::from_utf8(server.get("/metrics").body).unwrap();
        if metrics.contains("sluice_schema_refused_files 1") {
            break;
        }
        assert!(Instant::now() < deadline, "the broken file was not noticed");
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = server.send(
        "/v1/track",
        r#"{"event":"Order Completed","userId":"u","messageId":"m","properties":{}}"#,
    );
    assert_eq!(r.status, 200);
    let record = &dump(&server.log_dir())[0];
    assert_eq!(
        record["status"], "rejected",
        "still blocked by the last good version"
    );
    assert!(record["reason"].as_str().unwrap().contains("order_id"));
    let listed = admin(&server, "GET", "/admin/schemas", "").json();
    assert_eq!(listed[0]["event"], "Order Completed");
    assert_eq!(listed[0]["violations"], 1);
}

#[test]
fn the_admin_api_lists_schemas_and_validates_a_message() {
    let dir = plan_dir(&[
        ("order1.json", order_schema(1, "order_id")),
        ("order2.json", order_schema(2, "revenue")),
    ]);
    let server = Server::start_in(dir, "");
    let listed = admin(&server, "GET", "/admin/schemas", "").json();
    assert_eq!(listed[0]["versions"], json!([1, 2]));
    assert_eq!(listed[0]["enforced"], 2);
    let verdict = |body: Value| {
        admin(
            &server,
            "POST",
            "/admin/schemas/validate",
            &body.to_string(),
        )
        .json()
    };
    let v = verdict(
        json!({"type": "track", "event": "Order Completed", "userId": "u", "properties": {"revenue": 1}}),
    );
    assert_eq!(v["verdict"], "valid");
    assert_eq!(v["schema"]["version"], 2);
    let v = verdict(
        json!({"type": "track", "event": "Order Completed", "userId": "u", "properties": {"revenue": -1}}),
    );
    assert_eq!(v["verdict"], "invalid");
    assert_eq!(v["errors"][0]["path"], "/revenue");
    assert_eq!(
        verdict(json!({"type": "track", "event": "Nope", "userId": "u"}))["verdict"],
        "unplanned"
    );
    assert_eq!(
        verdict(json!({"type": "track", "userId": "u"}))["verdict"],
        "rejected"
    );
    assert_eq!(
        request(server.addr, "GET", "/admin/schemas", &[], b"").status,
        401
    );
    assert!(
        dump(&server.log_dir()).is_empty(),
        "validating stores nothing"
    );
}

fn sluice(config: &Path, args: &[&str]) -> std::process::Output {
    let mut all = vec!["--config", config.to_str().unwrap()];
    all.extend_from_slice(args);
    std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(&all)
        .output()
        .unwrap()
}

fn query_rows(config: &Path, sql: &str) -> Vec<Value> {
    let out = sluice(config, &["query", "--format", "json", sql]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn replay(config: &Path, args: &[&str]) -> Value {
    let mut all = vec!["replay", "quarantine"];
    all.extend_from_slice(args);
    let out = sluice(config, &all);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn replay_readmits_what_a_fixed_schema_lets_through_exactly_once() {
    let dir = plan_dir(&[("order.json", order_schema(1, "order_id"))]);
    let extra = "[schemas]\nviolations = \"block\"\n[storage]\nflush_interval = \"100ms\"\n";
    let config = dir.path().join("sluice.toml");
    let mut child = ChildServer::spawn(dir.path(), extra, |_| {});
    let batch = json!({"batch": [
        {"type": "track", "event": "Order Completed", "userId": "u", "messageId": "q1", "properties": {"orderId": "a"}},
        {"type": "track", "event": "Order Completed", "userId": "u", "messageId": "q2", "properties": {"orderId": "b"}},
        {"type": "track", "event": "Order Completed", "userId": "u", "messageId": "ok", "properties": {"order_id": "c"}},
        {"type": "track", "userId": "u", "messageId": "no-event"}
    ]});
    let r = request(
        child.addr,
        "POST",
        "/v1/batch",
        &[("Authorization", &basic(WRITE_KEY))],
        batch.to_string().as_bytes(),
    );
    assert_eq!(r.status, 200);
    let deadline = Instant::now() + Duration::from_secs(20);
    while query_rows(&config, "SELECT message_id FROM quarantine").len() < 3 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(100));
    }
    // Nothing passes yet.
    assert_eq!(
        replay(&config, &[]),
        json!({"candidates": 2, "readmitted": 0, "still_blocked": 2})
    );

    // The plan is fixed: version 2 asks for orderId.
    std::fs::write(
        dir.path().join("schemas/order2.json"),
        order_schema(2, "orderId"),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        replay(&config, &["--event", "Something Else"])["candidates"],
        0
    );
    assert_eq!(
        replay(&config, &["--event", "Order Completed"]),
        json!({"candidates": 2, "readmitted": 2, "still_blocked": 0})
    );
    assert_eq!(replay(&config, &[])["readmitted"], 0, "twice is once");
    let deadline = Instant::now() + Duration::from_secs(20);
    while query_rows(&config, "SELECT message_id FROM events").len() < 3 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(100));
    }
    let readmitted = query_rows(
        &config,
        "SELECT e.message_id, e.received_at = q.received_at AS same_time FROM events e JOIN quarantine q ON e.message_id = q.message_id ORDER BY 1",
    );
    assert_eq!(
        readmitted,
        vec![
            json!({"message_id": "q1", "same_time": true}),
            json!({"message_id": "q2", "same_time": true})
        ]
    );

    // After a restart, the lake remembers what was re-admitted.
    assert!(child.terminate().success());
    let child = ChildServer::spawn(dir.path(), extra, |_| {});
    assert_eq!(
        replay(&config, &[]),
        json!({"candidates": 0, "readmitted": 0, "still_blocked": 0})
    );
    drop(child);
    let ids = query_rows(
        &config,
        "SELECT message_id, count(*) AS n FROM events GROUP BY 1 ORDER BY 1",
    );
    assert_eq!(
        ids,
        vec![
            json!({"message_id": "ok", "n": 1}),
            json!({"message_id": "q1", "n": 1}),
            json!({"message_id": "q2", "n": 1})
        ]
    );
}
