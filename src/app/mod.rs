//! The wiring: the only module that knows the whole chain. It opens the intake log, rebuilds
//! the dedup state, starts the lake writer, the profile stage, the destinations and the HTTP edge
//! (tracking and admin) on the listener it is given, runs the background tasks, and on shutdown
//! drains the stages in the order data flows through them: edge, profile stage, destinations, log,
//! lake, dedup checkpoint. Each part is started by a function of its own below; [`Running`] holds
//! what they started and stops it.

use std::future::Future;
use std::net::TcpListener;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use actix_web::dev::ServerHandle;
use actix_web::{web, App, HttpServer};
use anyhow::Context as _;

mod admin_access;

use crate::admin::AdminState;
use crate::clock::{self, Clock};
use crate::config::Config;
use crate::destinations::{self, Destinations};
use crate::http::{self, AppState};
use crate::ingest::{Ingest, Parts};
use crate::intake_log::dedup::{self, Dedup};
use crate::intake_log::{Appender, Consumer, IntakeLog, LogOptions};
use crate::lake::compaction::{CompactionHandle, Compactor};
use crate::lake::typed::TypedSource;
use crate::lake::writer::{FlushPolicy, Stopped};
use crate::lake::{LakeHandle, LakeStore};
use crate::metrics::Metrics;
use crate::profile_stage::{self, LiveSegments, ProfileStage};
use crate::profiles::ProfileStore;
use crate::query::{QueryEngine, QueryLimits};
use crate::replay::Replayer;
use crate::schema::{self, Live};
use crate::segments;
use crate::supervisor::{Health, Stages};

/// Runs the server until `shutdown` resolves, then stops it gracefully.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    run_with_clock(config, listener, shutdown, clock::system()).await
}

pub async fn run_with_clock(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    clock: Clock,
) -> anyhow::Result<()> {
    let mut running = start(Arc::new(config), listener, clock).await?;
    tokio::select! {
        _ = shutdown => tracing::info!("shutting down: no new connections; finishing requests in flight"),
        result = &mut running.server_task => {
            result??;
            anyhow::bail!("the HTTP server stopped by itself");
        }
    }
    running.stop().await;
    Ok(())
}

/// Everything [`start`] started, to be stopped in order.
struct Running {
    config: Arc<Config>,
    state: web::Data<AppState>,
    server: ServerHandle,
    server_task: tokio::task::JoinHandle<std::io::Result<()>>,
    watches: Vec<Watch>,
    profile_stage: ProfileStage,
    destinations: Arc<Destinations>,
    log: Arc<IntakeLog>,
    compaction: CompactionHandle,
    lake: LakeHandle,
    query_runtime: QueryRuntime,
    checkpoints: dedup::Checkpoints,
}

async fn start(
    config: Arc<Config>,
    listener: TcpListener,
    clock: Clock,
) -> anyhow::Result<Running> {
    let metrics = Arc::new(Metrics::default());
    let (log, dedup, dedup_consumer) = open_log(&config, &metrics).await?;
    // The one way anything enters the log.
    let appender = Arc::new(Appender::new(log.clone(), dedup.clone()));
    // The profile stage's records (segment changes, clock records) may use the log's reserve: a
    // full log must not stop the stage whose progress frees it.
    let own_records = Arc::new(appender.for_own_records());
    let (plan, schema_watch) = load_plan(&config, &metrics)?;
    // Every consumer of the log runs under a supervisor, and shows on /readyz. Each registers its
    // log consumer as it starts, before anything can trim the log.
    let stages = Arc::new(Stages::default());
    let (lake, compaction, query) = start_lake(&config, &metrics, &log, &plan, &stages, &clock)?;
    let audiences = start_profile_stage(
        &config,
        &metrics,
        &log,
        &own_records,
        &query,
        &stages,
        &clock,
    )?;
    let destinations = start_destinations(&config, &metrics, &log, &stages)?;
    let query_runtime = QueryRuntime(Some(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("sluice-query")
            // Queries yield the core to ingestion.
            .on_thread_start(crate::thread_priority::lower)
            .enable_all()
            .build()?,
    ));

    let ingest = Arc::new(Ingest::new(
        &config,
        Parts {
            log: appender.clone(),
            plan: plan.clone(),
            metrics: metrics.ingest.clone(),
            schema_metrics: metrics.schema.clone(),
            clock,
        },
    ));
    let state = web::Data::new(AppState {
        config: config.clone(),
        ingest,
        log: log.clone(),
        dedup: dedup.clone(),
        registry: metrics.registry(),
        metrics: metrics.clone(),
        shutting_down: Default::default(),
        stages,
    });
    let admin_state = web::Data::new(AdminState {
        token: config.server.admin_token.clone(),
        query_limits: config.query.clone(),
        lake: query.clone(),
        query_runtime: query_runtime.handle(),
        query_slots: Arc::new(tokio::sync::Semaphore::new(2)),
        plan: plan.clone(),
        plan_metrics: metrics.schema.clone(),
        replayer: Arc::new(Replayer::new(&config, query, appender, plan)),
        audiences: Arc::new(admin_access::StoreAudiences {
            store: audiences.store,
            segments: audiences.live,
        }),
        deliveries: destinations.clone(),
    });
    if config.server.admin_token.as_deref() == Some(crate::admin::DEMO_TOKEN) {
        tracing::warn!(
            "the admin API takes the demo token `{}`: set SLUICE_ADMIN_TOKEN (see sluice.toml) before others can reach {}",
            crate::admin::DEMO_TOKEN,
            config.server.listen
        );
    }
    let (server, server_task) = serve(&config, listener, state.clone(), admin_state)?;

    // Dedup checkpoints: recent ids to runs on disk, so that a restart replays a short stretch of
    // the log.
    let checkpoints = dedup::Checkpoints::start(dedup, log.clone(), dedup_consumer)?;
    Ok(Running {
        config,
        state,
        server,
        server_task,
        watches: vec![schema_watch, audiences.watch],
        profile_stage: audiences.stage,
        destinations,
        log,
        compaction,
        lake,
        query_runtime,
        checkpoints,
    })
}

/// The intake log, and the dedup state rebuilt from its runs and the log.
async fn open_log(
    config: &Config,
    metrics: &Metrics,
) -> anyhow::Result<(Arc<IntakeLog>, Arc<Dedup>, Consumer)> {
    let log = IntakeLog::open(
        LogOptions {
            dir: config.log.dir.clone(),
            segment_size: config.log.segment_size,
            max_size: config.log.max_size,
        },
        metrics.log.clone(),
    )
    .with_context(|| format!("opening the intake log in {}", config.log.dir.display()))?;
    let log = Arc::new(log);
    let (dedup, consumer) = {
        let (log, config) = (log.clone(), config.dedup.clone());
        let metrics = metrics.dedup.clone();
        tokio::task::spawn_blocking(move || dedup::recover(&config, &log, metrics))
            .await?
            .context("rebuilding the dedup state")?
    };
    Ok((log, dedup, consumer))
}

/// The tracking plan, reloaded whenever the schemas folder changes.
fn load_plan(config: &Config, metrics: &Metrics) -> anyhow::Result<(Arc<Live>, Watch)> {
    let mut loader = schema::watch::Loader::new(&config.schemas.dir);
    let (schemas, registry, problems) = loader.load();
    for problem in &problems {
        tracing::error!(%problem, "schema file refused");
    }
    metrics.schema.refused_files.set(problems.len() as i64);
    tracing::info!(schemas = registry.len(), "tracking plan loaded");
    let plan = Arc::new(Live::new(schemas, registry));
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let thread = schema::watch::spawn(loader, plan.clone(), metrics.schema.clone(), stopped)?;
    Ok((plan, Watch { stop, thread }))
}

/// The supervisor's record of a stage, shown on /readyz.
fn health(stages: &Stages, metrics: &Metrics, stage: &str, consumer: &str) -> Arc<Health> {
    let health = Health::new(stage, consumer, metrics.stages.clone());
    stages.add(health.clone());
    health
}

/// The lake writer, its compaction, and the query engine over it.
fn start_lake(
    config: &Config,
    metrics: &Metrics,
    log: &Arc<IntakeLog>,
    plan: &Arc<Live>,
    stages: &Stages,
    clock: &Clock,
) -> anyhow::Result<(LakeHandle, CompactionHandle, QueryEngine)> {
    let typed = Arc::new(TypedSource::new(plan.clone()));
    let lake_store = LakeStore::from_url(&config.storage.url)?;
    let lake = LakeHandle::start(
        lake_store.clone(),
        log,
        FlushPolicy {
            interval: config.storage.flush_interval,
            ..FlushPolicy::default()
        },
        typed.clone(),
        metrics.lake.clone(),
        health(stages, metrics, "lake", crate::lake::writer::CONSUMER),
    )
    .context("starting the lake writer")?;
    let compaction = {
        let log_dir = config.log.dir.clone();
        let committed = Arc::new(move || {
            crate::intake_log::cursor::load(&log_dir, crate::lake::writer::CONSUMER)
                .ok()
                .flatten()
                .unwrap_or(0)
        });
        CompactionHandle::start(
            Compactor::new(lake_store.clone()),
            config.storage.compaction_interval,
            committed,
            clock.clone(),
            tokio::runtime::Handle::current(),
        )?
    };
    let query = QueryEngine::new(
        lake_store,
        typed,
        QueryLimits {
            memory: config.query.memory_limit as usize,
            timeout: config.query.timeout,
        },
    );
    Ok((lake, compaction, query))
}

/// What [`start_profile_stage`] started: the stage, the store it keeps, the segments in force and
/// the watch of the segments folder.
struct Audiences {
    stage: ProfileStage,
    store: Arc<ProfileStore>,
    live: Arc<LiveSegments>,
    watch: Watch,
}

/// Profiles and segments: another log consumer, and a producer of Audience Entered/Exited.
fn start_profile_stage(
    config: &Config,
    metrics: &Metrics,
    log: &Arc<IntakeLog>,
    appender: &Arc<Appender>,
    query: &QueryEngine,
    stages: &Stages,
    clock: &Clock,
) -> anyhow::Result<Audiences> {
    let store = Arc::new(
        ProfileStore::open(&config.profiles.dir, config.profiles.store_cache as usize)
            .with_context(|| {
                format!(
                    "opening the profile store in {}",
                    config.profiles.dir.display()
                )
            })?,
    );
    let mut loader = segments::watch::Loader::new(&config.segments.dir);
    let (set, problems) = loader.load();
    for problem in &problems {
        tracing::error!(%problem, "segment file refused");
    }
    metrics
        .profile_stage
        .refused_files
        .set(problems.len() as i64);
    tracing::info!(segments = set.len(), "segments loaded");
    let set = Arc::new(set);
    let live = Arc::new(LiveSegments::new(set.clone()));
    let (new_sets, reloaded_sets) = std::sync::mpsc::sync_channel(4);
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let thread = segments::watch::spawn(loader, new_sets, metrics.profile_stage.clone(), stopped)?;
    let stage = ProfileStage::start(
        profile_stage::Parts {
            store: store.clone(),
            log: log.clone(),
            appender: appender.clone(),
            metrics: metrics.profile_stage.clone(),
            clock: clock.clone(),
            runtime: tokio::runtime::Handle::current(),
            cache_size: config.profiles.cache_size,
            cache_memory: config.profiles.cache_memory as usize,
            save_every: config.profiles.save_interval,
            lake: Some(query.clone()),
            health: health(stages, metrics, "profiles", profile_stage::CONSUMER),
        },
        set,
        reloaded_sets,
        live.clone(),
    )
    .context("starting the profile stage")?;
    Ok(Audiences {
        stage,
        store,
        live,
        watch: Watch { stop, thread },
    })
}

/// Destinations: one log consumer each.
fn start_destinations(
    config: &Config,
    metrics: &Metrics,
    log: &Arc<IntakeLog>,
    stages: &Arc<Stages>,
) -> anyhow::Result<Arc<Destinations>> {
    let (loaded, problems) = destinations::load(config, &|name| std::env::var(name).ok());
    for problem in &problems {
        tracing::error!(%problem, "destination file problem");
    }
    let parts = destinations::Parts {
        log: log.clone(),
        state_dir: config.destinations.state.clone(),
        metrics: metrics.destinations.clone(),
        health: {
            let (stages, metrics) = (stages.clone(), metrics.stages.clone());
            Arc::new(move |name: &str| {
                let consumer = destinations::consumer_name(name);
                let health = Health::new(&consumer, &consumer, metrics.clone());
                stages.add(health.clone());
                health
            })
        },
    };
    let destinations = Destinations::start(loaded, parts).context("starting the destinations")?;
    Ok(Arc::new(destinations))
}

/// The HTTP server: the tracking edge, the admin API and the operations endpoints.
fn serve(
    config: &Config,
    listener: TcpListener,
    state: web::Data<AppState>,
    admin_state: web::Data<AdminState>,
) -> anyhow::Result<(ServerHandle, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let address = listener.local_addr()?;
    let workers = config
        .server
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .app_data(admin_state.clone())
            .wrap(http::cors_headers())
            .configure(crate::admin::routes)
            .configure(http::routes)
    })
    .workers(workers)
    .disable_signals()
    .shutdown_timeout(config.server.shutdown_timeout.as_secs().max(1))
    .listen(listener)?
    .run();
    let handle = server.handle();
    let task = tokio::spawn(server);
    tracing::info!(%address, workers, log = %config.log.dir.display(), "sluice is serving");
    Ok((handle, task))
}

impl Running {
    /// Stops in the order data flows: the edge, then the log, then the state derived from it.
    /// Every step gets until one deadline; what does not finish by then is named in the log (and
    /// redone from the log on the next start: nothing acknowledged is lost either way).
    async fn stop(self) {
        self.state.shutting_down.store(true, Ordering::Relaxed);
        for watch in self.watches {
            watch.stop();
        }
        let mut steps = Steps {
            deadline: tokio::time::Instant::now() + self.config.server.shutdown_timeout,
            abandoned: Vec::new(),
        };
        if tokio::time::timeout_at(steps.deadline, self.server.stop(true))
            .await
            .is_err()
        {
            steps.abandoned.push("HTTP requests in flight");
        }
        // The profile stage appends to the log too: it stops before the log closes.
        let stage = self.profile_stage;
        steps
            .run("profile stage batch", move || stage.finish())
            .await;
        // Destinations only read the log: they stop once nothing more will be appended.
        let destinations = self.destinations;
        steps
            .run("destination requests in flight", move || {
                destinations.finish()
            })
            .await;
        let log = self.log;
        steps.run("intake log writes", move || log.close()).await;
        let compaction = self.compaction;
        steps
            .run("compaction pass", move || compaction.stop())
            .await;
        let lake = self.lake;
        if let Some(Stopped::Abandoned) = steps.run("lake flush", move || lake.finish()).await {
            steps
                .abandoned
                .push("lake flush (storage or the writer failing)");
        }
        drop(self.query_runtime);
        let checkpoints = self.checkpoints;
        if let Some(Err(e)) = steps
            .run("dedup checkpoint", move || checkpoints.finish())
            .await
        {
            tracing::error!(error = %e, "final dedup checkpoint failed; the next start replays more of the log");
        }
        if steps.abandoned.is_empty() {
            tracing::info!("shut down cleanly");
        } else {
            tracing::error!(
                waited = ?self.config.server.shutdown_timeout,
                abandoned = %steps.abandoned.join(", "),
                "shutdown deadline passed; stopping without them"
            );
        }
    }
}

/// The steps of a shutdown, each run off the async threads until one deadline.
struct Steps {
    deadline: tokio::time::Instant,
    abandoned: Vec<&'static str>,
}

impl Steps {
    /// Runs `step`; `None`, and `what` noted as abandoned, when it does not finish in time.
    async fn run<T: Send + 'static>(
        &mut self,
        what: &'static str,
        step: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let done = tokio::time::timeout_at(self.deadline, tokio::task::spawn_blocking(step)).await;
        match done {
            Ok(Ok(out)) => Some(out),
            _ => {
                self.abandoned.push(what);
                None
            }
        }
    }
}

/// A folder watch's thread, stopped by dropping its channel.
struct Watch {
    stop: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Watch {
    fn stop(self) {
        drop(self.stop);
        let _ = self.thread.join();
    }
}

/// The runtime admin queries run on; dropping it abandons queries still running (it may be dropped
/// from async code, where a plain runtime refuses to be dropped).
struct QueryRuntime(Option<tokio::runtime::Runtime>);

impl QueryRuntime {
    fn handle(&self) -> tokio::runtime::Handle {
        self.0
            .as_ref()
            .expect("present until dropped")
            .handle()
            .clone()
    }
}

impl Drop for QueryRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}
