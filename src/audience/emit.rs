//! What Sluice says when a membership changes, Segment Engage style: a track `Audience Entered`
//! or `Audience Exited`, and an identify with the boolean trait. Both carry
//! `context.sluice.audience` (the segment key) so that destinations can route them, come from
//! the reserved source `sluice`, and have messageIds that depend only on the profile, the segment
//! and the change count, so that redoing a batch after a crash produces the same ids (and the
//! dedup drops the repeats).

use chrono::{DateTime, Utc};
use serde_json::{json, Map, Value};

use crate::profiles::Profile;
use crate::segments::rules::Segment;

/// The source name of every message Sluice emits itself. No configured source may use it.
pub const SOURCE: &str = "sluice";

pub struct Emission {
    pub message_id: String,
    pub body: Vec<u8>,
    /// What caused the change and when (microseconds): the message's arrival, or the moment a
    /// time condition came due. For the delay metrics.
    pub cause: Option<(Cause, i64)>,
}

pub use crate::metrics::Cause;

/// The track and the identify for one change of `profile`'s membership of `segment`.
pub fn change(
    segment: &Segment,
    profile: &Profile,
    entered: bool,
    changes: u32,
    now: DateTime<Utc>,
    cause: Option<(Cause, i64)>,
) -> [Emission; 2] {
    let key = segment.key.as_str();
    let direction = if entered { "entered" } else { "exited" };
    let base_id = format!("audience-{key}-{}-{changes}-{direction}", profile.id);
    let time = crate::ingest::format_time(now);
    let mut common = Map::new();
    if let Some(user) = &profile.user_id {
        common.insert("userId".into(), user.as_str().into());
    }
    if let Some(anon) = profile.anonymous_ids.first() {
        common.insert("anonymousId".into(), anon.as_str().into());
    }
    common.insert("timestamp".into(), time.clone().into());
    common.insert("receivedAt".into(), time.into());
    common.insert(
        "context".into(),
        json!({
            "library": {"name": "sluice", "version": env!("CARGO_PKG_VERSION")},
            "sluice": {"audience": key},
        }),
    );
    let message = |fields: Value, id: String| {
        let mut m = common.clone();
        if let Value::Object(fields) = fields {
            m.extend(fields);
        }
        m.insert("messageId".into(), id.clone().into());
        Emission {
            message_id: id,
            body: serde_json::to_vec(&m).expect("JSON values serialize"),
            cause,
        }
    };
    let mut properties = Map::new();
    properties.insert("audience_key".into(), key.into());
    properties.insert("audience_name".into(), segment.name.as_str().into());
    properties.insert(key.into(), entered.into());
    let mut traits = Map::new();
    traits.insert(key.into(), entered.into());
    [
        message(
            json!({
                "type": "track",
                "event": if entered { "Audience Entered" } else { "Audience Exited" },
                "properties": properties,
            }),
            base_id.clone(),
        ),
        message(
            json!({"type": "identify", "traits": traits}),
            format!("{base_id}-identify"),
        ),
    ]
}
