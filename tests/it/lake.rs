//! The lake end to end: messages in over HTTP, Parquet out, read back with `sluice query` and the
//! admin API; crashes during flushes; storage that goes away and comes back; a corrupt file.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;

const FAST_FLUSH: &str = "[storage]\nflush_interval = \"100ms\"\n";

pub(crate) fn query(config: &Path, sql: &str) -> Result<Vec<Value>, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "--config",
            config.to_str().unwrap(),
            "query",
            "--format",
            "json",
            sql,
        ])
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect())
}

fn message_ids(config: &Path) -> Vec<String> {
    query(config, "SELECT message_id FROM events")
        .unwrap()
        .iter()
        .map(|r| r["message_id"].as_str().unwrap().to_string())
        .collect()
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn admin_query(server: &Server, token: Option<&str>, sql: &str) -> Response {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    server.post(
        "/admin/query",
        &headers,
        serde_json::json!({ "sql": sql }).to_string().as_bytes(),
    )
}

#[test]
fn messages_land_in_the_lake_and_are_queryable() {
    let server = Server::start(FAST_FLUSH);
    let ids: Vec<String> = (0..20).map(|i| format!("lake-{i}")).collect();
    assert_eq!(server.send("/v1/batch", &batch_of(&ids)).status, 200);
    assert_eq!(
        server
            .send("/v1/track", r#"{"userId":"u","messageId":"bad"}"#)
            .status,
        400
    );
    let config = server.config_path();
    wait_for("the flush", || message_ids(&config).len() == 20);

    let r = admin_query(
        &server,
        Some(ADMIN_TOKEN),
        "SELECT event, count(*) AS n, min(date) AS d FROM events GROUP BY event",
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let rows = r.json();
    assert_eq!(rows[0]["event"], "Order Completed");
    assert_eq!(rows[0]["n"], 20);
    let r = admin_query(
        &server,
        Some(ADMIN_TOKEN),
        "SELECT json_get_str(properties, 'order_id') AS o, properties->>'currency' AS c FROM events WHERE message_id = 'lake-7'",
    );
    assert_eq!(r.json(), serde_json::json!([{"o": "o-lake-7", "c": "EUR"}]));
    let quarantined = query(&config, "SELECT message_id, reason FROM quarantine").unwrap();
    assert_eq!(
        quarantined,
        vec![serde_json::json!({"message_id": "bad", "reason": "track needs `event`"})]
    );
}

#[test]
fn the_admin_api_needs_the_token_and_reports_bad_sql() {
    let server = Server::start("");
    assert_eq!(admin_query(&server, None, "SELECT 1").status, 401);
    assert_eq!(admin_query(&server, Some("wrong"), "SELECT 1").status, 403);
    let r = admin_query(&server, Some(ADMIN_TOKEN), "SELEC nonsense");
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error"].as_str().unwrap().contains("SQL"),
        "{:?}",
        r.json()
    );
    let r = admin_query(
        &server,
        Some(ADMIN_TOKEN),
        "SELECT no_such_column FROM events",
    );
    assert_eq!(r.status, 400);
    let r = server.post(
        "/admin/query",
        &[("Authorization", &format!("Bearer {ADMIN_TOKEN}"))],
        b"not json",
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["success"], false);
    // The server is fine afterwards.
    assert_eq!(
        admin_query(&server, Some(ADMIN_TOKEN), "SELECT 1 AS one").json(),
        serde_json::json!([{"one": 1}])
    );
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "--config",
            server.config_path().to_str().unwrap(),
            "query",
            "SELEC",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("SQL"));
}

#[test]
fn a_corrupt_file_is_reported_clearly_and_the_writer_goes_on() {
    let server = Server::start(FAST_FLUSH);
    assert_eq!(
        server.send("/v1/batch", &batch_of(&["c-1".into()])).status,
        200
    );
    let config = server.config_path();
    wait_for("the flush", || message_ids(&config).len() == 1);
    let partition = std::fs::read_dir(server.dir.path().join("data/lake/events"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::write(
        partition.join("zz-corrupt.parquet"),
        b"PAR1 this is not parquet",
    )
    .unwrap();
    let err = query(&config, "SELECT count(*) FROM events").unwrap_err();
    assert!(
        err.contains("unreadable file(s) in the lake") && err.contains("zz-corrupt.parquet"),
        "{err}"
    );
    // The writer is unaffected: new messages still land (seen once the bad file is gone).
    assert_eq!(
        server.send("/v1/batch", &batch_of(&["c-2".into()])).status,
        200
    );
    std::thread::sleep(Duration::from_millis(500));
    std::fs::remove_file(partition.join("zz-corrupt.parquet")).unwrap();
    wait_for("the second flush", || message_ids(&config).len() == 2);
}

#[test]
fn storage_down_fills_the_log_then_503_and_everything_lands_when_it_returns() {
    let extra = format!("{FAST_FLUSH}[log]\nsegment_size = \"16KiB\"\nmax_size = \"96KiB\"\n");
    let server = Server::start(&extra);
    let lake = server.dir.path().join("data/lake");
    // Storage goes away: `events` is a file, so nothing can be written under it.
    std::fs::write(lake.join("events"), b"in the way").unwrap();
    let mut acked = Vec::new();
    let mut refused = 0;
    for i in 0..400 {
        let ids: Vec<String> = (0..3).map(|j| format!("down-{i}-{j}")).collect();
        match server.send("/v1/batch", &batch_of(&ids)).status {
            200 => acked.extend(ids),
            503 => {
                refused += 1;
                break;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(refused, 1, "the log should fill while storage is down");
    // Storage is back: the lake catches up, the log drains, the edge accepts again.
    std::fs::remove_file(lake.join("events")).unwrap();
    let config = server.config_path();
    wait_for("the lake to catch up", || {
        message_ids(&config).len() == acked.len()
    });
    wait_for("the log to drain", || {
        server
            .send("/v1/batch", &batch_of(&["after".into()]))
            .status
            == 200
    });
    acked.push("after".into());
    wait_for("the last flush", || {
        message_ids(&config).len() == acked.len()
    });
    let mut stored = message_ids(&config);
    stored.sort();
    acked.sort();
    assert_eq!(stored, acked, "every acknowledged message once");
}

#[test]
fn sigkill_during_flushes_stores_every_acknowledged_message_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let extra = "[storage]\nflush_interval = \"50ms\"\n[log]\nsegment_size = \"256KiB\"\n";
    let config = dir.path().join("sluice.toml");
    let mut acked = Vec::new();
    for round in 0..3 {
        let mut child = ChildServer::spawn(dir.path(), extra, |_| {});
        let stop = Arc::new(AtomicBool::new(false));
        let workers = load(child.addr, 4, &format!("kill{round}-"), stop.clone());
        std::thread::sleep(Duration::from_millis(700 + 300 * round));
        child.kill();
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            acked.extend(w.join().unwrap());
        }
    }
    // A last start lets the lake catch up with what the log kept.
    let child = ChildServer::spawn(dir.path(), extra, |_| {});
    wait_for("the lake to catch up", || {
        let ids = message_ids(&config);
        acked.iter().all(|id| ids.contains(id))
    });
    drop(child);
    let mut counts: HashMap<String, usize> = HashMap::new();
    for id in message_ids(&config) {
        *counts.entry(id).or_default() += 1;
    }
    let doubled: Vec<_> = counts.iter().filter(|(_, &n)| n > 1).take(5).collect();
    assert!(doubled.is_empty(), "rows stored twice: {doubled:?}");
    assert!(acked.len() > 1000, "{} acknowledged", acked.len());
    assert!(acked.iter().all(|id| counts.contains_key(id)));
}

#[test]
fn sigkill_during_compaction_loses_and_doubles_no_row() {
    let dir = tempfile::tempdir().unwrap();
    let extra = "[storage]\nflush_interval = \"20ms\"\ncompaction_interval = \"50ms\"\n";
    let config = dir.path().join("sluice.toml");
    // Many small files: one flush per batch (each batch waits for the last one's file, so a lake
    // writer slowed by a busy machine cannot gather several into one flush).
    let events = dir.path().join("data/lake/events");
    let event_files = || {
        let Ok(dates) = std::fs::read_dir(&events) else {
            return 0;
        };
        dates
            .flatten()
            .flat_map(|date| std::fs::read_dir(date.path()).into_iter().flatten())
            .flatten()
            .filter(|f| f.path().extension().is_some_and(|x| x == "parquet"))
            .count()
    };
    let mut sent = Vec::new();
    {
        let mut child = ChildServer::spawn(dir.path(), extra, |_| {});
        for i in 0..40 {
            let ids: Vec<String> = (0..50).map(|j| format!("cmp-{i}-{j}")).collect();
            let r = request(
                child.addr,
                "POST",
                "/v1/batch",
                &[("Authorization", &basic(WRITE_KEY))],
                batch_of(&ids).as_bytes(),
            );
            assert_eq!(r.status, 200);
            sent.extend(ids);
            wait_for("the batch's flush", || event_files() > i);
        }
        assert!(child.terminate().success());
    }
    // Make those files an old, closed partition.
    let today = std::fs::read_dir(&events)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let old = events.join("date=2020-01-01");
    std::fs::rename(&today, &old).unwrap();
    let count_files = || {
        std::fs::read_dir(&old)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "parquet")
            })
            .count()
    };
    let files_before = count_files();
    assert!(files_before > 5, "{files_before} files");
    // Kill the server at different moments of compaction passes.
    for delay in [60, 90, 120, 150] {
        let mut child = ChildServer::spawn(dir.path(), extra, |_| {});
        std::thread::sleep(Duration::from_millis(delay));
        child.kill();
        let mut counts: HashMap<String, usize> = HashMap::new();
        for id in message_ids(&config) {
            *counts.entry(id).or_default() += 1;
        }
        assert!(
            counts.values().all(|&n| n == 1),
            "a row counted twice after a kill at {delay} ms"
        );
        assert!(
            sent.iter().all(|id| counts.contains_key(id)),
            "a row lost after a kill at {delay} ms"
        );
    }
    let child = ChildServer::spawn(dir.path(), extra, |_| {});
    wait_for("compaction to finish", || count_files() == 1);
    drop(child);
    let mut stored = message_ids(&config);
    stored.sort();
    sent.sort();
    assert_eq!(stored, sent);
}
