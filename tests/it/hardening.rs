//! What a hostile client, an unlucky deployment or a misbehaving receiver can try, end to end:
//! each test here failed before the fix it names.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::*;

fn admin_query(server: &Server, sql: &str) -> std::io::Result<Response> {
    try_request(
        server.addr,
        "POST",
        "/admin/query",
        &[("Authorization", &format!("Bearer {ADMIN_TOKEN}"))],
        serde_json::json!({ "sql": sql }).to_string().as_bytes(),
    )
}

/// Admin SQL only reads: no statement writes a file, a table or the lake, through the API or the
/// command line.
#[test]
fn admin_sql_cannot_write() {
    let server = Server::start("");
    let target = server.dir.path().join("written-by-sql");
    let target = target.to_str().unwrap();
    let statements = [
        format!("COPY (SELECT 1 AS a) TO '{target}.csv' STORED AS CSV"),
        format!("CREATE EXTERNAL TABLE x (a INT) STORED AS CSV LOCATION '{target}-table/'"),
        "CREATE TABLE made AS SELECT 1 AS a".to_string(),
        "CREATE VIEW seen AS SELECT 1 AS a".to_string(),
        "INSERT INTO events (message_id) VALUES ('forged')".to_string(),
        "DROP TABLE events".to_string(),
        "SET datafusion.execution.batch_size = 1".to_string(),
    ];
    for sql in &statements {
        let r = admin_query(&server, sql).unwrap();
        assert_eq!(r.status, 400, "{sql}: {}", String::from_utf8_lossy(&r.body));
        let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["--config", server.config_path().to_str().unwrap(), "query"])
            .arg(sql)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{sql}: sluice query ran it");
    }
    let left: Vec<_> = std::fs::read_dir(server.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("written-by-sql"))
        .collect();
    assert!(left.is_empty(), "SQL wrote {left:?}");
    // Reading still works, and `events` is still there.
    let r = admin_query(&server, "SELECT count(*) AS n FROM events").unwrap();
    assert_eq!(r.json(), serde_json::json!([{"n": 0}]));
}

/// A result is bounded: at most `query.max_rows` rows, and one that grows past
/// `query.max_result_bytes` is cut off with an error, never passed off as the whole result.
#[test]
fn admin_sql_results_are_bounded() {
    let server = Server::start("[query]\nmax_rows = 5\nmax_result_bytes = 4096\n");
    let r = admin_query(&server, "SELECT * FROM generate_series(1, 1000) AS t(n)").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json().as_array().unwrap().len(), 5);
    let r = admin_query(
        &server,
        "SELECT repeat('x', 2000) AS pad FROM generate_series(1, 5)",
    );
    assert!(r.is_err(), "a cut result must not read as complete: {r:?}");
    // The server is fine afterwards.
    let r = admin_query(&server, "SELECT 1 AS one").unwrap();
    assert_eq!(r.json(), serde_json::json!([{"one": 1}]));
}

/// The admin token is checked before the body is read: a client without it cannot make the
/// server wait for (or buffer) a body.
#[test]
fn the_admin_token_is_checked_before_the_body_is_read() {
    let server = Server::start("");
    for auth in ["", "Authorization: Bearer wrong\r\n"] {
        let mut stream = TcpStream::connect(server.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let head = format!(
            "POST /admin/query HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 1000000\r\n\r\n{{\"sql\":"
        );
        stream.write_all(head.as_bytes()).unwrap();
        let started = Instant::now();
        let mut answer = [0u8; 12];
        stream.read_exact(&mut answer).unwrap();
        let status = String::from_utf8_lossy(&answer[9..12]).to_string();
        assert!(
            status == "401" || status == "403",
            "answered {status} without the token"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}

/// Every consumer of the log is visible: `/readyz` lists each stage with its state, restarts and
/// lag, and `/metrics` counts restarts per stage.
#[test]
fn every_stage_shows_on_readyz_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("destinations")).unwrap();
    std::fs::write(
        dir.path().join("destinations/crm.toml"),
        format!(
            "type = \"webhook\"\nurl = \"http://127.0.0.1:{}/\"\n",
            free_port()
        ),
    )
    .unwrap();
    let server = Server::start_in(dir, "");
    let ready = server.get("/readyz");
    assert_eq!(ready.status, 200);
    let body = ready.json();
    assert_eq!(body["status"], "ready", "{body}");
    let mut stages: Vec<String> = body["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            assert_eq!(s["state"], "running", "{s}");
            assert_eq!(s["restarts"], 0, "{s}");
            assert!(s["lag"].is_u64(), "{s}");
            s["stage"].as_str().unwrap().to_string()
        })
        .collect();
    stages.sort();
    assert_eq!(stages, vec!["destination-crm", "lake", "profiles"]);
    let metrics = String::from_utf8(server.get("/metrics").body).unwrap();
    for stage in ["lake", "profiles", "destination-crm"] {
        let line = format!("sluice_stage_restarts_total{{stage=\"{stage}\"}} 0");
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }
}

/// The settings analytics.js loads are not taken from forwarded host headers: one forged request
/// through a shared cache used to point every visitor's browser at another host.
#[test]
fn analytics_js_settings_ignore_forwarded_hosts() {
    let path = format!("/v1/projects/{WRITE_KEY}/settings");
    let forged = [
        ("X-Forwarded-Host", "evil.example"),
        ("X-Forwarded-Proto", "https"),
        ("Forwarded", "host=evil.example;proto=https"),
    ];
    let server = Server::start("");
    let r = request(server.addr, "GET", &path, &forged, b"");
    let io = &r.json()["integrations"]["Segment.io"];
    assert_eq!(io["apiHost"], format!("{}/v1", server.addr));
    assert_eq!(io["protocol"], "http");
    assert_eq!(r.header("cache-control"), Some("private, max-age=60"));

    let server =
        Server::start_with_server_keys("public_url = \"https://events.example.com/sluice/\"", "");
    let r = request(server.addr, "GET", &path, &forged, b"");
    let io = &r.json()["integrations"]["Segment.io"];
    assert_eq!(io["apiHost"], "events.example.com/sluice/v1");
    assert_eq!(io["protocol"], "https");
    assert_eq!(r.header("cache-control"), Some("public, max-age=60"));
}

/// The stages after the log on a full disk: the lake's Parquet files and the profile store can
/// not grow, ingestion goes on (the log's small segments still fit), and once there is space
/// again every acknowledged message is in the lake once, every user has a profile, and each
/// user's `Audience Entered` was emitted once.
#[test]
fn a_full_disk_under_the_lake_and_the_profile_store_loses_and_doubles_nothing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("segments")).unwrap();
    std::fs::write(
        dir.path().join("segments/buyers.toml"),
        "name = \"Buyers\"\nrule = 'user.did(\"Order Completed\")'\n",
    )
    .unwrap();
    let extra = "[log]\nsegment_size = \"256KiB\"\n[storage]\nflush_interval = \"3s\"\n[profiles]\nsave_interval = \"200ms\"\n";
    // The stores start at about 1 MiB; no file may grow past 1.5 MiB (EFBIG, as on a full disk).
    drop(ChildServer::spawn(dir.path(), extra, |_| {}));
    let child = ChildServer::spawn(dir.path(), extra, |cmd| limit_file_size(cmd, 1536 * 1024));
    let users = 600;
    let mut acked = Vec::new();
    // Text that does not compress, so that a flush file and the profile store both grow past
    // the limit: per user an identify with a 3 KB trait and a track with 3 KB of properties.
    let pad = |u: usize, what: &str| -> String {
        (0..190)
            .map(|i| {
                format!(
                    "{:016x}",
                    xxhash_rust::xxh3::xxh3_64(format!("{what}-{u}-{i}").as_bytes())
                )
            })
            .collect()
    };
    for round in 0..12 {
        let mut batch = Vec::new();
        for u in round * 50..(round + 1) * 50 {
            for (kind, id) in [
                ("identify", format!("full-i-{u}")),
                ("track", format!("full-t-{u}")),
            ] {
                acked.push(id.clone());
                batch.push(if kind == "identify" {
                    format!(
                        r#"{{"type":"identify","userId":"u{u}","messageId":"{id}","traits":{{"bio":"{}"}}}}"#,
                        pad(u, "bio")
                    )
                } else {
                    format!(
                        r#"{{"type":"track","event":"Order Completed","userId":"u{u}","messageId":"{id}","properties":{{"pad":"{}"}}}}"#,
                        pad(u, "pad")
                    )
                });
            }
        }
        let body = format!("{{\"batch\":[{}]}}", batch.join(","));
        let r = request(
            child.addr,
            "POST",
            "/v1/batch",
            &[("Authorization", &basic(WRITE_KEY))],
            body.as_bytes(),
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }
    std::thread::sleep(Duration::from_secs(5));
    let stages = {
        let r = request(child.addr, "GET", "/readyz", &[], b"");
        r.json()["stages"].clone()
    };
    for stage in ["lake", "profiles"] {
        let found = stages
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["stage"] == stage)
            .unwrap()
            .clone();
        assert!(
            found["lag"].as_u64().unwrap() > 0,
            "the {stage} stage could not store, so the log keeps its records: {found}"
        );
    }
    drop(child);

    // Space is back.
    let child = ChildServer::spawn(dir.path(), extra, |_| {});
    let config = dir.path().join("sluice.toml");
    let deadline = Instant::now() + Duration::from_secs(60);
    let ids = loop {
        let rows = crate::lake::query(
            &config,
            "SELECT message_id FROM events WHERE source = 'web'",
        )
        .unwrap();
        let ids: Vec<String> = rows
            .iter()
            .map(|r| r["message_id"].as_str().unwrap().to_string())
            .collect();
        if ids.len() >= acked.len() || Instant::now() > deadline {
            break ids;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), ids.len(), "a row stored twice");
    let mut expected = acked.clone();
    expected.sort();
    assert_eq!(sorted, expected, "every acknowledged message in the lake");
    let entered = |log: &std::path::Path| -> Vec<String> {
        dump(log)
            .into_iter()
            .filter(|e| e["source"] == "sluice" && e["message"]["event"] == "Audience Entered")
            .map(|e| e["message"]["userId"].as_str().unwrap().to_string())
            .collect()
    };
    let log = dir.path().join("data/log");
    let deadline = Instant::now() + Duration::from_secs(30);
    while entered(&log).len() < users && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut who = entered(&log);
    assert_eq!(who.len(), users, "each user entered once");
    who.sort();
    who.dedup();
    assert_eq!(who.len(), users);
    for u in [0, 299, 599] {
        let r = request(
            child.addr,
            "GET",
            &format!("/admin/profiles/u{u}"),
            &[("Authorization", &format!("Bearer {ADMIN_TOKEN}"))],
            b"",
        );
        assert_eq!(r.status, 200, "u{u}'s profile");
        assert_eq!(r.json()["events"]["Order Completed"]["count"], 1);
    }
}

/// A client that trickles its body is answered 408 once `server.body_timeout` has passed, rather
/// than holding its connection and a worker's attention for ever.
#[test]
fn a_trickled_body_is_answered_408() {
    let server = Server::start_with_server_keys("body_timeout = \"1s\"", "");
    let mut stream = TcpStream::connect(server.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let head = format!(
        "POST /v1/batch HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\nContent-Length: 5000\r\n\r\n{{\"batch\":[",
        basic(WRITE_KEY)
    );
    stream.write_all(head.as_bytes()).unwrap();
    let started = Instant::now();
    let mut answer = [0u8; 12];
    stream.read_exact(&mut answer).unwrap();
    assert_eq!(&answer[9..12], b"408");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
}

/// A query whose client goes away is stopped: its slot (two run at once) is free again at once,
/// instead of held until the query ends or times out.
#[test]
fn a_query_whose_client_goes_away_is_stopped() {
    let server = Server::start("");
    let long = serde_json::json!({
        "sql": "SELECT count(*) AS n FROM generate_series(1, 100000000000) AS t(v) WHERE v % 7 = 3"
    })
    .to_string();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(server.addr).unwrap();
        let head = format!(
            "POST /admin/query HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nContent-Length: {}\r\n\r\n{long}",
            long.len()
        );
        stream.write_all(head.as_bytes()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut status = [0u8; 12];
        stream.read_exact(&mut status).unwrap();
        assert_eq!(&status[9..12], b"200", "the query started");
        // The client goes away without reading the result.
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = admin_query(&server, "SELECT 1 AS one").unwrap();
        if r.status == 200 {
            assert_eq!(r.json(), serde_json::json!([{"one": 1}]));
            break;
        }
        assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
        assert!(
            Instant::now() < deadline,
            "the abandoned queries still hold their slots"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
