//! What a rule reads, found by looking at its text: which event names can change its answer,
//! whether traits can, which other segments it reads, and what history it needs a profile to
//! keep. Used to re-evaluate on a message only the segments that message can affect.
//!
//! The analysis is conservative: anything it cannot pin down (a name held in a variable, the
//! `event` variable, `last_seen`, a function pointer) makes the rule depend on every message,
//! which is always correct and only slower. It reads both forms of a call, `user.did("A")` and
//! `did(user, "A")`, and string literals as Rhai reads them (escapes included). It works on
//! tokens rather than Rhai's internal AST, whose shape is not a stable API; the rule has already
//! compiled, so the tokens are well formed.

use crate::profiles::profile::{Millis, Names, Retention, Set as HashSet};

/// How far back history is kept for a windowed call whose window is not a literal duration. A
/// longer window, computed at run time, fails the rule (see `super::api`) rather than answer from
/// too little history.
pub const UNKNOWN_WINDOW: Millis = 90 * 86_400_000;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Dependencies {
    /// Event names whose messages can change the answer (`All`: every message).
    pub events: Names,
    /// Whether an identify (new traits) can change the answer.
    pub traits: bool,
    /// Segments whose membership the rule reads (`All`: any).
    pub segments: Names,
    pub retention: Retention,
    /// Whether a windowed call's window is computed (kept as [`UNKNOWN_WINDOW`]).
    pub computed_window: bool,
}

impl Dependencies {
    #[cfg(test)]
    /// Whether a message with this event name (or an identify) can change the answer.
    pub fn affected_by(&self, event: Option<&str>, identify: bool) -> bool {
        (identify && self.traits)
            || match &self.events {
                Names::All => true,
                Names::Only(names) => event.is_some_and(|e| names.contains(e)),
            }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Token {
    Ident(String),
    Str(String),
    Num(String),
    Punct(char),
    /// A string we do not read (backtick interpolation, char literals).
    Other,
}

pub fn analyse(rule: &str) -> Dependencies {
    let tokens = tokenize(rule);
    let mut deps = Dependencies::default();
    let mut history = Names::default();
    let mut objects = Names::default();
    let mut read = Names::default();
    let mut values: Option<HashSet<(String, String)>> = Some(HashSet::new());
    let mut window: Millis = 0;
    let all_events = |deps: &mut Dependencies| deps.events = Names::All;
    if tokens.iter().any(calls_indirectly) {
        // A function pointer can call any of the API by a name we do not see.
        return Dependencies {
            events: Names::All,
            traits: true,
            segments: Names::All,
            retention: Retention {
                window: UNKNOWN_WINDOW,
                history: Names::All,
                values: None,
                objects: Names::All,
                read: Names::All,
            },
            computed_window: true,
        };
    }
    for i in 0..tokens.len() {
        let after_dot = i > 0 && tokens[i - 1] == Token::Punct('.');
        let Token::Ident(name) = &tokens[i] else {
            continue;
        };
        let call_args = (tokens.get(i + 1) == Some(&Token::Punct('('))).then(|| {
            let mut args = args(&tokens, i + 1);
            if !after_dot && !args.is_empty() {
                // `did(user, "A")`: the user is the first argument.
                args.remove(0);
            }
            args
        });
        // Both forms of a call of the user API; a plain name (`event`) is never after a dot.
        let method = after_dot || call_args.is_some();
        match (name.as_str(), method, call_args) {
            ("did" | "count" | "first" | "last" | "sum", true, Some(args)) => {
                let event = match args.first() {
                    Some([Token::Str(event)]) => Some(event.clone()),
                    _ => None,
                };
                match &event {
                    Some(e) => deps.events.union(&Names::Only([e.clone()].into())),
                    None => all_events(&mut deps),
                }
                let names = event
                    .clone()
                    .map_or(Names::All, |e| Names::Only([e].into()));
                read.union(&names);
                match (name.as_str(), args.len()) {
                    ("first" | "last", _) => objects.union(&names),
                    ("did" | "count", 2) | ("sum", 3) => {
                        history.union(&names);
                        let literal = literal_duration(args.last().unwrap());
                        deps.computed_window |= literal.is_none();
                        window = window.max(literal.unwrap_or(UNKNOWN_WINDOW));
                        if name == "sum" {
                            match (&event, args[1]) {
                                (Some(e), [Token::Str(p)]) => {
                                    if let Some(v) = values.as_mut() {
                                        v.insert((e.clone(), p.clone()));
                                    }
                                }
                                _ => values = None,
                            }
                        }
                    }
                    _ => {}
                }
            }
            ("traits", true, _) => deps.traits = true,
            ("first_seen" | "last_seen", true, _) => all_events(&mut deps),
            ("in_segment", true, Some(args)) => match args.first() {
                Some([Token::Str(key)]) => deps.segments.union(&Names::Only([key.clone()].into())),
                _ => deps.segments = Names::All,
            },
            ("event", false, _) => all_events(&mut deps),
            _ => {}
        }
    }
    // The first and last occurrences keep their properties only for a rule that can read them:
    // they are most of a profile's bytes, and copied on every message of their event.
    if !tokens.iter().any(mentions_properties) {
        objects = Names::default();
    }
    deps.retention = Retention {
        window,
        history,
        values,
        objects,
        read,
    };
    deps
}

/// Whether a token makes a call we cannot follow: a function pointer (`Fn("did")`, `.call(...)`,
/// `.curry(...)`), or a string naming one of the API's getters (`"get$traits"`).
fn calls_indirectly(token: &Token) -> bool {
    match token {
        Token::Ident(name) => matches!(name.as_str(), "Fn" | "call" | "curry"),
        Token::Str(text) => text.contains('$'),
        _ => false,
    }
}

/// Whether a token can be a way to an event's `properties`: the getter's name, or a string
/// that names it (`Fn("get$properties")`) or that we do not read.
fn mentions_properties(token: &Token) -> bool {
    match token {
        Token::Ident(name) => name == "properties",
        Token::Str(text) => text.contains("properties"),
        Token::Other => true,
        Token::Num(_) | Token::Punct(_) => false,
    }
}

/// The arguments of the call whose `(` is at `open`, each as its tokens.
fn args(tokens: &[Token], open: usize) -> Vec<&[Token]> {
    let mut out = Vec::new();
    let mut depth = 0;
    let mut start = open + 1;
    for (i, t) in tokens.iter().enumerate().skip(open) {
        match t {
            Token::Punct('(' | '[' | '{') => depth += 1,
            Token::Punct(')' | ']' | '}') => {
                depth -= 1;
                if depth == 0 {
                    if i > start {
                        out.push(&tokens[start..i]);
                    }
                    return out;
                }
            }
            Token::Punct(',') if depth == 1 => {
                out.push(&tokens[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out
}

/// `days(30)` and the like, written out.
fn literal_duration(tokens: &[Token]) -> Option<Millis> {
    let [Token::Ident(unit), Token::Punct('('), Token::Num(n), Token::Punct(')')] = tokens else {
        return None;
    };
    let n: i64 = n.replace('_', "").parse().ok()?;
    let unit = match unit.as_str() {
        "seconds" => 1_000,
        "minutes" => 60_000,
        "hours" => 3_600_000,
        "days" => 86_400_000,
        _ => return None,
    };
    Some(n.saturating_mul(unit))
}

pub(super) fn tokenize(text: &str) -> Vec<Token> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '/' && chars.get(i + 1) == Some(&'/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && chars.get(i + 1) == Some(&'*') {
            i += 2;
            while i < chars.len() && !(chars[i] == '*' && chars.get(i + 1) == Some(&'/')) {
                i += 1;
            }
            i += 2;
        } else if c == '"' {
            let start = i;
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            let literal: String = chars[start..i.min(chars.len())].iter().collect();
            out.push(string_literal(&literal));
        } else if c == '`' || c == '\'' {
            i += 1;
            while i < chars.len() && chars[i] != c {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            out.push(Token::Other);
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push(Token::Ident(chars[start..i].iter().collect()));
        } else if c.is_ascii_digit() {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push(Token::Num(chars[start..i].iter().collect()));
        } else {
            out.push(Token::Punct(c));
            i += 1;
        }
    }
    out
}

/// A string literal, as Rhai reads it: with an escape in it, Rhai itself reads it (there are
/// several kinds, and line continuations); a literal it cannot read is one we do not either.
fn string_literal(literal: &str) -> Token {
    let inside = &literal[1..literal.len().saturating_sub(1).max(1)];
    if !inside.contains('\\') {
        return Token::Str(inside.to_string());
    }
    match rhai::Engine::new_raw().eval_expression::<rhai::ImmutableString>(literal) {
        Ok(text) => Token::Str(text.to_string()),
        Err(_) => Token::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn only(names: &[&str]) -> Names {
        Names::Only(names.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn literal_names_and_windows_are_indexed() {
        let d = analyse(
            r#"
            // "Ignored" in a comment
            let signup = user.first("Signed Up");
            signup != () && signup.age() > hours(1) && !user.did("Onboarding Started")
              && user.sum("Order Completed", "revenue", days(30)) > 100.0
              && user.count("Page Viewed", minutes(90)) > 2
        "#,
        );
        assert_eq!(
            d.events,
            only(&[
                "Signed Up",
                "Onboarding Started",
                "Order Completed",
                "Page Viewed"
            ])
        );
        assert!(!d.traits);
        assert_eq!(d.retention.window, 30 * 86_400_000);
        assert_eq!(
            d.retention.history,
            only(&["Order Completed", "Page Viewed"])
        );
        assert_eq!(d.retention.objects, only(&[]), "no properties are read");
        assert_eq!(
            d.retention.values,
            Some([("Order Completed".to_string(), "revenue".to_string())].into())
        );
        assert_eq!(d.segments, only(&[]));
    }

    #[test]
    fn first_and_last_keep_properties_only_for_a_rule_that_reads_them() {
        let reads = |rule: &str| analyse(rule).retention.objects;
        assert_eq!(
            reads(r#"user.last("Order Completed").properties.total > 100"#),
            only(&["Order Completed"])
        );
        assert_eq!(
            reads(r#"let o = user.first("Signed Up"); let p = o.properties; p.plan == "pro""#),
            only(&["Signed Up"])
        );
        assert_eq!(
            reads(r#"Fn("get$properties").call(user.first("Signed Up")) != ()"#),
            Names::All,
            "a function pointer could read anything"
        );
        assert_eq!(
            reads(r#"user.first("Signed Up").age() > hours(1)"#),
            only(&[])
        );
    }

    #[test]
    fn what_cannot_be_pinned_down_depends_on_everything() {
        let d = analyse(r#"let name = "X"; user.did(name, days(n))"#);
        assert_eq!(d.events, Names::All);
        assert_eq!(d.retention.history, Names::All);
        assert_eq!(d.retention.window, UNKNOWN_WINDOW);
        assert_eq!(analyse(r#"event.name == "A""#).events, Names::All);
        assert_eq!(analyse("user.last_seen.age() < days(1)").events, Names::All);
        assert_eq!(
            analyse(r#"user.sum("A", p, days(1)) > 0"#).retention.values,
            None
        );
    }

    #[test]
    fn traits_and_segments_are_found() {
        let d = analyse(r#"user.traits.plan == "pro" && user.in_segment("big_spenders")"#);
        assert!(d.traits);
        assert_eq!(d.events, only(&[]));
        assert_eq!(d.segments, only(&["big_spenders"]));
        assert!(d.affected_by(None, true));
        assert!(!d.affected_by(Some("Other"), false));
        assert_eq!(
            analyse("let k = \"a\"; user.in_segment(k)").segments,
            Names::All
        );
    }
}

#[cfg(test)]
mod forms {
    use super::*;

    fn only(names: &[&str]) -> Names {
        Names::Only(names.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn the_function_call_form_is_indexed_like_the_method_form() {
        let d = analyse(
            r#"did(user, "Signed Up") && count(user, "Page Viewed", days(7)) > 2
               && sum(user, "Order Completed", "revenue", days(30)) > 10.0
               && in_segment(user, "vip") && last(user, "Plan Chosen").properties.tier == "pro""#,
        );
        assert_eq!(
            d.events,
            only(&["Signed Up", "Page Viewed", "Order Completed", "Plan Chosen"])
        );
        assert_eq!(d.segments, only(&["vip"]));
        assert_eq!(d.retention.window, 30 * 86_400_000);
        assert_eq!(
            d.retention.history,
            only(&["Page Viewed", "Order Completed"])
        );
        assert_eq!(
            d.retention.values,
            Some([("Order Completed".to_string(), "revenue".to_string())].into())
        );
        assert_eq!(d.retention.objects, only(&["Plan Chosen"]));
    }

    #[test]
    fn string_escapes_read_as_rhai_reads_them() {
        let d = analyse(
            r#"user.did("Caf\u00e9 \"Visited\"") || user.did("Tab\there") || user.did("back\\slash")"#,
        );
        assert_eq!(
            d.events,
            only(&["Café \"Visited\"", "Tab\there", "back\\slash"])
        );
    }

    #[test]
    fn a_function_pointer_depends_on_everything() {
        for rule in [
            r#"Fn("did").call(user, "A")"#,
            r#"let f = Fn("get$traits"); f.call(user).plan == "pro""#,
            r#"let f = Fn("in_segment"); f.curry(user).call("vip")"#,
        ] {
            let d = analyse(rule);
            assert_eq!(d.events, Names::All, "{rule}");
            assert!(d.traits, "{rule}");
            assert_eq!(d.segments, Names::All, "{rule}");
            assert_eq!(d.retention.history, Names::All, "{rule}");
        }
    }
}
