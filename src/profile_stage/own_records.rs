//! The stage's own records in the log: the changes it emits and the records it sets aside, each
//! appended once through the log's idempotent append, and, before a redo, read back so that it
//! appends none of them again.

use super::*;

/// The messageIds of the stage's own records in the log past the saved offset, up to `until`: a
/// redo appends none of them again.
pub(super) struct OwnAhead {
    pub(super) ids: HashSet<String>,
    pub(super) until: u64,
}

/// A record of the log the supervisor set aside: the stage kept failing on it.
pub(super) struct SetAside {
    pub(super) offset: u64,
    pub(super) payload: Vec<u8>,
    pub(super) reason: String,
}

impl Stage {
    /// Notes the messageIds of the stage's own records between the saved offset and the log's
    /// end: what a redo emits again is already there.
    pub(super) fn read_own_ahead(&mut self) -> Result<(), StageError> {
        self.own_ahead.ids.clear();
        let mut reader = self.log.reader(self.offset);
        loop {
            let records = reader.read(BATCH)?;
            if records.is_empty() {
                break;
            }
            for record in &records {
                match Entry::decode(&record.payload) {
                    Ok(e) if e.source == SOURCE && !e.message_id.is_empty() => {
                        self.own_ahead.ids.insert(e.message_id.to_string());
                    }
                    _ => {}
                }
            }
        }
        self.own_ahead.until = reader.position();
        Ok(())
    }

    /// Appends what the batch emitted to the log, and the records it set aside (as rejected, for
    /// the quarantine). The records arrive now, by the clock; the messages in them carry the
    /// stage's time, at which the changes happened.
    pub(super) fn append_emissions(&mut self) -> Result<(), AppendError> {
        if !self.set_aside.is_empty() {
            self.append_set_aside()?;
        }
        if self.emissions.is_empty() {
            return Ok(());
        }
        let now = (self.clock)();
        let keys: Vec<Option<u128>> = self
            .emissions
            .iter()
            .map(|e| Some(message_key(SOURCE, &e.message_id)))
            .collect();
        let pending = self.runtime.block_on(self.appender.begin(&keys));
        let mut records =
            RecordBatch::with_capacity(self.emissions.iter().map(|e| e.body.len() + 64).sum());
        for (e, &dup) in self.emissions.iter().zip(pending.duplicates()) {
            if !dup && !self.own_ahead.ids.contains(&e.message_id) {
                records.push_with(|b| {
                    Entry::encode(b, Status::Accepted, now, SOURCE, &e.message_id, "", |b| {
                        b.extend_from_slice(&e.body)
                    })
                });
            }
        }
        self.runtime.block_on(pending.finish(records, now))?;
        let durable = (self.clock)().timestamp_micros();
        for e in &self.emissions {
            if let Some((cause, at)) = e.cause {
                self.metrics
                    .change_delay
                    .get_or_create(&CauseLabels { cause })
                    .observe((durable - at).max(0) as f64 / 1e6);
            }
        }
        self.emissions.clear();
        Ok(())
    }

    /// Files the records set aside in the quarantine: appended to the log as rejected records of
    /// the `sluice` source, each under an id of its offset so that a redo adds none twice.
    pub(super) fn append_set_aside(&mut self) -> Result<(), AppendError> {
        let now = (self.clock)();
        let ids: Vec<String> = self
            .set_aside
            .iter()
            .map(|s| format!("set-aside-profiles-{}", s.offset))
            .collect();
        let keys: Vec<Option<u128>> = ids.iter().map(|id| Some(message_key(SOURCE, id))).collect();
        let pending = self.runtime.block_on(self.appender.begin(&keys));
        let mut records = RecordBatch::default();
        for ((s, id), &dup) in self.set_aside.iter().zip(&ids).zip(pending.duplicates()) {
            if dup || self.own_ahead.ids.contains(id) {
                continue;
            }
            let body = Entry::decode(&s.payload).map_or(&s.payload[..], |e| e.body);
            records.push_with(|b| {
                Entry::encode(b, Status::Rejected, now, SOURCE, id, &s.reason, |b| {
                    b.extend_from_slice(body)
                })
            });
        }
        self.runtime.block_on(pending.finish(records, now))?;
        for s in self.set_aside.drain(..) {
            self.health.was_set_aside(s.offset);
        }
        Ok(())
    }
}
