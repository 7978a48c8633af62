//! The engine segment rules run on: the sandbox of [`crate::script`] with the rule API
//! registered, and the scope a rule sees.

use rhai::{Engine, Scope};

/// The sandboxed engine ([`crate::script::engine`]) with the rule API registered. Variables must
/// be declared (`user` and `event` are).
pub fn engine() -> Engine {
    let mut engine = crate::script::engine();
    super::api::register(&mut engine);
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
