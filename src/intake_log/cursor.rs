//! Consumers and their durable cursors.
//!
//! A cursor is the offset of the first record a consumer has not finished with. It lives in
//! `<log dir>/cursors/<name>`, written to a temporary file, fsynced and renamed over the old one,
//! so a crash leaves either the old or the new value. After a restart a consumer resumes at its
//! cursor: it sees again whatever it had read but not committed (at least once), and the consumer
//! makes that idempotent.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::reader::{LogReader, ReadError, Record};
use super::{segment, Shared};

pub fn dir(log_dir: &Path) -> PathBuf {
    log_dir.join("cursors")
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !name.starts_with('.')
}

/// Reads a consumer's durable cursor.
pub fn load(log_dir: &Path, name: &str) -> io::Result<Option<u64>> {
    let path = dir(log_dir).join(name);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if bytes.len() != 12 || crc32fast::hash(&bytes[..8]).to_le_bytes() != bytes[8..] {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("cursor file {} is corrupt", path.display()),
        ));
    }
    Ok(Some(u64::from_le_bytes(bytes[..8].try_into().unwrap())))
}

fn store(log_dir: &Path, name: &str, offset: u64) -> io::Result<()> {
    let dir = dir(log_dir);
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut bytes = offset.to_le_bytes().to_vec();
    bytes.extend_from_slice(&crc32fast::hash(&bytes).to_le_bytes());
    let mut file = fs::File::create(&tmp)?;
    file.write_all(&bytes)?;
    file.sync_all()?;
    fs::rename(&tmp, dir.join(name))?;
    segment::sync_dir(&dir)
}

/// A registered reader of the log with a durable cursor. The log keeps every record from the
/// cursor on, for as long as it is open.
pub struct Consumer {
    name: String,
    shared: Arc<Shared>,
    reader: LogReader,
    committed: u64,
}

impl Consumer {
    pub(super) fn register(shared: Arc<Shared>, name: &str) -> io::Result<Consumer> {
        if !valid_name(name) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("`{name}` is not a consumer name (letters, digits, - _ .)"),
            ));
        }
        let oldest = shared.state.lock().unwrap().segments[0].base;
        let committed = match load(&shared.dir, name)? {
            Some(offset) => offset.max(oldest),
            None => {
                store(&shared.dir, name, oldest)?;
                oldest
            }
        };
        // Registered for the life of the log, even after this handle is dropped, so that a
        // consumer that stops for a while still holds back the records it has not processed.
        shared
            .cursors
            .lock()
            .unwrap()
            .insert(name.to_string(), committed);
        Ok(Consumer {
            name: name.to_string(),
            reader: LogReader::new(shared.clone(), committed),
            shared,
            committed,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The same consumer again, at its durable cursor, as after a restart: for a stage started
    /// again after a failure.
    pub fn reopen(&self) -> io::Result<Consumer> {
        Consumer::register(self.shared.clone(), &self.name)
    }

    /// The durable cursor: where this consumer resumes after a restart.
    pub fn committed(&self) -> u64 {
        self.committed
    }

    /// Offset of the next record [`Consumer::read`] returns.
    pub fn position(&self) -> u64 {
        self.reader.position()
    }

    /// Goes back to the durable cursor: what was read since is read again.
    pub fn rewind(&mut self) {
        self.reader = LogReader::new(self.shared.clone(), self.committed);
    }

    pub fn read(&mut self, max: usize) -> Result<Vec<Record>, ReadError> {
        self.reader.read(max)
    }

    /// Moves on to `offset`, not past the log's durable end, without reading what is before it:
    /// for a consumer handed those records by another reader (the destinations share one read of
    /// the log).
    pub fn skip_to(&mut self, offset: u64) {
        if offset != self.position() {
            self.reader = LogReader::new(self.shared.clone(), offset.min(self.shared.end()));
        }
    }

    pub async fn wait(&self) {
        self.reader.wait().await
    }

    /// Makes `offset` (one past the last record this consumer is done with) its durable cursor,
    /// then lets the log delete segments that no consumer needs any more.
    pub fn commit(&mut self, offset: u64) -> io::Result<()> {
        let end = self.shared.end();
        if offset > end {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cursor {offset} is past the end of the log ({end})"),
            ));
        }
        if offset <= self.committed {
            return Ok(());
        }
        store(&self.shared.dir, &self.name, offset)?;
        self.committed = offset;
        self.shared
            .cursors
            .lock()
            .unwrap()
            .insert(self.name.clone(), offset);
        self.shared.apply_retention()
    }
}
