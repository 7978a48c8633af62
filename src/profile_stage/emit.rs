//! What Sluice says when a membership changes, Segment Engage style: a track `Audience Entered`
//! or `Audience Exited`, and an identify with the boolean trait. Both carry their routing in
//! `context.sluice`: `audience`, the segment key, and `destinations`, the destinations the
//! segment file named when the change was emitted (so a redelivery goes where the change was
//! routed, whatever the segment says later). They come from
//! the reserved source `sluice`, and have messageIds that depend only on the profile, the segment
//! and the change count, so that redoing a batch after a crash produces the same ids (and the
//! dedup drops the repeats).

use std::io::Write;

use chrono::{DateTime, Utc};

use crate::profiles::Profile;
use crate::segments::rules::Segment;

pub struct Emission {
    pub message_id: String,
    pub body: Vec<u8>,
    /// What caused the change and when (microseconds): the message's arrival, or the moment a
    /// time condition came due. For the delay metric, which counts changes: only the track
    /// carries it.
    pub cause: Option<(Cause, i64)>,
}

pub use crate::metrics::Cause;

/// The track and the identify for one change of `profile`'s membership of `segment`. Written
/// straight as JSON text: a change can come with every other message, and building
/// `serde_json::Value`s for it cost more than evaluating the rule.
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
    let track_id = format!("audience-{key}-{}-{changes}-{direction}", profile.id);
    let identify_id = format!("{track_id}-identify");
    let time = crate::vocabulary::format_time(now);
    // What both messages share, from the opening brace on.
    let mut common = Vec::with_capacity(256);
    common.push(b'{');
    if let Some(user) = &profile.user_id {
        field(&mut common, "userId", user);
    }
    if let Some(anon) = profile.anonymous_ids.first() {
        field(&mut common, "anonymousId", anon);
    }
    field(&mut common, "timestamp", &time);
    field(&mut common, "receivedAt", &time);
    common.extend_from_slice(br#""context":{"library":{"name":"sluice","version":"#);
    string(&mut common, env!("CARGO_PKG_VERSION"));
    common.extend_from_slice(br#"},"sluice":{"audience":"#);
    string(&mut common, key);
    common.extend_from_slice(br#","destinations":["#);
    for (i, destination) in segment.destinations.iter().enumerate() {
        if i > 0 {
            common.push(b',');
        }
        string(&mut common, destination);
    }
    common.extend_from_slice(b"]}},");
    let message = |id: String, cause, rest: &dyn Fn(&mut Vec<u8>)| {
        let mut body = common.clone();
        field(&mut body, "messageId", &id);
        rest(&mut body);
        body.push(b'}');
        Emission {
            message_id: id,
            body,
            cause,
        }
    };
    let track = message(track_id, cause, &|b| {
        field(
            b,
            "event",
            if entered {
                "Audience Entered"
            } else {
                "Audience Exited"
            },
        );
        b.extend_from_slice(br#""type":"track","properties":{"#);
        // The segment's own key comes last and wins if it is one of the other two names.
        if key != "audience_key" {
            field(b, "audience_key", key);
        }
        if key != "audience_name" {
            field(b, "audience_name", &segment.name);
        }
        flag(b, key, entered);
        b.push(b'}');
    });
    let identify = message(identify_id, None, &|b| {
        b.extend_from_slice(br#""type":"identify","traits":{"#);
        flag(b, key, entered);
        b.push(b'}');
    });
    [track, identify]
}

/// What the messageId of a change's track says: the segment's key, the profile, the change's
/// number, and whether it was an entry. `None` for any other id (an identify's among them).
pub fn parse_change_id(id: &str) -> Option<(&str, u64, u32, bool)> {
    let rest = id.strip_prefix("audience-")?;
    let mut parts = rest.rsplitn(4, '-');
    let entered = match parts.next()? {
        "entered" => true,
        "exited" => false,
        _ => return None,
    };
    let changes = parts.next()?.parse().ok()?;
    let profile = parts.next()?.parse().ok()?;
    Some((parts.next()?, profile, changes, entered))
}

/// `"name":"value",`
fn field(out: &mut Vec<u8>, name: &str, value: &str) {
    string(out, name);
    out.push(b':');
    string(out, value);
    out.push(b',');
}

/// `"name":true` (no comma: it ends its object)
fn flag(out: &mut Vec<u8>, name: &str, value: bool) {
    string(out, name);
    let _ = write!(out, ":{value}");
}

fn string(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(out, s).expect("a string serializes");
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;
    use crate::segments::files;

    #[test]
    fn both_messages_are_json_with_every_field() {
        let file = files::parse(
            std::path::Path::new("segments/vip.toml"),
            "name = 'Very \"important\"'\ndestinations = ['crm', 'ads']\nrule = 'true'\n",
        );
        let (set, problems) = crate::segments::SegmentSet::build(vec![file.unwrap()], None);
        assert!(problems.is_empty(), "{problems:?}");
        let mut profile = Profile::new(7);
        profile.user_id = Some("u-1".into());
        profile.add_anonymous_id("a-1");
        let now = DateTime::from_timestamp_millis(1_767_225_600_000).unwrap();
        let cause = Some((Cause::Timer, 5));
        let [track, identify] = change(&set.segments[0], &profile, true, 3, now, cause);
        assert_eq!(track.cause, cause, "the delay metric counts a change once");
        assert_eq!(identify.cause, None);
        let track: Value = serde_json::from_slice(&track.body).unwrap();
        let identify: Value = serde_json::from_slice(&identify.body).unwrap();
        let key = set.segments[0].key.as_str();
        assert_eq!(track["type"], "track");
        assert_eq!(track["event"], "Audience Entered");
        assert_eq!(track["userId"], "u-1");
        assert_eq!(track["anonymousId"], "a-1");
        assert_eq!(track["messageId"], format!("audience-{key}-7-3-entered"));
        assert_eq!(track["timestamp"], track["receivedAt"]);
        assert_eq!(
            track["properties"],
            json!({"audience_key": key, "audience_name": "Very \"important\"", key: true})
        );
        // Its routing: the segment and the destinations it named at this moment.
        let routing = json!({"audience": key, "destinations": ["crm", "ads"]});
        assert_eq!(track["context"]["sluice"], routing);
        assert_eq!(identify["context"]["sluice"], routing);
        assert_eq!(track["context"]["library"]["name"], "sluice");
        assert_eq!(identify["type"], "identify");
        assert_eq!(identify["traits"], json!({key: true}));
        assert_eq!(
            identify["messageId"],
            format!("audience-{key}-7-3-entered-identify")
        );
        let track_id = track["messageId"].as_str().unwrap();
        assert_eq!(parse_change_id(track_id), Some((key, 7, 3, true)));
        assert_eq!(
            parse_change_id("audience-a-b-12-4-exited"),
            Some(("a-b", 12, 4, false))
        );
        assert_eq!(
            parse_change_id(identify["messageId"].as_str().unwrap()),
            None
        );
        assert_eq!(parse_change_id("order-1"), None);
    }
}
