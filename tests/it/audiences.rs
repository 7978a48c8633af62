//! Profiles and segments end to end: messages over HTTP, segment files on disk, and what the
//! server emits into the intake log and the lake, with a hand-moved clock for time conditions.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::*;

const STALLED: &str = r#"
name = "Stalled signups"
rule = '''
let signup = user.first("Signed Up");
signup != () && signup.age() > hours(1) && !user.did("Onboarding Started")
'''
"#;

const BUYERS: &str = r#"
name = "Buyers"
rule = 'user.did("Order Completed")'
"#;

fn segment(dir: &Path, key: &str, text: &str) {
    std::fs::create_dir_all(dir.join("segments")).unwrap();
    std::fs::write(dir.join(format!("segments/{key}.toml")), text).unwrap();
}

/// The messages Sluice emitted itself, in log order.
fn emitted(log_dir: &Path) -> Vec<Value> {
    dump(log_dir)
        .into_iter()
        .filter(|e| e["source"] == "sluice")
        .map(|e| e["message"].clone())
        .collect()
}

/// `Audience Entered` / `Audience Exited` tracks for `segment`, as (userId or anonymousId,
/// entered).
fn changes(log_dir: &Path, segment: &str) -> Vec<(String, bool)> {
    emitted(log_dir)
        .into_iter()
        .filter(|m| m["type"] == "track" && m["properties"]["audience_key"] == segment)
        .map(|m| {
            let who = m["userId"].as_str().or(m["anonymousId"].as_str()).unwrap();
            (who.to_string(), m["event"] == "Audience Entered")
        })
        .collect()
}

fn wait_for<T>(what: &str, within: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(started.elapsed() < within, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn admin(server: &Server, path: &str) -> Response {
    request(
        server.addr,
        "GET",
        path,
        &[("Authorization", &format!("Bearer {ADMIN_TOKEN}"))],
        b"",
    )
}

fn send(server: &Server, message: Value) {
    let r = server.send("/v1/batch", &json!({ "batch": [message] }).to_string());
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}

#[test]
fn a_message_over_http_becomes_an_audience_entered_in_the_lake() {
    let dir = tempfile::tempdir().unwrap();
    segment(dir.path(), "buyers", BUYERS);
    let extra = "[storage]\nurl = \"file://./data/lake\"\nflush_interval = \"1s\"\n";
    let server = Server::start_in(dir, extra);
    send(
        &server,
        json!({"type": "identify", "userId": "u1", "anonymousId": "a1", "traits": {"plan": "pro"}}),
    );
    send(
        &server,
        json!({"type": "track", "event": "Order Completed", "userId": "u1", "properties": {"revenue": 10}}),
    );
    let log = server.log_dir();
    wait_for(
        "Audience Entered in the log",
        Duration::from_secs(10),
        || (changes(&log, "buyers") == [("u1".to_string(), true)]).then_some(()),
    );
    let messages = emitted(&log);
    let entered = messages.iter().find(|m| m["type"] == "track").unwrap();
    assert_eq!(
        entered["properties"],
        json!({"audience_key": "buyers", "audience_name": "Buyers", "buyers": true})
    );
    assert_eq!(entered["anonymousId"], "a1");
    assert_eq!(entered["context"]["sluice"]["audience"], "buyers");
    let identify = messages.iter().find(|m| m["type"] == "identify").unwrap();
    assert_eq!(identify["traits"], json!({"buyers": true}));
    assert_eq!(identify["userId"], "u1");

    // It reaches the lake like any message.
    let rows = wait_for("the lake row", Duration::from_secs(15), || {
        let r = request(
            server.addr,
            "POST",
            "/admin/query",
            &[("Authorization", &format!("Bearer {ADMIN_TOKEN}"))],
            json!({"sql": "SELECT user_id, source, properties FROM events WHERE event = 'Audience Entered'"})
                .to_string()
                .as_bytes(),
        );
        let rows = r.json();
        (rows.as_array().is_some_and(|a| !a.is_empty())).then_some(rows)
    });
    assert_eq!(rows[0]["user_id"], "u1");
    assert_eq!(rows[0]["source"], "sluice");

    // The admin API sees the profile under either identifier, and the segment.
    let profile = wait_for("the committed profile", Duration::from_secs(5), || {
        let p = admin(&server, "/admin/profiles/u1").json();
        (p["segments"] == json!(["buyers"])).then_some(p)
    });
    assert_eq!(profile["segments"], json!(["buyers"]));
    assert_eq!(profile["traits"]["plan"], "pro");
    assert_eq!(profile["events"]["Order Completed"]["count"], 1);
    assert!(profile["identities"]
        .as_array()
        .unwrap()
        .contains(&json!({"type": "anonymousId", "id": "a1"})));
    assert_eq!(admin(&server, "/admin/profiles/a1").json(), profile);
    assert_eq!(admin(&server, "/admin/profiles/nobody").status, 404);
    let segments = admin(&server, "/admin/segments").json();
    assert_eq!(segments[0]["key"], "buyers");
    assert_eq!(segments[0]["size"], 1);
    assert_eq!(segments[0]["errors"], 0);
    assert!(segments[0]["last_change"].is_string());
    let members = admin(&server, "/admin/segments/buyers/members?limit=10").json();
    assert_eq!(members["members"][0]["userId"], "u1");
    assert_eq!(members["next"], Value::Null);
    assert_eq!(admin(&server, "/admin/segments/nope/members").status, 404);
    assert_eq!(
        server.get("/admin/segments").status,
        401,
        "the admin token is required"
    );
}

#[test]
fn a_time_condition_flips_at_its_moment_and_after_a_restart() {
    time_condition_flips("", false);
}

/// With no save for an hour, and traffic that never lets the stage go quiet (which saves too),
/// the timers live in the profile stage's memory (the store has none of them): they must come
/// due all the same, and the save at shutdown keeps them.
#[test]
fn a_time_condition_flips_between_saves_too() {
    time_condition_flips("[profiles]\nsave_interval = \"1h\"\n", true);
}

/// Sends a message of another user every 100 ms until dropped.
struct Traffic {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(server: &Server) -> Traffic {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (addr, stopped) = (server.addr, stop.clone());
        let thread = std::thread::spawn(move || {
            while !stopped.load(std::sync::atomic::Ordering::SeqCst) {
                let body =
                    json!({"batch": [{"type": "track", "event": "Noise", "userId": "other"}]});
                let auth = basic(WRITE_KEY);
                let r = request(
                    addr,
                    "POST",
                    "/v1/batch",
                    &[("Authorization", &auth)],
                    body.to_string().as_bytes(),
                );
                assert_eq!(r.status, 200);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Traffic {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn time_condition_flips(config: &str, busy: bool) {
    let dir = tempfile::tempdir().unwrap();
    segment(dir.path(), "stalled", STALLED);
    let clock = ManualClock::at("2026-01-01T00:00:00Z");
    let server = Server::start_with_clock(dir, config, clock.clock());
    let traffic = busy.then(|| Traffic::start(&server));
    let log = server.log_dir();
    let signup = |server: &Server, user: &str, clock: &ManualClock| {
        let at = sluice::vocabulary::format_time(clock.now());
        send(
            server,
            json!({"type": "track", "event": "Signed Up", "userId": user, "timestamp": at}),
        );
    };
    signup(&server, "u1", &clock);
    std::thread::sleep(Duration::from_millis(700));
    clock.advance(Duration::from_secs(59 * 60));
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(changes(&log, "stalled"), [], "not an hour yet");
    clock.advance(Duration::from_secs(2 * 60));
    wait_for("u1 to enter on the timer", Duration::from_secs(3), || {
        (changes(&log, "stalled") == [("u1".to_string(), true)]).then_some(())
    });

    // A second signup, then a restart while its hour passes: the timer is durable.
    signup(&server, "u2", &clock);
    std::thread::sleep(Duration::from_millis(500));
    drop(traffic);
    let dir = server.stop();
    clock.advance(Duration::from_secs(2 * 3600));
    let server = Server::start_with_clock(dir, config, clock.clock());
    let log = server.log_dir();
    wait_for(
        "u2 to enter after the restart",
        Duration::from_secs(5),
        || (changes(&log, "stalled").len() == 2).then_some(()),
    );
    assert_eq!(
        changes(&log, "stalled"),
        [("u1".to_string(), true), ("u2".to_string(), true)],
        "u1 entered exactly once"
    );
    // Onboarding takes u2 out.
    send(
        &server,
        json!({"type": "track", "event": "Onboarding Started", "userId": "u2"}),
    );
    wait_for("u2 to leave", Duration::from_secs(5), || {
        (changes(&log, "stalled").last() == Some(&("u2".to_string(), false))).then_some(())
    });
}

const BROWSING: &str = r#"
name = "Browsing"
rule = 'user.did("Page Viewed", minutes(20))'
"#;

/// Appends accepted messages to the intake log in `log_dir` as if they had arrived at
/// `received` (while no server runs on it).
fn append_arrived(log_dir: &Path, received: chrono::DateTime<chrono::Utc>, messages: &[Value]) {
    use sluice::entry::{Entry, Status};
    use sluice::intake_log::{IntakeLog, LogOptions, RecordBatch};
    let options = LogOptions {
        dir: log_dir.to_path_buf(),
        segment_size: 64 << 20,
        max_size: 1 << 30,
    };
    let log = IntakeLog::open(options, Default::default()).unwrap();
    let mut batch = RecordBatch::default();
    for m in messages {
        let body = m.to_string();
        let id = m["messageId"].as_str().unwrap();
        batch.push_with(|b| {
            Entry::encode(b, Status::Accepted, received, "web", id, "", |b| {
                b.extend_from_slice(body.as_bytes())
            })
        });
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(log.append(batch)).unwrap();
}

/// A stage that starts far behind the log (an hour of traffic arrived while it was stopped)
/// lives through that hour in the order it passed: u1 viewed a page every ten minutes, so a
/// twenty-minute window never closed on u1, and catching up must not emit an exit and a
/// second entry. The hour spans several of the stage's batches.
#[test]
fn a_stage_catching_up_on_the_log_does_not_flap_memberships() {
    let dir = tempfile::tempdir().unwrap();
    segment(dir.path(), "browsing", BROWSING);
    let clock = ManualClock::at("2026-01-01T00:00:00Z");
    let page = |at: chrono::DateTime<chrono::Utc>, n: usize| {
        let at = sluice::vocabulary::format_time(at);
        json!({"type": "page", "name": "Home", "userId": "u1", "messageId": format!("p{n}"),
               "timestamp": at, "receivedAt": at, "properties": {}, "context": {}})
    };
    let server = Server::start_with_clock(dir, "", clock.clock());
    send(&server, page(clock.now(), 0));
    let log = server.log_dir();
    wait_for("u1 to enter", Duration::from_secs(5), || {
        (changes(&log, "browsing") == [("u1".to_string(), true)]).then_some(())
    });
    let dir = server.stop();

    let per_round = sluice::profile_stage::BATCH + 100;
    for round in 1..=6 {
        clock.advance(Duration::from_secs(10 * 60));
        let at = sluice::vocabulary::format_time(clock.now());
        let mut messages = vec![page(clock.now(), round)];
        messages.extend((0..per_round).map(|i| {
            json!({"type": "track", "event": "Noise", "userId": format!("f{round}"),
                   "messageId": format!("n{round}-{i}"), "timestamp": at, "receivedAt": at,
                   "properties": {}, "context": {}})
        }));
        append_arrived(&dir.path().join("data/log"), clock.now(), &messages);
    }
    clock.advance(Duration::from_secs(60));
    let server = Server::start_with_clock(dir, "", clock.clock());
    let log = server.log_dir();
    let applied = format!("sluice_profile_messages_total {}\n", 6 * (per_round + 1));
    wait_for("the stage to catch up", Duration::from_secs(60), || {
        let metrics = String::from_utf8(server.get("/metrics").body).unwrap();
        metrics.contains(&applied).then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        changes(&log, "browsing"),
        [("u1".to_string(), true)],
        "no exit while u1's next page view was in the log"
    );
    // Caught up, the window closes on the clock as always.
    clock.advance(Duration::from_secs(20 * 60));
    wait_for("u1 to leave", Duration::from_secs(5), || {
        (changes(&log, "browsing") == [("u1".to_string(), true), ("u1".to_string(), false)])
            .then_some(())
    });
}

#[test]
fn anonymous_history_merges_into_the_user_and_two_user_ids_never_do() {
    let dir = tempfile::tempdir().unwrap();
    segment(
        dir.path(),
        "browsed_then_bought",
        "rule = 'user.count(\"Page Viewed\") >= 2 && user.did(\"Order Completed\")'",
    );
    let server = Server::start_in(dir, "");
    let log = server.log_dir();
    send(
        &server,
        json!({"type": "identify", "userId": "u1", "traits": {"email": "u1@example.com"}}),
    );
    send(
        &server,
        json!({"type": "page", "name": "Home", "anonymousId": "a1"}),
    );
    send(
        &server,
        json!({"type": "page", "name": "Pricing", "anonymousId": "a1"}),
    );
    // The purchase carries both ids: the anonymous profile merges into u1's.
    send(
        &server,
        json!({"type": "track", "event": "Order Completed", "userId": "u1", "anonymousId": "a1"}),
    );
    wait_for("u1 to enter", Duration::from_secs(10), || {
        (changes(&log, "browsed_then_bought") == [("u1".to_string(), true)]).then_some(())
    });
    // The change is in the log just before the store commits the batch: wait for the commit.
    let profile = wait_for("the merged profile", Duration::from_secs(5), || {
        let p = admin(&server, "/admin/profiles/a1").json();
        (p["identities"][0]["id"] == "u1").then_some(p)
    });
    assert_eq!(profile["events"]["Page Viewed"]["count"], 2);
    assert_eq!(profile["traits"]["email"], "u1@example.com");
    assert_eq!(
        profile["identities"][0],
        json!({"type": "userId", "id": "u1"})
    );

    // Another userId on the same device is a conflict: counted, never merged.
    send(
        &server,
        json!({"type": "identify", "userId": "u2", "anonymousId": "a1"}),
    );
    wait_for("u2's profile", Duration::from_secs(10), || {
        (admin(&server, "/admin/profiles/u2").status == 200).then_some(())
    });
    let u2 = admin(&server, "/admin/profiles/u2").json();
    assert_eq!(u2["identities"], json!([{"type": "userId", "id": "u2"}]));
    assert_eq!(
        admin(&server, "/admin/profiles/a1").json()["identities"][0]["id"],
        "u1"
    );
    let metrics = String::from_utf8(server.get("/metrics").body).unwrap();
    assert!(
        metrics.contains("sluice_identity_conflicts_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("sluice_identity_merges_total 1"),
        "{metrics}"
    );
}

#[test]
fn a_new_segment_is_backfilled_once_unless_it_says_not_to() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("segments")).unwrap();
    let server = Server::start_in(dir, "");
    for user in ["u1", "u2"] {
        send(
            &server,
            json!({"type": "track", "event": "Order Completed", "userId": user}),
        );
    }
    send(&server, json!({"type": "page", "userId": "u3"}));
    wait_for("the profiles", Duration::from_secs(10), || {
        (admin(&server, "/admin/profiles/u3").status == 200).then_some(())
    });
    let dir = server.dir.path().to_path_buf();
    segment(&dir, "buyers", BUYERS);
    segment(&dir, "new_buyers", &format!("backfill = false\n{BUYERS}"));
    let log = server.log_dir();
    wait_for("the backfill", Duration::from_secs(10), || {
        let mut got = changes(&log, "buyers");
        got.sort();
        (got == [("u1".to_string(), true), ("u2".to_string(), true)]).then_some(())
    });
    wait_for(
        "the backfill to be recorded",
        Duration::from_secs(5),
        || {
            let s = admin(&server, "/admin/segments").json();
            s.as_array()
                .unwrap()
                .iter()
                .all(|s| s["backfilled"] == true)
                .then_some(())
        },
    );
    assert_eq!(changes(&log, "new_buyers"), [], "backfill = false");
    // New messages count for both.
    send(
        &server,
        json!({"type": "track", "event": "Order Completed", "userId": "u3"}),
    );
    wait_for("u3 in both", Duration::from_secs(10), || {
        (changes(&log, "new_buyers") == [("u3".to_string(), true)]
            && changes(&log, "buyers").len() == 3)
            .then_some(())
    });
    // A restart does not backfill again.
    let data = server.stop();
    let server = Server::start_in(data, "");
    let log = server.log_dir();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(changes(&log, "buyers").len(), 3);
    // An edited rule is backfilled again: now two orders are needed, and everyone leaves.
    let dir = server.dir.path().to_path_buf();
    segment(
        &dir,
        "buyers",
        "rule = 'user.count(\"Order Completed\") >= 2'",
    );
    wait_for("the exits", Duration::from_secs(10), || {
        (changes(&log, "buyers")
            .iter()
            .filter(|(_, entered)| !entered)
            .count()
            == 3)
            .then_some(())
    });
}

#[test]
fn runaway_and_broken_rules_change_nothing_and_ingestion_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    segment(dir.path(), "looping", "rule = 'loop {} true'");
    segment(dir.path(), "broken", "rule = 'user.did(\"A\") &&'");
    segment(dir.path(), "deep", "rule = 'fn f(n) { f(n + 1) } f(0)'");
    segment(dir.path(), "good", "rule = 'user.did(\"A\")'");
    let server = Server::start_in(dir, "");
    let started = Instant::now();
    let users = 50;
    for u in 0..users {
        send(
            &server,
            json!({"type": "track", "event": "A", "userId": format!("u{u}")}),
        );
    }
    let sent_in = started.elapsed();
    let log = server.log_dir();
    wait_for("every user in `good`", Duration::from_secs(20), || {
        (changes(&log, "good").len() == users).then_some(())
    });
    assert!(
        sent_in < Duration::from_secs(10),
        "ingestion took {sent_in:?}"
    );
    let segments: HashMap<String, Value> = admin(&server, "/admin/segments")
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["key"].as_str().unwrap().to_string(), s.clone()))
        .collect();
    assert!(
        !segments.contains_key("broken"),
        "a rule that does not compile is not loaded"
    );
    for key in ["looping", "deep"] {
        assert_eq!(segments[key]["size"], 0);
        assert!(
            segments[key]["errors"].as_u64().unwrap() >= users as u64,
            "{key}"
        );
    }
    assert_eq!(changes(&log, "looping"), []);
    let metrics = String::from_utf8(server.get("/metrics").body).unwrap();
    assert!(
        metrics.contains(r#"sluice_segment_rule_failures_total{segment="looping",class="Budget"}"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("sluice_segment_refused_files 1"),
        "{metrics}"
    );
}

#[test]
fn a_crash_mid_stream_emits_each_change_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    segment(dir.path(), "buyers", BUYERS);
    let users = 500;
    let send_user = |addr, u: usize| {
        let body = json!({"batch": [{"type": "track", "event": "Order Completed", "userId": format!("u{u}"), "messageId": format!("m{u}")}]});
        request(
            addr,
            "POST",
            "/v1/batch",
            &[("Authorization", &basic(WRITE_KEY))],
            body.to_string().as_bytes(),
        )
    };
    // Four SIGKILLs, each right after a burst, while the profile stage is busy with it.
    let mut running = None;
    for round in 0..5 {
        let mut child = ChildServer::spawn(dir.path(), "", |_| {});
        for u in round * 100..(round + 1) * 100 {
            assert_eq!(send_user(child.addr, u).status, 200);
        }
        if round < 4 {
            child.kill();
        } else {
            running = Some(child);
        }
    }
    let log = dir.path().join("data/log");
    let entered = wait_for("every user to enter", Duration::from_secs(30), || {
        let got = changes(&log, "buyers");
        (got.len() >= users).then_some(got)
    });
    std::thread::sleep(Duration::from_millis(500));
    let entered_after = changes(&log, "buyers");
    assert_eq!(entered_after.len(), users, "no change emitted twice");
    let mut who: Vec<&String> = entered.iter().map(|(u, _)| u).collect();
    who.sort();
    who.dedup();
    assert_eq!(who.len(), users);
    drop(running);
}

#[test]
fn a_backfill_reads_history_the_profiles_never_kept_from_the_lake() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("segments")).unwrap();
    let extra = "[storage]\nurl = \"file://./data/lake\"\nflush_interval = \"1s\"\n";
    let server = Server::start_in(dir, extra);
    for (user, revenue) in [("u1", 150), ("u1", 200), ("u2", 50)] {
        send(
            &server,
            json!({"type": "track", "event": "Order Completed", "userId": user, "properties": {"revenue": revenue}}),
        );
    }
    wait_for("the orders in the lake", Duration::from_secs(15), || {
        let r = request(
            server.addr,
            "POST",
            "/admin/query",
            &[("Authorization", &format!("Bearer {ADMIN_TOKEN}"))],
            br#"{"sql": "SELECT count(*) AS n FROM events WHERE event = 'Order Completed'"}"#,
        );
        (r.json()[0]["n"] == 3).then_some(())
    });
    // No rule loaded so far needed order history, so the profiles hold none; the new rule does.
    let profile = admin(&server, "/admin/profiles/u1").json();
    assert_eq!(profile["events"]["Order Completed"]["count"], 2);
    segment(
        server.dir.path(),
        "spenders",
        "rule = 'user.sum(\"Order Completed\", \"revenue\", days(30)) >= 300.0'",
    );
    let log = server.log_dir();
    wait_for(
        "u1 to enter from lake history",
        Duration::from_secs(10),
        || (changes(&log, "spenders") == [("u1".to_string(), true)]).then_some(()),
    );
    // The history is on the profile now: a further order of u2 counts with the old one.
    send(
        &server,
        json!({"type": "track", "event": "Order Completed", "userId": "u2", "properties": {"revenue": 260}}),
    );
    wait_for("u2 to enter", Duration::from_secs(10), || {
        (changes(&log, "spenders").len() == 2).then_some(())
    });
}

/// The profile stage hands its saves to a saver thread and goes on while they commit. With a
/// save after every batch and a cache of 100 profiles, nearly every batch runs while the save of
/// the one before is in flight: links, merges, evictions and reloads then go through the
/// overlays of what is not committed yet. The store must end up as a stage that saved once at
/// the end leaves it, and as the messages say.
#[test]
fn saves_in_flight_while_the_stage_runs_on_leave_the_store_as_one_save_would() {
    const USERS: usize = 1_000;
    let arrived = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
        .unwrap()
        .to_utc();
    let at = sluice::vocabulary::format_time(arrived);
    let mut messages = Vec::new();
    let mut push = |mut m: Value| {
        m["messageId"] = json!(format!("m{}", messages.len()));
        m["timestamp"] = json!(at);
        messages.push(m);
    };
    // A profile per userId and one per anonymousId, merged by the identify; later pages name
    // only the anonymousId and must reach the merged profile. About 3.5 batches of the stage.
    for k in 0..USERS {
        push(json!({"type": "track", "event": "Signed Up", "userId": format!("u{k}")}));
    }
    for _ in 0..2 {
        for k in 0..USERS {
            push(json!({"type": "page", "name": "Home", "anonymousId": format!("a{k}")}));
        }
    }
    for k in 0..USERS {
        push(
            json!({"type": "identify", "userId": format!("u{k}"), "anonymousId": format!("a{k}")}),
        );
    }
    for _ in 0..2 {
        for k in 0..USERS {
            push(json!({"type": "page", "name": "Pricing", "anonymousId": format!("a{k}")}));
        }
    }
    for k in (0..USERS).step_by(2) {
        push(json!({"type": "track", "event": "Order Completed", "userId": format!("u{k}")}));
    }
    let run = |config: &str| {
        let dir = tempfile::tempdir().unwrap();
        segment(
            dir.path(),
            "readers",
            "rule = 'user.count(\"Page Viewed\") >= 4'",
        );
        segment(
            dir.path(),
            "buyers",
            "rule = 'user.count(\"Page Viewed\") >= 3 && user.did(\"Order Completed\")'",
        );
        segment(dir.path(), "recent", BROWSING);
        append_arrived(&dir.path().join("data/log"), arrived, &messages);
        let clock = ManualClock::at("2026-01-01T00:00:01Z");
        let server = Server::start_with_clock(dir, config, clock.clock());
        let profiles = wait_for("every profile saved", Duration::from_secs(60), || {
            let last = admin(&server, &format!("/admin/profiles/u{}", USERS - 2));
            (last.status == 200 && last.json()["events"]["Order Completed"]["count"] == 1)
                .then_some(())?;
            let all: Vec<Value> = (0..USERS)
                .map(|k| admin(&server, &format!("/admin/profiles/a{k}")).json())
                .collect();
            Some(all)
        });
        (server, clock, profiles)
    };
    let (reference, _, expected) = run("[profiles]\nsave_interval = \"1h\"\n");
    let (server, clock, saved) = run("[profiles]\nsave_interval = \"0s\"\ncache_size = 100\n");
    for (k, p) in saved.iter().enumerate() {
        assert_eq!(p["identities"][0]["id"], format!("u{k}"), "{p}");
        assert_eq!(p["events"]["Page Viewed"]["count"], 4, "{p}");
    }
    assert_eq!(saved, expected);
    for key in ["readers", "buyers", "recent"] {
        let mut got = changes(&server.log_dir(), key);
        let mut want = changes(&reference.log_dir(), key);
        got.sort();
        want.sort();
        assert_eq!(got, want, "{key}");
    }
    assert_eq!(changes(&server.log_dir(), "buyers").len(), USERS / 2);
    let sizes = |server: &Server| {
        let segments = admin(server, "/admin/segments").json();
        let sizes: HashMap<String, u64> = segments
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["key"].as_str().unwrap().to_string(),
                    s["size"].as_u64().unwrap(),
                )
            })
            .collect();
        sizes
    };
    assert_eq!(sizes(&server), sizes(&reference));
    assert_eq!(sizes(&server)["buyers"], USERS as u64 / 2);
    let profiles = |server: &Server| {
        let metrics = String::from_utf8(server.get("/metrics").body).unwrap();
        let line = metrics
            .lines()
            .find(|l| l.starts_with("sluice_profiles "))
            .map(str::to_string);
        line.unwrap_or_else(|| panic!("{metrics}"))
    };
    assert_eq!(
        profiles(&server),
        format!("sluice_profiles {USERS}"),
        "the anonymous profiles merged away are gone"
    );
    let metrics = String::from_utf8(server.get("/metrics").body).unwrap();
    assert!(
        metrics.contains("sluice_profile_stage_redos_total 0"),
        "every batch went through the first time: {metrics}"
    );

    drop(reference);

    // What was saved is what a restart starts from: a page by anonymousId reaches the user.
    let dir = server.stop();
    let server = Server::start_with_clock(dir, "", clock.clock());
    send(
        &server,
        json!({"type": "page", "name": "Docs", "anonymousId": "a7"}),
    );
    wait_for("the page on u7", Duration::from_secs(10), || {
        let p = admin(&server, "/admin/profiles/u7").json();
        (p["events"]["Page Viewed"]["count"] == 5).then_some(())
    });
    assert_eq!(profiles(&server), format!("sluice_profiles {USERS}"));
}
