//! Rules of the common shapes, evaluated without Rhai.
//!
//! Most segment rules are a few `user.did/count/sum/in_segment/traits` calls compared with
//! literals and joined with `&&`, `||` and `!`. Rhai spends microseconds on each (a scope, a
//! function lookup per call, a boxed value per duration); this module compiles such a rule into
//! a small expression tree that gives the same answer, and notes the same flip moments, in tens
//! of nanoseconds. The rule API does the work in both cases ([`Round`]); only the interpreter
//! differs.
//!
//! The accepted language is a subset of Rhai, checked for types at compile time:
//! - literals: integers, decimals, strings, `true`/`false`, `()`; `seconds(n)` … `days(n)`;
//! - `user.did(e)`, `user.did(e, d)`, `user.count(e)`, `user.count(e, d)`, `user.sum(e, p, d)`,
//!   `user.in_segment(k)`, `user.traits.name`, `user.first(e)`, `user.last(e)`,
//!   `user.first_seen`, `user.last_seen`, with literal arguments; `.age()` of an occurrence;
//! - comparisons (not chained), `!`, `&&`, `||`, parentheses;
//! - `let name = …;` before the final expression.
//!
//! Anything else (the `event` variable, arithmetic, `if`, loops, functions, other methods)
//! returns `None` from [`compile`], and the rule runs on Rhai as written. A rule that fails at run
//! time (the `.age()` of an event that never happened) also runs on Rhai, which gives the error.
//! A property test checks the two interpreters agree, on answers and on flip moments.

use super::analysis::{tokenize, Token};
use super::api::{Duration, Round};
use crate::profiles::profile::Millis;

/// A compiled rule: `let`s, in order, then the answer.
#[derive(Debug)]
pub struct Native {
    lets: Vec<Expr>,
    body: Expr,
}

#[derive(Debug)]
enum Expr {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Duration(Duration),
    /// The value of the `let` at this position.
    Var(usize),
    Not(Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Compare(Op, Box<Expr>, Box<Expr>),
    Did(String),
    DidWithin(String, Duration),
    Count(String),
    CountWithin(String, Duration),
    Sum(String, String, Duration),
    InSegment(String),
    Trait(String),
    Unit,
    First(String),
    Last(String),
    FirstSeen,
    LastSeen,
    Age(Box<Expr>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// What an expression is known to produce. `Dynamic` is a trait: any JSON value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Type {
    Bool,
    Int,
    Float,
    Str,
    Duration,
    Dynamic,
    Unit,
    /// An occurrence of an event, or `()` if there was none.
    Occurrence,
}

/// A value while evaluating.
#[derive(Debug, Clone, Copy)]
enum Value<'a> {
    Unit,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(&'a str),
    Duration(Duration),
    /// An occurrence of an event, at this time.
    Occurrence(Millis),
    /// An array or a map: equal to nothing here.
    Other,
}

/// The rule compiled for native evaluation, if it is of a shape this module knows.
pub fn compile(rule: &str) -> Option<Native> {
    let tokens = tokenize(rule);
    if tokens.contains(&Token::Other) {
        return None;
    }
    let mut p = Parser {
        tokens: &tokens,
        at: 0,
        vars: Vec::new(),
    };
    let mut lets = Vec::new();
    while p.ident("let") {
        let Some(Token::Ident(name)) = p.next().cloned() else {
            return None;
        };
        if matches!(name.as_str(), "user" | "event") || !p.punct('=') || p.punct('=') {
            return None;
        }
        let (expr, ty) = p.expr()?;
        if !p.punct(';') {
            return None;
        }
        lets.push(expr);
        p.vars.push((name, ty));
    }
    let (body, ty) = p.expr()?;
    (ty == Type::Bool && p.at == tokens.len()).then_some(Native { lets, body })
}

impl Native {
    /// The rule's answer for the round's profile, with flips noted as the Rhai API notes them;
    /// `None` if the rule fails (Rhai then says why).
    pub fn eval(&self, round: &Round) -> Option<bool> {
        let mut vars = Vec::with_capacity(self.lets.len());
        for expr in &self.lets {
            let value = expr.value(round, &vars)?;
            vars.push(value);
        }
        self.body.truth(round, &vars)
    }
}

impl Expr {
    fn value<'a>(&'a self, round: &'a Round, vars: &[Value<'a>]) -> Option<Value<'a>> {
        let occurrence = |at: Option<Millis>| at.map_or(Value::Unit, Value::Occurrence);
        let stats = |name: &str| round.profile.events.get(name);
        Some(match self {
            Expr::Bool(b) => Value::Bool(*b),
            Expr::Int(n) => Value::Int(*n),
            Expr::Float(x) => Value::Float(*x),
            Expr::Str(s) => Value::Str(s),
            Expr::Duration(d) => Value::Duration(*d),
            Expr::Unit => Value::Unit,
            Expr::Var(i) => vars[*i],
            Expr::Not(e) => Value::Bool(!e.truth(round, vars)?),
            Expr::And(a, b) => Value::Bool(a.truth(round, vars)? && b.truth(round, vars)?),
            Expr::Or(a, b) => Value::Bool(a.truth(round, vars)? || b.truth(round, vars)?),
            Expr::Compare(op, a, b) => {
                let a = a.value(round, vars)?;
                let b = b.value(round, vars)?;
                Value::Bool(compare(*op, a, b))
            }
            Expr::Did(e) => Value::Bool(round.did(e)),
            Expr::DidWithin(e, d) => Value::Bool(round.did_within(e, *d)),
            Expr::Count(e) => Value::Int(round.count(e)),
            Expr::CountWithin(e, d) => Value::Int(round.count_within(e, *d)),
            Expr::Sum(e, p, d) => Value::Float(round.sum(e, p, *d)),
            Expr::InSegment(k) => Value::Bool(round.in_segment(k)),
            Expr::Trait(name) => trait_value(round.profile.traits.get(name)),
            Expr::First(e) => occurrence(stats(e).map(|s| s.first)),
            Expr::Last(e) => occurrence(stats(e).map(|s| s.last)),
            Expr::FirstSeen => Value::Occurrence(round.profile.first_seen),
            Expr::LastSeen => Value::Occurrence(round.profile.last_seen),
            Expr::Age(e) => match e.value(round, vars)? {
                Value::Occurrence(at) => Value::Duration(Duration::age(at, round.now)),
                _ => return None, // `().age()`: Rhai fails the rule
            },
        })
    }

    /// For operands typed `Bool` at compile time.
    fn truth(&self, round: &Round, vars: &[Value]) -> Option<bool> {
        Some(matches!(self.value(round, vars)?, Value::Bool(true)))
    }
}

/// A trait as Rhai sees it (`crate::script::json_to_dynamic`): whole numbers are integers, null is `()`.
fn trait_value(v: Option<&serde_json::Value>) -> Value<'_> {
    use serde_json::Value as J;
    match v {
        None | Some(J::Null) => Value::Unit,
        Some(J::Bool(b)) => Value::Bool(*b),
        Some(J::Number(n)) => match n.as_i64() {
            Some(i) => Value::Int(i),
            None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Some(J::String(s)) => Value::Str(s),
        Some(J::Array(_) | J::Object(_)) => Value::Other,
    }
}

/// Rhai's comparison semantics: integers with decimals compare as decimals, and values of
/// different types are never equal (`!=` is true, every other comparison false).
fn compare(op: Op, a: Value, b: Value) -> bool {
    use std::cmp::Ordering;
    let ordered = |o: Option<Ordering>| match o {
        None => op == Op::Ne, // NaN, as Rust's float operators answer
        Some(o) => match op {
            Op::Eq => o.is_eq(),
            Op::Ne => o.is_ne(),
            Op::Lt => o.is_lt(),
            Op::Le => o.is_le(),
            Op::Gt => o.is_gt(),
            Op::Ge => o.is_ge(),
        },
    };
    let equality = |equal: bool| match op {
        Op::Eq => equal,
        Op::Ne => !equal,
        _ => false,
    };
    match (a, b) {
        (Value::Int(x), Value::Int(y)) => ordered(Some(x.cmp(&y))),
        (Value::Int(x), Value::Float(y)) => ordered((x as f64).partial_cmp(&y)),
        (Value::Float(x), Value::Int(y)) => ordered(x.partial_cmp(&(y as f64))),
        (Value::Float(x), Value::Float(y)) => ordered(x.partial_cmp(&y)),
        (Value::Duration(x), Value::Duration(y)) => ordered(Some(Duration::compare(x, y))),
        (Value::Str(x), Value::Str(y)) => ordered(Some(x.cmp(y))),
        (Value::Bool(x), Value::Bool(y)) => equality(x == y),
        (Value::Unit, Value::Unit) => equality(true),
        // Occurrences are only ever compared with `()` here.
        _ => equality(false),
    }
}

struct Parser<'t> {
    tokens: &'t [Token],
    at: usize,
    /// The `let`s so far, with their types.
    vars: Vec<(String, Type)>,
}

type Typed = (Expr, Type);

impl Parser<'_> {
    fn peek(&self, ahead: usize) -> Option<&Token> {
        self.tokens.get(self.at + ahead)
    }

    fn next(&mut self) -> Option<&Token> {
        let t = self.tokens.get(self.at);
        self.at += 1;
        t
    }

    fn punct(&mut self, c: char) -> bool {
        let found = self.peek(0) == Some(&Token::Punct(c));
        self.at += usize::from(found);
        found
    }

    fn ident(&mut self, name: &str) -> bool {
        let found = matches!(self.peek(0), Some(Token::Ident(i)) if i == name);
        self.at += usize::from(found);
        found
    }

    /// `||` binds loosest, then `&&`.
    fn expr(&mut self) -> Option<Typed> {
        self.chain('|', Self::and, Expr::Or)
    }

    fn and(&mut self) -> Option<Typed> {
        self.chain('&', Self::comparison, Expr::And)
    }

    /// `operand (cc operand)*` for a doubled `c` (`&&`, `||`), where every operand is a bool.
    fn chain(
        &mut self,
        c: char,
        operand: fn(&mut Self) -> Option<Typed>,
        join: fn(Box<Expr>, Box<Expr>) -> Expr,
    ) -> Option<Typed> {
        let (mut left, ty) = operand(self)?;
        while self.peek(0) == Some(&Token::Punct(c)) {
            if ty != Type::Bool || self.peek(1) != Some(&Token::Punct(c)) {
                return None;
            }
            self.at += 2;
            let (right, rty) = operand(self)?;
            if rty != Type::Bool {
                return None;
            }
            left = join(Box::new(left), Box::new(right));
        }
        Some((left, ty))
    }

    fn comparison(&mut self) -> Option<Typed> {
        let (left, lty) = self.unary()?;
        let Some(op) = self.operator() else {
            return Some((left, lty));
        };
        let (right, rty) = self.unary()?;
        if self.operator().is_some() {
            return None; // chained: Rhai's precedence between them is not worth mirroring
        }
        use Type::*;
        let ordering = !matches!(op, Op::Eq | Op::Ne);
        let allowed = match (lty, rty) {
            (Int | Float, Int | Float) | (Duration, Duration) | (Str, Str) => true,
            (Bool, Bool) => !ordering,
            (Dynamic, Bool | Int | Float | Str) | (Bool | Int | Float | Str, Dynamic) => true,
            (Dynamic | Occurrence, Unit) | (Unit, Dynamic | Occurrence) => !ordering,
            _ => false,
        };
        allowed.then(|| (Expr::Compare(op, Box::new(left), Box::new(right)), Bool))
    }

    fn operator(&mut self) -> Option<Op> {
        let (op, len) = match (self.peek(0), self.peek(1)) {
            (Some(Token::Punct('=')), Some(Token::Punct('='))) => (Op::Eq, 2),
            (Some(Token::Punct('!')), Some(Token::Punct('='))) => (Op::Ne, 2),
            (Some(Token::Punct('<')), Some(Token::Punct('='))) => (Op::Le, 2),
            (Some(Token::Punct('>')), Some(Token::Punct('='))) => (Op::Ge, 2),
            (Some(Token::Punct('<')), _) => (Op::Lt, 1),
            (Some(Token::Punct('>')), _) => (Op::Gt, 1),
            _ => return None,
        };
        self.at += len;
        Some(op)
    }

    fn unary(&mut self) -> Option<Typed> {
        if self.peek(0) == Some(&Token::Punct('!')) && self.peek(1) != Some(&Token::Punct('=')) {
            self.at += 1;
            let (e, ty) = self.unary()?;
            return (ty == Type::Bool).then(|| (Expr::Not(Box::new(e)), Type::Bool));
        }
        let (mut e, mut ty) = self.primary()?;
        // `.age()` of an occurrence, the one method on values.
        while self.peek(0) == Some(&Token::Punct('.')) {
            let age = self.peek(1) == Some(&Token::Ident("age".into()))
                && self.peek(2) == Some(&Token::Punct('('))
                && self.peek(3) == Some(&Token::Punct(')'));
            if !age || ty != Type::Occurrence {
                return None;
            }
            self.at += 4;
            (e, ty) = (Expr::Age(Box::new(e)), Type::Duration);
        }
        Some((e, ty))
    }

    fn primary(&mut self) -> Option<Typed> {
        match self.next()?.clone() {
            Token::Punct('(') if self.punct(')') => Some((Expr::Unit, Type::Unit)),
            Token::Punct('(') => {
                let e = self.expr()?;
                self.punct(')').then_some(e)
            }
            Token::Punct('-') => match self.number()? {
                (Expr::Int(n), ty) => Some((Expr::Int(n.checked_neg()?), ty)),
                (Expr::Float(x), ty) => Some((Expr::Float(-x), ty)),
                _ => None,
            },
            Token::Num(_) => {
                self.at -= 1;
                self.number()
            }
            Token::Str(s) => Some((Expr::Str(s), Type::Str)),
            Token::Ident(name) => match name.as_str() {
                "true" => Some((Expr::Bool(true), Type::Bool)),
                "false" => Some((Expr::Bool(false), Type::Bool)),
                "user" => self.user(),
                "seconds" | "minutes" | "hours" | "days" => {
                    self.at -= 1;
                    let d = self.duration()?;
                    Some((Expr::Duration(d), Type::Duration))
                }
                _ => {
                    let i = self.vars.iter().rposition(|(v, _)| *v == name)?;
                    Some((Expr::Var(i), self.vars[i].1))
                }
            },
            _ => None,
        }
    }

    /// An integer, or a decimal written `digits.digits`.
    fn number(&mut self) -> Option<Typed> {
        let Some(Token::Num(whole)) = self.next().cloned() else {
            return None;
        };
        let digits = |s: &str| {
            (!s.is_empty() && s.chars().all(|c| c.is_ascii_digit() || c == '_'))
                .then(|| s.replace('_', ""))
        };
        let whole = digits(&whole)?;
        if self.peek(0) == Some(&Token::Punct('.')) {
            if let Some(Token::Num(fraction)) = self.peek(1).cloned() {
                self.at += 2;
                let x: f64 = format!("{whole}.{}", digits(&fraction)?).parse().ok()?;
                return Some((Expr::Float(x), Type::Float));
            }
            return None;
        }
        Some((Expr::Int(whole.parse().ok()?), Type::Int))
    }

    fn string(&mut self) -> Option<String> {
        match self.next()? {
            Token::Str(s) => Some(s.clone()),
            _ => None,
        }
    }

    /// `days(30)` and the like.
    fn duration(&mut self) -> Option<Duration> {
        let Some(Token::Ident(unit)) = self.next().cloned() else {
            return None;
        };
        let unit: i64 = match unit.as_str() {
            "seconds" => 1_000,
            "minutes" => 60_000,
            "hours" => 3_600_000,
            "days" => 86_400_000,
            _ => return None,
        };
        if !self.punct('(') {
            return None;
        }
        let (Expr::Int(n), _) = self.number()? else {
            return None;
        };
        self.punct(')')
            .then(|| Duration::of(n.saturating_mul(unit)))
    }

    /// What follows `user`.
    fn user(&mut self) -> Option<Typed> {
        if !self.punct('.') {
            return None;
        }
        let Some(Token::Ident(member)) = self.next().cloned() else {
            return None;
        };
        match member.as_str() {
            "traits" => {
                if !self.punct('.') {
                    return None;
                }
                match self.next()? {
                    Token::Ident(name) => Some((Expr::Trait(name.clone()), Type::Dynamic)),
                    _ => None,
                }
            }
            "first_seen" => Some((Expr::FirstSeen, Type::Occurrence)),
            "last_seen" => Some((Expr::LastSeen, Type::Occurrence)),
            "did" | "count" | "sum" | "in_segment" | "first" | "last" => {
                if !self.punct('(') {
                    return None;
                }
                let first = self.string()?;
                let call = match (member.as_str(), self.punct(',')) {
                    ("did", false) => (Expr::Did(first), Type::Bool),
                    ("count", false) => (Expr::Count(first), Type::Int),
                    ("in_segment", false) => (Expr::InSegment(first), Type::Bool),
                    ("first", false) => (Expr::First(first), Type::Occurrence),
                    ("last", false) => (Expr::Last(first), Type::Occurrence),
                    ("did", true) => (Expr::DidWithin(first, self.duration()?), Type::Bool),
                    ("count", true) => (Expr::CountWithin(first, self.duration()?), Type::Int),
                    ("sum", true) => {
                        let property = self.string()?;
                        if !self.punct(',') {
                            return None;
                        }
                        (Expr::Sum(first, property, self.duration()?), Type::Float)
                    }
                    _ => return None,
                };
                self.punct(')').then_some(call)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests;
