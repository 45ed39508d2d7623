//! A formation or agent file being loaded: read as one YAML mapping, with where
//! each node is, so that diagnostics name the line and column they are about.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::formation::locate::{display_path, Positions};
use crate::formation::Diagnostic;

/// A file being loaded, with where each node of its YAML is.
pub(super) struct Source {
    pub(super) path: PathBuf,
    pub(super) bytes: Vec<u8>,
    positions: Positions,
}

impl Source {
    /// An error at `pointer`, located at its key or item (or nearest ancestor).
    pub(super) fn error(&self, pointer: &str, message: impl Into<String>) -> Diagnostic {
        self.locate(Diagnostic::error(&self.path, display_path(pointer), message), pointer)
    }

    pub(super) fn warning(&self, pointer: &str, message: impl Into<String>) -> Diagnostic {
        self.locate(Diagnostic::warning(&self.path, display_path(pointer), message), pointer)
    }

    fn locate(&self, diagnostic: Diagnostic, pointer: &str) -> Diagnostic {
        match self.positions.find(pointer) {
            Some((line, column)) => diagnostic.at(line, column),
            None => diagnostic,
        }
    }
}

/// Reads a file that must hold one YAML mapping.
pub(super) fn read_document(path: &Path) -> Result<(Source, Value), Vec<Diagnostic>> {
    let fail = |message: String| vec![Diagnostic::error(path, "(root)", message)];
    let bytes = fs::read(path).map_err(|e| fail(format!("cannot read {}: {e}", path.display())))?;
    let text = std::str::from_utf8(&bytes).map_err(|e| fail(format!("{} is not UTF-8 text: {e}", path.display())))?;
    let value: Value = serde_yaml::from_str(text).map_err(|e| vec![yaml_error(path, &e)])?;
    if !value.is_object() {
        return Err(fail(format!("expected a mapping of sections (`id: ...`), found {}", kind_of(&value))));
    }
    let positions = Positions::parse(text);
    Ok((Source { path: path.to_path_buf(), bytes, positions }, value))
}

fn yaml_error(path: &Path, e: &serde_yaml::Error) -> Diagnostic {
    let diagnostic = Diagnostic::error(path, "(root)", format!("malformed YAML: {e}"));
    match e.location() {
        Some(l) => diagnostic.at(l.line(), l.column()),
        None => diagnostic,
    }
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "an empty document",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}
