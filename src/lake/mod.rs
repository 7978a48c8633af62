//! The lake: every entry of the intake log as Parquet in object storage, queryable by Sluice
//! (`crate::query`) and by any engine that reads Parquet with hive partitioning.
//!
//! ```text
//! <storage.url>/events/date=YYYY-MM-DD/<start>-<end>.parquet       accepted messages
//! <storage.url>/quarantine/date=YYYY-MM-DD/<start>-<end>.parquet   rejected messages, with reason and raw JSON
//! <storage.url>/tracks/<event_slug>/date=YYYY-MM-DD/...             typed tables of track events with a schema
//! ```
//!
//! - [`store`]: `storage.url` to an object store; durable writes.
//! - [`tables`]: the tables' Arrow schemas and row builders.
//! - [`typed`]: typed per-event tables derived from the schema registry's files.
//! - [`writer`]: the log consumer that writes flushes exactly once.
//! - [`compaction`]: merges the small files of closed partitions.
//! - [`view`]: hides files that compaction superseded from readers' listings.
//!
//! The lake only reads the intake log (through its own consumer) and writes the object store; it
//! never touches the HTTP edge or the other consumers.

pub mod compaction;
pub mod store;
pub mod tables;
pub mod typed;
pub mod view;
pub mod writer;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::intake_log::IntakeLog;
use crate::metrics::LakeMetrics;
use crate::supervisor::{supervise, Health};
pub use store::LakeStore;
use typed::TypedSource;
use writer::{FlushPolicy, LakeWriter, Stopped};

/// The lake writer running on its own thread, under a supervisor (see `crate::supervisor`).
pub struct LakeHandle {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Option<Stopped>>,
}

impl LakeHandle {
    /// Registers the `lake` consumer (from now on the log keeps what the lake has not stored),
    /// redoes an interrupted flush, and starts writing. Call from within the Tokio runtime that
    /// should drive the object store's I/O. A failure starts the writer again from its cursor.
    pub fn start(
        store: LakeStore,
        log: &IntakeLog,
        policy: FlushPolicy,
        typed: Arc<TypedSource>,
        metrics: Arc<LakeMetrics>,
        health: Arc<Health>,
    ) -> std::io::Result<LakeHandle> {
        let consumer = log.consumer(writer::CONSUMER)?;
        let state_dir = log.dir().to_path_buf();
        let runtime = tokio::runtime::Handle::current();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("sluice-lake-writer".into())
                .spawn(move || {
                    // A flush encodes Parquet in one burst of 30–75 ms of CPU at 25,000 msg/s;
                    // at normal priority it took the core from the profile stage (nice 10) and
                    // was most of what delayed segment changes past 50 ms. The log holds what
                    // the lake has not stored, so the lake can wait for what the core has left.
                    crate::thread_priority::lowest();
                    let stopping = || stop.load(Ordering::Relaxed);
                    supervise(&health, stopping, || {
                        let writer = LakeWriter::new(
                            store.clone(),
                            consumer.reopen()?,
                            &state_dir,
                            policy.clone(),
                            metrics.clone(),
                            runtime.clone(),
                            typed.clone(),
                        )?;
                        writer.run(&stop, &health)
                    })
                })?
        };
        Ok(LakeHandle { stop, thread })
    }

    /// Stores everything the log holds, then stops. Call after the log stopped taking appends.
    /// [`Stopped::Abandoned`] when the writer was failing as it was asked to stop: the log keeps
    /// what it did not store.
    pub fn finish(self) -> Stopped {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .ok()
            .flatten()
            .unwrap_or(Stopped::Abandoned)
    }
}

#[cfg(test)]
pub(crate) mod tests;
