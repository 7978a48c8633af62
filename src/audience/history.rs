//! Filling profiles' history from the lake before a backfill.
//!
//! A profile keeps only the history the rules loaded at the time needed. A new or edited segment
//! may need more: event names nobody watched, a longer window, numbers nobody summed. Before
//! such a segment is backfilled, the occurrences it needs are read back from the lake's `events`
//! table and merged into the profiles' history (an occurrence already there, by name and time,
//! is replaced, so that nothing counts twice).
//!
//! What the lake does not hold yet (the last flush interval) is not read; messages from then on
//! are kept by the profiles as they arrive, so the gap is at most one flush interval of history
//! for the new names.

use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::datatypes::TimestampMicrosecondType;

use crate::profiles::profile::{numeric_values, Millis, Names, Occurrence, Retention};
use crate::query::{QueryEngine, QueryError};

/// One occurrence read from the lake, with whom it belongs to.
pub struct LakeOccurrence {
    pub user_id: Option<String>,
    pub anonymous_id: Option<String>,
    pub occurrence: Occurrence,
}

/// The SQL that reads what `needed` asks for, from `since` on.
fn sql(needed: &Retention, since: Millis) -> String {
    let quote = |s: &str| format!("'{}'", s.replace('\'', "''"));
    let kinds = match &needed.history {
        Names::All => "type IN ('track', 'page', 'screen')".to_string(),
        Names::Only(names) => {
            let mut parts = Vec::new();
            let tracks: Vec<String> = names
                .iter()
                .filter(|n| *n != "Page Viewed" && *n != "Screen Viewed")
                .map(|n| quote(n))
                .collect();
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
    let since = chrono::DateTime::from_timestamp_millis(since).unwrap_or_default();
    format!(
        "SELECT user_id, anonymous_id, type, event, timestamp, properties FROM events \
         WHERE source <> '{}' AND date >= DATE '{}' AND timestamp >= TIMESTAMP '{}' AND {kinds}",
        super::SOURCE,
        since.format("%Y-%m-%d"),
        crate::ingest::format_time(since),
    )
}

/// Reads the occurrences `needed` asks for, within its window before `now`.
pub async fn read(
    engine: &QueryEngine,
    needed: &Retention,
    now: Millis,
) -> Result<Vec<LakeOccurrence>, QueryError> {
    let sql = sql(needed, now - needed.window);
    if sql.is_empty() {
        return Ok(Vec::new());
    }
    let result = engine.sql(&sql).await?;
    let mut out = Vec::new();
    for batch in &result.batches {
        let user = batch.column(0).as_string::<i32>();
        let anon = batch.column(1).as_string::<i32>();
        let kind = batch.column(2).as_string::<i32>();
        let event = batch.column(3).as_string::<i32>();
        let at = batch.column(4).as_primitive::<TimestampMicrosecondType>();
        let properties = batch.column(5).as_string::<i32>();
        for i in 0..batch.num_rows() {
            let name = match kind.value(i) {
                "page" => "Page Viewed",
                "screen" => "Screen Viewed",
                _ if event.is_null(i) => continue,
                _ => event.value(i),
            };
            let props = (!properties.is_null(i)).then(|| properties.value(i));
            let values = numeric_values(name, props, needed.values.as_ref());
            out.push(LakeOccurrence {
                user_id: (!user.is_null(i)).then(|| user.value(i).to_string()),
                anonymous_id: (!anon.is_null(i)).then(|| anon.value(i).to_string()),
                occurrence: Occurrence {
                    name: name.to_string(),
                    at: at.value(i) / 1_000,
                    values,
                },
            });
        }
    }
    Ok(out)
}

/// Merges `o` into `history` (sorted by time): an occurrence with the same name and time is
/// replaced rather than added.
pub fn merge(history: &mut Vec<Occurrence>, o: Occurrence) {
    let start = history.partition_point(|h| h.at < o.at);
    let same = history[start..]
        .iter()
        .take_while(|h| h.at == o.at)
        .position(|h| h.name == o.name);
    match same {
        Some(i) => history[start + i] = o,
        None => history.insert(start, o),
    }
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
        };
        let sql = sql(&needed, 1_767_225_600_000);
        assert!(
            sql.contains("(type = 'track' AND event IN ('Order Completed'))"),
            "{sql}"
        );
        assert!(sql.contains("type = 'page'"), "{sql}");
        assert!(sql.contains("date >= DATE '2026-01-01'"), "{sql}");
        assert!(sql.contains("source <> 'sluice'"), "{sql}");
        let nothing = Retention::default();
        assert_eq!(super::sql(&nothing, 0), "");
    }

    #[test]
    fn merging_never_counts_an_occurrence_twice() {
        let o = |name: &str, at, v| Occurrence {
            name: name.into(),
            at,
            values: vec![("revenue".into(), v)],
        };
        let mut history = vec![o("A", 1, 1.0), o("B", 2, 1.0), o("A", 3, 1.0)];
        merge(&mut history, o("A", 2, 5.0));
        merge(&mut history, o("A", 3, 7.0));
        merge(&mut history, o("A", 0, 1.0));
        let got: Vec<(&str, Millis, f64)> = history
            .iter()
            .map(|h| (h.name.as_str(), h.at, h.values[0].1))
            .collect();
        assert_eq!(
            got,
            [
                ("A", 0, 1.0),
                ("A", 1, 1.0),
                ("A", 2, 5.0),
                ("B", 2, 1.0),
                ("A", 3, 7.0)
            ]
        );
    }
}
