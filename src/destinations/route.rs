//! Which messages a destination receives, and in what shape: `events`, `segments`, and the
//! optional Rhai `filter` and `transform`, on the sandboxed engine the segment rules use.

use std::borrow::Cow;
use std::collections::HashSet;

use rhai::{Dynamic, Engine, Scope, AST};
use serde::Deserialize;

use super::files::DestinationFile;
use crate::diagnostic::Diagnostic;
use crate::script::{self, dynamic_to_json, json_to_dynamic};
use crate::vocabulary::SOURCE;

/// What routing reads of a message: parsed once per message for every destination
/// ([`super::shared_read`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub kind: String,
    pub event: Option<String>,
    /// The key per-user order is kept by.
    pub user: String,
    /// For a segment change Sluice emitted: the segment, and the destinations the segment file
    /// named when the change was emitted.
    pub audience: Option<(String, Vec<String>)>,
}

impl Routing {
    /// Reads a message's routing from its JSON (`source` is the record's); the error says why the
    /// message cannot be routed.
    pub fn parse(source: &str, body: &[u8]) -> Result<Routing, String> {
        let head: Head = serde_json::from_slice(body).map_err(|e| e.to_string())?;
        let audience = audience(source, &head).map(|r| {
            let segment = r.audience.unwrap_or_default().into_owned();
            (
                segment,
                r.destinations.into_iter().map(Cow::into_owned).collect(),
            )
        });
        Ok(Routing {
            user: head.user().to_string(),
            kind: head.kind.into_owned(),
            event: head.event.map(Cow::into_owned),
            audience,
        })
    }
}

/// The fields routing reads; the rest of the message is skipped, not built.
#[derive(Debug, Deserialize)]
struct Head<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    event: Option<Cow<'a, str>>,
    #[serde(rename = "userId", default, borrow)]
    user_id: Option<Cow<'a, str>>,
    #[serde(rename = "anonymousId", default, borrow)]
    anonymous_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    context: Option<HeadContext<'a>>,
}

#[derive(Debug, Deserialize)]
struct HeadContext<'a> {
    /// Kept raw: a client may send a `context.sluice` of any shape, and routing must not fail on
    /// it. Only Sluice's own messages are read further (see [`audience`]).
    #[serde(default, borrow)]
    sluice: Option<&'a serde_json::value::RawValue>,
}

/// The routing a segment change carries (see `crate::profile_stage::emit`).
#[derive(Debug, Default, Deserialize)]
struct SluiceContext<'a> {
    /// The segment key.
    #[serde(default, borrow)]
    audience: Option<Cow<'a, str>>,
    /// The destinations the segment named when the change was emitted.
    #[serde(default, borrow)]
    destinations: Vec<Cow<'a, str>>,
}

impl Head<'_> {
    fn user(&self) -> &str {
        self.user_id
            .as_deref()
            .filter(|u| !u.is_empty())
            .or(self.anonymous_id.as_deref())
            .unwrap_or("")
    }
}

/// The segment a message announces an entry or exit of, with the destinations it was routed to,
/// when Sluice emitted it.
fn audience<'a>(source: &str, head: &Head<'a>) -> Option<SluiceContext<'a>> {
    if source != SOURCE {
        return None;
    }
    let raw = head.context.as_ref()?.sluice?;
    let routing = serde_json::from_str::<SluiceContext<'a>>(raw.get()).ok()?;
    routing.audience.is_some().then_some(routing)
}

pub struct Route {
    /// Track event names and message types; `None` is every message.
    events: Option<HashSet<String>>,
    segments: HashSet<String>,
    name: String,
    engine: Engine,
    filter: Option<AST>,
    transform: Option<AST>,
}

/// What the filter and transform made of one message.
#[derive(Debug, PartialEq)]
pub enum Shaped {
    Send(Vec<u8>),
    Dropped,
    /// The script failed: the message goes to the dead letter with this reason.
    Failed(String),
}

impl Route {
    pub fn compile(file: &DestinationFile) -> Result<Route, Vec<Diagnostic>> {
        let engine = script::engine();
        let mut problems = Vec::new();
        let mut compile = |what: &str, code: &Option<(String, usize)>| {
            let (code, offset) = code.as_ref()?;
            let mut scope = Scope::new();
            scope.push_dynamic("msg", Dynamic::UNIT);
            match engine.compile_with_scope(&scope, code) {
                Ok(ast) => Some(ast),
                Err(e) => {
                    problems.push(script::problem_at(
                        &file.path,
                        &file.text,
                        *offset,
                        what,
                        &e.1,
                        &e.0.to_string(),
                    ));
                    None
                }
            }
        };
        let filter = compile("filter", &file.filter);
        let transform = compile("transform", &file.transform);
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Route {
            events: file.events.as_ref().map(|e| e.iter().cloned().collect()),
            segments: file.segments.iter().cloned().collect(),
            name: file.name.clone(),
            engine,
            filter,
            transform,
        })
    }

    /// Whether this destination receives the message. A segment's entries and exits go to the
    /// destinations the segment file named when the change was emitted (carried in the message)
    /// and to those listing it under `segments`, whatever `events` says; ordinary messages go by
    /// `events`.
    pub fn wants(&self, routing: &Routing) -> bool {
        if let Some((segment, destinations)) = &routing.audience {
            return self.segments.contains(segment) || destinations.contains(&self.name);
        }
        match &self.events {
            None => true,
            Some(events) => {
                events.contains(&routing.kind)
                    || (routing.kind == "track"
                        && routing.event.as_deref().is_some_and(|e| events.contains(e)))
            }
        }
    }

    pub fn has_scripts(&self) -> bool {
        self.filter.is_some() || self.transform.is_some()
    }

    /// Runs the filter, then the transform, over the message.
    pub fn shape(&self, body: &[u8]) -> Shaped {
        if !self.has_scripts() {
            return Shaped::Send(body.to_vec());
        }
        let value: serde_json::Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => return Shaped::Failed(format!("message is not JSON: {e}")),
        };
        let mut msg = json_to_dynamic(&value);
        if let Some(filter) = &self.filter {
            match self.run(filter, msg.clone()) {
                Ok(keep) => match keep.as_bool() {
                    Ok(true) => {}
                    Ok(false) => return Shaped::Dropped,
                    Err(t) => {
                        return Shaped::Failed(format!("filter returned {t}, not true or false"))
                    }
                },
                Err(e) => return Shaped::Failed(format!("filter: {e}")),
            }
        }
        if let Some(transform) = &self.transform {
            match self.run(transform, msg) {
                Ok(out) if out.is_unit() => return Shaped::Dropped,
                Ok(out) => msg = out,
                Err(e) => return Shaped::Failed(format!("transform: {e}")),
            }
            return match dynamic_to_json(&msg) {
                Some(v @ serde_json::Value::Object(_)) => {
                    Shaped::Send(serde_json::to_vec(&v).expect("JSON values serialize"))
                }
                _ => Shaped::Failed(format!(
                    "transform returned {}, not a message (an object map) or ()",
                    msg.type_name()
                )),
            };
        }
        Shaped::Send(body.to_vec())
    }

    fn run(&self, ast: &AST, msg: Dynamic) -> Result<Dynamic, String> {
        let mut scope = Scope::new();
        scope.push_dynamic("msg", msg);
        self.engine
            .eval_ast_with_scope::<Dynamic>(&mut scope, ast)
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn route(extra: &str) -> Route {
        let text = format!("type = \"webhook\"\nurl = \"http://127.0.0.1:9/\"\n{extra}");
        let file = super::super::files::parse(Path::new("destinations/crm.toml"), &text, &|_| None)
            .unwrap();
        Route::compile(&file).unwrap()
    }

    fn head(source: &str, json: &str) -> Routing {
        Routing::parse(source, json.as_bytes()).unwrap()
    }

    #[test]
    fn events_match_names_and_types() {
        let r = route("events = [\"Order Completed\", \"identify\"]\n");
        let order = head("web", r#"{"type":"track","event":"Order Completed"}"#);
        assert!(r.wants(&order));
        assert!(r.wants(&head("web", r#"{"type":"identify"}"#)));
        assert!(!r.wants(&head("web", r#"{"type":"track","event":"Signed Up"}"#)));
        assert!(!r.wants(&head("web", r#"{"type":"page"}"#)));
        assert!(route("").wants(&head("web", r#"{"type":"page"}"#)));
        assert!(!route("events = []\n").wants(&head("web", r#"{"type":"page"}"#)));
    }

    #[test]
    fn segment_changes_go_by_segment_only() {
        let change = r#"{"type":"track","event":"Audience Entered","context":{"sluice":{"audience":"vip","destinations":[]}}}"#;
        // Listed under `segments`, whatever `events` says.
        assert!(route("events = []\nsegments = [\"vip\"]\n").wants(&head("sluice", change)));
        // Named by the segment file when the change was emitted: the change says so.
        let named = r#"{"type":"track","context":{"sluice":{"audience":"vip","destinations":["ads","crm"]}}}"#;
        assert!(route("events = []\n").wants(&head("sluice", named)));
        // Neither: not even a destination taking every event.
        assert!(!route("").wants(&head("sluice", change)));
        // The same shape from a client is an ordinary message.
        assert!(route("").wants(&head("web", named)));
    }

    #[test]
    fn filter_and_transform_shape_the_payload() {
        let r = route(
            "filter = 'msg.properties.revenue > 100'\ntransform = '''\nmsg.event = \"Big \" + msg.event; msg.properties.remove(\"secret\"); msg'''\n",
        );
        let big = br#"{"type":"track","event":"Order","properties":{"revenue":150,"secret":"x"}}"#;
        let Shaped::Send(out) = r.shape(big) else {
            panic!()
        };
        let out: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(out["event"], "Big Order");
        assert_eq!(out["properties"], serde_json::json!({"revenue": 150}));
        let small = br#"{"type":"track","event":"Order","properties":{"revenue":5}}"#;
        assert_eq!(r.shape(small), Shaped::Dropped);
        // No revenue at all: `() > 100` is false, not an error.
        assert_eq!(
            r.shape(br#"{"type":"track","event":"Order","properties":{}}"#),
            Shaped::Dropped
        );

        assert_eq!(route("transform = '()'\n").shape(big), Shaped::Dropped);
        assert!(
            matches!(route("transform = '42'\n").shape(big), Shaped::Failed(e) if e.contains("not a message"))
        );
        assert!(
            matches!(route("filter = 'loop {}'\n").shape(big), Shaped::Failed(e) if e.contains("operations"))
        );
    }

    /// An ordinary rich message (analytics.js sends a large context) can be reshaped by a
    /// transform: Rhai's size limits, counted over whole values (the message's parts included),
    /// used to fail it to the dead letter.
    #[test]
    fn an_ordinary_rich_message_can_be_reshaped_by_a_transform() {
        // A new payload built from the message's parts, as a transform for another API would.
        let r = route(
            r#"filter = 'msg.type == "track"'
transform = '''
let out = #{ type: msg.type, event: msg.event, userId: msg.userId, messageId: msg.messageId };
out.properties = msg.properties;
out.context = msg.context;
out.context.sent_by = "sluice";
out'''
"#,
        );
        // 250 properties, one of them a 5,000-character text and one a list of 1,500 numbers.
        let mut properties: serde_json::Map<String, serde_json::Value> = (0..248)
            .map(|i| {
                (
                    format!("p{i}"),
                    format!("value {i} {}", "v".repeat(40)).into(),
                )
            })
            .collect();
        properties.insert("description".into(), "d".repeat(5_000).into());
        properties.insert("ids".into(), (0..1_500).collect::<Vec<i64>>().into());
        let message = serde_json::json!({
            "type": "track", "event": "Viewed", "userId": "u", "messageId": "m",
            "properties": properties,
            "context": {
                "userAgent": "Mozilla/5.0 ".repeat(20),
                "page": {"url": format!("https://example.com/{}", "p".repeat(2000)), "title": "t"},
                "library": {"name": "analytics.js", "version": "next-1.70.0"},
                "campaign": {"name": "c", "source": "s"},
            },
        });
        let body = serde_json::to_vec(&message).unwrap();
        assert!(body.len() > 20_000, "{}", body.len());
        let Shaped::Send(out) = r.shape(&body) else {
            panic!("{:?}", r.shape(&body))
        };
        let mut expected = message;
        expected["context"]["sent_by"] = "sluice".into();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&out).unwrap(),
            expected
        );
    }

    #[test]
    fn broken_rhai_is_placed_in_the_file() {
        let text =
            "type = \"webhook\"\nurl = \"http://127.0.0.1:9/\"\nfilter = '''\nmsg.x >\n'''\n";
        let file = super::super::files::parse(Path::new("destinations/crm.toml"), text, &|_| None)
            .unwrap();
        let problems = Route::compile(&file).err().unwrap();
        let shown = problems[0].to_string();
        assert!(
            shown.starts_with("destinations/crm.toml:5:1: filter:")
                || shown.starts_with("destinations/crm.toml:4:"),
            "{shown}"
        );
    }
}
