//! API keys: constant-time comparison, and generated keys for formations that
//! declare none, kept in the data folder so they survive restarts.

use std::io;
use std::path::{Path, PathBuf};

use rand::RngCore;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::formation::ApiKeys;

/// Compares a presented key with the expected one in constant time: one pass
/// over the presented key, each byte against the expected key's (repeated as
/// needed), with no early exit. The time depends on the presented key's
/// length, which its sender knows, and never on the expected key's content.
/// (It used to hash both with SHA-256: 8k instructions a request.)
pub fn matches(expected: &str, presented: &str) -> bool {
    let (expected, presented) = (expected.as_bytes(), presented.as_bytes());
    let differ = presented.iter().zip(expected.iter().cycle()).fold(0u8, |differ, (p, e)| differ | (p ^ e));
    let same_length = (expected.len() as u64).ct_eq(&(presented.len() as u64));
    (differ.ct_eq(&0) & same_length).into()
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredKeys {
    admin_key: String,
    client_key: String,
}

/// Where a formation's generated keys live.
fn key_file(data_dir: &Path, formation_id: &str) -> PathBuf {
    data_dir.join("keys").join(format!("{formation_id}.json"))
}

fn random_key(prefix: &str) -> String {
    let mut bytes = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("{prefix}_{}", hex::encode(bytes))
}

/// The keys a formation is served with: those it declares, and for any it does
/// not declare, keys generated once and persisted in `data_dir/keys/`. Returns
/// the keys and whether new ones were generated just now (so the caller prints
/// them, once).
pub fn resolve(data_dir: &Path, formation_id: &str, declared: &ApiKeys) -> io::Result<(ApiKeys, bool)> {
    if declared.admin.is_some() && declared.client.is_some() {
        return Ok((declared.clone(), false));
    }
    let path = key_file(data_dir, formation_id);
    let (stored, generated) = match std::fs::read(&path) {
        Ok(bytes) => {
            let stored: StoredKeys = serde_json::from_slice(&bytes)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", path.display())))?;
            (stored, false)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let stored = StoredKeys { admin_key: random_key("fma"), client_key: random_key("fmc") };
            write_private(&path, &serde_json::to_vec_pretty(&stored)?)?;
            (stored, true)
        }
        Err(e) => return Err(e),
    };
    let keys = ApiKeys {
        admin: declared.admin.clone().or(Some(stored.admin_key)),
        client: declared.client.clone().or(Some(stored.client_key)),
    };
    Ok((keys, generated))
}

/// Writes a file readable by its owner only, atomically (temp file + rename).
fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_only_the_same_key() {
        assert!(matches("fmc_abc", "fmc_abc"));
        assert!(!matches("fmc_abc", "fmc_abd"));
        assert!(!matches("fmc_abc", "fmc_ab"));
        assert!(!matches("fmc_abc", ""));
        assert!(!matches("fmc_abc", "fmc_abcfmc_abc"), "a repetition of the key is not the key");
        assert!(!matches("fmc_abc", "fmc_abcX"));
        assert!(!matches("", "fmc_abc"));
        assert!(!matches("fmc_abc", "Fmc_abc"));
    }

    #[test]
    fn generated_keys_persist_and_declared_keys_win() {
        let dir = tempfile::tempdir().unwrap();
        let none = ApiKeys::default();
        let (first, generated) = resolve(dir.path(), "f", &none).unwrap();
        assert!(generated);
        assert!(first.admin.as_deref().unwrap().starts_with("fma_"));
        assert!(first.client.as_deref().unwrap().starts_with("fmc_"));
        let (again, generated) = resolve(dir.path(), "f", &none).unwrap();
        assert!(!generated);
        assert_eq!(first, again);

        let half = ApiKeys { admin: Some("mine".into()), client: None };
        let (mixed, _) = resolve(dir.path(), "f", &half).unwrap();
        assert_eq!(mixed.admin.as_deref(), Some("mine"));
        assert_eq!(mixed.client, first.client);
    }
}
