//! A destination's own durable state, one redb file per destination (`<state dir>/<name>.redb`),
//! so that one destination's writes never wait on another's:
//!
//! - `parked`: (user, seq) → a message (postcard) taken off the intake log before it was delivered, because
//!   its user is retrying or the destination is lagging. The log can then drop it; this queue
//!   holds it, in order per user, for as long as delivery takes.
//! - `users`: user → when that user's parked messages are next tried, and since when they fail.
//! - `dead`: seq → a message that will not be delivered as it is, with why (the dead letter).
//! - `meta`: `next_seq`.
//!
//! Every write commits durably before the log cursor moves past what it holds.

use std::path::{Path, PathBuf};
use std::sync::RwLock;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use super::sender::Outgoing;

const PARKED: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("parked");
const USERS: TableDefinition<&str, &[u8]> = TableDefinition::new("users");
const DEAD: TableDefinition<u64, &[u8]> = TableDefinition::new("dead");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

#[derive(Debug, thiserror::Error)]
#[error("destination queue: {0}")]
pub struct QueueError(String);

error_from!(
    QueueError:
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    postcard::Error,
    serde_json::Error,
    std::io::Error
);

/// When a parked user is next tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserState {
    pub retry_at_ms: i64,
    /// When its oldest parked message first failed; `None` when it was parked only because the
    /// destination lagged.
    pub failing_since_ms: Option<i64>,
    pub attempts: u32,
}

/// One dead-lettered message, as `GET /admin/destinations/{name}/dead` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dead {
    pub message_id: String,
    pub user: String,
    pub offset: u64,
    pub accepted_micros: i64,
    /// The payload (as sent, or as it was in the log when `shaped` is false).
    pub body: String,
    pub shaped: bool,
    /// The destination's answer, when it gave one.
    pub status: Option<u16>,
    pub reason: String,
    pub dead_at_ms: i64,
}

impl Dead {
    pub fn new(
        message: &Outgoing,
        shaped: bool,
        status: Option<u16>,
        reason: String,
        now_ms: i64,
    ) -> Dead {
        Dead {
            message_id: message.message_id.clone(),
            user: message.user.clone(),
            offset: message.offset,
            accepted_micros: message.accepted_micros,
            body: String::from_utf8_lossy(&message.body).into_owned(),
            shaped,
            status,
            reason,
            dead_at_ms: now_ms,
        }
    }

    /// The message again, and whether it was shaped (filtered and transformed) already.
    fn into_outgoing(self) -> (Outgoing, bool) {
        let message = Outgoing {
            offset: self.offset,
            user: self.user,
            message_id: self.message_id,
            accepted_micros: self.accepted_micros,
            body: self.body.into_bytes(),
        };
        (message, self.shaped)
    }
}

pub struct Queue {
    path: PathBuf,
    /// `None` only while [`Queue::reopen`] replaces it.
    db: RwLock<Option<Database>>,
}

/// Changes made together, durably.
#[derive(Default)]
pub struct Change {
    /// Appended to each user's parked messages, in order.
    pub park: Vec<Outgoing>,
    /// Parked messages done with (delivered or dead).
    pub remove: Vec<(String, u64)>,
    pub dead: Vec<Dead>,
    /// New states of parked users; `None` removes the user (nothing parked any more).
    pub users: Vec<(String, Option<UserState>)>,
}

impl Change {
    pub fn is_empty(&self) -> bool {
        self.park.is_empty()
            && self.remove.is_empty()
            && self.dead.is_empty()
            && self.users.is_empty()
    }
}

impl Queue {
    pub fn open(dir: &Path, name: &str) -> Result<Queue, QueueError> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{name}.redb"));
        let db = open_db(&path)?;
        Ok(Queue {
            path,
            db: RwLock::new(Some(db)),
        })
    }

    /// Closes and opens the file again: after a failed write (a full disk) redb refuses to go on
    /// with the handle it has.
    pub fn reopen(&self) -> Result<(), QueueError> {
        let mut db = self.db.write().unwrap();
        db.take();
        *db = Some(open_db(&self.path)?);
        Ok(())
    }

    fn read(&self) -> Result<redb::ReadTransaction, QueueError> {
        match self.db.read().unwrap().as_ref() {
            Some(db) => Ok(db.begin_read()?),
            None => Err(self.closed()),
        }
    }

    fn write(&self) -> Result<redb::WriteTransaction, QueueError> {
        match self.db.read().unwrap().as_ref() {
            Some(db) => Ok(db.begin_write()?),
            None => Err(self.closed()),
        }
    }

    fn closed(&self) -> QueueError {
        QueueError(format!("{} is not open", self.path.display()))
    }

    pub fn apply(&self, change: Change) -> Result<(), QueueError> {
        if change.is_empty() {
            return Ok(());
        }
        let w = self.write()?;
        write_change(&w, &change)?;
        w.commit()?;
        Ok(())
    }

    /// A consistent view to load several users' parked messages from.
    pub fn reader(&self) -> Result<QueueReader, QueueError> {
        Ok(QueueReader(self.read()?.open_table(PARKED)?))
    }

    /// Every parked user and its state: what a restart resumes from.
    pub fn users(&self) -> Result<Vec<(String, UserState)>, QueueError> {
        let r = self.read()?;
        let users = r.open_table(USERS)?;
        let mut out = Vec::new();
        for row in users.iter()? {
            let (user, state) = row?;
            out.push((
                user.value().to_string(),
                postcard::from_bytes(state.value())?,
            ));
        }
        Ok(out)
    }

    pub fn parked_count(&self) -> Result<u64, QueueError> {
        Ok(self.read()?.open_table(PARKED)?.len()?)
    }

    pub fn dead_count(&self) -> Result<u64, QueueError> {
        Ok(self.read()?.open_table(DEAD)?.len()?)
    }

    /// Up to `limit` dead letters after `after`, oldest first.
    pub fn dead(&self, after: Option<u64>, limit: usize) -> Result<Vec<(u64, Dead)>, QueueError> {
        let r = self.read()?;
        let dead = r.open_table(DEAD)?;
        let start = after.map_or(0, |a| a.saturating_add(1));
        let mut out = Vec::new();
        for row in dead.range(start..)?.take(limit) {
            let (seq, value) = row?;
            out.push((seq.value(), serde_json::from_slice(value.value())?));
        }
        Ok(out)
    }

    /// Takes every dead letter out, in one transaction with `park` of what the caller makes of
    /// them: each dead message leaves the dead letter exactly once.
    pub fn replay_dead(
        &self,
        decide: impl FnOnce(Vec<(Outgoing, bool)>) -> Change,
    ) -> Result<usize, QueueError> {
        let w = self.write()?;
        let taken = {
            let mut dead = w.open_table(DEAD)?;
            let mut taken = Vec::new();
            for row in dead.iter()? {
                let (_, value) = row?;
                taken.push(serde_json::from_slice::<Dead>(value.value())?);
            }
            dead.retain(|_, _| false)?;
            taken
        };
        let count = taken.len();
        write_change(
            &w,
            &decide(taken.into_iter().map(Dead::into_outgoing).collect()),
        )?;
        w.commit()?;
        Ok(count)
    }
}

pub struct QueueReader(redb::ReadOnlyTable<(&'static str, u64), &'static [u8]>);

impl QueueReader {
    /// Up to `limit` of `user`'s parked messages, oldest first, with their seqs.
    pub fn load(&self, user: &str, limit: usize) -> Result<Vec<(u64, Outgoing)>, QueueError> {
        let mut out = Vec::new();
        for row in self.0.range((user, 0)..=(user, u64::MAX))?.take(limit) {
            let (key, value) = row?;
            out.push((key.value().1, postcard::from_bytes(value.value())?));
        }
        Ok(out)
    }
}

fn open_db(path: &Path) -> Result<Database, QueueError> {
    let db = Database::builder().set_cache_size(8 << 20).create(path)?;
    let w = db.begin_write()?;
    w.open_table(PARKED)?;
    w.open_table(USERS)?;
    w.open_table(DEAD)?;
    w.open_table(META)?;
    w.commit()?;
    Ok(db)
}

fn write_change(w: &redb::WriteTransaction, change: &Change) -> Result<(), QueueError> {
    let mut meta = w.open_table(META)?;
    let mut seq = meta.get("next_seq")?.map_or(0, |v| v.value());
    let mut parked = w.open_table(PARKED)?;
    for p in &change.park {
        let row = postcard::to_allocvec(p)?;
        parked.insert((p.user.as_str(), seq), row.as_slice())?;
        seq += 1;
    }
    for (user, seq) in &change.remove {
        parked.remove((user.as_str(), *seq))?;
    }
    let mut dead = w.open_table(DEAD)?;
    for d in &change.dead {
        dead.insert(seq, serde_json::to_vec(d)?.as_slice())?;
        seq += 1;
    }
    let mut users = w.open_table(USERS)?;
    for (user, state) in &change.users {
        match state {
            Some(s) => {
                users.insert(user.as_str(), postcard::to_allocvec(s)?.as_slice())?;
            }
            None => {
                users.remove(user.as_str())?;
            }
        }
    }
    meta.insert("next_seq", seq)?;
    Ok(())
}
