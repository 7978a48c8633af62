//! The one place a Rhai engine is built, for segment rules and for destination filters and
//! transforms alike: its limits, JSON to Rhai values and back, and where a script's problem is in
//! the file it came from. Every script runs on an engine from [`engine`], never on
//! `Engine::new()`: Rhai has no limits by default.

use rhai::{Dynamic, Engine, ImmutableString};

use crate::diagnostic::Diagnostic;

/// Hard limits on one evaluation. A rule past any of them fails (and changes nothing).
///
/// Rhai counts its size limits over a whole value, nested values included (all the strings of a
/// map, every element of nested arrays), and over the values a script is given as well as those
/// it makes. So they are set above anything a script is given (a message is at most 32 KB as
/// sent, plus its batch's context; a profile's traits are merged from such messages), and what a
/// script makes is bounded by them together with its operations: a value past 1 MiB of text or
/// 100,000 elements fails, and 20,000 operations leave no room to build many.
pub const MAX_OPERATIONS: u64 = 20_000;
pub const MAX_CALL_LEVELS: usize = 16;
pub const MAX_EXPR_DEPTH: usize = 64;
pub const MAX_FUNCTION_EXPR_DEPTH: usize = 32;
pub const MAX_STRING_BYTES: usize = 1 << 20;
pub const MAX_ARRAY_LEN: usize = 100_000;
pub const MAX_MAP_LEN: usize = 100_000;

/// An engine with every limit above and nothing registered: no modules (the crate is built with
/// `no_module`), no clock (`no_time`), no `eval`; `print` and `debug` go nowhere; variables must
/// be declared.
pub fn engine() -> Engine {
    let mut engine = Engine::new();
    engine.set_max_operations(MAX_OPERATIONS);
    engine.set_max_call_levels(MAX_CALL_LEVELS);
    engine.set_max_expr_depths(MAX_EXPR_DEPTH, MAX_FUNCTION_EXPR_DEPTH);
    engine.set_max_string_size(MAX_STRING_BYTES);
    engine.set_max_array_size(MAX_ARRAY_LEN);
    engine.set_max_map_size(MAX_MAP_LEN);
    engine.set_strict_variables(true);
    engine.disable_symbol("eval");
    engine.on_print(|_| {});
    engine.on_debug(|_, _, _| {});
    engine
}

/// JSON as Rhai values: objects become maps, numbers become integers when they are whole.
pub fn json_to_dynamic(v: &serde_json::Value) -> Dynamic {
    use serde_json::Value;
    match v {
        Value::Null => Dynamic::UNIT,
        Value::Bool(b) => Dynamic::from_bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Dynamic::from_int(i),
            None => Dynamic::from_float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => Dynamic::from(ImmutableString::from(s.as_str())),
        Value::Array(items) => Dynamic::from_array(items.iter().map(json_to_dynamic).collect()),
        Value::Object(map) => Dynamic::from_map(
            map.iter()
                .map(|(k, v)| (k.as_str().into(), json_to_dynamic(v)))
                .collect(),
        ),
    }
}

/// Rhai values back as JSON; `None` for what JSON cannot hold (functions, custom types).
pub fn dynamic_to_json(v: &Dynamic) -> Option<serde_json::Value> {
    use serde_json::Value;
    if v.is_unit() {
        return Some(Value::Null);
    }
    if let Ok(b) = v.as_bool() {
        return Some(b.into());
    }
    if let Ok(i) = v.as_int() {
        return Some(i.into());
    }
    if let Ok(f) = v.as_float() {
        return Some(serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number));
    }
    if let Ok(c) = v.as_char() {
        return Some(c.to_string().into());
    }
    if v.is_string() {
        return Some(v.clone().into_string().ok()?.into());
    }
    if v.is_array() {
        let items = v.clone().into_array().ok()?;
        return items.iter().map(dynamic_to_json).collect::<Option<_>>();
    }
    if v.is_map() {
        let map = v.clone().try_cast::<rhai::Map>()?;
        return map
            .iter()
            .map(|(k, v)| Some((k.to_string(), dynamic_to_json(v)?)))
            .collect::<Option<serde_json::Map<_, _>>>()
            .map(Value::Object);
    }
    None
}

/// A Rhai problem in code that starts at byte `code_offset` of a file's `text`, labelled `what`.
pub fn problem_at(
    path: &std::path::Path,
    text: &str,
    code_offset: usize,
    what: &str,
    pos: &rhai::Position,
    message: &str,
) -> Diagnostic {
    let (base_line, base_col) = crate::diagnostic::line_col(text, code_offset);
    let (line, col) = match (pos.line(), pos.position()) {
        (Some(1), Some(c)) => (base_line, base_col + c - 1),
        (Some(l), Some(c)) => (base_line + l - 1, c),
        (Some(l), None) => (base_line + l - 1, 1),
        _ => (base_line, base_col),
    };
    Diagnostic {
        file: path.to_path_buf(),
        line,
        col,
        message: format!("{what}: {}", strip_position(message)),
    }
}

fn strip_position(message: &str) -> &str {
    message.split(" (line ").next().unwrap_or(message)
}

/// Where the code of a TOML string starting at `start` begins: past the quotes, and past the
/// newline that TOML drops right after opening triple quotes.
pub fn code_start(text: &str, start: usize) -> usize {
    let rest = &text[start..];
    let quotes = if rest.starts_with("'''") || rest.starts_with("\"\"\"") {
        3
    } else {
        1
    };
    let mut at = start + quotes;
    if quotes == 3 {
        if text[at..].starts_with("\r\n") {
            at += 2;
        } else if text[at..].starts_with('\n') {
            at += 1;
        }
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(script: &str) -> Result<Dynamic, String> {
        let engine = engine();
        let ast = engine.compile(script).map_err(|e| e.to_string())?;
        engine.eval_ast::<Dynamic>(&ast).map_err(|e| e.to_string())
    }

    #[test]
    fn abuse_is_stopped_by_a_limit() {
        let cases = [
            ("loop {}", "operations"),
            ("fn f(n) { f(n + 1) } f(0)", "stack overflow"),
            (r#"let s = "x"; loop { s += s; }"#, "string"),
            ("let a = [1]; loop { a += a; }", "array"),
            (
                "let m = #{}; for i in 0..200000 { m[`k${i}`] = i; }",
                "operations",
            ),
            (r#"eval("1")"#, "eval"),
            ("undefined_variable", "undefined_variable"),
        ];
        for (script, what) in cases {
            let started = std::time::Instant::now();
            let err = run(script).expect_err(script);
            assert!(err.to_lowercase().contains(what), "{script}: {err}");
            assert!(
                started.elapsed() < std::time::Duration::from_millis(500),
                "{script} took {:?}",
                started.elapsed()
            );
        }
    }
}
