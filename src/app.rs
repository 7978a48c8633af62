//! The wiring: the only module that knows the whole chain. It opens the intake log, rebuilds
//! the dedup state, starts the lake writer, the profile stage, the destinations and the HTTP edge on the listener it is given, runs the
//! background tasks, and on shutdown drains the stages in the order data flows through them:
//! edge, profile stage, destinations, log, lake, dedup checkpoint.

use std::future::Future;
use std::net::TcpListener;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use actix_web::{App, HttpServer};
use anyhow::Context as _;

use crate::clock::{self, Clock};
use crate::config::Config;
use crate::destinations::{self, Destinations};
use crate::http::{self, AppState};
use crate::ingest::{Ingest, Parts};
use crate::intake_log::{dedup, Appender, IntakeLog, LogOptions};
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
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::default());

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
    let (dedup, dedup_consumer) = {
        let log = log.clone();
        let config = config.clone();
        let metrics = metrics.dedup.clone();
        tokio::task::spawn_blocking(move || dedup::recover(&config.dedup, &log, metrics))
            .await?
            .context("rebuilding the dedup state")?
    };
    // The one way anything enters the log.
    let appender = Arc::new(Appender::new(log.clone(), dedup.clone()));

    // The tracking plan, reloaded whenever the schemas folder changes.
    let mut loader = schema::watch::Loader::new(&config.schemas.dir);
    let (schemas, registry, problems) = loader.load();
    for problem in &problems {
        tracing::error!(%problem, "schema file refused");
    }
    metrics.schema.refused_files.set(problems.len() as i64);
    tracing::info!(schemas = registry.len(), "tracking plan loaded");
    let plan = Arc::new(Live::new(schemas, registry));
    let (stop_schema_watch, schema_watch_stopped) = std::sync::mpsc::channel::<()>();
    let schema_watch = schema::watch::spawn(
        loader,
        plan.clone(),
        metrics.schema.clone(),
        schema_watch_stopped,
    )?;
    let typed = Arc::new(TypedSource::new(plan.clone()));

    // The lake registers its log consumer before anything can trim the log.
    let lake_store = LakeStore::from_url(&config.storage.url)?;
    // Every consumer of the log runs under a supervisor, and shows on /readyz.
    let stages = Arc::new(Stages::default());
    let health = |stage: &str, consumer: &str| {
        let health = Health::new(stage, consumer, metrics.stages.clone());
        stages.add(health.clone());
        health
    };
    let lake = LakeHandle::start(
        lake_store.clone(),
        &log,
        FlushPolicy {
            interval: config.storage.flush_interval,
            ..FlushPolicy::default()
        },
        typed.clone(),
        metrics.lake.clone(),
        health("lake", crate::lake::writer::CONSUMER),
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
        lake_store.clone(),
        typed.clone(),
        QueryLimits {
            memory: config.query.memory_limit as usize,
            timeout: config.query.timeout,
        },
    );

    // Profiles and segments: another log consumer, and a producer of Audience Entered/Exited.
    let profile_store = Arc::new(
        ProfileStore::open(&config.profiles.dir, config.profiles.store_cache as usize)
            .with_context(|| {
                format!(
                    "opening the profile store in {}",
                    config.profiles.dir.display()
                )
            })?,
    );
    let mut segment_loader = segments::watch::Loader::new(&config.segments.dir);
    let (segment_set, problems) = segment_loader.load();
    for problem in &problems {
        tracing::error!(%problem, "segment file refused");
    }
    metrics
        .profile_stage
        .refused_files
        .set(problems.len() as i64);
    tracing::info!(segments = segment_set.len(), "segments loaded");
    let segment_set = Arc::new(segment_set);
    let live_segments = Arc::new(LiveSegments::new(segment_set.clone()));
    let (new_sets, reloaded_sets) = std::sync::mpsc::sync_channel(4);
    let (stop_segment_watch, segment_watch_stopped) = std::sync::mpsc::channel::<()>();
    let segment_watch = segments::watch::spawn(
        segment_loader,
        new_sets,
        metrics.profile_stage.clone(),
        segment_watch_stopped,
    )?;
    let profile_stage = ProfileStage::start(
        profile_stage::Parts {
            store: profile_store.clone(),
            log: log.clone(),
            appender: appender.clone(),
            metrics: metrics.profile_stage.clone(),
            clock: clock.clone(),
            runtime: tokio::runtime::Handle::current(),
            cache_size: config.profiles.cache_size,
            cache_memory: config.profiles.cache_memory as usize,
            save_every: config.profiles.save_interval,
            lake: Some(query.clone()),
            health: health("profiles", profile_stage::CONSUMER),
        },
        segment_set,
        reloaded_sets,
        live_segments.clone(),
    )
    .context("starting the profile stage")?;

    // Destinations: one log consumer each, registered before anything can trim the log.
    let (loaded, problems) = destinations::load(&config, &|name| std::env::var(name).ok());
    for problem in &problems {
        tracing::error!(%problem, "destination file problem");
    }
    let destinations = Arc::new(
        Destinations::start(
            loaded,
            destinations::Parts {
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
            },
        )
        .context("starting the destinations")?,
    );

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
    let replayer = Arc::new(Replayer::new(
        &config,
        query.clone(),
        appender,
        plan.clone(),
    ));
    let state = actix_web::web::Data::new(AppState {
        config: config.clone(),
        ingest,
        log: log.clone(),
        dedup: dedup.clone(),
        registry: metrics.registry(),
        metrics: metrics.clone(),
        shutting_down: Default::default(),
        plan: plan.clone(),
        query,
        replayer,
        query_runtime: query_runtime.handle(),
        query_slots: Arc::new(tokio::sync::Semaphore::new(2)),
        profiles: profile_store,
        segments: live_segments,
        destinations: destinations.clone(),
        stages,
    });

    let address = listener.local_addr()?;
    let workers = config
        .server
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let server = {
        let state = state.clone();
        HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
                .wrap(http::cors_headers())
                .configure(http::routes)
        })
        .workers(workers)
        .disable_signals()
        .shutdown_timeout(config.server.shutdown_timeout.as_secs().max(1))
        .listen(listener)?
        .run()
    };
    let server_handle = server.handle();
    let mut server_task = tokio::spawn(server);
    tracing::info!(%address, workers, log = %config.log.dir.display(), "sluice is serving");

    // Dedup checkpoints: recent ids to runs on disk, so that a restart replays a short stretch of
    // the log.
    let checkpoints = dedup::Checkpoints::start(dedup, log.clone(), dedup_consumer)?;

    tokio::select! {
        _ = shutdown => tracing::info!("shutting down: no new connections; finishing requests in flight"),
        result = &mut server_task => {
            result??;
            anyhow::bail!("the HTTP server stopped by itself");
        }
    }

    // Stop in the order data flows: the edge, then the log, then the state derived from it.
    state.shutting_down.store(true, Ordering::Relaxed);
    drop(stop_schema_watch);
    let _ = schema_watch.join();
    drop(stop_segment_watch);
    let _ = segment_watch.join();
    let deadline = tokio::time::Instant::now() + config.server.shutdown_timeout;
    let mut abandoned = Vec::new();
    if tokio::time::timeout_at(deadline, server_handle.stop(true))
        .await
        .is_err()
    {
        abandoned.push("HTTP requests in flight");
    }
    // The profile stage appends to the log too: it stops before the log closes.
    let audience_stopped = tokio::task::spawn_blocking(move || profile_stage.finish());
    if tokio::time::timeout_at(deadline, audience_stopped)
        .await
        .is_err()
    {
        abandoned.push("profile stage batch");
    }
    // Destinations only read the log: they stop once nothing more will be appended.
    let destinations_stopped = tokio::task::spawn_blocking(move || destinations.finish());
    if tokio::time::timeout_at(deadline, destinations_stopped)
        .await
        .is_err()
    {
        abandoned.push("destination requests in flight");
    }
    let closing = tokio::task::spawn_blocking(move || log.close());
    if tokio::time::timeout_at(deadline, closing).await.is_err() {
        abandoned.push("intake log writes");
    }
    let compaction_stopped = tokio::task::spawn_blocking(move || compaction.stop());
    if tokio::time::timeout_at(deadline, compaction_stopped)
        .await
        .is_err()
    {
        abandoned.push("compaction pass");
    }
    let lake_done = tokio::task::spawn_blocking(move || lake.finish());
    match tokio::time::timeout_at(deadline, lake_done).await {
        Ok(Ok(Stopped::Flushed)) => {}
        Ok(Ok(Stopped::Abandoned)) => abandoned.push("lake flush (storage or the writer failing)"),
        _ => abandoned.push("lake flush"),
    }
    drop(query_runtime);
    let final_checkpoint = tokio::task::spawn_blocking(move || checkpoints.finish());
    match tokio::time::timeout_at(deadline, final_checkpoint).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => {
            tracing::error!(error = %e, "final dedup checkpoint failed; the next start replays more of the log")
        }
        _ => abandoned.push("dedup checkpoint"),
    }
    if abandoned.is_empty() {
        tracing::info!("shut down cleanly");
    } else {
        // Nothing acknowledged is lost either way: what was not finished is redone from the log
        // on the next start.
        tracing::error!(
            waited = ?config.server.shutdown_timeout,
            abandoned = %abandoned.join(", "),
            "shutdown deadline passed; stopping without them"
        );
    }
    Ok(())
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
