//! Runs a `muxi-rt` client command under a real pseudo-terminal (openpty), so
//! it sees a terminal on stdin and stdout: its output (escape codes and all) is
//! collected, and keys (Ctrl-C is byte 3) are typed into it.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Pty {
    master: File,
    child: Child,
    output: Arc<Mutex<Vec<u8>>>,
}

impl Pty {
    /// Starts `muxi-rt ARGS` on a new 120x30 terminal, with `env` set and
    /// other MUXI_* variables removed.
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Pty {
        let (mut master, mut slave): (RawFd, RawFd) = (-1, -1);
        let size = libc::winsize { ws_row: 30, ws_col: 120, ws_xpixel: 0, ws_ypixel: 0 };
        let rc = unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), &size) };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        let mut command = Command::new(super::BIN);
        command.args(args).env("TERM", "xterm-256color");
        for (k, _) in std::env::vars() {
            if k.starts_with("MUXI_") {
                command.env_remove(k);
            }
        }
        for (k, v) in env {
            command.env(k, v);
        }
        unsafe {
            command
                .stdin(Stdio::from_raw_fd(libc::dup(slave)))
                .stdout(Stdio::from_raw_fd(libc::dup(slave)))
                .stderr(Stdio::from_raw_fd(libc::dup(slave)))
                .pre_exec(|| {
                    // A session of its own with the terminal as its controlling
                    // terminal: Ctrl-C typed there reaches it as SIGINT.
                    if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
        }
        let child = command.spawn().expect("muxi-rt starts on the pty");
        unsafe { libc::close(slave) };
        let master = unsafe { File::from_raw_fd(master) };
        let output = Arc::new(Mutex::new(Vec::new()));
        let mut reader = master.try_clone().unwrap();
        let sink = output.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // EIO once the child has closed its side.
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Pty { master, child, output }
    }

    /// Everything written to the terminal so far, as text.
    pub fn output(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }

    /// Waits until `check` holds for the output; panics with it after `limit`.
    pub fn wait_for(&self, limit: Duration, what: &str, check: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let out = self.output();
            if check(&out) {
                return out;
            }
            if Instant::now() > deadline {
                panic!("timed out waiting for {what}; terminal output:\n{out}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Types `bytes` on the terminal.
    pub fn type_bytes(&mut self, bytes: &[u8]) {
        self.master.write_all(bytes).unwrap();
        self.master.flush().unwrap();
    }

    /// Waits for the command to exit; its exit code.
    pub fn wait(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the command did not exit; terminal output:\n{}", self.output());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Pty {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
