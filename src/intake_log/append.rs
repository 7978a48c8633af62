//! The one way records enter the log: idempotent by key.
//!
//! Every writer — the edge, the profile stage (segment changes, records it sets aside, clock
//! records) and the quarantine replay — appends in two steps: [`Appender::begin`] with one key per
//! record it means to write (`None` for a record that is never a duplicate), which says which are
//! duplicates of what the log holds within the dedup window; then [`Pending::finish`] with the
//! records of the others, built by the caller (so a duplicate costs no encoding), which resolves
//! once they are durable. Only then are their keys remembered: a failed or abandoned append
//! forgets them, so a retry is not mistaken for a duplicate (see [`super::dedup`], "Reservations").
//!
//! A key is [`message_key`] of the source and messageId for what a client sent and what Sluice
//! emits under its own source, and [`readmission_key`] for a quarantined message let in again (its
//! quarantine record already holds the message's own key).

use std::ops::Range;
use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::dedup::{self, Dedup, Reservation};
use super::{AppendError, IntakeLog, RecordBatch};

pub use dedup::key as message_key;

/// The key under which a quarantined message's readmission is remembered: another space than
/// [`message_key`] (whose separator is `0xff`), which the message's quarantine record took. No
/// UTF-8 text holds either byte, so the two never meet.
pub fn readmission_key(source: &str, message_id: &str) -> u128 {
    let mut h = xxhash_rust::xxh3::Xxh3Default::new();
    h.update(source.as_bytes());
    h.update(&[0xfe]);
    h.update(message_id.as_bytes());
    h.digest128()
}

/// The log with its dedup: the handle every writer appends through.
pub struct Appender {
    log: Arc<IntakeLog>,
    dedup: Arc<Dedup>,
}

/// One append between its two steps: its keys reserved, its records not yet written.
pub struct Pending<'a> {
    log: &'a IntakeLog,
    reservation: Reservation<'a>,
    duplicate: Vec<bool>,
}

impl Appender {
    pub fn new(log: Arc<IntakeLog>, dedup: Arc<Dedup>) -> Self {
        Appender { log, dedup }
    }

    /// Reserves `keys` and marks which are duplicates. When another append in flight holds one of
    /// them, waits (holding nothing) for its outcome: a copy is a duplicate only of what became
    /// durable.
    pub async fn begin(&self, keys: &[Option<u128>]) -> Pending<'_> {
        let (reservation, duplicate) = self.dedup.reserve(keys, || self.log.end()).await;
        Pending {
            log: &self.log,
            reservation,
            duplicate,
        }
    }

    /// Appends records that are never duplicates (clock records): nothing to reserve.
    pub async fn append_unkeyed(&self, records: RecordBatch) -> Result<Range<u64>, AppendError> {
        self.log.append(records).await
    }

    pub fn log(&self) -> &Arc<IntakeLog> {
        &self.log
    }
}

impl Pending<'_> {
    /// For each key given to [`Appender::begin`], whether the log already holds it.
    pub fn duplicates(&self) -> &[bool] {
        &self.duplicate
    }

    /// Appends `records` and, once they are durable, remembers the keys that were not duplicates
    /// as accepted `at`. On an error nothing is remembered.
    pub async fn finish(
        self,
        records: RecordBatch,
        at: DateTime<Utc>,
    ) -> Result<Range<u64>, AppendError> {
        let end = self.log.end();
        let appended = if records.is_empty() {
            end..end
        } else {
            self.log.append(records).await?
        };
        self.reservation.commit(at);
        Ok(appended)
    }
}
