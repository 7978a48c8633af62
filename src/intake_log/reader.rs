//! Reading committed records from any offset, across segments.

use std::io;
use std::sync::Arc;

use super::segment::{Next, RecordReader};
use super::Shared;

/// What one [`LogReader::read`] returns at most, in payload bytes (and at least one record).
pub const MAX_READ_BYTES: usize = 16 << 20;

/// One record of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub offset: u64,
    pub payload: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("offset {offset} is no longer in the intake log (the oldest held is {oldest})")]
    Gone { offset: u64, oldest: u64 },
    #[error("intake log segment {segment} is corrupt at offset {offset}")]
    Corrupt { segment: u64, offset: u64 },
    #[error("reading the intake log: {0}")]
    Io(#[from] std::io::Error),
}

/// A position in the log that moves forward as records are read. Only durable records are
/// returned, so what a reader sees never changes.
pub struct LogReader {
    shared: Arc<Shared>,
    next: u64,
    /// The open segment: its base and a reader positioned at `next`.
    open: Option<(u64, RecordReader)>,
}

impl LogReader {
    pub(crate) fn new(shared: Arc<Shared>, offset: u64) -> Self {
        LogReader {
            shared,
            next: offset,
            open: None,
        }
    }

    /// Offset of the next record this reader returns.
    pub fn position(&self) -> u64 {
        self.next
    }

    /// Up to `max` records from the position on; fewer (maybe none) at the end of the log, and
    /// fewer once they hold [`MAX_READ_BYTES`] (records can be large; a caller's memory is
    /// bounded by bytes, not only by count).
    pub fn read(&mut self, max: usize) -> Result<Vec<Record>, ReadError> {
        let mut out = Vec::new();
        let mut bytes = 0;
        while out.len() < max && bytes < MAX_READ_BYTES {
            let end = self.shared.end();
            if self.next >= end {
                break;
            }
            // Find the segment holding `next`, and its durable length.
            let (base, limit, is_last, path, following) = {
                let state = self.shared.state.lock().unwrap();
                let oldest = state.segments[0].base;
                if self.next < oldest {
                    return Err(ReadError::Gone {
                        offset: self.next,
                        oldest,
                    });
                }
                let i = state.segments.partition_point(|s| s.base <= self.next) - 1;
                let s = &state.segments[i];
                (
                    s.base,
                    s.size,
                    i + 1 == state.segments.len(),
                    s.path.clone(),
                    state.segments.get(i + 1).map(|s| s.base),
                )
            };
            if self.open.as_ref().map(|(b, _)| *b) != Some(base) {
                let mut reader = match (RecordReader::open(&path, base), following) {
                    // Read-only beside a live server, which trimmed the segment after this log
                    // was listed: its records are gone, as if the read had started a moment later.
                    (Err(e), Some(next))
                        if e.kind() == io::ErrorKind::NotFound && self.shared.read_only =>
                    {
                        self.next = next;
                        continue;
                    }
                    (opened, _) => opened?,
                };
                // Move up to `next` within the segment.
                while reader.next_offset() < self.next {
                    match reader.next(limit)? {
                        Next::Record(..) => {}
                        Next::End if self.shared.read_only && is_last => return Ok(out),
                        _ => {
                            return Err(ReadError::Corrupt {
                                segment: base,
                                offset: reader.next_offset(),
                            })
                        }
                    }
                }
                self.open = Some((base, reader));
            }
            let (_, reader) = self.open.as_mut().expect("opened above");
            match reader.next(limit)? {
                Next::Record(offset, payload) => {
                    debug_assert_eq!(offset, self.next);
                    self.next += 1;
                    bytes += payload.len();
                    out.push(Record { offset, payload });
                }
                Next::End if is_last => break,
                Next::Corrupt if is_last && self.shared.read_only => break,
                // A sealed segment ended: the next one starts here.
                Next::End => self.open = None,
                Next::Corrupt => {
                    return Err(ReadError::Corrupt {
                        segment: base,
                        offset: self.next,
                    })
                }
            }
        }
        Ok(out)
    }

    /// Waits until a record past the position is durable (returns at once if one is).
    pub async fn wait(&self) {
        let mut end = self.shared.end.subscribe();
        let next = self.next;
        let _ = end.wait_for(|&e| e > next).await;
    }
}
