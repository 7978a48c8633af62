//! Keeping the log's consumers alive. A stage (the lake writer, the profile stage, a destination)
//! that fails — returns an error it cannot retry, or panics — is started again from its durable
//! state (its log cursor, its store, its queue) after a backoff from 100 ms doubling to 30 s.
//! Left dead, its cursor would pin the intake log until the disk filled.
//!
//! Every failure is counted (`sluice_stage_restarts_total{stage}`) and shown on `/readyz` with
//! the stage's last error. A stage says which log record it has in hand
//! ([`Health::working_on`]); when it fails three times in a row on the same record, that record
//! is *set aside*: the next time the stage reaches it, [`Health::set_aside`] gives the reason,
//! and the stage files it where it keeps what it cannot process (the quarantine, or its dead
//! letter) and goes on. Nothing is dropped.
//!
//! This module knows nothing of what the stages do; `crate::app` wires them to it.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::Serialize;

use crate::metrics::{StageLabels, StageMetrics};

/// A messageId that makes a stage panic, in unit tests only: how the tests make a stage fail on
/// one record.
#[cfg(test)]
pub(crate) const POISON_FOR_TESTS: &str = "poison-for-tests";

/// Failures in a row on one record before it is set aside.
pub const SET_ASIDE_AFTER: u32 = 3;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A stage that ran this long since its last failure starts its backoff again from the first.
const HEALTHY_AFTER: Duration = Duration::from_secs(60);
/// No record in hand.
const NONE: u64 = u64::MAX;

/// What one stage's supervisor knows of it; shared with the stage and the operations endpoints.
pub struct Health {
    stage: String,
    /// The log consumer whose lag is the stage's.
    consumer: String,
    metrics: Arc<StageMetrics>,
    restarts: AtomicU64,
    /// The log offset of the record in hand, or [`NONE`].
    at: AtomicU64,
    failure: Mutex<Failure>,
    /// Whether any record is to be set aside (read on every record: no lock when none is).
    setting_aside: AtomicBool,
    set_aside: Mutex<HashMap<u64, String>>,
}

#[derive(Default)]
struct Failure {
    /// The last failure's reason, and when; cleared once the stage runs well again.
    last: Option<(String, Instant)>,
    /// The record the last failures were on, and how many in a row.
    on: Option<u64>,
    in_a_row: u32,
}

/// A stage as `/readyz` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub stage: String,
    pub consumer: String,
    /// `running`, or `restarting` while it recovers from a failure.
    pub state: &'static str,
    pub restarts: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl Health {
    pub fn new(stage: &str, consumer: &str, metrics: Arc<StageMetrics>) -> Arc<Health> {
        // Shown at 0 from the start, so that a dashboard has a series to watch.
        let labels = StageLabels {
            stage: stage.to_string(),
        };
        let _ = metrics.restarts.get_or_create(&labels);
        let _ = metrics.set_aside.get_or_create(&labels);
        Arc::new(Health {
            stage: stage.to_string(),
            consumer: consumer.to_string(),
            metrics,
            restarts: AtomicU64::new(0),
            at: AtomicU64::new(NONE),
            failure: Mutex::new(Failure::default()),
            setting_aside: AtomicBool::new(false),
            set_aside: Mutex::new(HashMap::new()),
        })
    }

    pub fn stage(&self) -> &str {
        &self.stage
    }

    /// The stage is processing the record at `offset`: a failure now is blamed on it.
    pub fn working_on(&self, offset: u64) {
        self.at.store(offset, Ordering::Relaxed);
    }

    /// The stage is between records: a failure now is not blamed on any.
    pub fn between_records(&self) {
        self.at.store(NONE, Ordering::Relaxed);
    }

    /// Why the record at `offset` is to be set aside, when it is. The stage then files it away
    /// and calls [`Health::was_set_aside`].
    pub fn set_aside(&self, offset: u64) -> Option<String> {
        if !self.setting_aside.load(Ordering::Relaxed) {
            return None;
        }
        self.set_aside.lock().unwrap().get(&offset).cloned()
    }

    /// The record at `offset` was filed away (durably, or it will be redone).
    pub fn was_set_aside(&self, offset: u64) {
        let mut set = self.set_aside.lock().unwrap();
        if set.remove(&offset).is_some() {
            self.count(&self.metrics.set_aside);
            tracing::warn!(stage = %self.stage, offset, "a log record the stage kept failing on was set aside");
        }
        self.setting_aside.store(!set.is_empty(), Ordering::Relaxed);
    }

    /// Records a failure: counts a restart and, after [`SET_ASIDE_AFTER`] in a row on the same
    /// record, marks that record to be set aside. For stages that restart themselves; the
    /// supervisor's loop calls it for the others.
    pub fn failed(&self, reason: &str) {
        self.restarts.fetch_add(1, Ordering::Relaxed);
        self.count(&self.metrics.restarts);
        let at = self.at.swap(NONE, Ordering::Relaxed);
        let mut failure = self.failure.lock().unwrap();
        failure.last = Some((crate::text::clip(reason.to_string(), 1_000), Instant::now()));
        if at == NONE {
            failure.on = None;
            failure.in_a_row = 0;
            return;
        }
        if failure.on == Some(at) {
            failure.in_a_row += 1;
        } else {
            failure.on = Some(at);
            failure.in_a_row = 1;
        }
        if failure.in_a_row >= SET_ASIDE_AFTER {
            failure.on = None;
            failure.in_a_row = 0;
            let reason = format!(
                "the {} stage failed on it {SET_ASIDE_AFTER} times: {reason}",
                self.stage
            );
            self.set_aside.lock().unwrap().insert(at, reason);
            self.setting_aside.store(true, Ordering::Relaxed);
        }
    }

    /// The stage has run well since its last failure for long enough to be called healthy.
    fn recovered(&self) -> bool {
        let failure = self.failure.lock().unwrap();
        failure
            .last
            .as_ref()
            .is_none_or(|(_, at)| at.elapsed() >= HEALTHY_AFTER)
    }

    pub fn status(&self) -> Status {
        let failure = self.failure.lock().unwrap();
        let recent = failure
            .last
            .as_ref()
            .filter(|(_, at)| at.elapsed() < HEALTHY_AFTER);
        Status {
            stage: self.stage.clone(),
            consumer: self.consumer.clone(),
            state: if recent.is_some() {
                "restarting"
            } else {
                "running"
            },
            restarts: self.restarts.load(Ordering::Relaxed),
            last_error: recent.map(|(reason, _)| reason.clone()),
        }
    }

    fn count(&self, family: &Family<StageLabels, Counter>) {
        family
            .get_or_create(&StageLabels {
                stage: self.stage.clone(),
            })
            .inc();
    }
}

/// Every supervised stage, for `/readyz`.
#[derive(Default)]
pub struct Stages(Mutex<Vec<Arc<Health>>>);

impl Stages {
    pub fn add(&self, health: Arc<Health>) {
        self.0.lock().unwrap().push(health);
    }

    pub fn statuses(&self) -> Vec<Status> {
        self.0.lock().unwrap().iter().map(|h| h.status()).collect()
    }
}

/// Runs `run` until it returns `Ok`, again after each failure (an error or a panic), with
/// backoff. `run` starts the stage from its durable state each time. `stopping` says when a
/// failure should end the loop instead (the process is shutting down); then `None`.
pub fn supervise<T, E: std::fmt::Display>(
    health: &Health,
    stopping: impl Fn() -> bool,
    mut run: impl FnMut() -> Result<T, E>,
) -> Option<T> {
    let mut backoff = FIRST_BACKOFF;
    loop {
        health.between_records();
        let reason = match catch_unwind(AssertUnwindSafe(&mut run)) {
            Ok(Ok(done)) => return Some(done),
            Ok(Err(e)) => e.to_string(),
            Err(panic) => panic_message(panic.as_ref()),
        };
        if health.recovered() {
            backoff = FIRST_BACKOFF;
        }
        health.failed(&reason);
        tracing::error!(stage = %health.stage, error = %reason, retry_in = ?backoff, "a stage failed; starting it again from its durable state");
        let until = Instant::now() + backoff;
        while Instant::now() < until {
            if stopping() {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20).min(backoff));
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".to_string());
    format!("panicked: {text}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health() -> Arc<Health> {
        Health::new("lake", "lake", Arc::default())
    }

    #[test]
    fn a_failing_stage_is_run_again_until_it_succeeds_and_each_failure_counts() {
        let h = health();
        let mut runs = 0;
        let done = supervise(
            &h,
            || false,
            || {
                runs += 1;
                match runs {
                    1 => Err("disk on fire".to_string()),
                    2 => panic!("a bug"),
                    _ => Ok(runs),
                }
            },
        );
        assert_eq!(done, Some(3));
        let status = h.status();
        assert_eq!(status.restarts, 2);
        assert_eq!(status.state, "restarting", "failed within the last minute");
        assert!(status.last_error.unwrap().contains("a bug"));
        assert_eq!(
            h.metrics
                .restarts
                .get_or_create(&StageLabels {
                    stage: "lake".into()
                })
                .get(),
            2
        );
    }

    #[test]
    fn a_record_failed_on_three_times_in_a_row_is_set_aside() {
        let h = health();
        let mut runs = 0;
        let mut set_aside = Vec::new();
        supervise(
            &h,
            || false,
            || -> Result<(), String> {
                runs += 1;
                for offset in 0..10 {
                    if let Some(reason) = h.set_aside(offset) {
                        set_aside.push((offset, reason));
                        h.was_set_aside(offset);
                        continue;
                    }
                    h.working_on(offset);
                    if offset == 7 {
                        panic!("record 7 breaks the stage");
                    }
                    h.between_records();
                }
                Ok(())
            },
        );
        assert_eq!(runs, SET_ASIDE_AFTER as usize + 1);
        assert_eq!(set_aside.len(), 1);
        assert_eq!(set_aside[0].0, 7);
        assert!(
            set_aside[0].1.contains("record 7 breaks the stage"),
            "{set_aside:?}"
        );
        assert_eq!(h.set_aside(7), None, "set aside once");
    }

    #[test]
    fn failures_between_records_blame_none() {
        let h = health();
        for _ in 0..5 {
            h.between_records();
            h.failed("storage down");
        }
        h.working_on(3);
        h.failed("x");
        h.working_on(4);
        h.failed("x");
        h.working_on(3);
        h.failed("x");
        assert_eq!(h.set_aside(3), None, "not three in a row");
        assert_eq!(h.set_aside(4), None);
    }

    #[test]
    fn stopping_ends_the_loop() {
        let h = health();
        let result: Option<()> = supervise(&h, || true, || Err("down"));
        assert_eq!(result, None);
    }
}
