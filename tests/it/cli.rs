//! The `sluice` commands other than serving, run as a user would run them.

use std::process::Command;

use crate::support::*;

fn sluice(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn check_accepts_the_shipped_demo_config() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/sluice.toml");
    let out = sluice(&["--config", path, "check"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(": ok"));
}

#[test]
fn check_prints_every_problem_with_its_place_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = \"nowhere\"\ntypo = 1\n\n[[sources]]\nname = \"web\"\n\n[log]\nmax_size = \"lots\"\n",
    )
    .unwrap();
    let out = sluice(&["--config", path.to_str().unwrap(), "check"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8(out.stdout).unwrap();
    let p = path.display();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert!(
        lines[0].starts_with(&format!("{p}:2:10: `server.listen`")),
        "{text}"
    );
    assert!(
        lines[1].starts_with(&format!("{p}:3:1: unknown key `server.typo`")),
        "{text}"
    );
    assert!(
        lines[2].starts_with(&format!("{p}:5:1: a source needs a `write_key`")),
        "{text}"
    );
    assert!(
        lines[3].starts_with(&format!("{p}:9:12: `log.max_size`")),
        "{text}"
    );
}

#[test]
fn serve_refuses_a_broken_config_with_the_same_messages() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.toml");
    std::fs::write(&path, "[server\n").unwrap();
    let out = sluice(&["--config", path.to_str().unwrap(), "serve"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains(&format!("{}:1:", path.display())), "{err}");
    let out = sluice(&["--config", "/no/such/sluice.toml", "serve"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read config"));
}

#[test]
fn log_dump_prints_json_lines_from_an_offset_or_a_cursor() {
    let server = Server::start("");
    let ids: Vec<String> = (0..5).map(|i| format!("dump-{i}")).collect();
    server.send("/v1/batch", &batch_of(&ids));
    let config = server.dir.path().join("sluice.toml");
    let config = config.to_str().unwrap();

    let out = sluice(&["--config", config, "log", "dump"]);
    assert!(out.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5);
    assert_eq!(lines[0]["offset"], 0);
    assert_eq!(lines[4]["messageId"], "dump-4");
    assert_eq!(lines[2]["message"]["properties"]["order_id"], "o-dump-2");

    let out = sluice(&["--config", config, "log", "dump", "--from", "3"]);
    assert_eq!(String::from_utf8(out.stdout).unwrap().lines().count(), 2);

    // The dedup consumer's cursor has not moved yet: from it, everything.
    let out = sluice(&["--config", config, "log", "dump", "--cursor", "dedup"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8(out.stdout).unwrap().lines().count(), 5);
    let out = sluice(&["--config", config, "log", "dump", "--cursor", "nobody"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no consumer named `nobody`"));
}

#[test]
fn serve_logs_json_lines_with_log_format_json() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let path = dir.path().join("sluice.toml");
    std::fs::write(&path, config_text(&format!("127.0.0.1:{port}"), "")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "--log-format",
            "json",
            "--config",
            path.to_str().unwrap(),
            "serve",
        ])
        .env("SLUICE_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let started = std::time::Instant::now();
    while try_request(addr, "GET", "/healthz", &[], b"").is_err() {
        assert!(started.elapsed() < std::time::Duration::from_secs(30));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let messages: Vec<&str> = lines
        .iter()
        .filter_map(|l| l["fields"]["message"].as_str())
        .collect();
    assert!(messages.contains(&"sluice is serving"), "{messages:?}");
    assert!(messages.contains(&"shut down cleanly"), "{messages:?}");
}

#[test]
fn check_reports_breaking_versions_and_schemas_that_do_not_compile() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sluice.toml");
    std::fs::write(&config, config_text("127.0.0.1:0", "")).unwrap();
    let schemas = dir.path().join("schemas");
    std::fs::create_dir_all(&schemas).unwrap();
    std::fs::write(
        schemas.join("v1.json"),
        "{\n  \"x-sluice\": {\"type\": \"track\", \"event\": \"Paid\", \"version\": 1},\n  \"properties\": {\n    \"amount\": {\"type\": \"number\"}\n  }\n}\n",
    )
    .unwrap();
    std::fs::write(
        schemas.join("v2.json"),
        "{\n  \"x-sluice\": {\"type\": \"track\", \"event\": \"Paid\", \"version\": 2},\n  \"properties\": {\n    \"amount\": {\"type\": \"integer\"}\n  },\n  \"required\": [\"amount\"]\n}\n",
    )
    .unwrap();
    std::fs::write(
        schemas.join("broken.json"),
        "{\n  \"x-sluice\": {\"type\": \"track\", \"event\": \"Other\"},\n  \"properties\": {\n    \"n\": {\"type\": \"numeric\"}\n  }\n}\n",
    )
    .unwrap();
    let out = sluice(&["--config", config.to_str().unwrap(), "check"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8(out.stdout).unwrap();
    let broken = schemas.join("broken.json");
    let v2 = schemas.join("v2.json");
    assert!(
        text.contains(&format!("{}:4:", broken.display())) && text.contains("does not compile"),
        "{text}"
    );
    assert!(
        text.contains(&format!("{}:4:", v2.display()))
            && text.contains("narrows the type of `amount` from number to integer"),
        "{text}"
    );
    assert!(text.contains("makes `amount` required"), "{text}");
}

#[test]
fn check_reports_broken_rules_unknown_destinations_and_failing_segment_tests() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.toml");
    std::fs::write(&path, "[[sources]]\nname = \"web\"\nwrite_key = \"k\"\n").unwrap();
    let segments = dir.path().join("segments");
    std::fs::create_dir_all(&segments).unwrap();
    std::fs::create_dir_all(dir.path().join("destinations")).unwrap();
    let destinations = dir.path().join("destinations");
    std::fs::write(
        destinations.join("crm.toml"),
        "type = \"webhook\"\nurl = \"http://127.0.0.1:9/\"\n",
    )
    .unwrap();
    std::fs::write(
        destinations.join("typo.toml"),
        "type = \"webhook\"\nurl = \"http://127.0.0.1:9/\"\nbatch = 3\n",
    )
    .unwrap();
    std::fs::write(
        destinations.join("filtered.toml"),
        "type = \"webhook\"\nurl = \"http://127.0.0.1:9/\"\nfilter = 'msg.x >'\nsegments = [\"nope\"]\n",
    )
    .unwrap();
    std::fs::write(
        segments.join("broken.toml"),
        "name = \"Broken\"\nrule = '''\nuser.did(\"A\") &&\n'''\n",
    )
    .unwrap();
    std::fs::write(
        segments.join("routed.toml"),
        "destinations = [\"crm\", \"nowhere\"]\nrule = 'true'\n",
    )
    .unwrap();
    std::fs::write(
        segments.join("wrong.toml"),
        "rule = 'user.did(\"A\")'\n\n[[test]]\nname = \"did A\"\nmessages = [{ type = \"track\", event = \"B\" }]\nexpect = true\n",
    )
    .unwrap();
    let out = sluice(&["--config", path.to_str().unwrap(), "check"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8(out.stdout).unwrap();
    let s = segments.display();
    assert!(
        text.contains(&format!("{s}/broken.toml:4:1: rule: Script is incomplete")),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "{s}/routed.toml:1:24: unknown destination `nowhere`"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "{s}/wrong.toml:3:1: test `did A`: expected the profile in the segment"
        )),
        "{text}"
    );
    let d = destinations.display();
    assert!(
        text.contains(&format!("{d}/typo.toml:3:1: unknown field `batch`")),
        "{text}"
    );
    assert!(
        text.contains(&format!("{d}/filtered.toml:3:")) && text.contains("filter: "),
        "{text}"
    );
    assert_eq!(text.lines().count(), 5, "{text}");
}

#[test]
fn receive_prints_each_message_it_is_posted_and_answers_200() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["receive", "--listen", &listen])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = listen.parse().unwrap();
    let post = |body: &str| {
        crate::receiver::eventually(
            "the receiver answers",
            std::time::Duration::from_secs(10),
            || {
                try_request(addr, "POST", "/hook", &[], body.as_bytes())
                    .ok()
                    .map(|r| r.status)
            },
        )
    };
    assert_eq!(post(r#"{"type":"track","event":"One"}"#), 200);
    assert_eq!(
        post(r#"{"batch":[{"event":"Two"},{"event":"Three"}]}"#),
        200
    );
    assert_eq!(post("not json"), 200);
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let lines: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(
        lines,
        [
            r#"{"event":"One","type":"track"}"#,
            r#"{"event":"Two"}"#,
            r#"{"event":"Three"}"#,
            "not json"
        ]
    );
}
