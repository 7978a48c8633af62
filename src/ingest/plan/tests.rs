use super::*;
use crate::ingest::message::RawMessage;
use crate::ingest::rules::{self, BatchDefaults};
use crate::schema::Schemas;

fn registry() -> Registry {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("order.json"),
        r#"{"x-sluice":{"type":"track","event":"Order Completed","version":1},
            "type":"object","properties":{"order_id":{"type":"string"},"revenue":{"type":"number"}},
            "required":["order_id"]}"#,
    )
    .unwrap();
    let (schemas, problems) = Schemas::load_dir(dir.path());
    assert!(problems.is_empty());
    let (registry, problems) = Registry::build(&schemas);
    assert!(problems.is_empty());
    registry
}

fn message(json: &str) -> Box<Message<'_>> {
    let raw = RawMessage::read(serde_json::from_str(json).unwrap()).unwrap();
    Box::new(rules::apply(raw, None, &BatchDefaults::default(), chrono::Utc::now()).unwrap())
}

const VALID: &str = r#"{"type":"track","userId":"u","event":"Order Completed","properties":{"order_id":"o1","revenue":5}}"#;
const INVALID: &str = r#"{"type":"track","userId":"u","event":"Order Completed","properties":{"revenue":"five"},"context":{"ip":"1.2.3.4"}}"#;
const UNPLANNED: &str = r#"{"type":"track","userId":"u","event":"Something Else"}"#;

fn policy(unplanned: Unplanned, violations: Violations) -> Policy {
    Policy {
        unplanned,
        violations,
    }
}

#[test]
fn the_policy_matrix() {
    let r = registry();
    let metrics = SchemaMetrics::default();
    for unplanned in [Unplanned::Allow, Unplanned::Block] {
        for violations in [Violations::Flag, Violations::Block] {
            let p = policy(unplanned, violations);
            assert!(
                matches!(enforce(message(VALID), &r, p, &metrics), Decision::Store(_)),
                "valid is stored under {p:?}"
            );
            match (enforce(message(INVALID), &r, p, &metrics), violations) {
                (Decision::Store(m), Violations::Flag) => {
                    let context: Value = serde_json::from_str(m.context.unwrap().get()).unwrap();
                    assert_eq!(context["ip"], "1.2.3.4", "the rest of the context is kept");
                    let paths: Vec<&str> = context["violations"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v["path"].as_str().unwrap())
                        .collect();
                    assert!(
                        paths.contains(&"") && paths.contains(&"/revenue"),
                        "{paths:?}"
                    );
                }
                (Decision::Block(_, reason), Violations::Block) => {
                    assert!(
                        reason.starts_with("schema: Order Completed v1: "),
                        "{reason}"
                    );
                    assert!(
                        reason.contains("/revenue") && reason.contains("order_id"),
                        "{reason}"
                    );
                }
                _ => panic!("invalid under {p:?}"),
            }
            match (enforce(message(UNPLANNED), &r, p, &metrics), unplanned) {
                (Decision::Store(_), Unplanned::Allow) => {}
                (Decision::Block(_, reason), Unplanned::Block) => {
                    assert_eq!(reason, "unplanned: no schema for track `Something Else`")
                }
                _ => panic!("unplanned under {p:?}"),
            }
        }
    }
    let alias = message(r#"{"type":"alias","userId":"u","previousId":"p"}"#);
    assert!(matches!(
        enforce(
            alias,
            &r,
            policy(Unplanned::Block, Violations::Block),
            &metrics
        ),
        Decision::Store(_)
    ));
}

#[test]
fn checks_are_counted_by_registered_event_or_unplanned() {
    let r = registry();
    let metrics = SchemaMetrics::default();
    let p = policy(Unplanned::Allow, Violations::Flag);
    enforce(message(VALID), &r, p, &metrics);
    enforce(message(INVALID), &r, p, &metrics);
    enforce(message(UNPLANNED), &r, p, &metrics);
    let mut text = String::new();
    let mut reg = prometheus_client::registry::Registry::default();
    reg.register("checks", "", metrics.checks.clone());
    prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
    assert!(
        text.contains(r#"checks_total{event="Order Completed",outcome="valid"} 1"#),
        "{text}"
    );
    assert!(text.contains(r#"checks_total{event="Order Completed",outcome="flagged"} 1"#));
    assert!(text.contains(r#"checks_total{event="unplanned",outcome="unplanned_allowed"} 1"#));
    assert!(
        !text.contains("Something Else"),
        "unregistered names never become labels"
    );
}
