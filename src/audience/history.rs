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

use crate::profiles::profile::{numeric_values, Millis, Names, Retention};
use crate::query::{QueryEngine, QueryError};

/// One occurrence read from the lake, with whom it belongs to.
pub struct LakeOccurrence {
    pub user_id: Option<String>,
    pub anonymous_id: Option<String>,
    pub name: String,
    pub at: Millis,
    pub values: Vec<(String, f64)>,
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
                name: name.to_string(),
                at: at.value(i) / 1_000,
                values,
            });
        }
    }
    Ok(out)
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
}
