//! Dedup over a whole window: `RATE` new messageIds a second for `HOURS` hours of simulated time
//! (a full 24 h at 2,000/s by default: 172.8 M ids), in requests of 100, with a checkpoint every
//! 30 s of simulated time, as the server runs it. Prints, every simulated hour, the ids held, the
//! memory dedup holds (`Dedup::memory`) and the process's RSS, the run files on disk, and the wall
//! time; then the cost of a lookup of a new id and of one held.
//!
//!   cargo bench --bench dedup_window                       # 2,000/s for 24 h
//!   SLUICE_BENCH_RATE=500 SLUICE_BENCH_HOURS=2 cargo bench --bench dedup_window
//!
//! Runs go to a temporary folder under $TMPDIR (on the disk by default: 2.8 GB at full size).

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures_util::FutureExt;
use sluice::config::DedupConfig;
use sluice::intake_log::dedup::{key, Dedup};
use sluice::metrics::DedupMetrics;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn disk_mb(dir: &std::path::Path) -> (usize, f64) {
    let files: Vec<_> = std::fs::read_dir(dir).map_or(Vec::new(), |e| e.flatten().collect());
    let bytes: u64 = files
        .iter()
        .filter_map(|f| f.metadata().ok())
        .map(|m| m.len())
        .sum();
    (files.len(), bytes as f64 / 1e6)
}

fn main() {
    let rate = env("SLUICE_BENCH_RATE", 2_000);
    let hours = env("SLUICE_BENCH_HOURS", 24);
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("dedup");
    let metrics = Arc::new(DedupMetrics::default());
    let dedup = Dedup::new(
        &DedupConfig {
            window: Duration::from_secs(24 * 3600),
            max_ids: 250_000_000,
        },
        runs.clone(),
        metrics.clone(),
    );
    let t0 = DateTime::<Utc>::from_timestamp(1_800_000_000, 0).unwrap();
    let started = Instant::now();
    println!(
        "{rate} ids/s for {hours} h of simulated time, requests of 100, a checkpoint every 30 s"
    );
    println!("hour  ids held      dedup MB  RSS MB   runs  disk MB   wall s");
    let mut n: u64 = 0;
    let per_checkpoint = rate * 30;
    for second in (0..hours * 3600).step_by(30) {
        let now = t0 + chrono::Duration::seconds(second as i64);
        for chunk in 0..per_checkpoint.div_ceil(100) {
            let size = 100.min(per_checkpoint - chunk * 100);
            let keys: Vec<Option<u128>> = (0..size)
                .map(|i| Some(key("web", &(n + i).to_string())))
                .collect();
            n += size;
            let (reservation, duplicate) = dedup.reserve(&keys, || 0).now_or_never().unwrap();
            assert!(duplicate.iter().all(|d| !d), "a new id called a duplicate");
            reservation.commit(now);
        }
        dedup.checkpoint(0, now).unwrap();
        if (second + 30) % 3600 == 0 {
            let (files, disk) = disk_mb(&runs);
            println!(
                "{:>4}  {:>11}  {:>8.1}  {:>6.1}  {:>5}  {:>7.1}  {:>7.1}",
                (second + 30) / 3600,
                dedup.len(),
                dedup.memory() as f64 / 1e6,
                rss_mb(),
                files,
                disk,
                started.elapsed().as_secs_f64()
            );
        }
    }

    // Lookups: ids never seen (the common case), and ids held (a retry).
    let now = t0 + chrono::Duration::seconds((hours * 3600) as i64);
    let lookups = 1_000_000u64;
    let checks_before = metrics.disk_checks.get();
    let started = Instant::now();
    for i in 0..lookups / 100 {
        let keys: Vec<Option<u128>> = (0..100)
            .map(|j| Some(key("new", &(i * 100 + j).to_string())))
            .collect();
        let (reservation, duplicate) = dedup.reserve(&keys, || 0).now_or_never().unwrap();
        assert!(duplicate.iter().all(|d| !d));
        drop(reservation);
    }
    let new_ns = started.elapsed().as_nanos() as f64 / lookups as f64;
    let false_hits = metrics.disk_checks.get() - checks_before;
    let held = 20_000u64;
    let started = Instant::now();
    for i in 0..held {
        let old = (i * 7_919) % n;
        let (_r, duplicate) = dedup
            .reserve(&[Some(key("web", &old.to_string()))], || 0)
            .now_or_never()
            .unwrap();
        assert!(duplicate[0], "an id held was not found");
    }
    let held_us = started.elapsed().as_secs_f64() * 1e6 / held as f64;
    println!(
        "lookup of a new id: {new_ns:.0} ns (with reserve and release; {false_hits} of {lookups} read a run), of an id held: {held_us:.1} µs"
    );
    let _ = now;
}
