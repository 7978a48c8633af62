//! Enforcing the tracking plan: what happens to a message that passed the field rules, given what
//! the schema registry says of it and the source's policies.
//!
//! - valid: stored as is;
//! - invalid, `violations = "flag"`: stored with the errors in `context.violations`;
//! - invalid, `violations = "block"`: quarantined with every error, not forwarded;
//! - no schema, `unplanned = "block"`: quarantined; `"allow"`: stored.
//!
//! A blocked message still counts as accepted in the HTTP answer: a schema violation is not an
//! error of the request. Quarantine reasons start with `schema:` or `unplanned:`, which is how a
//! replay finds the messages that a fixed schema may now admit.

use serde_json::{Map, Value};

use super::message::Json;
use super::rules::Message;
use crate::config::{Unplanned, Violations};
use crate::metrics::{PlanOutcome, SchemaMetrics};
use crate::schema::{Registry, Verdict, Violation};
use crate::vocabulary::MessageType;

/// A source's policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub unplanned: Unplanned,
    pub violations: Violations,
}

/// What the plan decided.
pub enum Decision<'a> {
    Store(Box<Message<'a>>),
    /// To the quarantine, with the reason.
    Block(Box<Message<'a>>, String),
}

/// The payload the registry checks: `properties` for track, page and screen; `traits` for
/// identify and group.
fn payload<'m, 'a>(m: &'m Message<'a>) -> Option<&'m Json<'a>> {
    match m.kind {
        MessageType::Track | MessageType::Page | MessageType::Screen => m.properties.as_ref(),
        MessageType::Identify | MessageType::Group => m.traits.as_ref(),
        MessageType::Alias => None,
    }
}

/// The event name (track) or page/screen name the registry looks the message up by.
pub fn lookup_name<'m>(m: &'m Message) -> Option<&'m str> {
    match m.kind {
        MessageType::Track => m.event.as_deref(),
        _ => m.name.as_deref(),
    }
}

/// Applies the registry and the policy to one message.
pub fn enforce<'a>(
    mut m: Box<Message<'a>>,
    registry: &Registry,
    policy: Policy,
    metrics: &SchemaMetrics,
) -> Decision<'a> {
    let name = lookup_name(&m);
    let Some(compiled) = registry.lookup(m.kind, name) else {
        if m.kind == MessageType::Alias {
            return Decision::Store(m);
        }
        let outcome = match policy.unplanned {
            Unplanned::Allow => PlanOutcome::UnplannedAllowed,
            Unplanned::Block => PlanOutcome::UnplannedBlocked,
        };
        metrics.count("unplanned", outcome);
        return match policy.unplanned {
            Unplanned::Allow => Decision::Store(m),
            Unplanned::Block => {
                let what = match (m.kind, name) {
                    (kind, Some(name)) => format!("{} `{name}`", kind.as_str()),
                    (kind, None) => kind.as_str().to_string(),
                };
                Decision::Block(m, format!("unplanned: no schema for {what}"))
            }
        };
    };
    let value: Value = match payload(&m) {
        Some(raw) => serde_json::from_str(raw.get()).unwrap_or(Value::Null),
        None => Value::Object(Map::new()),
    };
    let label = compiled.label();
    match compiled.check(&value) {
        Verdict::Valid | Verdict::Unplanned => {
            metrics.count(&label, PlanOutcome::Valid);
            Decision::Store(m)
        }
        Verdict::Invalid(violations) => match policy.violations {
            Violations::Flag => {
                metrics.count(&label, PlanOutcome::Flagged);
                flag(&mut m, &violations);
                Decision::Store(m)
            }
            Violations::Block => {
                metrics.count(&label, PlanOutcome::Blocked);
                let reason = format!(
                    "schema: {} v{}: {}",
                    label,
                    compiled.version(),
                    describe(&violations)
                );
                Decision::Block(m, reason)
            }
        },
    }
}

/// `/revenue: -1 is less than the minimum of 0; /: "order_id" is a required property`
pub fn describe(violations: &[Violation]) -> String {
    violations
        .iter()
        .map(|v| {
            format!(
                "{}: {}",
                if v.path.is_empty() { "/" } else { &v.path },
                v.message
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Adds the errors to `context.violations`.
fn flag(m: &mut Message, violations: &[Violation]) {
    let mut context: Map<String, Value> = m
        .context
        .as_ref()
        .and_then(|c| serde_json::from_str(c.get()).ok())
        .unwrap_or_default();
    context.insert(
        "violations".into(),
        serde_json::to_value(violations).unwrap_or(Value::Null),
    );
    m.context = Json::of(&context).ok();
}

#[cfg(test)]
mod tests;
