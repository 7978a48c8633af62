//! One read of the intake log for every destination: each record is read, decoded and its routing
//! parsed once ([`Routing::parse`] scans the whole message), then handed to every destination
//! that comes by it.
//!
//! Each destination keeps its own cursor (they deliver at their own pace, and a dead one must not
//! hold the others). The destination furthest ahead reads the log and appends what it read to a
//! window of the most recent [`WINDOW`] records; the others take theirs from the window and move
//! their cursor past them without reading. One that has fallen behind the window reads and parses
//! for itself (nothing is lost, only the sharing), until it catches up.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use super::route::Routing;
use crate::entry::{Entry, Status};
use crate::intake_log::{Consumer, ReadError, Record};

/// Records the window holds: at about 600 bytes a message, some 10 MB; destinations that keep up
/// are well within it of each other.
pub const WINDOW: usize = 16_384;

/// One record of the log as the destinations see it.
#[derive(Debug)]
pub struct Routed {
    pub offset: u64,
    /// The record as stored (an [`Entry`]).
    pub payload: Vec<u8>,
    /// For an accepted message: its routing, or why it has none. `None` for any other record.
    pub routing: Option<Result<Routing, String>>,
}

impl Routed {
    fn new(record: Record) -> Routed {
        let routing = match Entry::decode(&record.payload) {
            Ok(entry) if entry.status == Status::Accepted => {
                Some(Routing::parse(entry.source, entry.body))
            }
            _ => None,
        };
        Routed {
            offset: record.offset,
            payload: record.payload,
            routing,
        }
    }
}

#[derive(Default)]
pub struct SharedRead {
    window: Mutex<Window>,
}

#[derive(Default)]
struct Window {
    /// The offset of `records[0]`.
    start: u64,
    records: VecDeque<Arc<Routed>>,
}

impl Window {
    fn end(&self) -> u64 {
        self.start + self.records.len() as u64
    }
}

impl SharedRead {
    /// Up to `max` records from `consumer`'s position on, with the consumer moved past them.
    pub fn read(&self, consumer: &mut Consumer, max: usize) -> Result<Vec<Arc<Routed>>, ReadError> {
        let position = consumer.position();
        let mut window = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if position < window.start {
            // Behind the window: on its own.
            drop(window);
            return Ok(consumer.read(max)?.into_iter().map(routed).collect());
        }
        if position < window.end() {
            let from = (position - window.start) as usize;
            let taken: Vec<_> = window.records.range(from..).take(max).cloned().collect();
            consumer.skip_to(position + taken.len() as u64);
            return Ok(taken);
        }
        // Furthest ahead: read for everyone (the others wait for it here, then take it).
        let read: Vec<_> = consumer.read(max)?.into_iter().map(routed).collect();
        if position > window.end() {
            *window = Window {
                start: position,
                records: VecDeque::new(),
            };
        }
        window.records.extend(read.iter().cloned());
        while window.records.len() > WINDOW {
            window.records.pop_front();
            window.start += 1;
        }
        Ok(read)
    }
}

fn routed(record: Record) -> Arc<Routed> {
    Arc::new(Routed::new(record))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intake_log::{IntakeLog, LogOptions, RecordBatch};
    use crate::metrics::LogMetrics;
    use chrono::Utc;

    fn log_with(dir: &std::path::Path, bodies: &[&str]) -> IntakeLog {
        let options = LogOptions {
            dir: dir.to_path_buf(),
            segment_size: 1 << 20,
            max_size: 1 << 30,
        };
        let log = IntakeLog::open(options, Arc::new(LogMetrics::default())).unwrap();
        let mut batch = RecordBatch::with_capacity(1024);
        for (i, body) in bodies.iter().enumerate() {
            batch.push_with(|b| {
                let id = format!("m{i}");
                Entry::encode(b, Status::Accepted, Utc::now(), "web", &id, "", |b| {
                    b.extend_from_slice(body.as_bytes())
                })
            });
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(log.append(batch)).unwrap();
        log
    }

    #[test]
    fn each_record_is_parsed_once_for_all_and_each_cursor_moves_on_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let bodies: Vec<String> = (0..10)
            .map(|i| format!(r#"{{"type":"track","event":"E{i}","userId":"u{i}"}}"#))
            .collect();
        let bodies: Vec<&str> = bodies.iter().map(String::as_str).collect();
        let log = log_with(dir.path(), &bodies);
        let reads = SharedRead::default();
        let (mut a, mut b) = (log.consumer("a").unwrap(), log.consumer("b").unwrap());
        let first = reads.read(&mut a, 4).unwrap();
        assert_eq!(a.position(), 4);
        // The second destination is handed the very records the first read.
        let same = reads.read(&mut b, 10).unwrap();
        assert_eq!(same.len(), 4);
        assert!(first.iter().zip(&same).all(|(x, y)| Arc::ptr_eq(x, y)));
        assert_eq!(b.position(), 4);
        // Now b is ahead, reads on for both, and a takes it from the window.
        let rest = reads.read(&mut b, 10).unwrap();
        assert_eq!(rest.len(), 6);
        let again = reads.read(&mut a, 10).unwrap();
        assert!(rest.iter().zip(&again).all(|(x, y)| Arc::ptr_eq(x, y)));
        assert_eq!((a.position(), b.position()), (10, 10));
        let routing = again[5].routing.as_ref().unwrap().as_ref().unwrap();
        assert_eq!(
            (routing.user.as_str(), routing.event.as_deref()),
            ("u9", Some("E9"))
        );
        assert!(reads.read(&mut a, 10).unwrap().is_empty());
    }

    #[test]
    fn one_behind_the_window_reads_for_itself_and_a_bad_message_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_with(dir.path(), &[r#"{"type":"page","userId":"u"}"#, "not json"]);
        let reads = SharedRead::default();
        let (mut a, mut b) = (log.consumer("a").unwrap(), log.consumer("b").unwrap());
        reads.read(&mut a, 1).unwrap();
        // Push the window past offset 0 as if the log had moved far on.
        reads.window.lock().unwrap().start = 1;
        reads.window.lock().unwrap().records.clear();
        let own = reads.read(&mut b, 10).unwrap();
        assert_eq!(own.iter().map(|r| r.offset).collect::<Vec<_>>(), [0, 1]);
        assert!(matches!(&own[1].routing, Some(Err(e)) if e.contains("expected")));
        assert_eq!(b.position(), 2);
    }
}
