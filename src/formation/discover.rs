//! Finds the formation files of a folder: `DIR/<name>/formation.afs` (else
//! `formation.yaml`, else `formation.yml`) and `DIR/*.afs`, in path order.

use std::fs;
use std::path::{Path, PathBuf};

use super::Diagnostic;

/// The names a modular formation's main file may have, by preference.
const FORMATION_FILE_NAMES: [&str; 3] = ["formation.afs", "formation.yaml", "formation.yml"];

/// One formation file found in a folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The formation file.
    pub file: PathBuf,
    /// The folder its relative paths resolve against: `DIR/<name>` for the folder
    /// layout, `DIR` for `DIR/*.afs`.
    pub dir: PathBuf,
    /// True for the folder layout (`DIR/<name>/formation.afs`).
    pub folder_layout: bool,
}

/// Lists the formation files of `dir`, sorted by path.
pub fn discover(dir: &Path) -> Result<Vec<Found>, Diagnostic> {
    let entries = fs::read_dir(dir).map_err(|e| {
        Diagnostic::error(dir, "(root)", format!("cannot read formations folder {}: {e}", dir.display()))
    })?;
    let mut found = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|e| {
                Diagnostic::error(dir, "(root)", format!("cannot read formations folder {}: {e}", dir.display()))
            })?
            .path();
        if path.is_dir() {
            found.extend(folder_formation(&path));
        } else if path.extension().is_some_and(|ext| ext == "afs") && path.is_file() {
            found.push(Found { file: path, dir: dir.to_path_buf(), folder_layout: false });
        }
    }
    if found.is_empty() {
        return Err(Diagnostic::error(
            dir,
            "(root)",
            format!(
                "no formation files found in {d} (expected {d}/<name>/formation.afs or {d}/*.afs)",
                d = dir.display()
            ),
        ));
    }
    found.sort_by(|a, b| a.file.cmp(&b.file));
    Ok(found)
}

/// The main file of a modular formation folder, if it has one.
fn folder_formation(folder: &Path) -> Option<Found> {
    FORMATION_FILE_NAMES.iter().map(|name| folder.join(name)).find(|file| file.is_file()).map(|file| Found {
        file,
        dir: folder.to_path_buf(),
        folder_layout: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(path: &Path) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, "id: x\n").unwrap();
    }

    #[test]
    fn finds_both_layouts_sorted_by_path() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        touch(&root.join("b/formation.afs"));
        touch(&root.join("b/formation.yaml")); // .afs wins
        touch(&root.join("a/formation.yml"));
        touch(&root.join("c.afs"));
        touch(&root.join("notes.txt"));
        touch(&root.join("empty-folder/readme.md"));
        let found = discover(root).unwrap();
        assert_eq!(
            found,
            vec![
                Found { file: root.join("a/formation.yml"), dir: root.join("a"), folder_layout: true },
                Found { file: root.join("b/formation.afs"), dir: root.join("b"), folder_layout: true },
                Found { file: root.join("c.afs"), dir: root.to_path_buf(), folder_layout: false },
            ]
        );
    }

    #[test]
    fn an_empty_folder_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        touch(&tmp.path().join("readme.md"));
        let err = discover(tmp.path()).unwrap_err();
        assert!(err.is_error());
        assert!(err.message.starts_with("no formation files found in "), "{}", err.message);
        assert!(err.message.contains("/<name>/formation.afs or "), "{}", err.message);
    }

    #[test]
    fn a_missing_folder_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("nope");
        let err = discover(&missing).unwrap_err();
        assert_eq!(err.file, missing);
        assert!(err.message.contains("cannot read formations folder"), "{}", err.message);
    }
}
