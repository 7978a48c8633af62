//! Every metric Sluice exports, in one place, with its name, help and labels.
//!
//! Label values come from small, fixed sets (routes, outcomes, internal consumer names) or from
//! configuration (source names); never from request data such as write keys, user ids or event
//! names. Stages receive the part they update; gauges that describe state (log size, lag) are
//! read from their owners when `/metrics` is scraped.

use std::sync::Arc;

use std::fmt::Write as _;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The tracking routes, as a label (short aliases count as their long form).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Route {
    Track,
    Identify,
    Page,
    Screen,
    Group,
    Alias,
    Batch,
}

/// What the tracking plan did with a message.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum PlanOutcome {
    Valid,
    Flagged,
    Blocked,
    UnplannedAllowed,
    UnplannedBlocked,
}

impl PlanOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            PlanOutcome::Valid => "valid",
            PlanOutcome::Flagged => "flagged",
            PlanOutcome::Blocked => "blocked",
            PlanOutcome::UnplannedAllowed => "unplanned_allowed",
            PlanOutcome::UnplannedBlocked => "unplanned_blocked",
        }
    }
}

/// Schema checks by event: the label is a registered event (configuration, bounded by the
/// registry) or `unplanned`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PlanLabels {
    pub event: String,
    pub outcome: PlanOutcome,
}

/// Reloads of the schema folder.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum ReloadOutcome {
    Applied,
    /// Some files were refused; their last good versions stay in force.
    PartlyRefused,
}

impl ReloadOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            ReloadOutcome::Applied => "applied",
            ReloadOutcome::PartlyRefused => "partly_refused",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub outcome: ReloadOutcome,
}

/// Metrics of the tracking plan.
#[derive(Default)]
pub struct SchemaMetrics {
    pub checks: Family<PlanLabels, Counter>,
    pub reloads: Family<ReloadLabels, Counter>,
    pub refused_files: Gauge,
}

impl SchemaMetrics {
    pub fn count(&self, event: &str, outcome: PlanOutcome) {
        self.checks
            .get_or_create(&PlanLabels {
                event: event.to_string(),
                outcome,
            })
            .inc();
    }
}

impl Route {
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Track => "track",
            Route::Identify => "identify",
            Route::Page => "page",
            Route::Screen => "screen",
            Route::Group => "group",
            Route::Alias => "alias",
            Route::Batch => "batch",
        }
    }
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Rejected => "rejected",
            Outcome::Blocked => "blocked",
            Outcome::Duplicate => "duplicate",
            Outcome::RateLimited => "rate_limited",
            Outcome::Unavailable => "unavailable",
        }
    }
}

/// Label values are written lower-case, as Prometheus users expect.
macro_rules! label_value_from_as_str {
    ($($t:ty),*) => {$(
        impl EncodeLabelValue for $t {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
                encoder.write_str(self.as_str())
            }
        }
    )*};
}
label_value_from_as_str!(Route, Outcome, PlanOutcome, ReloadOutcome);

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: Route,
    pub status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: Route,
}

/// What became of one message.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Outcome {
    /// Durably in the log, to be stored and forwarded.
    Accepted,
    /// Broke the field rules; durably in the log, marked for the quarantine.
    Rejected,
    /// Acknowledged, but quarantined by the tracking plan (a violation or an unplanned event
    /// under a `block` policy).
    Blocked,
    /// A messageId already accepted within the dedup window; acknowledged, not stored again.
    Duplicate,
    /// Refused with 429.
    RateLimited,
    /// Refused with 503: the log could not take it.
    Unavailable,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MessageLabels {
    pub source: String,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConsumerLabels {
    pub consumer: String,
}

/// Metrics of the HTTP edge and the messages it takes in.
pub struct IngestMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub request_seconds: Family<RouteLabels, Histogram, fn() -> Histogram>,
    pub messages: Family<MessageLabels, Counter>,
}

/// Metrics the intake log updates as it writes.
pub struct LogMetrics {
    pub fsyncs: Counter,
    pub fsync_seconds: Histogram,
    pub group_records: Histogram,
    pub appended_records: Counter,
    pub appended_bytes: Counter,
    pub write_errors: Counter,
}

/// Metrics read from their owners at scrape time.
#[derive(Default)]
pub struct StateGauges {
    pub log_bytes: Gauge,
    pub log_segments: Gauge,
    pub log_end_offset: Gauge,
    pub consumer_lag: Family<ConsumerLabels, Gauge>,
    pub dedup_ids: Gauge,
    pub dedup_memory: Gauge,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    pub stage: String,
}

/// Metrics of the stages that consume the log, kept by their supervisor.
#[derive(Default)]
pub struct StageMetrics {
    pub restarts: Family<StageLabels, Counter>,
    pub set_aside: Family<StageLabels, Counter>,
}

#[derive(Default)]
pub struct DedupMetrics {
    pub evicted: Counter,
    /// Filter hits confirmed on disk (a run's block read).
    pub disk_checks: Counter,
}

/// Metrics the lake writer updates.
pub struct LakeMetrics {
    pub files_written: Counter,
    pub bytes_written: Counter,
    pub rows_written: Counter,
    /// Accepted entries that could not become event rows and went to the quarantine.
    pub misfiled: Counter,
    pub flush_seconds: Histogram,
    pub flush_errors: Counter,
}

impl Default for LakeMetrics {
    fn default() -> Self {
        LakeMetrics {
            files_written: Counter::default(),
            bytes_written: Counter::default(),
            rows_written: Counter::default(),
            misfiled: Counter::default(),
            flush_seconds: latency_histogram(),
            flush_errors: Counter::default(),
        }
    }
}

/// The `profiles` stage (`crate::profile_stage`): profiles and segments. The `segment` label is a segment key: configuration (a file name in
/// `segments/`), never user data.
pub struct ProfileStageMetrics {
    /// From the arrival of the message (or the due moment of a timer) to the emitted change
    /// being durable in the log.
    pub change_delay: Family<CauseLabels, Histogram, fn() -> Histogram>,
    pub messages: Counter,
    pub evaluations: Counter,
    pub timer_wakeups: Counter,
    pub rule_failures: Family<RuleFailureLabels, Counter>,
    pub changes: Family<SegmentChangeLabels, Counter>,
    pub sizes: Family<SegmentLabels, Gauge>,
    pub merges: Counter,
    pub conflicts: Counter,
    pub profiles: Gauge,
    pub reloads: Family<ReloadLabels, Counter>,
    pub refused_files: Gauge,
    /// How long a save of the profile store took to write and commit, on the saver's thread.
    pub save_seconds: Histogram,
    /// Profiles written by saves (each once per save, however many messages it took).
    pub saved_profiles: Counter,
    /// Time the profile stage spent on saves: handing one off (and waiting for the one before,
    /// when it had to), and taking in one that committed.
    pub save_pauses: Family<PauseLabels, Histogram, fn() -> Histogram>,
    /// Times the profile stage went back to the last save and redid the log from there, after a
    /// batch or a save failed.
    pub redos: Counter,
    /// Reads of the lake for a backfill's history that failed (each is tried again later).
    pub backfill_read_failures: Counter,
    /// What profiles dropped at their caps.
    pub capped: Family<CapLabels, Counter>,
    /// One batch of the profile stage: applying its records, waking due timers, and appending
    /// what it emitted to the log, durably.
    pub batch_seconds: Histogram,
    /// Log records in one batch of the profile stage.
    pub batch_records: Histogram,
    /// Profiles the stage holds in memory, decoded and cold (in their stored encoding), and
    /// what they take (the decoded ones estimated).
    pub cache_profiles: Family<CacheTierLabels, Gauge>,
    pub cache_bytes: Family<CacheTierLabels, Gauge>,
}

/// What made a membership change.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Cause {
    Message,
    Timer,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CauseLabels {
    pub cause: Cause,
}

/// What the profile stage paused for: handing a save off, waiting for the save in flight
/// (when it had to hand off the next one), taking in a save that committed.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum SavePause {
    HandOff,
    Wait,
    Commit,
}

/// A tier of the profile stage's cache (see `crate::profile_stage`'s `cache.rs`).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum CacheTier {
    Decoded,
    Cold,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheTierLabels {
    pub tier: CacheTier,
}

/// What a profile's cap dropped (see `crate::profiles::profile::MAX_EVENT_NAMES`).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Capped {
    EventName,
    Trait,
    History,
    AnonymousId,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CapLabels {
    pub what: Capped,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PauseLabels {
    pub at: SavePause,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SegmentLabels {
    pub segment: String,
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Direction {
    Entered,
    Exited,
}

impl Default for ProfileStageMetrics {
    fn default() -> Self {
        fn delays() -> Histogram {
            Histogram::new([
                0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.075, 0.1, 0.2, 0.5, 1.0,
                2.0, 5.0,
            ])
        }
        ProfileStageMetrics {
            change_delay: Family::new_with_constructor(delays),
            messages: Counter::default(),
            evaluations: Counter::default(),
            timer_wakeups: Counter::default(),
            rule_failures: Family::default(),
            changes: Family::default(),
            sizes: Family::default(),
            merges: Counter::default(),
            conflicts: Counter::default(),
            profiles: Gauge::default(),
            reloads: Family::default(),
            refused_files: Gauge::default(),
            save_seconds: delays(),
            saved_profiles: Counter::default(),
            save_pauses: Family::new_with_constructor(delays),
            redos: Counter::default(),
            backfill_read_failures: Counter::default(),
            capped: Family::default(),
            batch_seconds: delays(),
            batch_records: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            cache_profiles: Family::default(),
            cache_bytes: Family::default(),
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SegmentChangeLabels {
    pub segment: String,
    pub direction: Direction,
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum FailureClass {
    /// Over the sandbox's operation, depth or size limits.
    Budget,
    Error,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleFailureLabels {
    pub segment: String,
    pub class: FailureClass,
}

/// Destinations. The `destination` label is a destination's name: a file name in
/// `destinations/`, configuration, never user data.
pub struct DestinationMetrics {
    pub delivered: Family<DestinationLabels, Counter>,
    pub retried: Family<DestinationLabels, Counter>,
    pub dead_lettered: Family<DestinationLabels, Counter>,
    pub in_flight: Family<DestinationLabels, Gauge>,
    pub backlog: Family<DestinationLabels, Gauge>,
    /// From the edge accepting a message to the destination answering 2xx for it.
    pub latency: Family<DestinationLabels, Histogram, fn() -> Histogram>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DestinationLabels {
    pub destination: String,
}

impl Default for DestinationMetrics {
    fn default() -> Self {
        DestinationMetrics {
            delivered: Family::default(),
            retried: Family::default(),
            dead_lettered: Family::default(),
            in_flight: Family::default(),
            backlog: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
        }
    }
}

pub struct Metrics {
    pub profile_stage: Arc<ProfileStageMetrics>,
    pub destinations: Arc<DestinationMetrics>,
    pub ingest: Arc<IngestMetrics>,
    pub log: Arc<LogMetrics>,
    pub dedup: Arc<DedupMetrics>,
    pub lake: Arc<LakeMetrics>,
    pub schema: Arc<SchemaMetrics>,
    pub stages: Arc<StageMetrics>,
    pub state: StateGauges,
}

fn latency_histogram() -> Histogram {
    // 50 µs to ~13 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 18))
}

impl Default for LogMetrics {
    fn default() -> Self {
        LogMetrics {
            fsyncs: Counter::default(),
            fsync_seconds: latency_histogram(),
            group_records: Histogram::new(exponential_buckets(1.0, 2.0, 16)),
            appended_records: Counter::default(),
            appended_bytes: Counter::default(),
            write_errors: Counter::default(),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            ingest: Arc::new(IngestMetrics {
                requests: Family::default(),
                request_seconds: Family::new_with_constructor(latency_histogram),
                messages: Family::default(),
            }),
            log: Arc::new(LogMetrics::default()),
            dedup: Arc::new(DedupMetrics::default()),
            lake: Arc::new(LakeMetrics::default()),
            schema: Arc::new(SchemaMetrics::default()),
            profile_stage: Arc::new(ProfileStageMetrics::default()),
            destinations: Arc::new(DestinationMetrics::default()),
            stages: Arc::new(StageMetrics::default()),
            state: StateGauges::default(),
        }
    }
}

impl Metrics {
    /// A registry that exposes these metrics under their public names.
    pub fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("sluice");
        let d = &self.destinations;
        r.register(
            "destination_delivered",
            "Messages a destination answered 2xx for",
            d.delivered.clone(),
        );
        r.register(
            "destination_retried",
            "Messages whose request failed in a way worth retrying",
            d.retried.clone(),
        );
        r.register(
            "destination_dead_lettered",
            "Messages moved to a destination's dead letter",
            d.dead_lettered.clone(),
        );
        r.register(
            "destination_in_flight",
            "Messages in requests not yet answered",
            d.in_flight.clone(),
        );
        r.register(
            "destination_backlog",
            "Messages waiting for a destination: unread log records, buffered and queued",
            d.backlog.clone(),
        );
        r.register(
            "destination_delivery_seconds",
            "From acceptance at the edge to the destination's 2xx",
            d.latency.clone(),
        );
        let i = &self.ingest;
        r.register(
            "http_requests",
            "HTTP requests by route and status code",
            i.requests.clone(),
        );
        r.register(
            "http_request_duration_seconds",
            "Time to answer an HTTP request, by route",
            i.request_seconds.clone(),
        );
        r.register(
            "ingest_messages",
            "Messages received, by source and what became of them",
            i.messages.clone(),
        );
        let l = &self.log;
        r.register(
            "log_fsyncs",
            "Group commits (one fsync each) of the intake log",
            l.fsyncs.clone(),
        );
        r.register(
            "log_fsync_duration_seconds",
            "Time to write and fsync one group commit",
            l.fsync_seconds.clone(),
        );
        r.register(
            "log_group_commit_records",
            "Records made durable by one fsync",
            l.group_records.clone(),
        );
        r.register(
            "log_appended_records",
            "Records appended to the intake log",
            l.appended_records.clone(),
        );
        r.register(
            "log_appended_bytes",
            "Bytes appended to the intake log",
            l.appended_bytes.clone(),
        );
        r.register(
            "log_write_errors",
            "Failed writes or fsyncs of the intake log (nothing in a failed group was acknowledged)",
            l.write_errors.clone(),
        );
        let s = &self.state;
        r.register(
            "log_size_bytes",
            "Bytes held by the intake log's segments",
            s.log_bytes.clone(),
        );
        r.register(
            "log_segments",
            "Segment files of the intake log",
            s.log_segments.clone(),
        );
        r.register(
            "log_end_offset",
            "Offset the next durable record of the intake log will get",
            s.log_end_offset.clone(),
        );
        r.register(
            "stage_restarts",
            "Times a stage (lake, profiles, a destination) failed and was started again from its durable state",
            self.stages.restarts.clone(),
        );
        r.register(
            "stage_set_aside",
            "Log records a stage failed on three times in a row and set aside (to the quarantine or its dead letter)",
            self.stages.set_aside.clone(),
        );
        r.register(
            "log_consumer_lag_records",
            "Records of the intake log that a consumer has not yet committed",
            s.consumer_lag.clone(),
        );
        r.register(
            "dedup_ids",
            "messageIds remembered for deduplication",
            s.dedup_ids.clone(),
        );
        r.register(
            "dedup_evicted",
            "messageIds forgotten before their window ended, to keep memory bounded",
            self.dedup.evicted.clone(),
        );
        r.register(
            "dedup_disk_checks",
            "messageIds the in-memory filter may hold, looked for on disk",
            self.dedup.disk_checks.clone(),
        );
        r.register(
            "dedup_memory_bytes",
            "Memory dedup holds: its filter, the runs' indexes and recent ids",
            s.dedup_memory.clone(),
        );
        let p = &self.schema;
        r.register(
            "schema_checks",
            "Messages checked against the tracking plan, by registered event (or `unplanned`) and outcome",
            p.checks.clone(),
        );
        r.register(
            "schema_reloads",
            "Reloads of the schemas folder, by outcome",
            p.reloads.clone(),
        );
        r.register(
            "schema_refused_files",
            "Schema files refused at the last reload (their last good version stays in force)",
            p.refused_files.clone(),
        );
        let k = &self.lake;
        r.register(
            "lake_files_written",
            "Parquet files written to the lake",
            k.files_written.clone(),
        );
        r.register(
            "lake_bytes_written",
            "Bytes of Parquet written to the lake",
            k.bytes_written.clone(),
        );
        r.register(
            "lake_rows_written",
            "Rows written to the lake, all tables",
            k.rows_written.clone(),
        );
        r.register(
            "lake_misfiled",
            "Accepted messages that could not become event rows and were filed in the quarantine",
            k.misfiled.clone(),
        );
        r.register(
            "lake_flush_duration_seconds",
            "Time to write one flush (all its files) and commit it",
            k.flush_seconds.clone(),
        );
        r.register(
            "lake_flush_errors",
            "Lake flushes that failed and are retried (storage unreachable, for one)",
            k.flush_errors.clone(),
        );
        let g = &self.profile_stage;
        r.register(
            "profile_messages",
            "Messages applied to profiles",
            g.messages.clone(),
        );
        r.register(
            "profiles",
            "Profiles in the profile store",
            g.profiles.clone(),
        );
        r.register(
            "segment_evaluations",
            "Segment rules evaluated",
            g.evaluations.clone(),
        );
        r.register(
            "segment_timer_wakeups",
            "Profiles re-evaluated because a time condition came due",
            g.timer_wakeups.clone(),
        );
        r.register(
            "segment_rule_failures",
            "Rule evaluations that failed (error, or over the sandbox's budget) and changed nothing",
            g.rule_failures.clone(),
        );
        r.register(
            "segment_changes",
            "Audience Entered / Audience Exited emitted",
            g.changes.clone(),
        );
        r.register("segment_size", "Members of each segment", g.sizes.clone());
        r.register(
            "segment_change_delay_seconds",
            "From a message's arrival (or a time condition's moment) to its Audience Entered/Exited being durable in the log",
            g.change_delay.clone(),
        );
        r.register(
            "identity_merges",
            "Profiles merged into another by identity resolution",
            g.merges.clone(),
        );
        r.register(
            "identity_conflicts",
            "Messages linking two different userIds, which are never merged",
            g.conflicts.clone(),
        );
        r.register(
            "segment_reloads",
            "Reloads of the segments folder by outcome",
            g.reloads.clone(),
        );
        r.register(
            "segment_refused_files",
            "Segment files refused at the last reload (their last good version stays loaded)",
            g.refused_files.clone(),
        );
        r.register(
            "profile_save_seconds",
            "Saves of the profile store, written and committed while the profile stage goes on",
            g.save_seconds.clone(),
        );
        r.register(
            "profile_saved_profiles",
            "Profiles written by saves of the profile store, each once per save",
            g.saved_profiles.clone(),
        );
        r.register(
            "profile_save_pause_seconds",
            "Time the profile stage spent on saves: handing one off (waiting for the one before when it had to) and taking in one that committed",
            g.save_pauses.clone(),
        );
        r.register(
            "profile_stage_redos",
            "Times the profile stage went back to its last save after a failure and redid the log from there",
            g.redos.clone(),
        );
        r.register(
            "profile_cache_profiles",
            "Profiles the profile stage holds in memory: decoded, and cold (in their stored encoding, decoded on use)",
            g.cache_profiles.clone(),
        );
        r.register(
            "profile_cache_bytes",
            "What the profiles in memory take: decoded (estimated) and cold; both within profiles.cache_memory",
            g.cache_bytes.clone(),
        );
        r.register(
            "profile_capped",
            "What profiles dropped at their caps: event names no rule reads, traits, history entries, anonymousIds not linked",
            g.capped.clone(),
        );
        r.register(
            "segment_backfill_read_failures",
            "Reads of the lake for a backfill's history that failed; the backfill waits and tries again",
            g.backfill_read_failures.clone(),
        );
        r.register(
            "profile_batch_seconds",
            "Batches of the profile stage: applying the records read, waking due timers, and appending the changes emitted, durably",
            g.batch_seconds.clone(),
        );
        r.register(
            "profile_batch_records",
            "Log records read by one batch of the profile stage",
            g.batch_records.clone(),
        );
        r
    }
}
