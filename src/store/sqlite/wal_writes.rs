//! The writer's WAL appends, handed to the kernel in one write per commit.
//!
//! SQLite writes each WAL frame with two `pwrite`s, its 24-byte header and
//! then its page: a commit of 13 pages is 26 system calls, each paying the
//! file system's fixed cost. [`VFS`] is SQLite's default VFS with one change:
//! a WAL file opened through it holds a run of contiguous writes in memory and
//! writes the run at once when SQLite syncs the file, reads it, asks its size,
//! truncates it, controls it or closes it (or when a write does not continue
//! the run, or the run would pass [`MAX_HELD`]). Every other file (the
//! database, its shared memory) is the default VFS's own, untouched.
//!
//! Why nothing is lost or seen early: with `synchronous=FULL` SQLite syncs the
//! WAL before it publishes a commit in the WAL index, so every frame of a
//! commit is written before a reader can look for it, and a write that fails
//! then fails the sync, and so the commit. [`open`] sets it, and nothing in the
//! store changes it. Only the writer's connection uses this VFS.

use std::ffi::{c_int, c_void, CStr};
use std::path::Path;
use std::sync::OnceLock;

use rusqlite::ffi;
use rusqlite::{Connection, OpenFlags};

/// The VFS's name, as `sqlite3_open_v2` takes it.
pub(super) const VFS: &str = "muxi-wal-writes";
const VFS_NAME: &CStr = c"muxi-wal-writes";

/// The most bytes held before they are written: 29 frames of 4 KiB pages.
/// A larger commit is written in runs of this size. (The default VFS writes
/// at most 128 KiB - 1 bytes a call: its `seekAndWrite` masks the length with
/// `0x1ffff`, so a longer write would lose its high bits.)
const MAX_HELD: usize = 120 * 1024;

/// Opens `path` for writing through [`VFS`], with `synchronous=FULL`.
pub(super) fn open(path: &Path) -> rusqlite::Result<Connection> {
    registered()
        .map_err(|message| rusqlite::Error::SqliteFailure(ffi::Error::new(ffi::SQLITE_ERROR), Some(message)))?;
    let conn = Connection::open_with_flags_and_vfs(path, OpenFlags::default(), VFS)?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    Ok(conn)
}

/// A WAL file opened through [`VFS`]: SQLite's handle, what it holds, then
/// the default VFS's own file, whose size only that VFS knows.
#[repr(C)]
struct WalFile {
    base: ffi::sqlite3_file,
    held: *mut Held,
    real: ffi::sqlite3_file,
}

/// Bytes written by SQLite and not yet by the kernel: `room`'s bytes belong
/// at `start` in the file.
struct Held {
    start: i64,
    room: Room,
}

impl Held {
    fn end(&self) -> i64 {
        self.start + self.room.len as i64
    }
}

/// Room for one run of [`MAX_HELD`] bytes, mapped straight from the OS: it
/// is resident only as far as runs have reached, and outside the allocator's
/// arenas (a `Vec` grown to 120 KiB there added about 3 MB to a fresh
/// server's RSS).
struct Room {
    base: std::ptr::NonNull<u8>,
    len: usize,
}

impl Room {
    fn new() -> Option<Room> {
        use libc::{mmap, MAP_ANONYMOUS, MAP_FAILED, MAP_PRIVATE, PROT_READ, PROT_WRITE};
        // SAFETY: a fresh private anonymous mapping, owned by this `Room` alone.
        let base =
            unsafe { mmap(std::ptr::null_mut(), MAX_HELD, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0) };
        if base == MAP_FAILED {
            return None;
        }
        std::ptr::NonNull::new(base.cast()).map(|base| Room { base, len: 0 })
    }

    fn filled(&mut self) -> &mut [u8] {
        // SAFETY: the first `len` (<= MAX_HELD) bytes of the mapping, borrowed with `self`.
        unsafe { std::slice::from_raw_parts_mut(self.base.as_ptr(), self.len) }
    }

    /// Appends `data`; the caller keeps the run within [`MAX_HELD`].
    fn push(&mut self, data: &[u8]) {
        assert!(self.len + data.len() <= MAX_HELD, "a run past MAX_HELD");
        // SAFETY: in bounds (checked above); `data` is SQLite's buffer, not this mapping.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.base.as_ptr().add(self.len), data.len()) };
        self.len += data.len();
    }
}

impl Drop for Room {
    fn drop(&mut self) {
        // SAFETY: the mapping `new` made, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), MAX_HELD) };
    }
}

/// The default VFS, found and wrapped once per process.
struct Registered {
    real: *mut ffi::sqlite3_vfs,
}

// SAFETY: both VFS structs are leaked, never changed after registration, and
// SQLite's VFS functions may be called from any thread.
unsafe impl Send for Registered {}
unsafe impl Sync for Registered {}

static REGISTERED: OnceLock<Result<Registered, String>> = OnceLock::new();

fn registered() -> Result<&'static Registered, String> {
    REGISTERED.get_or_init(register).as_ref().map_err(Clone::clone)
}

fn real_vfs() -> *mut ffi::sqlite3_vfs {
    // Only reached through a file or VFS that `register` made.
    REGISTERED.get().and_then(|r| r.as_ref().ok()).map_or(std::ptr::null_mut(), |r| r.real)
}

fn register() -> Result<Registered, String> {
    // SAFETY: `sqlite3_vfs_find` initialises SQLite if needed; the VFS it
    // returns lives as long as the process. The copy is leaked, so it does too.
    unsafe {
        let real = ffi::sqlite3_vfs_find(std::ptr::null());
        if real.is_null() {
            return Err("SQLite has no default VFS".into());
        }
        let mut ours = *real;
        ours.zName = VFS_NAME.as_ptr();
        ours.pNext = std::ptr::null_mut();
        // Room for a wrapped WAL file; any other file uses the first `szOsFile` bytes.
        ours.szOsFile = std::mem::offset_of!(WalFile, real) as c_int + (*real).szOsFile;
        ours.xOpen = Some(open_file);
        // `pAppData` stays the default VFS's: its functions read it.
        let rc = ffi::sqlite3_vfs_register(Box::leak(Box::new(ours)), 0);
        if rc != ffi::SQLITE_OK {
            return Err(format!("cannot register the {VFS} VFS: SQLite error {rc}"));
        }
        Ok(Registered { real })
    }
}

/// `xOpen`: a WAL file is wrapped; any other is the default VFS's own file.
unsafe extern "C" fn open_file(
    _vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let real = real_vfs();
    let Some(real_open) = real.as_ref().and_then(|vfs| vfs.xOpen) else {
        return ffi::SQLITE_ERROR;
    };
    if flags & ffi::SQLITE_OPEN_WAL == 0 {
        return real_open(real, name, file, flags, out_flags);
    }
    let wal = file.cast::<WalFile>();
    (*wal).base.pMethods = std::ptr::null();
    (*wal).held = std::ptr::null_mut();
    // The room first: if the file then fails to open, the room just drops.
    let Some(room) = Room::new() else { return ffi::SQLITE_NOMEM };
    let inner = std::ptr::addr_of_mut!((*wal).real);
    let rc = real_open(real, name, inner, flags, out_flags);
    if rc != ffi::SQLITE_OK {
        // SQLite closes only a file whose methods are set: close the inner one here.
        if let Some(close) = (*inner).pMethods.as_ref().and_then(|m| m.xClose) {
            close(inner);
        }
        return rc;
    }
    (*wal).held = Box::into_raw(Box::new(Held { start: 0, room }));
    (*wal).base.pMethods = &WAL_METHODS;
    ffi::SQLITE_OK
}

/// The wrapped file's parts: what it holds, the inner file, and its methods.
///
/// Sound for every method of [`WAL_METHODS`]: SQLite calls them only on a
/// file that `open_file` set up (its methods are set last) and not yet
/// closed, from one thread at a time (the connection's).
unsafe fn parts<'a>(
    file: *mut ffi::sqlite3_file,
) -> (&'a mut Held, *mut ffi::sqlite3_file, &'a ffi::sqlite3_io_methods) {
    let wal = file.cast::<WalFile>();
    let inner = std::ptr::addr_of_mut!((*wal).real);
    (&mut *(*wal).held, inner, &*(*inner).pMethods)
}

/// Writes what `held` holds, and forgets it whatever the outcome: a failed
/// write fails the call that asked for it, and with it SQLite's commit, which
/// then writes its frames again.
unsafe fn flush(held: &mut Held, inner: *mut ffi::sqlite3_file, methods: &ffi::sqlite3_io_methods) -> c_int {
    if held.room.len == 0 {
        return ffi::SQLITE_OK;
    }
    let rc = write_at(inner, methods, held.room.filled(), held.start);
    held.room.len = 0;
    rc
}

/// Writes `bytes` at `offset` in the inner file.
unsafe fn write_at(
    inner: *mut ffi::sqlite3_file,
    methods: &ffi::sqlite3_io_methods,
    bytes: &[u8],
    offset: i64,
) -> c_int {
    match (methods.xWrite, c_int::try_from(bytes.len())) {
        (Some(write), Ok(len)) => write(inner, bytes.as_ptr().cast(), len, offset),
        _ => ffi::SQLITE_IOERR_WRITE,
    }
}

/// Runs `call` on the inner file once what is held is written.
unsafe fn flushed(
    file: *mut ffi::sqlite3_file,
    call: impl FnOnce(*mut ffi::sqlite3_file, &ffi::sqlite3_io_methods) -> c_int,
) -> c_int {
    let (held, inner, methods) = parts(file);
    match flush(held, inner, methods) {
        ffi::SQLITE_OK => call(inner, methods),
        failed => failed,
    }
}

unsafe extern "C" fn write(file: *mut ffi::sqlite3_file, data: *const c_void, amount: c_int, offset: i64) -> c_int {
    let (held, inner, methods) = parts(file);
    let Ok(len) = usize::try_from(amount) else { return ffi::SQLITE_IOERR_WRITE };
    let data = std::slice::from_raw_parts(data.cast::<u8>(), len);
    let end = offset.saturating_add(amount.into());
    let held_any = held.room.len > 0;
    if held_any && offset >= held.start && end <= held.end() {
        // A frame written again within the run (a page changed twice in one transaction).
        let from = (offset - held.start) as usize;
        held.room.filled()[from..from + len].copy_from_slice(data);
        return ffi::SQLITE_OK;
    }
    let continues = held_any && offset == held.end();
    if !continues || held.room.len + len > MAX_HELD {
        let rc = flush(held, inner, methods);
        if rc != ffi::SQLITE_OK {
            return rc;
        }
    }
    if held.room.len == 0 {
        if len > MAX_HELD {
            return write_at(inner, methods, data, offset);
        }
        held.start = offset;
    }
    held.room.push(data);
    ffi::SQLITE_OK
}

unsafe extern "C" fn close(file: *mut ffi::sqlite3_file) -> c_int {
    let wal = file.cast::<WalFile>();
    let (held, inner, methods) = parts(file);
    let flushed = flush(held, inner, methods);
    let closed = methods.xClose.map_or(ffi::SQLITE_OK, |close| close(inner));
    drop(Box::from_raw((*wal).held));
    (*wal).held = std::ptr::null_mut();
    if flushed != ffi::SQLITE_OK {
        flushed
    } else {
        closed
    }
}

unsafe extern "C" fn read(file: *mut ffi::sqlite3_file, into: *mut c_void, amount: c_int, offset: i64) -> c_int {
    flushed(file, |inner, m| m.xRead.map_or(ffi::SQLITE_IOERR_READ, |f| f(inner, into, amount, offset)))
}

unsafe extern "C" fn truncate(file: *mut ffi::sqlite3_file, size: i64) -> c_int {
    flushed(file, |inner, m| m.xTruncate.map_or(ffi::SQLITE_IOERR_TRUNCATE, |f| f(inner, size)))
}

unsafe extern "C" fn sync(file: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    flushed(file, |inner, m| m.xSync.map_or(ffi::SQLITE_IOERR_FSYNC, |f| f(inner, flags)))
}

unsafe extern "C" fn file_size(file: *mut ffi::sqlite3_file, size: *mut i64) -> c_int {
    flushed(file, |inner, m| m.xFileSize.map_or(ffi::SQLITE_IOERR_FSTAT, |f| f(inner, size)))
}

unsafe extern "C" fn file_control(file: *mut ffi::sqlite3_file, op: c_int, arg: *mut c_void) -> c_int {
    flushed(file, |inner, m| m.xFileControl.map_or(ffi::SQLITE_NOTFOUND, |f| f(inner, op, arg)))
}

/// The calls that neither read nor write the file go straight to it.
macro_rules! passed_on {
    ($name:ident, $method:ident, $missing:expr, ($($arg:ident: $ty:ty),*)) => {
        unsafe extern "C" fn $name(file: *mut ffi::sqlite3_file $(, $arg: $ty)*) -> c_int {
            let (_, inner, methods) = parts(file);
            methods.$method.map_or($missing, |f| f(inner $(, $arg)*))
        }
    };
}

passed_on!(lock, xLock, ffi::SQLITE_OK, (level: c_int));
passed_on!(unlock, xUnlock, ffi::SQLITE_OK, (level: c_int));
passed_on!(check_reserved_lock, xCheckReservedLock, ffi::SQLITE_OK, (out: *mut c_int));
passed_on!(sector_size, xSectorSize, 4096, ());
passed_on!(device_characteristics, xDeviceCharacteristics, 0, ());

/// A WAL file's methods: version 1, as SQLite needs no shared memory or
/// memory map of a WAL file (those are the database file's).
static WAL_METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 1,
    xClose: Some(close),
    xRead: Some(read),
    xWrite: Some(write),
    xTruncate: Some(truncate),
    xSync: Some(sync),
    xFileSize: Some(file_size),
    xLock: Some(lock),
    xUnlock: Some(unlock),
    xCheckReservedLock: Some(check_reserved_lock),
    xFileControl: Some(file_control),
    xSectorSize: Some(sector_size),
    xDeviceCharacteristics: Some(device_characteristics),
    xShmMap: None,
    xShmLock: None,
    xShmBarrier: None,
    xShmUnmap: None,
    xFetch: None,
    xUnfetch: None,
};

#[cfg(test)]
mod tests {
    use super::*;

    /// Write system calls made by this thread so far (Linux's per-thread I/O accounting).
    fn writes_by_this_thread() -> u64 {
        let io = std::fs::read_to_string("/proc/thread-self/io").expect("/proc/thread-self/io");
        io.lines().find_map(|l| l.strip_prefix("syscw: ")).and_then(|n| n.trim().parse().ok()).expect("syscw")
    }

    fn database(dir: &Path, conn: Connection) -> Connection {
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)).unwrap();
        assert_eq!(mode, "wal");
        conn.pragma_update(None, "synchronous", "FULL").unwrap();
        conn.execute_batch("CREATE TABLE IF NOT EXISTS t (n INTEGER PRIMARY KEY, pad TEXT)").unwrap();
        assert!(dir.join("t.db-wal").exists());
        conn
    }

    /// The write calls that writing `rows` rows of about 1 KB makes (a commit, outside a transaction).
    fn writes_per_commit(conn: &Connection, first: i64, rows: i64) -> u64 {
        let before = writes_by_this_thread();
        conn.execute(
            "WITH RECURSIVE s(v) AS (VALUES (?1) UNION ALL SELECT v + 1 FROM s WHERE v < ?2) \
             INSERT INTO t (n, pad) SELECT v, printf('%.1000c', 'x') FROM s",
            [first, first + rows - 1],
        )
        .unwrap();
        writes_by_this_thread() - before
    }

    #[test]
    fn a_commit_reaches_the_wal_in_one_write_and_every_reader_sees_it_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let gathered = database(dir.path(), open(&path).unwrap());
        let plain = database(dir.path(), Connection::open(&path).unwrap());
        let reader = Connection::open(&path).unwrap();
        let count = |conn: &Connection| -> i64 { conn.query_row("SELECT count(*) FROM t", [], |r| r.get(0)).unwrap() };
        let (mut plain_writes, mut gathered_writes) = (0, 0);
        for round in 0..10 {
            // Forty rows: about ten pages, each written as two calls by the default VFS.
            plain_writes += writes_per_commit(&plain, round * 100, 40);
            assert_eq!(count(&reader), round * 80 + 40);
            gathered_writes += writes_per_commit(&gathered, round * 100 + 50, 40);
            assert_eq!(count(&reader), round * 80 + 80, "a commit is seen by another connection once it returns");
        }
        assert!(plain_writes >= 10 * 20, "the default VFS: {plain_writes} writes");
        assert!(gathered_writes <= 10 * 2, "gathered: {gathered_writes} writes for 10 commits");
        drop((gathered, plain));
        let check: String = reader.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
        assert_eq!(check, "ok");
    }

    #[test]
    fn what_a_closed_connection_held_is_in_the_database_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let conn = database(dir.path(), open(&path).unwrap());
        // Past `MAX_HELD` in one commit, and a page written twice in one transaction.
        conn.execute_batch("BEGIN").unwrap();
        writes_per_commit(&conn, 0, 600);
        conn.execute("UPDATE t SET pad = 'changed' WHERE n < 5", []).unwrap();
        conn.execute_batch("COMMIT").unwrap();
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())).unwrap();
        writes_per_commit(&conn, 1000, 3);
        drop(conn);
        let reopened = Connection::open(&path).unwrap();
        let (rows, changed): (i64, i64) = reopened
            .query_row("SELECT count(*), sum(pad = 'changed') FROM t", [], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap();
        assert_eq!((rows, changed), (603, 5));
        let check: String = reopened.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
        assert_eq!(check, "ok");
    }
}
