//! Destinations: each file in `destinations/` is a live destination that receives the messages
//! and segment changes it subscribes to, signed, in order per user, at least once.
//!
//! - [`files`]: reading a destination file (the shared keys, then the type's own by serde).
//! - [`route`]: which messages it takes, and the Rhai `filter` / `transform`.
//! - [`sender`]: the [`Sender`] trait a type implements, and what HTTP types share.
//! - [`webhook`], [`segment`]: the types, one folder each with the same two files.
//! - [`queue`]: a destination's durable queue and dead letter.
//! - [`shared_read`]: one read and parse of the log for all of them.
//! - [`pump`]: the delivery engine of one destination.
//!
//! Each destination runs on its own thread, with its own log cursor (`destination-<name>`),
//! queue file and rate limit: one that is slow or dead shares nothing with the others or with
//! ingestion but the log it reads, and that read (the one ahead reads and parses each record
//! once for all; one behind reads for itself). The threads run below ingestion's CPU priority, all of them
//! together weighing about what the profile stage does.
//!
//! ## Adding a type
//! Make a folder beside `webhook/` with `settings.rs` (a serde struct with
//! `deny_unknown_fields`: the type's keys in the file) and `sender.rs` (a [`Sender`]), then add
//! one variant to [`Kind`] and one arm to [`Kind::sender`]. Routing, batching, retries, the dead
//! letter and metrics come with the engine.

pub mod files;
pub mod pump;
pub mod queue;
pub mod route;
pub mod segment;
pub mod sender;
pub mod shared_read;
pub mod webhook;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::diagnostic::Diagnostic;
use crate::intake_log::IntakeLog;
use crate::metrics::DestinationMetrics;
use crate::supervisor::{supervise, Health};
pub use files::{Delivery, DestinationFile};
use pump::{Command, Pump, Stats};
use queue::{Dead, Queue};
use route::Route;
pub use sender::Sender;
use shared_read::SharedRead;

/// The destination types, by the file's `type`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Kind {
    Webhook(webhook::Settings),
    Segment(segment::Settings),
}

impl Kind {
    pub fn type_name(&self) -> &'static str {
        match self {
            Kind::Webhook(_) => "webhook",
            Kind::Segment(_) => "segment",
        }
    }

    pub fn sender(&self, client: reqwest::Client, delivery: &Delivery) -> Arc<dyn Sender> {
        match self {
            Kind::Webhook(s) => Arc::new(webhook::Webhook::new(
                s.clone(),
                client,
                delivery.batch_size > 1,
            )),
            Kind::Segment(s) => Arc::new(segment::SegmentApi::new(s.clone(), client)),
        }
    }
}

/// The log consumer name of a destination.
pub fn consumer_name(destination: &str) -> String {
    format!("destination-{destination}")
}

/// Reads and compiles every destination file and checks the segments each lists exist: what
/// `sluice check` and `sluice serve` both do (serve logs the problems and starts what loaded).
pub fn load(
    config: &crate::config::Config,
    env: crate::config::reader::Env<'_>,
) -> (Vec<(DestinationFile, Route)>, Vec<Diagnostic>) {
    let (files, mut problems) = files::read_all(&config.destinations.dir, env);
    let segments = crate::folder_watch::toml_names(&config.segments.dir);
    let mut loaded = Vec::new();
    for file in files {
        let route = match Route::compile(&file) {
            Ok(route) => route,
            Err(mut found) => {
                problems.append(&mut found);
                continue;
            }
        };
        // Reported, not refused: segments are reloaded while serving, and one added later is
        // routed to this destination from then on.
        for key in file.segments.iter().filter(|k| !segments.contains(*k)) {
            problems.push(Diagnostic::file(
                &file.path,
                format!("`segments`: unknown segment `{key}` (no segments/{key}.toml)"),
            ));
        }
        loaded.push((file, route));
    }
    (loaded, problems)
}

/// One destination as `GET /admin/destinations` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Since this process started.
    pub delivered: u64,
    pub retried: u64,
    pub dead_lettered: u64,
    /// Waiting: unread log records, buffered and parked messages.
    pub backlog: u64,
    /// In the dead letter now, across restarts.
    pub dead_letter: u64,
}

struct Running {
    name: String,
    kind: &'static str,
    stats: Arc<Stats>,
    queue: Arc<Queue>,
    /// Taken (closed) at shutdown.
    commands: std::sync::Mutex<Option<mpsc::Sender<Command>>>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Every running destination.
pub struct Destinations {
    running: Vec<Running>,
}

/// Makes the supervisor's record of a destination, by its name.
pub type HealthOf = Arc<dyn Fn(&str) -> Arc<Health> + Send + Sync>;

pub struct Parts {
    pub log: Arc<IntakeLog>,
    pub state_dir: std::path::PathBuf,
    pub metrics: Arc<DestinationMetrics>,
    /// Makes the supervisor's record of one destination, by its name.
    pub health: HealthOf,
}

impl Destinations {
    /// Starts one delivery thread per destination, each under a supervisor that starts it again
    /// from its cursor and queue if it fails. Each registers its log cursor before this returns,
    /// so that nothing it has not delivered can be trimmed from the log.
    pub fn start(
        loaded: Vec<(DestinationFile, Route)>,
        parts: Parts,
    ) -> anyhow::Result<Destinations> {
        let mut running = Vec::new();
        let count = loaded.len();
        let reads = Arc::new(SharedRead::default());
        for (file, route) in loaded {
            let name = file.name.clone();
            let consumer = parts.log.consumer(&consumer_name(&name))?;
            let queue = Arc::new(Queue::open(&parts.state_dir, &name)?);
            let client = sender::client(file.delivery.timeout, file.delivery.concurrency)?;
            let stats = Arc::new(Stats::default());
            let health = (parts.health)(&name);
            let pump = {
                let (log, reads, queue, stats, health) = (
                    parts.log.clone(),
                    reads.clone(),
                    queue.clone(),
                    stats.clone(),
                    health.clone(),
                );
                let metrics = parts.metrics.clone();
                let sender = file.kind.sender(client, &file.delivery);
                let file = file.clone();
                let mut route = Some(route);
                // The delivery engine from what is durable: its cursor and its queue.
                move || -> anyhow::Result<Pump> {
                    let route = match route.take() {
                        Some(route) => route,
                        None => Route::compile(&file)
                            .map_err(|problems| anyhow::anyhow!("{}", problems[0].message))?,
                    };
                    Ok(Pump {
                        name: file.name.clone(),
                        route,
                        sender: sender.clone(),
                        delivery: file.delivery.clone(),
                        consumer: consumer.reopen()?,
                        reads: reads.clone(),
                        log: log.clone(),
                        queue: queue.clone(),
                        metrics: metrics.clone(),
                        stats: stats.clone(),
                        health: health.clone(),
                    })
                }
            };
            let (commands, receiver) = mpsc::channel(4);
            let thread = std::thread::Builder::new()
                .name(format!("sluice-dest-{name}"))
                .spawn(move || {
                    crate::thread_priority::lower_shared(count);
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("a current-thread runtime builds");
                    let mut pump = pump;
                    // Looked at by one closure or the other, never both at once.
                    let receiver = std::cell::RefCell::new(receiver);
                    supervise(
                        &health,
                        || receiver.borrow().is_closed(),
                        || {
                            runtime.block_on(pump()?.run(&mut receiver.borrow_mut()));
                            anyhow::Ok(())
                        },
                    );
                })?;
            tracing::info!(destination = %name, kind = file.kind.type_name(), "destination started");
            running.push(Running {
                name,
                kind: file.kind.type_name(),
                stats,
                queue,
                commands: std::sync::Mutex::new(Some(commands)),
                thread: std::sync::Mutex::new(Some(thread)),
            });
        }
        Ok(Destinations { running })
    }

    pub fn summaries(&self) -> Vec<Summary> {
        self.running
            .iter()
            .map(|r| Summary {
                name: r.name.clone(),
                kind: r.kind,
                delivered: r.stats.delivered.load(Ordering::Relaxed),
                retried: r.stats.retried.load(Ordering::Relaxed),
                dead_lettered: r.stats.dead_lettered.load(Ordering::Relaxed),
                backlog: r.stats.backlog.load(Ordering::Relaxed),
                dead_letter: r.queue.dead_count().unwrap_or(0),
            })
            .collect()
    }

    fn find(&self, name: &str) -> Option<&Running> {
        self.running.iter().find(|r| r.name == name)
    }

    /// Up to `limit` dead letters of `name` after `after`; `None` for an unknown destination.
    pub fn dead(
        &self,
        name: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Option<Result<Vec<(u64, Dead)>, String>> {
        let r = self.find(name)?;
        Some(r.queue.dead(after, limit).map_err(|e| e.to_string()))
    }

    /// Sends every dead letter of `name` back to delivery; how many. `None` for an unknown
    /// destination.
    pub async fn replay(&self, name: &str) -> Option<Result<usize, String>> {
        let r = self.find(name)?;
        let (reply, answer) = oneshot::channel();
        let commands = r.commands.lock().unwrap().clone();
        let sent = match commands {
            Some(commands) => commands.send(Command::Replay(reply)).await.is_ok(),
            None => false,
        };
        if !sent {
            return Some(Err("the destination is not running".into()));
        }
        Some(
            answer
                .await
                .unwrap_or_else(|_| Err("the destination stopped".into())),
        )
    }

    /// Stops every destination: requests in flight finish, cursors are saved.
    pub fn finish(&self) {
        for r in &self.running {
            r.commands.lock().unwrap().take();
        }
        for r in &self.running {
            if let Some(thread) = r.thread.lock().unwrap().take() {
                let _ = thread.join();
            }
        }
    }
}
