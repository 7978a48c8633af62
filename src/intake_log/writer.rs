//! The writer thread: group commit.
//!
//! It blocks for the first queued append, then takes whatever else is already queued (up to
//! [`MAX_GROUP_BYTES`]), writes it all at the end of the active segment with positioned writes,
//! fsyncs once, publishes the new end and answers every request. While it waits on the disk, new
//! requests queue up and form the next group, so the fsync rate adapts to the load by itself.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use super::segment::{self, SegmentFile, HEADER_LEN};
use super::{AppendError, Command, LogOptions, Room, Shared};
use crate::metrics::LogMetrics;

const MAX_GROUP_BYTES: usize = 8 << 20;

pub(super) struct Writer {
    shared: Arc<Shared>,
    options: LogOptions,
    active: SegmentFile,
    file: File,
    /// Offset the next record will get.
    next_offset: u64,
    metrics: Arc<LogMetrics>,
}

/// Appends written to the active segment but not yet fsynced.
struct Pending {
    commands: Vec<(Command, Range<u64>)>,
    bytes: u64,
}

impl Writer {
    pub(super) fn new(
        shared: Arc<Shared>,
        options: LogOptions,
        active: SegmentFile,
        file: File,
        next_offset: u64,
        metrics: Arc<LogMetrics>,
    ) -> Self {
        Writer {
            shared,
            options,
            active,
            file,
            next_offset,
            metrics,
        }
    }

    pub(super) fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut group = Vec::new();
        while let Some(first) = commands.blocking_recv() {
            let mut bytes = first.batch.byte_len();
            group.push(first);
            while bytes < MAX_GROUP_BYTES {
                match commands.try_recv() {
                    Ok(next) => {
                        bytes += next.batch.byte_len();
                        group.push(next);
                    }
                    Err(_) => break,
                }
            }
            self.commit_group(&mut group);
        }
        tracing::debug!(end = self.next_offset, "intake log writer stopped");
    }

    fn commit_group(&mut self, group: &mut Vec<Command>) {
        let mut pending = Pending {
            commands: Vec::with_capacity(group.len()),
            bytes: 0,
        };
        for command in group.drain(..) {
            if self.shared.failed.load(Ordering::Relaxed) {
                let _ = command.reply.send(Err(AppendError::Failed));
                continue;
            }
            if command.batch.is_empty() {
                let at = self.next_offset;
                let _ = command.reply.send(Ok(at..at));
                continue;
            }
            let len = command.batch.byte_len() as u64;
            let held = self.shared.state.lock().unwrap().total_bytes + pending.bytes;
            let max = match command.room {
                Room::Limit => self.options.max_size,
                Room::Reserve => self.options.max_size + self.options.reserve(),
            };
            if held + len > max {
                let _ = command.reply.send(Err(AppendError::Full { held, max }));
                continue;
            }
            let active_len = self.active.size + pending.bytes;
            if active_len + len > self.options.segment_size && active_len > HEADER_LEN {
                self.flush(&mut pending);
                if let Err(e) = self.roll() {
                    tracing::error!(error = %e, "could not start a new intake log segment");
                    self.metrics.write_errors.inc();
                    let _ = command.reply.send(Err(AppendError::Io(e.to_string())));
                    continue;
                }
            }
            let range = self.next_offset..self.next_offset + command.batch.len();
            self.next_offset = range.end;
            pending.bytes += len;
            pending.commands.push((command, range));
        }
        self.flush(&mut pending);
    }

    /// Writes and fsyncs the pending appends, then answers them.
    fn flush(&mut self, pending: &mut Pending) {
        if pending.commands.is_empty() {
            return;
        }
        let started = Instant::now();
        let records: u64 = pending.commands.iter().map(|(c, _)| c.batch.len()).sum();
        match self.write_and_sync(pending) {
            Ok(()) => {
                self.active.size += pending.bytes;
                {
                    let mut state = self.shared.state.lock().unwrap();
                    state.total_bytes += pending.bytes;
                    if let Some(last) = state.segments.last_mut() {
                        last.size = self.active.size;
                    }
                }
                self.shared.end.send_replace(self.next_offset);
                self.metrics.fsyncs.inc();
                self.metrics
                    .fsync_seconds
                    .observe(started.elapsed().as_secs_f64());
                self.metrics.group_records.observe(records as f64);
                self.metrics.appended_records.inc_by(records);
                self.metrics.appended_bytes.inc_by(pending.bytes);
                for (command, range) in pending.commands.drain(..) {
                    let _ = command.reply.send(Ok(range));
                }
            }
            Err(e) => {
                self.metrics.write_errors.inc();
                // Nothing of this group was acknowledged: cut it off so it is never read, and
                // give its offsets back.
                let undone = self
                    .file
                    .set_len(self.active.size)
                    .and_then(|()| self.file.sync_data());
                let first = pending.commands[0].1.start;
                let error = match undone {
                    Ok(()) => {
                        self.next_offset = first;
                        tracing::error!(error = %e, records, "intake log write failed; the group was refused");
                        AppendError::Io(e.to_string())
                    }
                    Err(cut) => {
                        self.shared.failed.store(true, Ordering::Relaxed);
                        tracing::error!(error = %e, cut_error = %cut, "intake log write failed and could not be undone; refusing all appends");
                        AppendError::Failed
                    }
                };
                for (command, _) in pending.commands.drain(..) {
                    let _ = command.reply.send(Err(error.clone()));
                }
            }
        }
        pending.bytes = 0;
    }

    fn write_and_sync(&self, pending: &Pending) -> std::io::Result<()> {
        let mut at = self.active.size;
        for (command, _) in &pending.commands {
            self.file.write_all_at(&command.batch.buf, at)?;
            at += command.batch.byte_len() as u64;
        }
        self.file.sync_data()
    }

    /// Seals the active segment (already durable) and starts a new one at the next offset.
    fn roll(&mut self) -> std::io::Result<()> {
        let (segment, file) = segment::create(&self.options.dir, self.next_offset)?;
        {
            let mut state = self.shared.state.lock().unwrap();
            state.total_bytes += segment.size;
            state.segments.push(segment.clone());
        }
        self.active = segment;
        self.file = file;
        Ok(())
    }
}
