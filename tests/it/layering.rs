//! The crate's layering, as its opening doc (`src/lib.rs`, "Layers") writes it down, checked
//! against every `crate::` path in the code under `src/`: a module may use only modules of the
//! layers below its own. Strict layers between the crate's top-level modules also mean there is no
//! import circle between them. Test code (a `tests.rs`, a `tests/` folder, anything after a
//! `#[cfg(test)]`) may reach any module, to drive its own the way the server does.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

#[test]
fn no_module_uses_a_module_of_its_own_layer_or_one_above() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = fs::read_to_string(src.join("lib.rs")).unwrap();
    let modules = modules(&lib);
    let layers = layers(&lib, &modules);
    let unplaced: Vec<_> = modules
        .iter()
        .filter(|m| !layers.contains_key(*m))
        .collect();
    assert!(
        unplaced.is_empty(),
        "modules with no layer in lib.rs: {unplaced:?}"
    );

    let mut wrong = Vec::new();
    for file in rust_files(&src) {
        let relative = file.strip_prefix(&src).unwrap();
        let first = relative
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_str()
            .unwrap();
        let module = first.trim_end_matches(".rs");
        if !layers.contains_key(module) || is_test_file(relative) {
            continue;
        }
        let text = fs::read_to_string(&file).unwrap();
        for used in crate_paths(code_outside_tests(&text)) {
            if used != module && layers.get(&used).is_some_and(|l| *l <= layers[module]) {
                wrong.push(format!(
                    "src/{}: `{module}` uses `{used}`, which is not in a layer below it",
                    relative.display()
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layering of src/lib.rs:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_check_sees_every_form_of_path() {
    let code = "#[cfg(test)]\nmod tests;\nuse crate::{alpha::A, beta::{B, C}, zeta};\nuse crate::{\n    eta::{H, I},\n    theta,\n};\nuse crate::gamma;\nfn f() { crate::delta::go(); }\n// crate::comment\n#[cfg(test)]\nmod tests {\n    use crate::epsilon;\n}";
    let found = crate_paths(code_outside_tests(code));
    let expected = ["alpha", "beta", "delta", "eta", "gamma", "theta", "zeta"].map(String::from);
    assert_eq!(found, BTreeSet::from(expected));
}

/// The crate's modules, from its `pub mod` lines.
fn modules(lib: &str) -> Vec<String> {
    lib.lines()
        .filter_map(|l| l.strip_prefix("pub mod ")?.strip_suffix(';'))
        .map(String::from)
        .collect()
}

/// Each module's layer, 0 at the top: one line of the "Layers" block each.
fn layers(lib: &str, modules: &[String]) -> HashMap<String, usize> {
    let doc: Vec<&str> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("//!"))
        .map(str::trim)
        .skip_while(|l| *l != "## Layers")
        .skip_while(|l| *l != "```text")
        .skip(1)
        .take_while(|l| *l != "```")
        .collect();
    let mut layers = HashMap::new();
    let mut next = 0;
    for line in doc {
        let names: Vec<&str> = line
            .split_whitespace()
            .filter(|w| modules.iter().any(|m| m == w))
            .collect();
        if names.is_empty() {
            continue;
        }
        for name in names {
            assert!(
                layers.insert(name.to_string(), next).is_none(),
                "`{name}` placed twice"
            );
        }
        next += 1;
    }
    layers
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}

fn is_test_file(relative: &Path) -> bool {
    relative.file_name().is_some_and(|n| n == "tests.rs")
        || relative.components().any(|c| c.as_os_str() == "tests")
}

/// The file up to its inline test module (`#[cfg(test)]` then `mod tests {`), which stands at the
/// end by this crate's habit; a `#[cfg(test)] mod tests;` line only names another file.
fn code_outside_tests(text: &str) -> &str {
    let mut from = 0;
    while let Some(at) = text[from..].find("#[cfg(test)]").map(|i| from + i) {
        let rest = text[at + "#[cfg(test)]".len()..].trim_start();
        let item = rest.lines().next().unwrap_or_default();
        if item.starts_with("mod ") && item.ends_with('{') {
            return &text[..at];
        }
        from = at + 1;
    }
    text
}

/// The first segment of every `crate::` path in `code`, comments left out, grouped imports
/// (`crate::{a::x, b}`, over several lines too) taken apart.
fn crate_paths(code: &str) -> BTreeSet<String> {
    let code: String = code
        .lines()
        .map(|line| line.split("//").next().unwrap())
        .collect::<Vec<_>>()
        .join("\n");
    let is_name = |c: char| c.is_alphanumeric() || c == '_';
    let mut found = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        let Some(group) = rest.strip_prefix('{') else {
            found.insert(rest.chars().take_while(|c| is_name(*c)).collect());
            continue;
        };
        // Only each item's first name, at the group's own depth, is a module of the crate.
        let (mut depth, mut first, mut name) = (0, true, String::new());
        for c in group.chars() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => break,
                '}' => depth -= 1,
                _ if depth > 0 => {}
                ',' => {
                    if first && !name.is_empty() {
                        found.insert(std::mem::take(&mut name));
                    }
                    (first, name) = (true, String::new());
                }
                ':' if first => {
                    found.insert(std::mem::take(&mut name));
                    first = false;
                }
                c if first && is_name(c) => name.push(c),
                _ => {}
            }
        }
        if first && !name.is_empty() {
            found.insert(name);
        }
    }
    found.retain(|n: &String| !n.is_empty());
    found
}
