//! The wiring: the only module that knows the whole chain. It opens the intake log, rebuilds
//! the dedup state, starts the HTTP edge on the listener it is given, runs the background tasks,
//! and on shutdown drains the stages in the order data flows through them.

use std::future::Future;
use std::net::TcpListener;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use actix_web::{App, HttpServer};
use anyhow::Context as _;

use crate::clock::{self, Clock};
use crate::config::Config;
use crate::http::{self, AppState};
use crate::ingest::{dedup, Ingest};
use crate::intake_log::{IntakeLog, LogOptions};
use crate::metrics::Metrics;

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

    let ingest = Arc::new(Ingest::new(
        &config,
        dedup.clone(),
        log.clone(),
        metrics.ingest.clone(),
        clock,
    ));
    let state = actix_web::web::Data::new(AppState {
        config: config.clone(),
        ingest,
        log: log.clone(),
        dedup: dedup.clone(),
        registry: metrics.registry(),
        metrics: metrics.clone(),
        shutting_down: Default::default(),
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

    // Dedup snapshots, so that a restart replays only a short stretch of the log.
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
    let deadline = tokio::time::Instant::now() + config.server.shutdown_timeout;
    let mut abandoned = Vec::new();
    if tokio::time::timeout_at(deadline, server_handle.stop(true))
        .await
        .is_err()
    {
        abandoned.push("HTTP requests in flight");
    }
    let closing = tokio::task::spawn_blocking(move || log.close());
    if tokio::time::timeout_at(deadline, closing).await.is_err() {
        abandoned.push("intake log writes");
    }
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
