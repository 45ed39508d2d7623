//! The data folder's lock: one server per data folder.
//!
//! Two servers on one SQLite folder would both run every unfinished request.
//! `serve` takes an exclusive `flock` on `DATA/muxi.lock` for its whole life
//! (the kernel drops it when the process dies, however it dies) and writes its
//! pid there, so a second server stops at start-up with a clear error.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// The lock file inside the data folder.
pub const LOCK_FILE: &str = "muxi.lock";

/// Held for as long as the server runs.
#[derive(Debug)]
pub struct DataLock {
    _file: File,
}

/// Why the lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("the data folder {dir} is in use by another muxi-rt (pid {pid}); stop it or choose another --data-dir")]
    InUse { dir: PathBuf, pid: String },
    #[error("cannot lock {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

impl DataLock {
    /// Takes the lock of `dir`, or says who holds it.
    pub fn acquire(dir: &Path) -> Result<DataLock, LockError> {
        let path = dir.join(LOCK_FILE);
        let io = |source| LockError::Io { path: path.clone(), source };
        let mut file =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io)?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        if !locked {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(io(err));
            }
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim();
            return Err(LockError::InUse {
                dir: dir.to_path_buf(),
                pid: if pid.is_empty() { "unknown".into() } else { pid.into() },
            });
        }
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        Ok(DataLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_told_who_has_it() {
        let dir = tempfile::tempdir().unwrap();
        let first = DataLock::acquire(dir.path()).expect("first lock");
        let err = DataLock::acquire(dir.path()).expect_err("second lock");
        let message = err.to_string();
        assert!(message.contains(&std::process::id().to_string()), "{message}");
        assert!(message.contains("in use by another muxi-rt"), "{message}");
        drop(first);
        DataLock::acquire(dir.path()).expect("free again once dropped");
    }
}
