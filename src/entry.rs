//! What one record of the intake log holds: a message the edge accepted, one it rejected (kept
//! for the quarantine), or a clock reading of the profile stage's (see `crate::profile_stage`, "The
//! stage's time"). Written by the ingest stage, read by every consumer.
//!
//! ```text
//! u8   format version (1)
//! u8   status: 0 accepted, 1 rejected, 2 clock (no message; the body is empty)
//! i64  receivedAt, microseconds since the epoch
//! u16  length, source name
//! u16  length, messageId (may be empty for a rejected message)
//! u32  length, rejection reason (empty when accepted)
//! ...  the message JSON: enriched when accepted, as received when rejected
//! ```
//!
//! A small binary header in front of the JSON lets consumers route and deduplicate without
//! parsing the message.

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;

const VERSION: u8 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Accepted,
    Rejected,
    /// The profile stage's clock read `receivedAt`: time passed to then with no message. Only
    /// the profile stage reads these; every other consumer passes over them.
    Clock,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Accepted => "accepted",
            Status::Rejected => "rejected",
            Status::Clock => "clock",
        }
    }
}

/// One log record, borrowed from its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<'a> {
    pub status: Status,
    pub received_at_micros: i64,
    pub source: &'a str,
    pub message_id: &'a str,
    pub reason: &'a str,
    pub body: &'a [u8],
}

#[derive(Debug, thiserror::Error)]
#[error("intake log record is malformed: {0}")]
pub struct DecodeError(&'static str);

impl<'a> Entry<'a> {
    /// Appends the header and calls `body` to append the message JSON.
    pub fn encode(
        out: &mut Vec<u8>,
        status: Status,
        received_at: DateTime<Utc>,
        source: &str,
        message_id: &str,
        reason: &str,
        body: impl FnOnce(&mut Vec<u8>),
    ) {
        out.push(VERSION);
        out.push(match status {
            Status::Accepted => 0,
            Status::Rejected => 1,
            Status::Clock => 2,
        });
        out.extend_from_slice(&received_at.timestamp_micros().to_le_bytes());
        put_str16(out, source);
        put_str16(out, message_id);
        let reason = &reason.as_bytes()[..reason.len().min(u32::MAX as usize)];
        out.extend_from_slice(&(reason.len() as u32).to_le_bytes());
        out.extend_from_slice(reason);
        body(out);
    }

    pub fn decode(payload: &'a [u8]) -> Result<Entry<'a>, DecodeError> {
        let mut r = Cursor(payload);
        if r.u8()? != VERSION {
            return Err(DecodeError("unknown format version"));
        }
        let status = match r.u8()? {
            0 => Status::Accepted,
            1 => Status::Rejected,
            2 => Status::Clock,
            _ => return Err(DecodeError("unknown status")),
        };
        let received_at_micros = i64::from_le_bytes(r.take(8)?.try_into().unwrap());
        let len = r.u16()? as usize;
        let source = r.str(len)?;
        let len = r.u16()? as usize;
        let message_id = r.str(len)?;
        let len = u32::from_le_bytes(r.take(4)?.try_into().unwrap()) as usize;
        let reason = r.str(len)?;
        Ok(Entry {
            status,
            received_at_micros,
            source,
            message_id,
            reason,
            body: r.0,
        })
    }

    pub fn received_at(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_micros(self.received_at_micros).unwrap_or_default()
    }

    /// The entry as one JSON object, as `sluice log dump` prints it, with the message embedded
    /// byte for byte (as a string if it is not JSON, which the edge never writes).
    pub fn to_json_line(&self, offset: u64) -> String {
        let mut head = serde_json::json!({
            "offset": offset,
            "status": self.status.as_str(),
            "source": self.source,
            "messageId": self.message_id,
            "receivedAt": crate::vocabulary::format_time(self.received_at()),
        });
        if self.status == Status::Rejected {
            head["reason"] = self.reason.into();
        }
        let mut line = head.to_string();
        line.pop(); // the closing brace
        line.push_str(",\"message\":");
        match std::str::from_utf8(self.body)
            .ok()
            .filter(|body| serde_json::from_str::<&RawValue>(body).is_ok())
        {
            Some(json) => line.push_str(json),
            None => {
                line.push_str(&serde_json::to_string(&String::from_utf8_lossy(self.body)).unwrap())
            }
        }
        line.push('}');
        line
    }
}

fn put_str16(out: &mut Vec<u8>, s: &str) {
    // Sources are config names and messageIds are capped far below this by the message size limit.
    let end = crate::text::boundary_at_most(s, u16::MAX as usize);
    out.extend_from_slice(&(end as u16).to_le_bytes());
    out.extend_from_slice(&s.as_bytes()[..end]);
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError("truncated"));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }

    fn str(&mut self, n: usize) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(self.take(n)?).map_err(|_| DecodeError("text is not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let now = DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap();
        let mut buf = Vec::new();
        Entry::encode(
            &mut buf,
            Status::Rejected,
            now,
            "web",
            "m-1",
            "track needs `event`",
            |b| b.extend_from_slice(br#"{"type":"track"}"#),
        );
        let e = Entry::decode(&buf).unwrap();
        assert_eq!(e.status, Status::Rejected);
        assert_eq!(e.received_at(), now);
        assert_eq!(e.source, "web");
        assert_eq!(e.message_id, "m-1");
        assert_eq!(e.reason, "track needs `event`");
        assert_eq!(e.body, br#"{"type":"track"}"#);
        let line: serde_json::Value = serde_json::from_str(&e.to_json_line(7)).unwrap();
        assert_eq!(line["offset"], 7);
        assert_eq!(line["status"], "rejected");
        assert_eq!(line["message"]["type"], "track");
        assert_eq!(line["receivedAt"], "2023-11-14T22:13:20.123456Z");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(Entry::decode(&[]).is_err());
        assert!(Entry::decode(&[1, 0, 1, 2]).is_err());
        assert!(Entry::decode(&[9; 40]).is_err());
    }
}
