//! What happens to acknowledged messages when things go wrong: a torn write, a SIGKILL under
//! load, a disk that refuses writes, a shutdown signal.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::*;

#[test]
fn a_torn_tail_is_cut_on_restart_and_every_complete_record_kept() {
    let server = Server::start("");
    let ids: Vec<String> = (0..20).map(|i| format!("torn-{i}")).collect();
    for chunk in ids.chunks(5) {
        assert_eq!(server.send("/v1/batch", &batch_of(chunk)).status, 200);
    }
    let log_dir = server.log_dir();
    let dir = server.stop();
    // Cut the newest segment in the middle of its last record, as a crash during a write would.
    let mut segments: Vec<_> = std::fs::read_dir(&log_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    segments.sort();
    let newest = segments.last().unwrap();
    let len = std::fs::metadata(newest).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(newest)
        .unwrap()
        .set_len(len - 40)
        .unwrap();

    let server = Server::start_in(dir, "");
    assert_eq!(accepted_ids(&server.log_dir()), ids[..19].to_vec());
    // Writing goes on cleanly after the cut.
    assert_eq!(
        server
            .send(
                "/v1/track",
                r#"{"event":"E","userId":"u","messageId":"after"}"#
            )
            .status,
        200
    );
    let dir = server.stop();
    let server = Server::start_in(dir, "");
    let after = accepted_ids(&server.log_dir());
    assert_eq!(after.len(), 20);
    assert_eq!(after.last().unwrap(), "after");
}

#[test]
fn sigkill_under_load_loses_no_acknowledged_message_and_duplicates_none() {
    let dir = tempfile::tempdir().unwrap();
    // Small segments so that the kill can land around a segment roll too.
    let extra = "[log]\nsegment_size = \"256KiB\"\n";
    let mut child = ChildServer::spawn(dir.path(), extra, |_| {});
    let stop = Arc::new(AtomicBool::new(false));
    let workers = load(child.addr, 8, "k", stop.clone());
    std::thread::sleep(Duration::from_millis(1500));
    child.kill();
    stop.store(true, Ordering::Relaxed);
    let acked: Vec<String> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    assert!(
        acked.len() > 1000,
        "the load should have got going ({} acked)",
        acked.len()
    );

    let restarted = ChildServer::spawn(dir.path(), extra, |_| {});
    let stored = accepted_ids(&dir.path().join("data/log"));
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for id in &stored {
        *counts.entry(id.as_str()).or_default() += 1;
    }
    let duplicated: Vec<_> = counts.iter().filter(|(_, &n)| n > 1).collect();
    assert!(duplicated.is_empty(), "stored twice: {duplicated:?}");
    let lost: Vec<&String> = acked
        .iter()
        .filter(|id| !counts.contains_key(id.as_str()))
        .collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged messages lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    // And the restarted server still dedups what it had accepted before the crash.
    let r = request(
        restarted.addr,
        "POST",
        "/v1/batch",
        &[("Authorization", &basic(WRITE_KEY))],
        batch_of(&acked[..5]).as_bytes(),
    );
    assert_eq!(r.status, 200);
    drop(restarted);
    assert_eq!(
        accepted_ids(&dir.path().join("data/log")).len(),
        stored.len()
    );
}

#[test]
fn a_disk_that_refuses_writes_gives_503_and_harms_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let extra = "[log]\nsegment_size = \"4MiB\"\n";
    // Files may not grow past 256 KiB: writes beyond fail with EFBIG, as on a full disk.
    let limit: u64 = 256 * 1024;
    // A first start creates the profile store (its file starts larger than the limit).
    drop(ChildServer::spawn(dir.path(), extra, |_| {}));
    let child = ChildServer::spawn(dir.path(), extra, |cmd| limit_file_size(cmd, limit));
    let mut acked = Vec::new();
    let mut refused = 0;
    for i in 0..200 {
        let ids: Vec<String> = (0..10).map(|j| format!("disk-{i}-{j}")).collect();
        let r = request(
            child.addr,
            "POST",
            "/v1/batch",
            &[("Authorization", &basic(WRITE_KEY))],
            batch_of(&ids).as_bytes(),
        );
        match r.status {
            200 => acked.extend(ids),
            503 => {
                refused += 1;
                assert!(r.header("retry-after").is_some());
            }
            other => panic!("unexpected {other}: {}", String::from_utf8_lossy(&r.body)),
        }
    }
    assert!(
        refused > 0,
        "writes past the file size limit must be refused"
    );
    assert!(!acked.is_empty());
    drop(child);
    // Space is back: everything acknowledged is there, and writing works again.
    let child = ChildServer::spawn(dir.path(), extra, |_| {});
    assert_eq!(accepted_ids(&dir.path().join("data/log")), acked);
    let r = request(
        child.addr,
        "POST",
        "/v1/batch",
        &[("Authorization", &basic(WRITE_KEY))],
        batch_of(&["after-disk".into()]).as_bytes(),
    );
    assert_eq!(r.status, 200);
}

#[test]
fn sigterm_finishes_in_flight_work_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = ChildServer::spawn(dir.path(), "", |_| {});
    let stop = Arc::new(AtomicBool::new(false));
    let workers = load(child.addr, 4, "t", stop.clone());
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let status = child.terminate();
    stop.store(true, Ordering::Relaxed);
    assert!(status.success(), "exit status {status}");
    assert!(started.elapsed() < Duration::from_secs(10));
    let acked: Vec<String> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    let stored = accepted_ids(&dir.path().join("data/log"));
    assert!(acked.iter().all(|id| stored.contains(id)));
    // A clean stop writes the recent ids to a dedup run, so the next start has nothing to
    // replay.
    let runs = std::fs::read_dir(dir.path().join("data/log/dedup")).unwrap();
    assert!(runs.count() >= 1, "no dedup run written");
}

#[test]
fn concurrent_requests_share_fsyncs() {
    let server = Server::start("");
    let sent = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..16)
        .map(|t| {
            let addr = server.addr;
            let sent = sent.clone();
            std::thread::spawn(move || {
                for n in 0..25 {
                    let body = format!(r#"{{"event":"E","userId":"u","messageId":"gc-{t}-{n}"}}"#);
                    let r = request(
                        addr,
                        "POST",
                        "/v1/track",
                        &[("Authorization", &basic(WRITE_KEY))],
                        body.as_bytes(),
                    );
                    assert_eq!(r.status, 200);
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let text = String::from_utf8(server.get("/metrics").body).unwrap();
    let fsyncs: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("sluice_log_fsyncs_total "))
        .unwrap()
        .parse()
        .unwrap();
    let sent = sent.load(Ordering::Relaxed) as f64;
    assert_eq!(sent, 400.0);
    assert!(
        fsyncs < sent,
        "{fsyncs} fsyncs for {sent} requests: group commit should share them"
    );
    let stored = Mutex::new(accepted_ids(&server.log_dir()));
    assert_eq!(stored.lock().unwrap().len(), 400);
}
