//! Command agents die with the server, however it ends.
//!
//! - **PDEATHSIG**: every agent program is started with
//!   `prctl(PR_SET_PDEATHSIG, SIGKILL)`, so the kernel kills it when the server
//!   dies, even by SIGKILL. The signal fires when the *thread* that forked the
//!   program exits, not the process: programs are therefore forked from one
//!   dedicated thread that lives as long as the process ([`spawn`]), never from
//!   a tokio worker or blocking-pool thread (those may exit while the agent runs).
//! - **Records**: PDEATHSIG reaches only the program itself, not what it started
//!   in its process group. While an agent runs, `DATA/agents/<pgid>` holds
//!   `<pid> <start time>` (field 22 of `/proc/<pid>/stat`), removed when the
//!   agent ends. At start-up [`sweep`] kills (SIGKILL) each recorded group whose
//!   leader still has the recorded start time (a recycled pid never matches), and
//!   deletes the records.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Mutex, OnceLock};

/// The records folder, once the server has set it ([`sweep`]). Unset (unit
/// tests, tools), agents run unrecorded.
static RECORDS: OnceLock<PathBuf> = OnceLock::new();

/// A program to start, the runtime to register it with, and where to answer.
type Job =
    (tokio::process::Command, tokio::runtime::Handle, tokio::sync::oneshot::Sender<io::Result<tokio::process::Child>>);

/// Starts `command` from the spawner thread, with PDEATHSIG set in the child.
/// Must be called within a tokio runtime (the child is registered with it).
pub async fn spawn(mut command: tokio::process::Command) -> io::Result<tokio::process::Child> {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls (prctl, getppid); it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The server died between the fork and the prctl: do not run orphaned.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    let (reply, answer) = tokio::sync::oneshot::channel();
    spawner()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .send((command, tokio::runtime::Handle::current(), reply))
        .map_err(|_| io::Error::other("the agent spawner thread is gone"))?;
    answer.await.map_err(|_| io::Error::other("the agent spawner thread is gone"))?
}

/// The long-lived thread every agent program is forked from.
fn spawner() -> &'static Mutex<mpsc::Sender<Job>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("muxi-agent-spawner".into())
            .spawn(move || {
                for (mut command, runtime, reply) in queue {
                    let _entered = runtime.enter();
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("the agent spawner thread starts");
        Mutex::new(jobs)
    })
}

/// The running agent's record; removed when dropped.
pub struct Record {
    path: PathBuf,
}

impl Record {
    /// Records process group `pgid` (led by `pid`), if records are kept.
    pub fn create(pgid: i32, pid: i32) -> Option<Record> {
        let dir = RECORDS.get()?;
        let start = start_time(pid)?;
        let path = dir.join(pgid.to_string());
        match std::fs::write(&path, format!("{pid} {start}\n")) {
            Ok(()) => Some(Record { path }),
            Err(err) => {
                tracing::warn!(error = %err, path = %path.display(), "cannot record a running agent");
                None
            }
        }
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Field 22 (start time, in clock ticks since boot) of `/proc/<pid>/stat`.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 2, the command name, is in parentheses and may hold spaces or `)`.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// Keeps records in `DATA/agents/` from now on, and first kills the process
/// groups that earlier records name and that still run. Returns how many groups
/// were killed. Call once at start-up, before unfinished requests are run again,
/// and only once this server owns the data folder.
pub fn sweep(data_dir: &Path) -> io::Result<usize> {
    let dir = data_dir.join("agents");
    std::fs::create_dir_all(&dir)?;
    let killed = sweep_dir(&dir)?;
    if killed > 0 {
        tracing::warn!(groups = killed, "killed agent processes left running by an earlier server");
    }
    let _ = RECORDS.set(dir);
    Ok(killed)
}

/// Kills what the records in `dir` name and still runs; deletes every record.
fn sweep_dir(dir: &Path) -> io::Result<usize> {
    let mut killed = 0;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if kill_recorded(&path) {
            killed += 1;
        }
        let _ = std::fs::remove_file(&path);
    }
    Ok(killed)
}

/// Kills the group a record names if its leader is the recorded process.
fn kill_recorded(path: &Path) -> bool {
    let Some(pgid) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.parse::<i32>().ok()) else {
        return false;
    };
    let Ok(text) = std::fs::read_to_string(path) else { return false };
    let mut fields = text.split_whitespace();
    let (Some(Ok(pid)), Some(Ok(start))) = (fields.next().map(str::parse::<i32>), fields.next().map(str::parse::<u64>))
    else {
        return false;
    };
    // pid 0, 1 or negative would signal far more than one group.
    if pgid <= 1 || pid <= 1 || start_time(pid) != Some(start) {
        return false;
    }
    // SAFETY: killpg only sends a signal, to a group whose recorded leader is
    // still the process that was recorded.
    unsafe { libc::killpg(pgid, libc::SIGKILL) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_reads_field_22() {
        let me = std::process::id() as i32;
        let start = start_time(me).expect("own start time");
        assert!(start > 0);
        assert_eq!(start_time(me), Some(start), "stable");
        assert_eq!(start_time(-5), None);
    }

    #[test]
    fn records_that_do_not_match_are_dropped_without_killing() {
        let dir = tempfile::tempdir().unwrap();
        let agents = dir.path().join("agents");
        std::fs::create_dir_all(&agents).unwrap();
        let me = std::process::id() as i32;
        // Our own pid with a wrong start time (a recycled pid), and junk.
        std::fs::write(agents.join(me.to_string()), format!("{me} 1\n")).unwrap();
        std::fs::write(agents.join("junk"), "x").unwrap();
        std::fs::write(agents.join("1"), "1 1\n").unwrap();
        assert_eq!(sweep_dir(&agents).unwrap(), 0);
        assert_eq!(std::fs::read_dir(&agents).unwrap().count(), 0, "records deleted");
    }
}
