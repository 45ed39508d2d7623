//! The loading pipeline: read -> parse YAML -> resolve secrets -> validate against
//! the schema -> build the typed [`Formation`]; and loading a whole folder.

use std::path::{Path, PathBuf};

use super::{Diagnostic, Formation};

/// A source of secret values (`${{ secrets.NAME }}`); the server uses the environment.
pub type Secrets<'a> = &'a dyn Fn(&str) -> Option<String>;

/// What loading a folder found.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Valid formations, in path order.
    pub formations: Vec<Formation>,
    /// Files that failed, with their problems.
    pub failures: Vec<(PathBuf, Vec<Diagnostic>)>,
    /// Problems of the folder itself (unreadable, empty).
    pub problems: Vec<Diagnostic>,
}

/// Loads one formation file.
pub fn load_file(path: &Path, secrets: Secrets<'_>) -> Result<Formation, Vec<Diagnostic>> {
    let _ = secrets;
    Err(vec![Diagnostic::error(path, "(root)", "not implemented yet")])
}

/// Loads every formation of a folder (see [`super::discover`]); duplicate ids fail.
pub fn load_dir(dir: &Path, secrets: Secrets<'_>) -> LoadReport {
    let _ = (dir, secrets);
    LoadReport::default()
}
