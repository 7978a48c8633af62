//! The delivery engine of one destination: reads the intake log through its own cursor, keeps
//! each user's messages in order, batches, limits the rate and the requests in flight, retries,
//! and dead-letters what will never be taken.
//!
//! ## Where a message waits
//! - **Buffered** (memory): read from the log, not yet tried. Their offsets hold the cursor back,
//!   so a crash re-reads them.
//! - **Parked** (the destination's [`Queue`], durable): messages of a user whose request failed,
//!   and everything after them for that user, until that user is through; and, when the
//!   destination lags while the log fills (its buffer is full and the log holds more than
//!   [`SPILL_AT`] of its `max_size`), everything buffered. While the destination is down
//!   (paused), it reads nothing new until the log fills that far. Once
//!   parked, a message no longer holds the log: a dead or slow destination never keeps the
//!   intake log's disk.
//! - **Dead** (the queue's dead letter): rejected with a 4xx other than 408/429, retried for
//!   longer than `max_retry_age`, or its filter or transform failed.
//!
//! ## Order
//! A user has at most one request in flight, and a user is either buffered or parked: once a
//! user is parked, its later messages go to the queue behind the parked ones. A failing user
//! waits; the others go on.
//!
//! ## Failure
//! 5xx, 408, 429, timeouts and connection errors retry that batch's users with exponential
//! backoff from `retry_backoff` (1 s) to 5 min with jitter, or after `Retry-After`, which pauses the whole
//! destination (the receiver asked for a break). Three failures in a row pause the whole
//! destination with the same backoff, so a dead receiver gets a probe now and then, not a
//! request per parked user.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock as _, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota};
use prometheus_client::metrics::{counter::Counter, family::Family};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::files::{Delivery, BACKOFF_CAP};
use super::queue::{Change, Dead, Queue, QueueError, UserState};
use super::route::{Route, Shaped};
use super::sender::{Attempt, Outgoing, Sender};
use super::shared_read::SharedRead;
use crate::entry::Entry;
use crate::intake_log::{Consumer, IntakeLog};
use crate::metrics::{DestinationLabels, DestinationMetrics};
use crate::supervisor::Health;

/// How full the intake log may get (a share of its `max_size`) before a lagging destination
/// moves its backlog into its own queue. Below it, a destination that is merely behind reads on
/// from the log, which is cheaper than parking.
pub const SPILL_AT: f64 = 0.5;
const READ_CHUNK: usize = 1_000;
/// Failures in a row, across users, after which the whole destination pauses.
const PAUSE_AFTER: u32 = 3;
const COMMIT_EVERY: Duration = Duration::from_secs(1);

/// Counters the admin API reads.
#[derive(Debug, Default)]
pub struct Stats {
    pub delivered: AtomicU64,
    pub retried: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub backlog: AtomicU64,
}

pub enum Command {
    /// Move every dead letter back to the queue; answers how many.
    Replay(oneshot::Sender<Result<usize, String>>),
}

pub struct Pump {
    pub name: String,
    pub route: Route,
    pub sender: Arc<dyn Sender>,
    pub delivery: Delivery,
    pub consumer: Consumer,
    /// The read of the log every destination shares.
    pub reads: Arc<SharedRead>,
    /// For its end (to wait for more) and its fill level (see [`SPILL_AT`]).
    pub log: Arc<IntakeLog>,
    pub queue: Arc<Queue>,
    pub metrics: Arc<DestinationMetrics>,
    pub stats: Arc<Stats>,
    /// Its supervisor: failures are counted there, and records it keeps failing on are set
    /// aside (to its dead letter).
    pub health: Arc<Health>,
}

/// Where a message in a request came from, to know what finishing it means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Log,
    Queue(u64),
}

#[derive(Default)]
struct Batch {
    messages: Vec<Outgoing>,
    origins: Vec<Origin>,
}

struct State<'p> {
    pump: &'p mut Pump,
    labels: DestinationLabels,
    limiter: Option<DefaultDirectRateLimiter>,
    buffered: HashMap<String, VecDeque<Outgoing>>,
    buffered_count: usize,
    /// Users with buffered messages, not busy, not parked: the invariant every change keeps.
    ready: VecDeque<String>,
    busy: HashSet<String>,
    parked: HashMap<String, UserState>,
    /// Parked users that are not busy, by when they are next tried.
    due: BTreeSet<(i64, String)>,
    /// Log offsets read and wanted, not yet delivered, dead or parked: the cursor is the first.
    unfinished: BTreeSet<u64>,
    in_flight_messages: usize,
    failures_in_a_row: u32,
    paused_until: Option<Instant>,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Exponential from `start`, capped, with "equal jitter": between half and all of it.
pub fn backoff(start: Duration, attempts: u32, seed: u64) -> Duration {
    let exp = start.saturating_mul(1u32 << attempts.saturating_sub(1).min(16));
    let full = exp.min(BACKOFF_CAP);
    let fraction = (xxhash_rust::xxh3::xxh3_64(&seed.to_le_bytes()) % 1000) as f64 / 1000.0;
    full.mul_f64(0.5 + 0.5 * fraction)
}

impl Pump {
    /// Runs until `commands` closes, then waits for requests in flight and commits the cursor.
    /// When its state fails (the queue cannot be written: a full disk; the log cannot be read),
    /// it starts over from what is durable, its cursor and its queue, after a pause.
    pub async fn run(mut self, commands: &mut mpsc::Receiver<Command>) {
        let mut failures = 0;
        loop {
            let error = match self.run_once(commands).await {
                Ok(()) => return,
                Err(e) => e,
            };
            failures += 1;
            self.health.between_records();
            self.health.failed(&error.to_string());
            let pause = backoff(Duration::from_secs(1), failures, failures as u64);
            tracing::error!(destination = %self.name, error = %error, ?pause, "delivery failed; resuming from the destination's cursor and queue");
            self.consumer.rewind();
            if let Err(e) = self.queue.reopen() {
                tracing::error!(destination = %self.name, error = %e, "reopening the destination's queue");
            }
            let resume = tokio::time::sleep(pause);
            tokio::pin!(resume);
            loop {
                tokio::select! {
                    _ = &mut resume => break,
                    command = commands.recv() => match command {
                        Some(Command::Replay(reply)) => {
                            let _ = reply.send(Err(format!("the destination is recovering: {error}")));
                        }
                        None => return,
                    },
                }
            }
        }
    }

    async fn run_once(&mut self, commands: &mut mpsc::Receiver<Command>) -> anyhow::Result<()> {
        let limiter = self.delivery.rate_limit.map(|rate| {
            let rate = std::num::NonZeroU32::new(rate).expect("validated positive");
            DefaultDirectRateLimiter::direct(
                Quota::per_second(rate).allow_burst(std::num::NonZeroU32::MIN),
            )
        });
        let mut state = State {
            labels: DestinationLabels {
                destination: self.name.clone(),
            },
            limiter,
            buffered: HashMap::new(),
            buffered_count: 0,
            ready: VecDeque::new(),
            busy: HashSet::new(),
            parked: HashMap::new(),
            due: BTreeSet::new(),
            unfinished: BTreeSet::new(),
            in_flight_messages: 0,
            failures_in_a_row: 0,
            paused_until: None,
            pump: self,
        };
        // A failed run's requests were dropped with it.
        state.publish_in_flight();
        for (user, s) in state.pump.queue.users()? {
            state.due.insert((s.retry_at_ms, user.clone()));
            state.parked.insert(user, s);
        }
        let log_end = state.pump.log.watch_end();
        let mut in_flight: JoinSet<(Batch, Attempt)> = JoinSet::new();
        let mut next_commit = Instant::now() + COMMIT_EVERY;
        loop {
            state.read_log()?;
            state.spill_if_lagging()?;
            let wake = state.launch(&mut in_flight)?;
            let position = state.pump.consumer.position();
            let mut log_end = log_end.clone();
            let can_read = state.should_read();
            let wake = wake.min(next_commit);
            tokio::select! {
                Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                    let (batch, attempt) = done.expect("delivery tasks do not panic");
                    state.finish(batch, attempt)?;
                }
                _ = log_end.wait_for(|&end| end > position), if can_read => {}
                _ = tokio::time::sleep_until(wake) => {}
                command = commands.recv() => match command {
                    Some(Command::Replay(reply)) => {
                        let _ = reply.send(state.replay().map_err(|e| e.to_string()));
                    }
                    None => break,
                },
            }
            if Instant::now() >= next_commit {
                state.commit()?;
                next_commit = Instant::now() + COMMIT_EVERY;
            }
        }
        while let Some(done) = in_flight.join_next().await {
            let (batch, attempt) = done.expect("delivery tasks do not panic");
            state.finish(batch, attempt)?;
        }
        Ok(state.commit()?)
    }
}

impl State<'_> {
    /// Whether to read on: room in the buffer, and the destination not paused (down), unless the
    /// log is filling up. A down destination's messages wait in the log, which costs nothing,
    /// rather than being copied into its queue.
    fn should_read(&self) -> bool {
        if self.buffered_count >= self.pump.delivery.buffer {
            return false;
        }
        match self.paused_until {
            Some(until) if until > Instant::now() => self.log_filling(),
            _ => true,
        }
    }

    /// The log holds more than [`SPILL_AT`] of its `max_size`.
    fn log_filling(&self) -> bool {
        self.pump.log.fill() >= SPILL_AT
    }

    fn read_log(&mut self) -> anyhow::Result<()> {
        while self.should_read() {
            let records = self.pump.reads.read(&mut self.pump.consumer, READ_CHUNK)?;
            if records.is_empty() {
                return Ok(());
            }
            let mut change = Change::default();
            let mut set_aside = Vec::new();
            for record in &records {
                if let Some(reason) = self.pump.health.set_aside(record.offset) {
                    let entry = Entry::decode(&record.payload).ok();
                    let message = Outgoing {
                        offset: record.offset,
                        user: String::new(),
                        message_id: entry.as_ref().map_or("", |e| e.message_id).to_string(),
                        accepted_micros: entry.as_ref().map_or(0, |e| e.received_at_micros),
                        body: entry.map_or(&record.payload[..], |e| e.body).to_vec(),
                    };
                    change
                        .dead
                        .push(Dead::new(&message, false, None, reason, now_ms()));
                    set_aside.push(record.offset);
                    continue;
                }
                // A panic from here to the end of the record is blamed on it.
                self.pump.health.working_on(record.offset);
                // Routed records are accepted messages, so they decode.
                let (Some(routing), Ok(entry)) = (&record.routing, Entry::decode(&record.payload))
                else {
                    continue;
                };
                let head = match routing {
                    Ok(head) => head,
                    Err(e) => {
                        // Never skipped in silence: kept in the dead letter with the reason.
                        let message = Outgoing {
                            offset: record.offset,
                            user: String::new(),
                            message_id: entry.message_id.to_string(),
                            accepted_micros: entry.received_at_micros,
                            body: entry.body.to_vec(),
                        };
                        let reason = format!("the message could not be routed: {e}");
                        change
                            .dead
                            .push(Dead::new(&message, false, None, reason, now_ms()));
                        continue;
                    }
                };
                if !self.pump.route.wants(head) {
                    continue;
                }
                let mut message = Outgoing {
                    offset: record.offset,
                    user: head.user.clone(),
                    message_id: entry.message_id.to_string(),
                    accepted_micros: entry.received_at_micros,
                    body: Vec::new(),
                };
                match self.pump.route.shape(entry.body) {
                    Shaped::Dropped => {}
                    Shaped::Failed(reason) => {
                        message.body = entry.body.to_vec();
                        change
                            .dead
                            .push(Dead::new(&message, false, None, reason, now_ms()));
                    }
                    Shaped::Send(body) => {
                        message.body = body;
                        if self.parked.contains_key(&message.user) {
                            change.park.push(message);
                        } else {
                            self.buffer(message);
                        }
                    }
                }
            }
            self.pump.health.between_records();
            self.count_dead(change.dead.len());
            self.pump.queue.apply(change)?;
            for offset in set_aside {
                self.pump.health.was_set_aside(offset);
            }
        }
        Ok(())
    }

    fn buffer(&mut self, message: Outgoing) {
        self.unfinished.insert(message.offset);
        self.buffered_count += 1;
        let queue = self.buffered.entry(message.user.clone()).or_default();
        if queue.is_empty() && !self.busy.contains(&message.user) {
            self.ready.push_back(message.user.clone());
        }
        queue.push_back(message);
    }

    /// Takes a user's buffered messages out of memory (and out of `ready`).
    fn take_buffered(&mut self, user: &str) -> VecDeque<Outgoing> {
        let taken = self.buffered.remove(user).unwrap_or_default();
        self.buffered_count -= taken.len();
        if !taken.is_empty() {
            self.ready.retain(|u| u != user);
        }
        taken
    }

    /// When the buffer is full and the log is filling up, the destination is holding the log:
    /// park everything buffered (but what busy users hold), so the log cursor can move on.
    fn spill_if_lagging(&mut self) -> Result<(), QueueError> {
        if self.buffered_count < self.pump.delivery.buffer || !self.log_filling() {
            return Ok(());
        }
        let mut change = Change::default();
        let now = now_ms();
        let users: Vec<String> = self.ready.iter().cloned().collect();
        for user in users {
            let taken = self.take_buffered(&user);
            let state = UserState {
                retry_at_ms: now,
                failing_since_ms: None,
                attempts: 0,
            };
            change.users.push((user.clone(), Some(state)));
            self.parked.insert(user.clone(), state);
            self.due.insert((now, user));
            change.park.extend(taken);
        }
        let offsets: Vec<u64> = change.park.iter().map(|m| m.offset).collect();
        tracing::info!(destination = %self.pump.name, messages = offsets.len(), "destination lags: buffered messages parked in its queue");
        self.pump.queue.apply(change)?;
        for offset in offsets {
            self.unfinished.remove(&offset);
        }
        Ok(())
    }

    /// Starts requests while the concurrency, the rate and the pause allow. Returns when to look
    /// again.
    fn launch(&mut self, in_flight: &mut JoinSet<(Batch, Attempt)>) -> Result<Instant, QueueError> {
        let far = Instant::now() + Duration::from_secs(3600);
        loop {
            if in_flight.len() >= self.pump.delivery.concurrency {
                return Ok(far);
            }
            if let Some(until) = self.paused_until {
                if until > Instant::now() {
                    return Ok(until);
                }
                self.paused_until = None;
            }
            let next_due = self.next_due();
            if self.ready.is_empty() && next_due.is_none_or(|at| at > Instant::now()) {
                return Ok(next_due.unwrap_or(far));
            }
            if let Some(limiter) = &self.limiter {
                if let Err(not_until) = limiter.check() {
                    let wait = not_until.wait_time_from(DefaultClock::default().now());
                    return Ok(Instant::now() + wait);
                }
            }
            let batch = self.next_batch()?;
            if batch.messages.is_empty() {
                continue;
            }
            self.in_flight_messages += batch.messages.len();
            self.publish_in_flight();
            let sender = self.pump.sender.clone();
            in_flight.spawn(async move {
                let attempt = sender.send(&batch.messages).await;
                (batch, attempt)
            });
        }
    }

    fn next_due(&self) -> Option<Instant> {
        let (at, _) = self.due.first()?;
        // Looked at again within the hour whatever the queue says (a stored time is not trusted
        // to be near).
        let wait = (*at - now_ms()).clamp(0, 3_600_000) as u64;
        Some(Instant::now() + Duration::from_millis(wait))
    }

    /// Up to `batch_size` messages, and no more bytes than the sender takes in one request (but
    /// at least one message): parked users that are due first (their messages are older), then
    /// buffered ones. Each user's messages in order, and each user in one batch only.
    fn next_batch(&mut self) -> Result<Batch, QueueError> {
        let cap = self.pump.delivery.batch_size;
        let mut room = Room {
            bytes: self.pump.sender.max_request_bytes(),
            taken: false,
        };
        let mut batch = Batch::default();
        let now = now_ms();
        let mut through = Change::default();
        let reader = match self.due.first() {
            Some((at, _)) if *at <= now => Some(self.pump.queue.reader()?),
            _ => None,
        };
        while let Some(reader) = &reader {
            if batch.messages.len() >= cap {
                break;
            }
            let (at, user) = match self.due.first() {
                Some((at, _)) if *at <= now => self.due.pop_first().expect("checked above"),
                _ => break,
            };
            let loaded = reader.load(&user, cap - batch.messages.len())?;
            if loaded.is_empty() {
                // Through: the user's next messages are buffered again.
                self.parked.remove(&user);
                through.users.push((user, None));
                continue;
            }
            // What does not fit stays in the queue, for the user's next request.
            let fitting: Vec<_> = loaded
                .into_iter()
                .take_while(|(_, m)| room.take(m))
                .collect();
            if fitting.is_empty() {
                self.due.insert((at, user));
                break;
            }
            self.busy.insert(user);
            for (seq, message) in fitting {
                batch.messages.push(message);
                batch.origins.push(Origin::Queue(seq));
            }
        }
        drop(reader);
        self.pump.queue.apply(through)?;
        while batch.messages.len() < cap {
            let Some(user) = self.ready.pop_front() else {
                break;
            };
            let queue = self
                .buffered
                .get_mut(&user)
                .expect("ready users have messages");
            let most = queue.len().min(cap - batch.messages.len());
            let n = queue.iter().take(most).take_while(|m| room.take(m)).count();
            if n == 0 {
                self.ready.push_front(user);
                break;
            }
            for message in queue.drain(..n) {
                batch.messages.push(message);
                batch.origins.push(Origin::Log);
            }
            self.buffered_count -= n;
            if queue.is_empty() {
                self.buffered.remove(&user);
            }
            self.busy.insert(user);
        }
        Ok(batch)
    }

    fn finish(&mut self, batch: Batch, attempt: Attempt) -> Result<(), QueueError> {
        let n = batch.messages.len();
        self.in_flight_messages -= n;
        self.publish_in_flight();
        let now = now_ms();
        let mut change = Change::default();
        let mut finished_offsets = Vec::new();
        // The batch's users, in order of first appearance.
        let mut users: Vec<&str> = Vec::new();
        for m in &batch.messages {
            if !users.contains(&m.user.as_str()) {
                users.push(&m.user);
            }
        }
        match &attempt {
            Attempt::Delivered => {
                self.failures_in_a_row = 0;
                {
                    let latency = self.pump.metrics.latency.get_or_create(&self.labels);
                    let now_micros = now * 1000;
                    for (m, origin) in batch.messages.iter().zip(&batch.origins) {
                        latency.observe((now_micros - m.accepted_micros).max(0) as f64 / 1e6);
                        settle(m, *origin, &mut change, &mut finished_offsets);
                    }
                }
                self.count(&self.pump.metrics.delivered, &self.pump.stats.delivered, n);
                for user in &users {
                    if self.parked.contains_key(*user) {
                        self.reset_parked(user, now, &mut change);
                    }
                }
            }
            Attempt::Reject { status, body } => {
                self.failures_in_a_row = 0;
                let reason = format!("HTTP {status}: {body}");
                for (m, origin) in batch.messages.iter().zip(&batch.origins) {
                    change
                        .dead
                        .push(Dead::new(m, true, Some(*status), reason.clone(), now));
                    settle(m, *origin, &mut change, &mut finished_offsets);
                }
                tracing::warn!(destination = %self.pump.name, status, messages = n, "destination refused messages; they are in its dead letter");
                self.count_dead(n);
                for user in &users {
                    if self.parked.contains_key(*user) {
                        self.reset_parked(user, now, &mut change);
                    }
                }
            }
            Attempt::Retry { after, reason } => {
                // No message waits past its max_retry_age, whatever the receiver asks.
                let after = after.map(|a| a.min(self.pump.delivery.max_retry_age));
                let after = &after;
                self.failures_in_a_row += 1;
                self.count(&self.pump.metrics.retried, &self.pump.stats.retried, n);
                let pause = match after {
                    Some(after) => Some(*after),
                    None if self.failures_in_a_row >= PAUSE_AFTER => Some(backoff(
                        self.pump.delivery.retry_backoff,
                        self.failures_in_a_row - PAUSE_AFTER + 1,
                        now as u64,
                    )),
                    None => None,
                };
                if let Some(pause) = pause {
                    self.paused_until = Some(Instant::now() + pause);
                }
                tracing::debug!(destination = %self.pump.name, reason, "delivery failed; retrying later");
                let max_age = self.pump.delivery.max_retry_age.as_millis() as i64;
                for user in &users {
                    let previous = self.parked.get(*user).copied();
                    let since = previous.and_then(|s| s.failing_since_ms).unwrap_or(now);
                    let expired = now - since > max_age;
                    let mine = batch.messages.iter().zip(&batch.origins);
                    for (m, origin) in mine.filter(|(m, _)| m.user == *user) {
                        if expired {
                            let why =
                                format!("retried for longer than max_retry_age; last: {reason}");
                            change.dead.push(Dead::new(m, true, None, why, now));
                            settle(m, *origin, &mut change, &mut finished_offsets);
                        } else if *origin == Origin::Log {
                            change.park.push(m.clone());
                            finished_offsets.push(m.offset);
                        }
                    }
                    if expired {
                        // Given up on these; the user's later messages get their own chances.
                        self.reset_parked(user, now, &mut change);
                        continue;
                    }
                    let attempts = previous.map_or(0, |s| s.attempts) + 1;
                    let wait = after.unwrap_or_else(|| {
                        backoff(
                            self.pump.delivery.retry_backoff,
                            attempts,
                            now as u64 ^ u64::from(attempts),
                        )
                    });
                    let state = UserState {
                        retry_at_ms: now + wait.as_millis() as i64,
                        failing_since_ms: Some(since),
                        attempts,
                    };
                    self.parked.insert(user.to_string(), state);
                    change.users.push((user.to_string(), Some(state)));
                }
                self.count_dead(change.dead.len());
            }
        }
        // A user now parked keeps nothing in memory: what it had buffered goes behind.
        for user in &users {
            self.busy.remove(*user);
            if let Some(state) = self.parked.get(*user) {
                self.due.insert((state.retry_at_ms, user.to_string()));
                let taken = self.take_buffered(user);
                for m in taken {
                    finished_offsets.push(m.offset);
                    change.park.push(m);
                }
            } else if self.buffered.get(*user).is_some_and(|q| !q.is_empty()) {
                self.ready.push_back(user.to_string());
            }
        }
        self.pump.queue.apply(change)?;
        for offset in finished_offsets {
            self.unfinished.remove(&offset);
        }
        Ok(())
    }

    /// A parked user whose last request ended (delivered or refused): tried again at once, with
    /// a clean slate; [`State::next_batch`] unparks it when its queue is empty.
    fn reset_parked(&mut self, user: &str, now: i64, change: &mut Change) {
        let state = UserState {
            retry_at_ms: now,
            failing_since_ms: None,
            attempts: 0,
        };
        if self.parked.contains_key(user) {
            self.parked.insert(user.to_string(), state);
            change.users.push((user.to_string(), Some(state)));
        }
    }

    fn publish_in_flight(&self) {
        self.pump
            .metrics
            .in_flight
            .get_or_create(&self.labels)
            .set(self.in_flight_messages as i64);
    }

    fn count_dead(&self, n: usize) {
        self.count(
            &self.pump.metrics.dead_lettered,
            &self.pump.stats.dead_lettered,
            n,
        );
    }

    /// Adds `n` to a counter of the metrics and to its twin in the admin stats.
    fn count(&self, metric: &Family<DestinationLabels, Counter>, stat: &AtomicU64, n: usize) {
        if n > 0 {
            metric.get_or_create(&self.labels).inc_by(n as u64);
            stat.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// Publishes the backlog, then moves the cursor to the first unfinished offset (in that
    /// order, so that whoever sees the cursor move sees the backlog it left behind).
    fn commit(&mut self) -> Result<(), QueueError> {
        let position = self.pump.consumer.position();
        let unread = self.pump.log.end().saturating_sub(position);
        let backlog = unread + self.buffered_count as u64 + self.pump.queue.parked_count()?;
        self.pump.stats.backlog.store(backlog, Ordering::Relaxed);
        self.pump
            .metrics
            .backlog
            .get_or_create(&self.labels)
            .set(backlog as i64);
        let cursor = self.unfinished.first().copied().unwrap_or(position);
        if let Err(e) = self.pump.consumer.commit(cursor) {
            tracing::error!(destination = %self.pump.name, error = %e, "saving the destination's log cursor");
        }
        Ok(())
    }

    /// Every dead letter back into the queue, once: shaped again when its filter or transform
    /// had failed, and its user parked (due now) behind whatever it already had parked.
    fn replay(&mut self) -> Result<usize, QueueError> {
        let now = now_ms();
        let mut newly_parked = Vec::new();
        let route = &self.pump.route;
        let parked = &self.parked;
        let count = self.pump.queue.replay_dead(|taken| {
            let mut change = Change::default();
            for (mut message, shaped) in taken {
                if !shaped {
                    match route.shape(&message.body) {
                        Shaped::Send(body) => message.body = body,
                        Shaped::Dropped => continue,
                        Shaped::Failed(reason) => {
                            change
                                .dead
                                .push(Dead::new(&message, false, None, reason, now));
                            continue;
                        }
                    }
                }
                if !parked.contains_key(&message.user) && !newly_parked.contains(&message.user) {
                    newly_parked.push(message.user.clone());
                }
                change.park.push(message);
            }
            let state = UserState {
                retry_at_ms: now,
                failing_since_ms: None,
                attempts: 0,
            };
            for user in &newly_parked {
                change.users.push((user.clone(), Some(state)));
            }
            change
        })?;
        let mut change = Change::default();
        let mut moved = Vec::new();
        for user in newly_parked {
            let state = UserState {
                retry_at_ms: now,
                failing_since_ms: None,
                attempts: 0,
            };
            self.parked.insert(user.clone(), state);
            if !self.busy.contains(&user) {
                self.due.insert((now, user.clone()));
                let taken = self.take_buffered(&user);
                moved.extend(taken.iter().map(|m| m.offset));
                change.park.extend(taken);
            }
        }
        self.pump.queue.apply(change)?;
        for offset in moved {
            self.unfinished.remove(&offset);
        }
        tracing::info!(destination = %self.pump.name, messages = count, "dead letter replayed");
        Ok(count)
    }
}

/// What is left of one request's size.
struct Room {
    bytes: usize,
    /// Whether a message was taken: the first always is, whatever its size.
    taken: bool,
}

impl Room {
    /// Takes `message` if it fits (with the comma that joins it to the others).
    fn take(&mut self, message: &Outgoing) -> bool {
        let size = message.body.len() + 1;
        if self.taken && size > self.bytes {
            return false;
        }
        self.bytes = self.bytes.saturating_sub(size);
        self.taken = true;
        true
    }
}

/// A message of a finished request is done with: out of the queue, or off the log.
fn settle(message: &Outgoing, origin: Origin, change: &mut Change, finished: &mut Vec<u64>) {
    match origin {
        Origin::Log => finished.push(message.offset),
        Origin::Queue(seq) => change.remove.push((message.user.clone(), seq)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_a_second_to_five_minutes_with_jitter() {
        for seed in 0..50 {
            let second = Duration::from_secs(1);
            let first = backoff(second, 1, seed);
            assert!(first >= Duration::from_millis(500) && first <= Duration::from_secs(1));
            let fourth = backoff(second, 4, seed);
            assert!(fourth >= Duration::from_secs(4) && fourth <= Duration::from_secs(8));
            let late = backoff(second, 30, seed);
            assert!(late >= Duration::from_secs(150) && late <= Duration::from_secs(300));
        }
        let spread: HashSet<Duration> = (0..50)
            .map(|s| backoff(Duration::from_secs(1), 3, s))
            .collect();
        assert!(spread.len() > 10, "jitter spreads retries");
    }
}
