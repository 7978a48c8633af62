//! The one place a Rhai engine is built. Every rule (and, later, every destination filter and
//! transform) runs on an engine from [`engine`], never on `Engine::new()`: Rhai has no limits by
//! default.

use rhai::{Engine, Scope};

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

/// A sandboxed engine with the rule API registered: bounded operations, call depth, expression
/// depth and sizes; no modules (the crate is built with `no_module`), no clock (`no_time`), no
/// `eval`, and `print`/`debug` go nowhere. Variables must be declared (`user` and `event` are).
pub fn engine() -> Engine {
    let mut engine = limited();
    super::api::register(&mut engine);
    engine
}

/// An engine with every limit of [`engine`] and nothing registered: for destination filters and
/// transforms, which see a message rather than a profile.
pub fn limited() -> Engine {
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

/// The scope a rule runs with: `user` and `event`, as constants (a rule cannot reassign them
/// for the rules after it).
pub fn scope<'a>(user: rhai::Dynamic, event: rhai::Dynamic) -> Scope<'a> {
    let mut scope = Scope::new();
    scope.push_constant_dynamic("user", user);
    scope.push_constant_dynamic("event", event);
    scope
}

/// The scope a rule is compiled with: the same names, as variables, because the optimizer would
/// fold a constant's placeholder value into the compiled rule.
pub fn compile_scope<'a>() -> Scope<'a> {
    let mut scope = Scope::new();
    scope.push_dynamic("user", rhai::Dynamic::UNIT);
    scope.push_dynamic("event", rhai::Dynamic::UNIT);
    scope
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(script: &str) -> Result<rhai::Dynamic, String> {
        let engine = engine();
        let ast = engine
            .compile_with_scope(&compile_scope(), script)
            .map_err(|e| e.to_string())?;
        engine
            .eval_ast_with_scope(&mut scope(rhai::Dynamic::UNIT, rhai::Dynamic::UNIT), &ast)
            .map_err(|e| e.to_string())
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

    #[test]
    fn ordinary_rules_run() {
        assert_eq!(run("days(1) > hours(23)").unwrap().as_bool(), Ok(true));
        assert_eq!(
            run("let x = 0; for i in 0..10 { x += i } x")
                .unwrap()
                .as_int(),
            Ok(45)
        );
    }
}
