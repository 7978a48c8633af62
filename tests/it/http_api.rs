//! The Segment HTTP API against a real server on a loopback port.

use serde_json::Value;

use crate::support::*;

#[test]
fn a_track_call_is_acknowledged_and_logged_once() {
    let server = Server::start("");
    let r = server.send(
        "/v1/track",
        r#"{"event":"Signed Up","userId":"u1","messageId":"t-1"}"#,
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), serde_json::json!({"success": true}));
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    let records = dump(&server.log_dir());
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["message"]["type"], "track");
    assert_eq!(records[0]["message"]["event"], "Signed Up");
    assert_eq!(records[0]["source"], "web");
}

#[test]
fn every_single_message_path_sets_its_type() {
    let server = Server::start("");
    let cases = [
        ("/v1/track", "track", r#""event":"E""#),
        ("/v1/t", "track", r#""event":"E""#),
        ("/v1/identify", "identify", r#""traits":{"a":1}"#),
        ("/v1/i", "identify", r#""traits":{}"#),
        ("/v1/page", "page", r#""name":"Home""#),
        ("/v1/p", "page", r#""name":"Home""#),
        ("/v1/screen", "screen", r#""name":"Main""#),
        ("/v1/s", "screen", r#""name":"Main""#),
        ("/v1/group", "group", r#""groupId":"g""#),
        ("/v1/g", "group", r#""groupId":"g""#),
        ("/v1/alias", "alias", r#""previousId":"p""#),
        ("/v1/a", "alias", r#""previousId":"p""#),
    ];
    for (i, (path, _, fields)) in cases.iter().enumerate() {
        let body = format!(r#"{{"userId":"u","messageId":"p-{i}",{fields}}}"#);
        let r = server.send(path, &body);
        assert_eq!(
            r.status,
            200,
            "{path}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    let types: Vec<String> = dump(&server.log_dir())
        .iter()
        .map(|r| r["message"]["type"].as_str().unwrap().to_string())
        .collect();
    let expected: Vec<&str> = cases.iter().map(|c| c.1).collect();
    assert_eq!(types, expected);
}

#[test]
fn batch_import_and_the_short_batch_path_take_batches() {
    let server = Server::start("");
    for (n, path) in ["/v1/batch", "/v1/import", "/v1/b"].iter().enumerate() {
        let ids: Vec<String> = (0..3).map(|i| format!("{path}-{n}-{i}")).collect();
        let r = server.send(path, &batch_of(&ids));
        assert_eq!(r.status, 200, "{path}");
    }
    assert_eq!(accepted_ids(&server.log_dir()).len(), 9);
    // analytics.js telemetry is accepted and not stored.
    assert_eq!(server.send("/v1/m", r#"{"series":[]}"#).status, 200);
    assert_eq!(accepted_ids(&server.log_dir()).len(), 9);
}

#[test]
fn each_auth_form() {
    let server = Server::start("");
    let single = r#"{"event":"E","userId":"u"}"#;
    // Basic auth, write key as user name with an empty password.
    assert_eq!(
        server
            .post(
                "/v1/track",
                &[("Authorization", &basic(WRITE_KEY))],
                single.as_bytes()
            )
            .status,
        200
    );
    // writeKey in the body of a single call and of a batch.
    let in_body = format!(r#"{{"event":"E","userId":"u","writeKey":"{WRITE_KEY}"}}"#);
    assert_eq!(
        server.post("/v1/track", &[], in_body.as_bytes()).status,
        200
    );
    let batch = format!(
        r#"{{"writeKey":"{WRITE_KEY}","batch":[{}]}}"#,
        track("auth-b")
    );
    assert_eq!(server.post("/v1/batch", &[], batch.as_bytes()).status, 200);
    // Missing, unknown, and unreadable keys.
    let missing = server.post("/v1/track", &[], single.as_bytes());
    assert_eq!(missing.status, 401);
    assert_eq!(
        missing.json(),
        serde_json::json!({"success": false, "error": "missing write key"})
    );
    let unknown = server.post(
        "/v1/track",
        &[("Authorization", &basic("wrong"))],
        single.as_bytes(),
    );
    assert_eq!(unknown.status, 401);
    assert_eq!(unknown.json()["error"], "unknown write key");
    let garbled = server.post(
        "/v1/track",
        &[("Authorization", "Basic !!!")],
        single.as_bytes(),
    );
    assert_eq!(garbled.status, 401);
    let bearer = server.post(
        "/v1/track",
        &[("Authorization", "Bearer x")],
        single.as_bytes(),
    );
    assert_eq!(bearer.status, 401);
    assert_eq!(
        dump(&server.log_dir()).len(),
        3,
        "refused requests store nothing"
    );
}

#[test]
fn gzip_and_text_plain_bodies_are_accepted() {
    let server = Server::start("");
    let body = batch_of(&["gz-1".into(), "gz-2".into()]);
    let r = server.post(
        "/v1/batch",
        &[
            ("Authorization", &basic(WRITE_KEY)),
            ("Content-Encoding", "gzip"),
        ],
        &gzip(body.as_bytes()),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // sendBeacon posts text/plain with the key in the body.
    let beacon = format!(
        r#"{{"writeKey":"{WRITE_KEY}","batch":[{}]}}"#,
        track("beacon-1")
    );
    let r = server.post(
        "/v1/b",
        &[("Content-Type", "text/plain;charset=UTF-8")],
        beacon.as_bytes(),
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        accepted_ids(&server.log_dir()),
        vec!["gz-1", "gz-2", "beacon-1"]
    );
    let r = server.post(
        "/v1/batch",
        &[
            ("Authorization", &basic(WRITE_KEY)),
            ("Content-Encoding", "gzip"),
        ],
        b"this is not gzip",
    );
    assert_eq!(r.status, 400);
    assert!(r.json()["error"].as_str().unwrap().contains("gzip"));
    let r = server.post(
        "/v1/batch",
        &[
            ("Authorization", &basic(WRITE_KEY)),
            ("Content-Encoding", "br"),
        ],
        body.as_bytes(),
    );
    assert_eq!(r.status, 400);
}

#[test]
fn malformed_json_is_a_400_that_stores_nothing() {
    let server = Server::start("");
    for body in [
        r#"{"batch":[{"type":"track""#,
        "",
        "null x",
        "{\"batch\": 5}",
    ] {
        let r = server.send("/v1/batch", body);
        assert_eq!(r.status, 400, "{body}");
        let j = r.json();
        assert_eq!(j["success"], false);
        assert!(
            j["error"].as_str().unwrap().starts_with("malformed JSON"),
            "{j}"
        );
    }
    let r = server.send("/v1/track", "{not json}");
    assert_eq!(r.status, 400);
    assert!(dump(&server.log_dir()).is_empty());
}

#[test]
fn each_missing_field_is_rejected_with_its_reason_and_quarantined() {
    let server = Server::start("");
    let cases = [
        ("/v1/track", r#"{"userId":"u"}"#, "track needs `event`"),
        (
            "/v1/track",
            r#"{"event":"E"}"#,
            "`userId` or `anonymousId` is required",
        ),
        (
            "/v1/identify",
            r#"{"traits":{"a":1}}"#,
            "`userId` or `anonymousId` is required",
        ),
        ("/v1/group", r#"{"userId":"u"}"#, "group needs `groupId`"),
        ("/v1/alias", r#"{"userId":"u"}"#, "alias needs `previousId`"),
        ("/v1/alias", r#"{"previousId":"p"}"#, "alias needs `userId`"),
        (
            "/v1/batch",
            r#"{"batch":[{"userId":"u","event":"E"}]}"#,
            "`type` is missing",
        ),
        (
            "/v1/page",
            r#"{"userId":"u","properties":[1]}"#,
            "`properties` must be an object",
        ),
    ];
    for (path, body, reason) in cases {
        let r = server.send(path, body);
        assert_eq!(r.status, 400, "{path} {body}");
        let j = r.json();
        assert_eq!(j["success"], false);
        assert_eq!(j["accepted"], 0);
        assert_eq!(j["rejected"][0]["index"], 0);
        assert_eq!(j["rejected"][0]["error"], reason, "{path} {body}");
    }
    let records = dump(&server.log_dir());
    assert_eq!(records.len(), cases.len(), "every rejected message is kept");
    for (record, (_, _, reason)) in records.iter().zip(cases) {
        assert_eq!(record["status"], "rejected");
        assert_eq!(record["reason"], reason);
    }
}

#[test]
fn a_partial_batch_answers_200_with_the_detail() {
    let server = Server::start("");
    let big = format!(
        r#"{{"type":"track","event":"Big","userId":"u","messageId":"big-1","properties":{{"x":"{}"}}}}"#,
        "y".repeat(33 * 1024)
    );
    let body = format!(
        r#"{{"batch":[{},{{"type":"track","userId":"u","messageId":"bad-1"}},{big},{}]}}"#,
        track("good-1"),
        track("good-2")
    );
    let r = server.send("/v1/batch", &body);
    assert_eq!(r.status, 200);
    let j = r.json();
    assert_eq!(j["success"], true);
    assert_eq!(j["accepted"], 2);
    let rejected = j["rejected"].as_array().unwrap();
    assert_eq!(rejected.len(), 2);
    assert_eq!(rejected[0]["index"], 1);
    assert_eq!(rejected[0]["messageId"], "bad-1");
    assert_eq!(rejected[1]["index"], 2);
    assert!(rejected[1]["error"].as_str().unwrap().contains("32 KB"));
    assert_eq!(accepted_ids(&server.log_dir()), vec!["good-1", "good-2"]);
}

#[test]
fn each_limit_answers_413_naming_it() {
    let server = Server::start("");
    let big_single = format!(
        r#"{{"event":"E","userId":"u","properties":{{"x":"{}"}}}}"#,
        "y".repeat(32 * 1024)
    );
    let r = server.send("/v1/track", &big_single);
    assert_eq!(r.status, 413);
    assert!(
        r.json()["error"].as_str().unwrap().contains("32 KB"),
        "{:?}",
        r.json()
    );

    let ids: Vec<String> = (0..2501).map(|i| format!("n{i}")).collect();
    let too_many = format!(
        r#"{{"batch":[{}]}}"#,
        ids.iter()
            .map(|i| format!(r#"{{"type":"screen","userId":"{i}"}}"#))
            .collect::<Vec<_>>()
            .join(",")
    );
    assert!(too_many.len() < 500 * 1024);
    let r = server.send("/v1/batch", &too_many);
    assert_eq!(r.status, 413);
    assert!(r.json()["error"]
        .as_str()
        .unwrap()
        .contains("2500 messages"));

    let huge: Vec<String> = (0..40).map(|i| format!("h{i}")).collect();
    let mut huge_body = batch_of(&huge);
    huge_body.insert_str(1, &format!(r#""pad":"{}","#, "z".repeat(500 * 1024)));
    let r = server.send("/v1/batch", &huge_body);
    assert_eq!(r.status, 413);
    assert!(r.json()["error"].as_str().unwrap().contains("500 KB"));
    assert!(dump(&server.log_dir()).is_empty());
}

#[test]
fn a_gzip_bomb_is_refused_with_413_without_a_memory_spike() {
    let dir = tempfile::tempdir().unwrap();
    let child = ChildServer::spawn(dir.path(), "", |_| {});
    let bomb = gzip(&vec![b' '; 200 << 20]); // 200 MB of spaces, about 200 KB compressed
    assert!(bomb.len() < 500 * 1024);
    let before = peak_rss_kib(child.child.id());
    for _ in 0..3 {
        let r = request(
            child.addr,
            "POST",
            "/v1/batch",
            &[
                ("Authorization", &basic(WRITE_KEY)),
                ("Content-Encoding", "gzip"),
            ],
            &bomb,
        );
        assert_eq!(r.status, 413);
        assert!(r.json()["error"].as_str().unwrap().contains("500 KB"));
    }
    let grew_kib = peak_rss_kib(child.child.id()).saturating_sub(before);
    assert!(grew_kib < 20 * 1024, "peak memory grew by {grew_kib} KiB");
}

#[test]
fn duplicates_are_acknowledged_but_stored_once_even_across_a_restart() {
    let server = Server::start("");
    assert_eq!(
        server
            .send("/v1/batch", &batch_of(&["d-1".into(), "d-2".into()]))
            .status,
        200
    );
    assert_eq!(
        server
            .send(
                "/v1/track",
                r#"{"event":"E","userId":"u","messageId":"d-1"}"#
            )
            .status,
        200
    );
    let dir = server.stop();
    let server = Server::start_in(dir, "");
    let r = server.send("/v1/batch", &batch_of(&["d-2".into(), "d-3".into()]));
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), serde_json::json!({"success": true}));
    assert_eq!(accepted_ids(&server.log_dir()), vec!["d-1", "d-2", "d-3"]);
}

#[test]
fn clock_skew_is_corrected() {
    let server = Server::start("");
    // The device clock runs a day behind.
    let r = server.send(
        "/v1/batch",
        r#"{"sentAt":"2020-01-02T00:00:10Z","batch":[
            {"type":"track","event":"E","userId":"u","messageId":"skew","timestamp":"2020-01-02T00:00:00Z"}]}"#,
    );
    assert_eq!(r.status, 200);
    let m = &dump(&server.log_dir())[0]["message"];
    let received = sluice::vocabulary::parse_time(m["receivedAt"].as_str().unwrap()).unwrap();
    let timestamp = sluice::vocabulary::parse_time(m["timestamp"].as_str().unwrap()).unwrap();
    assert_eq!((received - timestamp).num_seconds(), 10);
    assert_eq!(m["originalTimestamp"], "2020-01-02T00:00:00Z");
    assert_eq!(m["sentAt"], "2020-01-02T00:00:10Z");
}

#[test]
fn batch_context_merges_into_each_message() {
    let server = Server::start("");
    let r = server.send(
        "/v1/batch",
        r#"{"context":{"library":{"name":"batch-lib"},"ip":"9.9.9.9"},"integrations":{"All":true},
            "batch":[{"type":"identify","userId":"u","messageId":"ctx-1","context":{"ip":"1.1.1.1"}}]}"#,
    );
    assert_eq!(r.status, 200);
    let m = &dump(&server.log_dir())[0]["message"];
    assert_eq!(m["context"]["ip"], "1.1.1.1");
    assert_eq!(m["context"]["library"]["name"], "batch-lib");
    assert_eq!(m["integrations"]["All"], true);
}

#[test]
fn cors_preflight_lets_any_origin_post() {
    let server = Server::start("");
    for path in ["/v1/t", "/v1/batch", "/v1/projects/x/settings", "/anything"] {
        let r = request(
            server.addr,
            "OPTIONS",
            path,
            &[
                ("Origin", "https://shop.example"),
                ("Access-Control-Request-Method", "POST"),
                (
                    "Access-Control-Request-Headers",
                    "content-type,authorization",
                ),
            ],
            b"",
        );
        assert_eq!(r.status, 204, "{path}");
        assert_eq!(r.header("access-control-allow-origin"), Some("*"));
        assert!(r
            .header("access-control-allow-methods")
            .unwrap()
            .contains("POST"));
        assert_eq!(
            r.header("access-control-allow-headers"),
            Some("content-type,authorization")
        );
    }
}

#[test]
fn analytics_js_settings_point_back_at_this_server() {
    let server = Server::start("");
    let r = server.get(&format!("/v1/projects/{WRITE_KEY}/settings"));
    assert_eq!(r.status, 200);
    let j: Value = r.json();
    let io = &j["integrations"]["Segment.io"];
    assert_eq!(io["apiKey"], WRITE_KEY);
    assert_eq!(io["apiHost"], format!("{}/v1", server.addr));
    assert_eq!(io["protocol"], "http");
    assert_eq!(server.get("/v1/projects/nope/settings").status, 404);
}

#[test]
fn the_rate_limit_answers_429_with_retry_after() {
    // The shared config's source has no limit; this one has.
    let server = Server::start(
        r#"
[[sources]]
name = "limited"
write_key = "limited-key"
rate_limit = 10
"#,
    );
    let auth = basic("limited-key");
    let ids: Vec<String> = (0..10).map(|i| format!("rl-{i}")).collect();
    let r = server.post(
        "/v1/batch",
        &[("Authorization", &auth)],
        batch_of(&ids).as_bytes(),
    );
    assert_eq!(r.status, 200);
    let r = server.post(
        "/v1/batch",
        &[("Authorization", &auth)],
        batch_of(&["rl-x".into()]).as_bytes(),
    );
    assert_eq!(r.status, 429);
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry));
    assert_eq!(r.json()["success"], false);
    // The other source is not limited by this one.
    assert_eq!(
        server
            .send("/v1/batch", &batch_of(&["other".into()]))
            .status,
        200
    );
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let r = server.post(
        "/v1/batch",
        &[("Authorization", &auth)],
        batch_of(&["rl-y".into()]).as_bytes(),
    );
    assert_eq!(r.status, 200, "the allowance refills");
}

#[test]
fn a_full_log_answers_503_with_retry_after_and_keeps_what_it_has() {
    let server = Server::start("[log]\nsegment_size = \"8KiB\"\nmax_size = \"40KiB\"\n");
    let mut acknowledged = Vec::new();
    let mut refused = 0;
    for i in 0..60 {
        let ids: Vec<String> = (0..3).map(|j| format!("full-{i}-{j}")).collect();
        let r = server.send("/v1/batch", &batch_of(&ids));
        match r.status {
            200 => acknowledged.extend(ids),
            503 => {
                refused += 1;
                assert_eq!(r.header("retry-after"), Some("5"));
                assert!(r.json()["error"].as_str().unwrap().contains("full"));
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert!(refused > 0, "the log should fill up");
    assert_eq!(server.get("/readyz").status, 503);
    assert_eq!(accepted_ids(&server.log_dir()), acknowledged);
}

#[test]
fn health_readiness_and_metrics() {
    let server = Server::start("");
    assert_eq!(server.get("/healthz").status, 200);
    assert_eq!(server.get("/readyz").status, 200);
    server.send("/v1/batch", &batch_of(&["m-1".into(), "m-1".into()]));
    server.send("/v1/track", r#"{"userId":"u"}"#);
    server.post("/v1/track", &[], b"{}");
    let text = String::from_utf8(server.get("/metrics").body).unwrap();
    for needle in [
        r#"sluice_ingest_messages_total{source="web",outcome="accepted"} 1"#,
        r#"sluice_ingest_messages_total{source="web",outcome="duplicate"} 1"#,
        r#"sluice_ingest_messages_total{source="web",outcome="rejected"} 1"#,
        r#"sluice_http_requests_total{route="track",status="401"} 1"#,
        r#"sluice_http_requests_total{route="batch",status="200"} 1"#,
        "sluice_log_fsyncs_total",
        "sluice_log_fsync_duration_seconds_bucket",
        "sluice_log_size_bytes",
        r#"sluice_log_consumer_lag_records{consumer="dedup"}"#,
        "sluice_dedup_ids 1",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    assert!(!text.contains(WRITE_KEY), "no write key in labels");
    assert!(!text.contains("user-m-1"), "no user data in labels");
}

#[test]
fn unknown_paths_are_json_404s() {
    let server = Server::start("");
    let r = server.get("/v2/track");
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["success"], false);
}
