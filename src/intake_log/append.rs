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
use super::{AppendError, IntakeLog, RecordBatch, Room};

pub use dedup::key as message_key;

/// The key under which a quarantined message's readmission is remembered: another space than
/// [`message_key`], which the message's quarantine record took.
pub fn readmission_key(source: &str, message_id: &str) -> u128 {
    dedup::key_in(0xfe, source, message_id)
}

/// The log with its dedup: the handle every writer appends through.
pub struct Appender {
    log: Arc<IntakeLog>,
    dedup: Arc<Dedup>,
    room: Room,
}

/// One append between its two steps: its keys reserved, its records not yet written.
pub struct Pending<'a> {
    log: &'a IntakeLog,
    room: Room,
    reservation: Reservation<'a>,
    duplicate: Vec<bool>,
}

impl Appender {
    /// An appender for what clients send: refused past the log's `max_size`.
    pub fn new(log: Arc<IntakeLog>, dedup: Arc<Dedup>) -> Self {
        Appender {
            log,
            dedup,
            room: Room::Limit,
        }
    }

    /// An appender on the same log and dedup for Sluice's own records, which may use the log's
    /// reserve (see [`Room::Reserve`]).
    pub fn for_own_records(&self) -> Appender {
        Appender {
            log: self.log.clone(),
            dedup: self.dedup.clone(),
            room: Room::Reserve,
        }
    }

    /// Reserves `keys` and marks which are duplicates. When another append in flight holds one of
    /// them, waits (holding nothing) for its outcome: a copy is a duplicate only of what became
    /// durable.
    pub async fn begin(&self, keys: &[Option<u128>]) -> Pending<'_> {
        let (reservation, duplicate) = self.dedup.reserve(keys, || self.log.end()).await;
        Pending {
            log: &self.log,
            room: self.room,
            reservation,
            duplicate,
        }
    }

    /// Appends records that are never duplicates (clock records): nothing to reserve.
    pub async fn append_unkeyed(&self, records: RecordBatch) -> Result<Range<u64>, AppendError> {
        self.log.append_in(self.room, records).await
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
        let appended = if records.is_empty() {
            let end = self.log.end();
            end..end
        } else {
            self.log.append_in(self.room, records).await?
        };
        self.reservation.commit(at);
        Ok(appended)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DedupConfig;
    use crate::intake_log::LogOptions;

    fn appender(dir: &std::path::Path) -> Appender {
        let options = LogOptions {
            dir: dir.join("log"),
            segment_size: 1 << 20,
            max_size: 1 << 30,
        };
        let log = Arc::new(IntakeLog::open(options, Default::default()).unwrap());
        let config = DedupConfig {
            window: std::time::Duration::from_secs(3600),
            max_ids: 1000,
        };
        let dedup = Dedup::new(&config, dir.join("dedup"), Default::default());
        Appender::new(log, Arc::new(dedup))
    }

    fn one(payload: &[u8]) -> RecordBatch {
        let mut records = RecordBatch::default();
        records.push(payload);
        records
    }

    #[tokio::test]
    async fn a_key_is_appended_once_and_a_readmission_is_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let appender = appender(dir.path());
        let key = Some(message_key("web", "m1"));
        let first = appender.begin(&[key]).await;
        assert_eq!(first.duplicates(), [false]);
        first.finish(one(b"a"), Utc::now()).await.unwrap();
        let again = appender.begin(&[key, None]).await;
        assert_eq!(
            again.duplicates(),
            [true, false],
            "unkeyed records never are"
        );
        again.finish(one(b"b"), Utc::now()).await.unwrap();

        // The message's quarantine record holds its key; letting it in again is another.
        let readmitted = Some(readmission_key("web", "m1"));
        assert_ne!(readmitted, key);
        let pending = appender.begin(&[readmitted]).await;
        assert_eq!(pending.duplicates(), [false]);
        pending.finish(one(b"c"), Utc::now()).await.unwrap();
        assert_eq!(appender.begin(&[readmitted]).await.duplicates(), [true]);
        assert_eq!(appender.log().end(), 3);
    }

    #[tokio::test]
    async fn an_append_that_fails_remembers_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let appender = appender(dir.path());
        let key = Some(message_key("web", "m1"));
        appender.log().close();
        let pending = appender.begin(&[key]).await;
        assert!(pending.finish(one(b"a"), Utc::now()).await.is_err());
        assert_eq!(
            appender.begin(&[key]).await.duplicates(),
            [false],
            "the retry is new"
        );
    }
}
