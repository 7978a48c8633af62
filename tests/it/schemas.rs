//! Data-driven tests over the shipped tracking plan in `schemas/`: every schema compiles, and the
//! example messages next to each (`*.examples.json`) pass or fail as they are labelled.

use std::path::{Path, PathBuf};

use sluice::config::{Unplanned, Violations};
use sluice::ingest::message::RawMessage;
use sluice::ingest::plan::{enforce, Decision, Policy};
use sluice::ingest::rules::{self, BatchDefaults};
use sluice::metrics::SchemaMetrics;
use sluice::schema::watch::Loader;

fn shipped() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas")
}

fn example_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            example_files(&path, out);
        } else if path.to_string_lossy().ends_with(".examples.json") {
            out.push(path);
        }
    }
}

#[test]
fn every_shipped_schema_compiles() {
    let (schemas, registry, problems) = Loader::new(&shipped()).load();
    assert!(problems.is_empty(), "{problems:#?}");
    assert!(schemas.tracks().count() >= 4);
    assert!(registry.len() >= 6);
}

#[test]
fn shipped_examples_pass_or_fail_as_labelled() {
    let (_, registry, _) = Loader::new(&shipped()).load();
    let mut files = Vec::new();
    example_files(&shipped(), &mut files);
    assert!(files.len() >= 5, "examples next to every schema group");
    let mut checked = 0;
    for file in files {
        let examples: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        for (label, want_valid) in [("valid", true), ("invalid", false)] {
            for (i, example) in examples[label].as_array().unwrap().iter().enumerate() {
                let text = example.to_string();
                let raw = RawMessage::read(serde_json::from_str(&text).unwrap()).unwrap();
                let m =
                    rules::apply(raw, None, &BatchDefaults::default(), chrono::Utc::now()).unwrap();
                let strict = Policy {
                    unplanned: Unplanned::Block,
                    violations: Violations::Block,
                };
                let verdict =
                    match enforce(Box::new(m), &registry, strict, &SchemaMetrics::default()) {
                        Decision::Store(_) => "valid".to_string(),
                        Decision::Block(_, reason) => reason,
                    };
                match (want_valid, verdict.as_str()) {
                    (true, "valid") => checked += 1,
                    (false, v) if v.starts_with("schema:") => checked += 1,
                    _ => panic!("{} {label}[{i}]: {verdict:?}", file.display()),
                }
            }
        }
    }
    assert!(checked >= 25, "{checked} examples");
}

#[test]
fn the_demo_config_checks_clean_with_its_plan() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/sluice.toml");
    let mut out = Vec::new();
    assert!(
        sluice::commands::check(Path::new(path), &mut out).unwrap(),
        "{}",
        String::from_utf8_lossy(&out)
    );
}
