//! Compiled segments and their evaluation against one profile.
//!
//! A [`SegmentSet`] is every loaded segment, compiled once, in an order where a segment comes
//! after the segments it reads with `in_segment`. Evaluating a profile runs only the segments
//! the trigger can affect (see [`super::analysis`]), plus those whose timer is due, plus the
//! dependents of any segment whose membership just changed.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rhai::{Dynamic, Engine, AST};

use super::analysis::{analyse, Dependencies};
use super::api::{self, Message, Round, User};
use super::files::SegmentFile;
use super::native::{self, Native};
use super::sandbox;
use crate::diagnostic::Diagnostic;
use crate::profiles::memberships::Layout;
use crate::profiles::profile::{intern, Millis, Names, Profile, Retention};

pub struct Segment {
    pub key: String,
    pub name: String,
    pub description: String,
    pub destinations: Vec<String>,
    pub backfill: bool,
    /// Changes whenever the rule's text does, or the set of loaded segments it reads: a new
    /// fingerprint means backfill again.
    pub fingerprint: u64,
    pub deps: Dependencies,
    pub file: SegmentFile,
    ast: AST,
    /// The rule compiled for the native interpreter, when it is of a shape that one knows.
    native: Option<Native>,
    pub health: Health,
}

/// Rule failures of one segment, for metrics and `/admin/segments`.
#[derive(Default)]
pub struct Health {
    pub errors: AtomicU64,
    pub last_error: Mutex<Option<String>>,
    /// When a failure was last logged (millis), to log at most one per segment every 10 s.
    last_logged: AtomicI64,
}

/// What re-evaluation a profile needs.
#[derive(Clone, Copy)]
pub enum Trigger<'a> {
    /// A message arrived for the profile.
    Message {
        event: Option<&'a str>,
        identify: bool,
        /// The message, for the rule's `event`.
        message: Message<'a>,
    },
    /// The profile's timer is due: the segments whose recheck time has come.
    Timer,
    /// Every segment (a new or merged profile), with the message if there is one.
    All(Option<Message<'a>>),
    /// These segments only (backfill).
    Only(&'a HashSet<usize>),
}

/// A change of one profile's membership of one segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub segment: usize,
    pub entered: bool,
    /// The membership's change count after this change.
    pub changes: u32,
}

/// Why a rule's evaluation changed nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleFailure {
    /// Over an operation, depth or size limit.
    Budget,
    /// Any other runtime error, or a result that is not a bool.
    Error,
}

pub struct SegmentSet {
    engine: Engine,
    /// In dependency order.
    pub segments: Vec<Segment>,
    /// For each segment, the later segments that read it with `in_segment`.
    dependents: Vec<Vec<usize>>,
    /// Positions by key.
    by_key: Arc<hashbrown::HashMap<String, usize>>,
    /// The keys by position, which profiles' memberships are laid out by.
    layout: Layout,
    /// The segments a message with this event name can affect.
    by_event: hashbrown::HashMap<String, Vec<usize>>,
    /// The segments every message can affect.
    always: Vec<usize>,
    /// The segments an identify (new traits) can affect.
    on_identify: Vec<usize>,
    /// What every loaded rule together needs profiles to keep.
    pub retention: Retention,
}

/// The outcome of evaluating one profile.
#[derive(Debug, Default)]
pub struct Evaluation {
    pub transitions: Vec<Transition>,
    pub failures: Vec<(usize, RuleFailure)>,
}

impl SegmentSet {
    pub fn empty() -> SegmentSet {
        SegmentSet::build(Vec::new(), None).0
    }

    /// Compiles every file. A file whose rule does not compile, that names an unknown
    /// destination (when `destinations` is given), or that is in an `in_segment` cycle, is left
    /// out and reported.
    pub fn build(
        files: Vec<SegmentFile>,
        destinations: Option<&HashSet<String>>,
    ) -> (SegmentSet, Vec<Diagnostic>) {
        let engine = sandbox::engine();
        let scope = sandbox::compile_scope();
        let mut problems = Vec::new();
        let mut compiled = Vec::new();
        for file in files {
            let mut ok = true;
            if let Some(known) = destinations {
                for (name, span) in &file.destinations {
                    if !known.contains(name) {
                        let at = span.as_ref().map_or(0, |s| s.start);
                        problems.push(Diagnostic::at(
                            &file.path,
                            &file.text,
                            at,
                            format!("unknown destination `{name}` (no destinations/{name}.toml)"),
                        ));
                        ok = false;
                    }
                }
            }
            let ast = match engine.compile_with_scope(&scope, &file.rule) {
                Ok(ast) => Some(ast),
                Err(e) => {
                    problems.push(rhai_problem(&file, &e.1, &e.0.to_string()));
                    None
                }
            };
            if let (true, Some(ast)) = (ok, ast) {
                compiled.push((file, ast));
            }
        }
        let (order, cyclic) = dependency_order(&compiled);
        for &i in &cyclic {
            let file = &compiled[i].0;
            problems.push(Diagnostic::at(
                &file.path,
                &file.text,
                file.rule_offset,
                "this rule is part of an in_segment cycle",
            ));
        }
        let loaded: Vec<String> = order.iter().map(|&i| compiled[i].0.key.clone()).collect();
        let mut slots: Vec<Option<(SegmentFile, AST)>> = compiled.into_iter().map(Some).collect();
        let segments: Vec<Segment> = order
            .into_iter()
            .filter_map(|i| slots[i].take())
            .map(|(file, ast)| {
                let deps = analyse(&file.rule);
                Segment {
                    key: file.key.clone(),
                    name: file.name.clone(),
                    description: file.description.clone(),
                    destinations: file.destinations.iter().map(|(d, _)| d.clone()).collect(),
                    backfill: file.backfill,
                    fingerprint: fingerprint(&file.rule, &deps, &loaded),
                    deps,
                    native: native::compile(&file.rule),
                    file,
                    ast,
                    health: Health::default(),
                }
            })
            .collect();
        let index: HashMap<&str, usize> = segments
            .iter()
            .enumerate()
            .map(|(i, s)| (s.key.as_str(), i))
            .collect();
        let by_key = Arc::new(
            segments
                .iter()
                .enumerate()
                .map(|(i, s)| (s.key.clone(), i))
                .collect(),
        );
        let mut by_event: hashbrown::HashMap<String, Vec<usize>> = hashbrown::HashMap::new();
        let (mut always, mut on_identify) = (Vec::new(), Vec::new());
        for (i, s) in segments.iter().enumerate() {
            match &s.deps.events {
                Names::All => always.push(i),
                Names::Only(names) => {
                    for n in names {
                        by_event.entry(n.clone()).or_default().push(i);
                    }
                }
            }
            if s.deps.traits {
                on_identify.push(i);
            }
        }
        let mut dependents = vec![Vec::new(); segments.len()];
        for (i, s) in segments.iter().enumerate() {
            match &s.deps.segments {
                Names::All => (0..i).for_each(|j| dependents[j].push(i)),
                Names::Only(keys) => {
                    for k in keys {
                        if let Some(&j) = index.get(k.as_str()) {
                            dependents[j].push(i);
                        }
                    }
                }
            }
        }
        let mut retention = Retention::nothing();
        for s in &segments {
            retention.union(&s.deps.retention);
        }
        let layout = segments.iter().map(|s| intern(&s.key)).collect();
        let set = SegmentSet {
            engine,
            layout,
            segments,
            dependents,
            by_key,
            by_event,
            always,
            on_identify,
            retention,
        };
        (set, problems)
    }

    pub fn len(&self) -> usize {
        self.segments.len()
    }

    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    pub fn position(&self, key: &str) -> Option<usize> {
        self.by_key.get(key).copied()
    }

    /// Re-evaluates the segments `trigger` calls for and records the answers in the profile's
    /// memberships (member, change count, next recheck time).
    pub fn evaluate(&self, profile: &mut Profile, trigger: Trigger, now: Millis) -> Evaluation {
        let mut out = Evaluation::default();
        let memberships = &mut profile.memberships;
        memberships.lay_out(&self.layout, |key| self.position(key));
        // Whatever the trigger, a segment whose time has come is looked at. Memberships of
        // segments no longer loaded are kept (a reload may bring them back), but their due
        // timers are dropped.
        let mut wanted: smallvec::SmallVec<[bool; 64]> =
            smallvec::smallvec![false; self.segments.len()];
        memberships.due(now).for_each(|i| wanted[i] = true);
        let aside = memberships.aside_mut();
        if !aside.is_empty() {
            for (_, m) in aside.iter_mut() {
                m.recheck_at = m.recheck_at.filter(|&t| t > now);
            }
            aside.retain(|(_, m)| !m.is_empty());
        }
        if self.segments.is_empty() {
            return out;
        }
        let mut want = |list: &[usize]| list.iter().for_each(|&i| wanted[i] = true);
        match trigger {
            Trigger::Message {
                event, identify, ..
            } => {
                want(&self.always);
                if let Some(list) = event.and_then(|e| self.by_event.get(e)) {
                    want(list);
                }
                if identify {
                    want(&self.on_identify);
                }
            }
            Trigger::Timer => {}
            Trigger::All(_) => wanted.iter_mut().for_each(|w| *w = true),
            Trigger::Only(set) => set.iter().for_each(|&i| wanted[i] = true),
        }
        if !wanted.iter().any(|w| *w) {
            return out;
        }
        let shared = Arc::new(std::mem::take(profile));
        let round = Round::new(
            shared.clone(),
            now,
            self.by_key.clone(),
            self.retention.window,
        );
        let mut answers: smallvec::SmallVec<[(usize, bool, Option<Millis>); 16]> =
            smallvec::SmallVec::new();
        {
            // Made for the first rule that needs Rhai, if one does.
            let mut scope: Option<rhai::Scope> = None;
            for i in 0..self.segments.len() {
                if !wanted[i] {
                    continue;
                }
                let segment = &self.segments[i];
                api::start_recording();
                // A rule the native interpreter fails runs again on Rhai, for Rhai's error.
                let native = segment.native.as_ref().and_then(|rule| rule.eval(&round));
                let result = match native {
                    Some(answer) => Ok(Dynamic::from_bool(answer)),
                    None => {
                        api::start_recording();
                        let scope = scope.get_or_insert_with(|| {
                            let event = match trigger {
                                Trigger::Message { message, .. } | Trigger::All(Some(message)) => {
                                    Dynamic::from(message.to_event())
                                }
                                _ => Dynamic::UNIT,
                            };
                            sandbox::scope(Dynamic::from(User(round.clone())), event)
                        });
                        let result = self
                            .engine
                            .eval_ast_with_scope::<Dynamic>(scope, &segment.ast);
                        // What a rule declared (even a `let user = ...` shadowing) ends with it.
                        scope.rewind(2);
                        result
                    }
                };
                let answer = match result {
                    Ok(v) => match v.as_bool() {
                        Ok(b) => b,
                        Err(got) => {
                            let failure = format!("the rule returned {got}, not true or false");
                            segment.health.failed(&segment.key, failure, now);
                            out.failures.push((i, RuleFailure::Error));
                            continue;
                        }
                    },
                    Err(e) => {
                        let class = classify(&e);
                        segment.health.failed(&segment.key, e.to_string(), now);
                        out.failures.push((i, class));
                        continue;
                    }
                };
                let was = round.member(i);
                round.answer(i, answer);
                if was != answer {
                    for &d in &self.dependents[i] {
                        wanted[d] = true;
                    }
                }
                answers.push((i, answer, api::recorded()));
            }
        }
        drop(round);
        *profile = Arc::try_unwrap(shared).unwrap_or_else(|still_shared| (*still_shared).clone());
        for &(i, answer, recheck_at) in &answers {
            if !answer && recheck_at.is_none() && profile.memberships.at(i).is_none() {
                continue; // nothing to remember
            }
            let m = profile.memberships.at_or_default(i);
            m.recheck_at = recheck_at;
            if m.member != answer {
                m.member = answer;
                m.changes += 1;
                m.since = now;
                out.transitions.push(Transition {
                    segment: i,
                    entered: answer,
                    changes: m.changes,
                });
            }
            // Only what carries information is kept: a segment the profile was never in and that
            // waits for no moment needs no entry.
            profile.memberships.drop_if_empty(i);
        }
        // A failed rule keeps its answer but loses its timer, so that it is not woken again and
        // again; its next message re-evaluates it.
        for &(i, _) in &out.failures {
            if let Some(m) = profile.memberships.at_mut(i) {
                m.recheck_at = None;
            }
            profile.memberships.drop_if_empty(i);
        }
        out
    }
}

impl SegmentSet {
    /// What `sluice check` notes about loaded rules whose answers the profiles' caps can bend
    /// (they load and run; see `crate::profiles::profile::MAX_EVENT_NAMES`).
    pub fn notes(&self) -> Vec<Diagnostic> {
        use crate::profiles::profile::MAX_EVENT_NAMES;
        let mut notes = Vec::new();
        for s in &self.segments {
            let mut note = |message: String| {
                notes.push(Diagnostic::at(
                    &s.file.path,
                    &s.file.text,
                    s.file.rule_offset,
                    format!("note: {message}"),
                ))
            };
            if s.deps.retention.read == Names::All {
                note(format!("this rule reads event names it computes: past {MAX_EVENT_NAMES} event names a profile counts only the names rules write out, so a computed name may read as never done"));
            }
            if s.deps.computed_window {
                let days = super::analysis::UNKNOWN_WINDOW / 86_400_000;
                note(format!("this rule computes a window: history is kept {days} days for it, and a longer window fails the rule; write the window out (days(30)) to keep what it needs"));
            }
        }
        notes
    }
}

impl Health {
    fn failed(&self, key: &str, message: String, now: Millis) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let last = self.last_logged.load(Ordering::Relaxed);
        if now - last >= 10_000
            && self
                .last_logged
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(segment = key, error = %message, "segment rule failed; membership unchanged (logged at most every 10 s)");
        }
        *self.last_error.lock().unwrap() = Some(message);
    }
}

fn classify(e: &rhai::EvalAltResult) -> RuleFailure {
    use rhai::EvalAltResult as E;
    match e {
        E::ErrorTooManyOperations(..)
        | E::ErrorStackOverflow(..)
        | E::ErrorDataTooLarge(..)
        | E::ErrorTooManyVariables(..) => RuleFailure::Budget,
        _ => RuleFailure::Error,
    }
}

/// A Rhai problem placed in the segment file.
pub fn rhai_problem(file: &SegmentFile, pos: &rhai::Position, message: &str) -> Diagnostic {
    crate::script::problem_at(
        &file.path,
        &file.text,
        file.rule_offset,
        "rule",
        pos,
        message,
    )
}

/// What a segment's memberships depend on besides the events: its rule, and which of the segments
/// it reads are loaded. A new fingerprint means backfill again, so a rule that reads
/// `in_segment("b")` is evaluated again on every profile when `b` is removed (or added).
fn fingerprint(rule: &str, deps: &Dependencies, loaded: &[String]) -> u64 {
    let read: Vec<&str> = match &deps.segments {
        Names::Only(keys) if keys.is_empty() => {
            // Reads no segment: the rule alone, as before segments were part of it.
            return xxhash_rust::xxh3::xxh3_64(rule.as_bytes());
        }
        Names::Only(keys) => {
            let mut read: Vec<&str> = loaded
                .iter()
                .filter(|k| keys.contains(k.as_str()))
                .map(String::as_str)
                .collect();
            read.sort_unstable();
            read
        }
        Names::All => {
            let mut read: Vec<&str> = loaded.iter().map(String::as_str).collect();
            read.sort_unstable();
            read
        }
    };
    let mut text = rule.to_string();
    for key in read {
        text.push('\0');
        text.push_str(key);
    }
    xxhash_rust::xxh3::xxh3_64(text.as_bytes())
}

/// Indexes into `compiled` in an order where `in_segment` dependencies come first, and those in a
/// cycle (left out). Rules that read any segment by a computed key come last.
fn dependency_order(compiled: &[(SegmentFile, AST)]) -> (Vec<usize>, Vec<usize>) {
    let deps: Vec<Dependencies> = compiled.iter().map(|(f, _)| analyse(&f.rule)).collect();
    let index: HashMap<&str, usize> = compiled
        .iter()
        .enumerate()
        .map(|(i, (f, _))| (f.key.as_str(), i))
        .collect();
    let mut order = Vec::new();
    let mut state = vec![0u8; compiled.len()]; // 0 new, 1 visiting, 2 done
    let mut cyclic = HashSet::new();
    fn visit(
        i: usize,
        deps: &[Dependencies],
        index: &HashMap<&str, usize>,
        state: &mut [u8],
        order: &mut Vec<usize>,
        cyclic: &mut HashSet<usize>,
        path: &mut Vec<usize>,
    ) {
        match state[i] {
            2 => return,
            1 => {
                let from = path.iter().position(|&p| p == i).unwrap_or(0);
                cyclic.extend(path[from..].iter().copied());
                return;
            }
            _ => {}
        }
        state[i] = 1;
        path.push(i);
        if let Names::Only(keys) = &deps[i].segments {
            let mut keys: Vec<&String> = keys.iter().collect();
            keys.sort();
            for k in keys {
                if let Some(&j) = index.get(k.as_str()) {
                    visit(j, deps, index, state, order, cyclic, path);
                }
            }
        }
        path.pop();
        state[i] = 2;
        order.push(i);
    }
    let (reads_any, plain): (Vec<usize>, Vec<usize>) =
        (0..compiled.len()).partition(|&i| deps[i].segments == Names::All);
    for i in plain {
        visit(
            i,
            &deps,
            &index,
            &mut state,
            &mut order,
            &mut cyclic,
            &mut Vec::new(),
        );
    }
    order.extend(reads_any);
    order.retain(|i| !cyclic.contains(i));
    let mut cyclic: Vec<usize> = cyclic.into_iter().collect();
    cyclic.sort();
    (order, cyclic)
}

#[cfg(test)]
pub(crate) mod tests;
