//! Filling profiles' history from the lake before a backfill.
//!
//! A profile keeps only the history the rules loaded at the time needed. A new or edited segment
//! may need more: event names nobody watched, a longer window, numbers nobody summed. Before
//! such a segment is backfilled, the occurrences it needs are read back from the lake's `events`
//! table and merged into the profiles' history (see `Batch::fill_history` in the stage), a day
//! of event time at a time: [`open`] streams one day's rows, [`occurrences`] reads a batch of
//! them.
//!
//! What the lake does not hold yet (the last flush interval) is not read; messages from then on
//! are kept by the profiles as they arrive, so the gap is at most one flush interval of history
//! for the new names.

use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::datatypes::TimestampMicrosecondType;
use datafusion::execution::SendableRecordBatchStream;

use crate::intake_log::message_key;
use crate::profiles::profile::{numeric_values, Millis, Names, Retention, Set};
use crate::query::{QueryEngine, QueryError};

/// One occurrence read from the lake, with whom it belongs to.
pub struct LakeOccurrence {
    /// The message's dedup key (source and messageId): it names the log record it came from.
    pub key: u128,
    pub user_id: Option<String>,
    pub anonymous_id: Option<String>,
    pub name: String,
    /// Its time as the profile stage counts it: the timestamp, but not after the arrival.
    pub at: Millis,
    pub values: Vec<(String, f64)>,
}

/// The SQL that reads what `needed` asks for, of events whose timestamp is in `[from, to)`
/// (`to` `None`: from `from` on, future timestamps included), received since `since`.
fn sql(needed: &Retention, since: Millis, from: Millis, to: Option<Millis>) -> String {
    let quote = |s: &str| format!("'{}'", s.replace('\'', "''"));
    let kinds = match &needed.history {
        Names::All => "type IN ('track', 'page', 'screen')".to_string(),
        Names::Only(names) => {
            let mut parts = Vec::new();
            let mut tracks: Vec<String> = names
                .iter()
                .filter(|n| *n != "Page Viewed" && *n != "Screen Viewed")
                .map(|n| quote(n))
                .collect();
            tracks.sort();
            if !tracks.is_empty() {
                parts.push(format!(
                    "(type = 'track' AND event IN ({}))",
                    tracks.join(", ")
                ));
            }
            if names.contains("Page Viewed") {
                parts.push("type = 'page'".into());
            }
            if names.contains("Screen Viewed") {
                parts.push("type = 'screen'".into());
            }
            if parts.is_empty() {
                return String::new();
            }
            format!("({})", parts.join(" OR "))
        }
    };
    let time = |ms: Millis| chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default();
    let at = |ms: Millis| format!("TIMESTAMP '{}'", crate::vocabulary::format_time(time(ms)));
    // A row's moment is `min(timestamp, received_at)` (a device clock ahead counts as of its
    // arrival): the range is on the moment, so that each row is in exactly one day's read (the
    // backfill matches rows to what a profile holds per moment, a day at a time). Written as two
    // ranges on the columns, not on the least of them, so that files and row groups out of both
    // are skipped by their statistics.
    let within = |column: &str| match to {
        Some(to) => format!("{column} >= {} AND {column} < {}", at(from), at(to)),
        None => format!("{column} >= {}", at(from)),
    };
    format!(
        "SELECT source, message_id, user_id, anonymous_id, type, event, timestamp, received_at, \
         properties FROM events WHERE source <> '{}' AND date >= DATE '{}' \
         AND (({} AND timestamp <= received_at) OR ({} AND timestamp > received_at)) AND {kinds}",
        super::SOURCE,
        time(since).format("%Y-%m-%d"),
        within("timestamp"),
        within("received_at"),
    )
}

/// Starts reading the occurrences `needed` asks for whose timestamp is in `[from, to)` (`to`
/// `None`: on from `from`), of the messages received since `since`. The lake's files are listed
/// before this returns: a row the stream yields was in the log before.
pub async fn open(
    engine: &QueryEngine,
    needed: &Retention,
    since: Millis,
    from: Millis,
    to: Option<Millis>,
) -> Result<Option<SendableRecordBatchStream>, QueryError> {
    let sql = sql(needed, since, from, to);
    if sql.is_empty() {
        return Ok(None);
    }
    engine.stream(&sql, None).await.map(Some)
}

/// The occurrences in one batch of [`open`]'s rows, with the numbers `values` asks to keep
/// (every top-level number when `None`).
pub fn occurrences(
    batch: &RecordBatch,
    values: Option<&Set<(String, String)>>,
) -> Vec<LakeOccurrence> {
    let source = batch.column(0).as_string::<i32>();
    let message_id = batch.column(1).as_string::<i32>();
    let user = batch.column(2).as_string::<i32>();
    let anon = batch.column(3).as_string::<i32>();
    let kind = batch.column(4).as_string::<i32>();
    let event = batch.column(5).as_string::<i32>();
    let at = batch.column(6).as_primitive::<TimestampMicrosecondType>();
    let received = batch.column(7).as_primitive::<TimestampMicrosecondType>();
    let properties = batch.column(8).as_string::<i32>();
    let mut out = Vec::with_capacity(batch.num_rows());
    for i in 0..batch.num_rows() {
        let name = match kind.value(i) {
            "page" => "Page Viewed",
            "screen" => "Screen Viewed",
            _ if event.is_null(i) => continue,
            _ => event.value(i),
        };
        let props = (!properties.is_null(i)).then(|| properties.value(i));
        out.push(LakeOccurrence {
            key: message_key(source.value(i), message_id.value(i)),
            user_id: (!user.is_null(i)).then(|| user.value(i).to_string()),
            anonymous_id: (!anon.is_null(i)).then(|| anon.value(i).to_string()),
            name: name.to_string(),
            at: at.value(i).min(received.value(i)).div_euclid(1_000),
            values: numeric_values(name, props, values),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_asks_for_the_needed_names_only() {
        let needed = Retention {
            window: 86_400_000,
            history: Names::Only(["Order Completed".to_string(), "Page Viewed".to_string()].into()),
            values: None,
            objects: Names::default(),
            read: Names::default(),
        };
        let sql = sql(
            &needed,
            1_767_225_600_000,
            1_767_225_600_000,
            Some(1_767_312_000_000),
        );
        assert!(
            sql.contains("(type = 'track' AND event IN ('Order Completed'))"),
            "{sql}"
        );
        assert!(sql.contains("type = 'page'"), "{sql}");
        assert!(sql.contains("date >= DATE '2026-01-01'"), "{sql}");
        assert!(
            sql.contains("timestamp < TIMESTAMP '2026-01-02T00:00:00Z'"),
            "{sql}"
        );
        assert!(
            sql.contains(
                "received_at < TIMESTAMP '2026-01-02T00:00:00Z' AND timestamp > received_at"
            ),
            "an order from a clock ahead is read on the day it arrived: {sql}"
        );
        assert!(sql.contains("source <> 'sluice'"), "{sql}");
        let nothing = Retention::default();
        assert_eq!(super::sql(&nothing, 0, 0, Some(1)), "");
        let open_ended = super::sql(&needed, 0, 1_767_225_600_000, None);
        assert!(!open_ended.contains(" < TIMESTAMP"), "{open_ended}");
    }
}
