//! Trigger templates (stub: being written).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::formation::Diagnostic;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Trigger {
    pub name: String,
}

/// Loads `dir/triggers/*.md`; a folder without `triggers/` has none.
pub fn load_templates(dir: &Path) -> Result<BTreeMap<String, Trigger>, Vec<Diagnostic>> {
    let _ = dir;
    Ok(BTreeMap::new())
}
