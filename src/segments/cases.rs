//! Running the `[[test]]` cases of segment files: each case's messages go into a fresh profile,
//! every loaded segment is evaluated at the case's time, and the segment's membership must be
//! what the case expects. `sluice check` reports each failing case at its place in the file.

use serde_json::value::RawValue;
use serde_json::Value;

use super::files::{parse_time, TestCase};
use super::rules::{SegmentSet, Trigger};
use crate::diagnostic::Diagnostic;
use crate::profiles::profile::{Millis, Observed, Profile};
use crate::vocabulary::MessageType;

/// When a case's messages have no timestamp, they happen one second apart from this moment.
const DEFAULT_START: Millis = 1_767_225_600_000; // 2026-01-01T00:00:00Z

/// Every failing case of every loaded segment.
pub fn run_all(set: &SegmentSet) -> Vec<Diagnostic> {
    let mut problems = Vec::new();
    for (i, segment) in set.segments.iter().enumerate() {
        for case in &segment.file.tests {
            if let Err(message) = run(set, i, case) {
                problems.push(Diagnostic::at(
                    &segment.file.path,
                    &segment.file.text,
                    case.offset,
                    format!("test `{}`: {message}", case.name),
                ));
            }
        }
    }
    problems
}

/// Runs one case of segment `index`.
pub fn run(set: &SegmentSet, index: usize, case: &TestCase) -> Result<(), String> {
    let mut profile = Profile::new(1);
    let mut times = Vec::new();
    for (n, m) in case.messages.iter().enumerate() {
        let at = match m.get("timestamp").and_then(Value::as_str) {
            Some(t) => {
                parse_time(t).ok_or_else(|| format!("message {}: bad timestamp `{t}`", n + 1))?
            }
            None => DEFAULT_START + n as Millis * 1_000,
        };
        times.push(at);
    }
    let now = case
        .at
        .unwrap_or_else(|| times.iter().max().copied().unwrap_or(DEFAULT_START) + 1_000);
    for (m, at) in case.messages.iter().zip(times) {
        let kind = m.get("type").and_then(Value::as_str).unwrap_or("track");
        let kind =
            MessageType::parse(kind).ok_or_else(|| format!("unknown message type `{kind}`"))?;
        let raw = |key: &str| {
            m.get(key)
                .map(|v| RawValue::from_string(v.to_string()).expect("serialized JSON"))
        };
        let (properties, traits) = (raw("properties"), raw("traits"));
        if let Some(u) = m.get("userId").and_then(Value::as_str) {
            profile.user_id = Some(u.to_string());
        }
        let observed = Observed {
            kind,
            event: m.get("event").and_then(Value::as_str),
            at,
            properties: properties.as_deref(),
            traits: traits.as_deref(),
        };
        profile.apply(&observed, &set.retention, now);
    }
    let evaluation = set.evaluate(&mut profile, Trigger::All(None), now);
    if let Some((_, failure)) = evaluation.failures.iter().find(|(i, _)| *i == index) {
        let segment = &set.segments[index];
        let error = segment.health.last_error.lock().unwrap().clone();
        return Err(format!(
            "the rule failed ({failure:?}): {}",
            error.unwrap_or_default()
        ));
    }
    let key = &set.segments[index].key;
    let member = profile
        .memberships
        .get(key.as_str())
        .is_some_and(|m| m.member);
    if member == case.expect {
        Ok(())
    } else if case.expect {
        Err("expected the profile in the segment, but the rule says it is not".into())
    } else {
        Err("expected the profile outside the segment, but the rule puts it in".into())
    }
}
