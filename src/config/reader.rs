//! A reader over a parsed TOML document that keeps every value's place in the file, so that each
//! problem (a wrong type, a bad value, an unknown key) becomes a [`Diagnostic`] with its line and
//! column, and reading goes on to find the next one.
//!
//! String values get `${VAR}` / `${VAR:-default}` interpolation from the injected environment.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml_edit::{Item, TableLike};

use crate::diagnostic::Diagnostic;

/// The longest duration a config file may give.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 86_400);

/// Looks up an environment variable; injected so that tests do not touch the process environment.
pub type Env<'e> = &'e dyn Fn(&str) -> Option<String>;

pub struct Reader<'s> {
    file: PathBuf,
    source: &'s str,
    env: Env<'s>,
    pub diagnostics: Vec<Diagnostic>,
}

/// One table of the document being read, remembering which keys were asked for, so that the rest
/// can be reported as unknown.
pub struct Section<'d> {
    table: &'d dyn TableLike,
    name: String,
    span: Option<Range<usize>>,
    known: Vec<&'static str>,
}

impl<'s> Reader<'s> {
    pub fn new(file: &Path, source: &'s str, env: Env<'s>) -> Self {
        Reader {
            file: file.to_path_buf(),
            source,
            env,
            diagnostics: Vec::new(),
        }
    }

    pub fn error(&mut self, span: Option<Range<usize>>, message: impl Into<String>) {
        let offset = span.map_or(0, |s| s.start);
        self.diagnostics
            .push(Diagnostic::at(&self.file, self.source, offset, message));
    }

    /// The section at `key` of `parent`, which must be a table if present.
    pub fn section<'d>(
        &mut self,
        parent: &mut Section<'d>,
        key: &'static str,
    ) -> Option<Section<'d>> {
        let item = parent.get(key)?;
        let name = parent.child_name(key);
        match item.as_table_like() {
            Some(table) => Some(Section::new(table, name, item.span())),
            None => {
                self.error(item.span(), format!("`{name}` must be a table"));
                None
            }
        }
    }

    /// The tables of an array of tables (`[[key]]` or `key = [{...}]`).
    pub fn sections<'d>(
        &mut self,
        parent: &mut Section<'d>,
        key: &'static str,
    ) -> Vec<Section<'d>> {
        let Some(item) = parent.get(key) else {
            return Vec::new();
        };
        let name = parent.child_name(key);
        if let Some(tables) = item.as_array_of_tables() {
            return tables
                .iter()
                .map(|t| Section::new(t, name.clone(), t.span()))
                .collect();
        }
        if let Some(array) = item.as_array() {
            let mut out = Vec::new();
            for value in array.iter() {
                match value.as_inline_table() {
                    Some(t) => out.push(Section::new(t, name.clone(), value.span())),
                    None => self.error(value.span(), format!("`{name}` must hold tables")),
                }
            }
            return out;
        }
        self.error(
            item.span(),
            format!("`{name}` must be an array of tables ([[{name}]])"),
        );
        Vec::new()
    }

    /// A string, with environment variables interpolated.
    pub fn string(
        &mut self,
        section: &mut Section<'_>,
        key: &'static str,
    ) -> Option<Spanned<String>> {
        let item = section.get(key)?;
        let name = section.child_name(key);
        let Some(raw) = item.as_str() else {
            self.error(item.span(), format!("`{name}` must be a string"));
            return None;
        };
        match interpolate(raw, self.env) {
            Ok(value) => Some(Spanned {
                value,
                span: item.span(),
            }),
            Err(e) => {
                self.error(item.span(), format!("`{name}`: {e}"));
                None
            }
        }
    }

    /// A string taken as written, with no interpolation (Rhai code uses `${...}` itself).
    pub fn raw_string(
        &mut self,
        section: &mut Section<'_>,
        key: &'static str,
    ) -> Option<Spanned<String>> {
        let item = section.get(key)?;
        match item.as_str() {
            Some(s) => Some(Spanned {
                value: s.to_string(),
                span: item.span(),
            }),
            None => {
                let name = section.child_name(key);
                self.error(item.span(), format!("`{name}` must be a string"));
                None
            }
        }
    }

    pub fn boolean(&mut self, section: &mut Section<'_>, key: &'static str) -> Option<bool> {
        let item = section.get(key)?;
        let value = item.as_bool();
        if value.is_none() {
            let name = section.child_name(key);
            self.error(item.span(), format!("`{name}` must be true or false"));
        }
        value
    }

    /// An array of strings, each with its place.
    pub fn strings(
        &mut self,
        section: &mut Section<'_>,
        key: &'static str,
    ) -> Option<Vec<Spanned<String>>> {
        let item = section.get(key)?;
        let name = section.child_name(key);
        let Some(array) = item.as_array() else {
            self.error(item.span(), format!("`{name}` must be an array of strings"));
            return None;
        };
        let mut out = Vec::new();
        for v in array.iter() {
            match v.as_str() {
                Some(s) => out.push(Spanned {
                    value: s.to_string(),
                    span: v.span(),
                }),
                None => self.error(v.span(), format!("`{name}` must hold strings only")),
            }
        }
        Some(out)
    }

    /// Any value, as JSON (TOML dates become strings).
    pub fn json(
        &mut self,
        section: &mut Section<'_>,
        key: &'static str,
    ) -> Option<Spanned<serde_json::Value>> {
        let item = section.get(key)?;
        Some(Spanned {
            value: item_to_json(item),
            span: item.span(),
        })
    }

    /// A non-negative integer that fits `u64`.
    pub fn integer(
        &mut self,
        section: &mut Section<'_>,
        key: &'static str,
    ) -> Option<Spanned<u64>> {
        let item = section.get(key)?;
        let name = section.child_name(key);
        match item.as_integer() {
            Some(n) if n >= 0 => Some(Spanned {
                value: n as u64,
                span: item.span(),
            }),
            Some(_) => {
                self.error(item.span(), format!("`{name}` must not be negative"));
                None
            }
            None => {
                self.error(item.span(), format!("`{name}` must be an integer"));
                None
            }
        }
    }

    /// A duration written as a string such as `"10s"`, `"250ms"` or `"24h"`, of at most
    /// [`MAX_DURATION`] (timers and deadlines are added to the clock).
    pub fn duration(&mut self, section: &mut Section<'_>, key: &'static str) -> Option<Duration> {
        let text = self.string(section, key)?;
        match humantime::parse_duration(&text.value) {
            Ok(d) if d > MAX_DURATION => {
                let name = section.child_name(key);
                self.error(text.span, format!("`{name}` must be at most 10 years"));
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                let name = section.child_name(key);
                self.error(
                    text.span,
                    format!("`{name}`: {e} (write a duration such as \"10s\", \"5m\" or \"24h\")"),
                );
                None
            }
        }
    }

    /// A size in bytes, as an integer or a string such as `"64MB"` or `"512KiB"`.
    pub fn size(&mut self, section: &mut Section<'_>, key: &'static str) -> Option<u64> {
        let item = section.get(key)?;
        if item.is_integer() {
            return self.integer(section, key).map(|n| n.value);
        }
        let text = self.string(section, key)?;
        match parse_size(&text.value) {
            Some(n) => Some(n),
            None => {
                let name = section.child_name(key);
                self.error(
                    text.span,
                    format!(
                        "`{name}`: `{}` is not a size (write bytes, or \"64MB\", \"10GiB\")",
                        text.value
                    ),
                );
                None
            }
        }
    }

    /// One of a fixed set of words.
    pub fn choice<T: Copy>(
        &mut self,
        section: &mut Section<'_>,
        key: &'static str,
        choices: &[(&str, T)],
    ) -> Option<T> {
        let text = self.string(section, key)?;
        if let Some((_, v)) = choices.iter().find(|(word, _)| *word == text.value) {
            return Some(*v);
        }
        let words: Vec<&str> = choices.iter().map(|(w, _)| *w).collect();
        let name = section.child_name(key);
        self.error(
            text.span,
            format!(
                "`{name}` must be one of {}, not `{}`",
                words.join(" | "),
                text.value
            ),
        );
        None
    }

    /// Every key of `section` not read so far, as one serde type (strings interpolated). Serde
    /// reports a wrong type, a missing or unknown field at the key it names when there is one.
    /// Consumes the section: `T` decides which keys it knows (`deny_unknown_fields`).
    pub fn typed<T: serde::de::DeserializeOwned>(&mut self, section: Section<'_>) -> Option<T> {
        let mut rest = serde_json::Map::new();
        for (key, item) in section.table.iter() {
            if section.known.contains(&key) {
                continue;
            }
            match item_to_json_interpolated(item, self.env) {
                Ok(value) => {
                    rest.insert(key.to_string(), value);
                }
                Err(e) => {
                    let name = section.child_name(key);
                    self.error(item.span(), format!("`{name}`: {e}"));
                    return None;
                }
            }
        }
        match serde_json::from_value(serde_json::Value::Object(rest)) {
            Ok(value) => Some(value),
            Err(e) => {
                let message = e.to_string();
                // serde names the field between backticks: place the problem on that key.
                let span = message
                    .split('`')
                    .skip(1)
                    .step_by(2)
                    .find_map(|word| section.table.key(word).and_then(|k| k.span()))
                    .or_else(|| section.table.key("type").and_then(|k| k.span()))
                    .or(section.span.clone());
                self.error(span, message);
                None
            }
        }
    }

    /// Reports every key of `section` that was never asked for.
    pub fn finish(&mut self, section: Section<'_>) {
        for (key, item) in section.table.iter() {
            if !section.known.contains(&key) {
                let span = section
                    .table
                    .key(key)
                    .and_then(|k| k.span())
                    .or_else(|| item.span())
                    .or(section.span.clone());
                let name = section.child_name(key);
                self.error(span, format!("unknown key `{name}`"));
            }
        }
    }
}

impl<'d> Section<'d> {
    pub fn new(table: &'d dyn TableLike, name: String, span: Option<Range<usize>>) -> Self {
        Section {
            table,
            name,
            span,
            known: Vec::new(),
        }
    }

    /// Looks a key up and records it as known.
    fn get(&mut self, key: &'static str) -> Option<&'d Item> {
        self.known.push(key);
        self.table.get(key).filter(|item| !item.is_none())
    }

    fn child_name(&self, key: &str) -> String {
        if self.name.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.name)
        }
    }

    pub fn span(&self) -> Option<Range<usize>> {
        self.span.clone()
    }
}

/// A value read from the file with where it was.
#[derive(Debug, Clone)]
pub struct Spanned<T> {
    pub value: T,
    pub span: Option<Range<usize>>,
}

/// Replaces `${VAR}` with the variable's value (empty when unset) and `${VAR:-default}` with the
/// value, or `default` when the variable is unset or empty, as a POSIX shell does. `$$` is a
/// literal `$`.
pub fn interpolate(raw: &str, env: Env<'_>) -> Result<String, String> {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body
                .find('}')
                .ok_or_else(|| format!("`${{` without a closing `}}` in \"{raw}\""))?;
            let inner = &body[..end];
            let (name, default) = match inner.split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (inner, None),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("`${{{inner}}}` is not a variable name"));
            }
            let value = env(name).filter(|v| !(default.is_some() && v.is_empty()));
            out.push_str(value.as_deref().or(default).unwrap_or(""));
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Parses `"512"`, `"64KB"`, `"64MB"`, `"1GB"` (powers of 1000) or `"64KiB"`, `"10GiB"` (powers of
/// 1024).
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let number: u64 = text[..digits_end].parse().ok()?;
    let unit = text[digits_end..].trim();
    let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "k" => 1_000,
        "mb" | "m" => 1_000_000,
        "gb" | "g" => 1_000_000_000,
        "tb" | "t" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => return None,
    };
    number.checked_mul(multiplier)
}

fn item_to_json_interpolated(item: &Item, env: Env<'_>) -> Result<serde_json::Value, String> {
    fn walk(v: serde_json::Value, env: Env<'_>) -> Result<serde_json::Value, String> {
        use serde_json::Value as V;
        Ok(match v {
            V::String(s) => V::String(interpolate(&s, env)?),
            V::Array(items) => V::Array(
                items
                    .into_iter()
                    .map(|v| walk(v, env))
                    .collect::<Result<_, _>>()?,
            ),
            V::Object(map) => V::Object(
                map.into_iter()
                    .map(|(k, v)| Ok((k, walk(v, env)?)))
                    .collect::<Result<_, String>>()?,
            ),
            other => other,
        })
    }
    walk(item_to_json(item), env)
}

fn item_to_json(item: &Item) -> serde_json::Value {
    match item {
        Item::Value(v) => value_to_json(v),
        Item::Table(t) => serde_json::Value::Object(
            t.iter()
                .map(|(k, v)| (k.to_string(), item_to_json(v)))
                .collect(),
        ),
        Item::ArrayOfTables(tables) => serde_json::Value::Array(
            tables
                .iter()
                .map(|t| {
                    serde_json::Value::Object(
                        t.iter()
                            .map(|(k, v)| (k.to_string(), item_to_json(v)))
                            .collect(),
                    )
                })
                .collect(),
        ),
        Item::None => serde_json::Value::Null,
    }
}

fn value_to_json(v: &toml_edit::Value) -> serde_json::Value {
    use toml_edit::Value as V;
    match v {
        V::String(s) => s.value().clone().into(),
        V::Integer(i) => (*i.value()).into(),
        V::Float(f) => {
            serde_json::Number::from_f64(*f.value()).map_or(serde_json::Value::Null, Into::into)
        }
        V::Boolean(b) => (*b.value()).into(),
        V::Datetime(d) => d.value().to_string().into(),
        V::Array(a) => serde_json::Value::Array(a.iter().map(value_to_json).collect()),
        V::InlineTable(t) => serde_json::Value::Object(
            t.iter()
                .map(|(k, v)| (k.to_string(), value_to_json(v)))
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "SET" => Some("value".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn interpolates_like_a_shell() {
        assert_eq!(interpolate("a${SET}b", &env).unwrap(), "avalueb");
        assert_eq!(interpolate("${UNSET}", &env).unwrap(), "");
        assert_eq!(interpolate("${UNSET:-dflt}", &env).unwrap(), "dflt");
        assert_eq!(interpolate("${EMPTY:-dflt}", &env).unwrap(), "dflt");
        assert_eq!(interpolate("${SET:-dflt}", &env).unwrap(), "value");
        assert_eq!(interpolate("$${SET} $5", &env).unwrap(), "${SET} $5");
        assert!(interpolate("${SET", &env).is_err());
        assert!(interpolate("${BAD NAME}", &env).is_err());
    }

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("64MB"), Some(64_000_000));
        assert_eq!(parse_size("64 MiB"), Some(64 << 20));
        assert_eq!(parse_size("10GB"), Some(10_000_000_000));
        assert_eq!(parse_size("ten"), None);
        assert_eq!(parse_size("10XB"), None);
    }
}
