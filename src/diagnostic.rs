//! Problems found in the files a deployment is made of (`sluice.toml`, and later schemas, segments
//! and destinations), each pinned to a place: `file:line:col: message`.
//!
//! Loading collects every problem it can find instead of stopping at the first, so that
//! `sluice check` and `sluice serve` can print them all at once.

use std::fmt;
use std::path::{Path, PathBuf};

/// One problem in one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    /// 1-based; 0 when the problem is about the file as a whole (for example, it cannot be read).
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl Diagnostic {
    /// A problem at a byte offset of `source`, the text of `file`.
    pub fn at(file: &Path, source: &str, offset: usize, message: impl Into<String>) -> Self {
        let (line, col) = line_col(source, offset);
        Diagnostic {
            file: file.to_path_buf(),
            line,
            col,
            message: message.into(),
        }
    }

    /// A problem with the whole file.
    pub fn file(file: &Path, message: impl Into<String>) -> Self {
        Diagnostic {
            file: file.to_path_buf(),
            line: 0,
            col: 0,
            message: message.into(),
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file.display(),
                self.line,
                self.col,
                self.message
            )
        }
    }
}

/// Every problem found while loading, in file order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(source.len());
    let before = &source[..crate::text::boundary_at_most(source, offset)];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one() {
        let src = "a = 1\nbb = 2\n";
        assert_eq!(line_col(src, 0), (1, 1));
        assert_eq!(line_col(src, 6), (2, 1));
        assert_eq!(line_col(src, 9), (2, 4));
    }

    #[test]
    fn display_has_file_line_col() {
        let d = Diagnostic::at(Path::new("x.toml"), "a\nbc", 3, "bad");
        assert_eq!(d.to_string(), "x.toml:2:2: bad");
        assert_eq!(
            Diagnostic::file(Path::new("x.toml"), "gone").to_string(),
            "x.toml: gone"
        );
    }
}
