//! A prepared statement that binds its text values in place, for the
//! writer's many-row `INSERT` of new requests ([`super::inserts`]).
//!
//! rusqlite binds every text as `SQLITE_TRANSIENT`: SQLite copies it into a
//! buffer of its own, and frees the copies when the statement goes back to
//! rusqlite's cache (which also hashes the statement's text on each use). A
//! 64-row insert binds 1,088 values. Bound as `SQLITE_STATIC`, SQLite reads the
//! caller's bytes where they are, which is sound only while those bytes live:
//! [`InPlace::execute`] takes the values for one run of the statement and
//! clears every binding before it returns, even when binding or stepping fails
//! or a caller's closure panics.

use std::ffi::{c_int, CStr};
use std::marker::PhantomData;
use std::ptr::{self, NonNull};

use rusqlite::{ffi, Connection};

/// A statement prepared on a connection it cannot outlive.
pub(super) struct InPlace<'conn> {
    statement: NonNull<ffi::sqlite3_stmt>,
    db: *mut ffi::sqlite3,
    parameters: c_int,
    _conn: PhantomData<&'conn Connection>,
}

impl<'conn> InPlace<'conn> {
    /// Prepares `sql` (one statement) on `conn`, to be kept and reused.
    pub fn prepare(conn: &'conn Connection, sql: &str) -> rusqlite::Result<InPlace<'conn>> {
        let length = c_int::try_from(sql.len()).map_err(|_| failure(ffi::SQLITE_TOOBIG, "statement too long"))?;
        // SAFETY: the handle is the open connection `conn`, which the lifetime
        // keeps open for as long as the statement exists; `sql` is read only
        // during the call, up to `length` bytes.
        unsafe {
            let db = conn.handle();
            let mut statement = ptr::null_mut();
            let flags = ffi::SQLITE_PREPARE_PERSISTENT as std::ffi::c_uint;
            let rc = ffi::sqlite3_prepare_v3(db, sql.as_ptr().cast(), length, flags, &mut statement, ptr::null_mut());
            if rc != ffi::SQLITE_OK {
                return Err(last_error(db, rc));
            }
            let statement = NonNull::new(statement).ok_or_else(|| failure(ffi::SQLITE_MISUSE, "no statement"))?;
            let parameters = ffi::sqlite3_bind_parameter_count(statement.as_ptr());
            Ok(InPlace { statement, db, parameters, _conn: PhantomData })
        }
    }

    /// Binds the values `bind` gives, in order, and runs the statement to its
    /// end. Every parameter must be bound; the bindings are cleared before
    /// this returns, so no borrowed value is left behind in the statement.
    pub fn execute<'v>(&mut self, bind: impl FnOnce(&mut Values<'v>) -> rusqlite::Result<()>) -> rusqlite::Result<()> {
        let (statement, db) = (self.statement.as_ptr(), self.db);
        let mut values = Values { statement, db, parameters: self.parameters, next: 0, _values: PhantomData };
        bind(&mut values)?;
        if values.next != values.parameters {
            return Err(failure(ffi::SQLITE_RANGE, "not every parameter is bound"));
        }
        // SAFETY: the statement is live, and each value bound to it lives for
        // 'v, which outlasts this call (dropping `values` clears them).
        let rc = unsafe { ffi::sqlite3_step(statement) };
        let result = match rc {
            ffi::SQLITE_DONE => Ok(()),
            ffi::SQLITE_ROW => Err(rusqlite::Error::ExecuteReturnedResults),
            rc => Err(last_error(db, rc)),
        };
        drop(values);
        result
    }
}

impl Drop for InPlace<'_> {
    fn drop(&mut self) {
        // SAFETY: the statement is live and finalized once; the connection is
        // still open (the lifetime).
        unsafe {
            ffi::sqlite3_finalize(self.statement.as_ptr());
        }
    }
}

/// The values of one run of an [`InPlace`] statement, bound in order; each
/// borrowed for `'v`. Dropping it resets the statement and clears them.
pub(super) struct Values<'v> {
    statement: *mut ffi::sqlite3_stmt,
    db: *mut ffi::sqlite3,
    parameters: c_int,
    next: c_int,
    /// The values bound, borrowed for 'v.
    _values: PhantomData<&'v str>,
}

impl<'v> Values<'v> {
    /// The next parameter's number, or an error past the last.
    fn next(&mut self) -> rusqlite::Result<(*mut ffi::sqlite3_stmt, c_int)> {
        if self.next >= self.parameters {
            return Err(failure(ffi::SQLITE_RANGE, "more values than parameters"));
        }
        self.next += 1;
        Ok((self.statement, self.next))
    }

    fn check(&self, rc: c_int) -> rusqlite::Result<()> {
        if rc == ffi::SQLITE_OK {
            Ok(())
        } else {
            Err(last_error(self.db, rc))
        }
    }

    pub fn text(&mut self, value: &'v str) -> rusqlite::Result<()> {
        let length = c_int::try_from(value.len()).map_err(|_| failure(ffi::SQLITE_TOOBIG, "text too long"))?;
        let (statement, index) = self.next()?;
        // SAFETY: `value` lives for 'v, and the binding is cleared when this
        // `Values` is dropped, within 'v (see `InPlace::execute`).
        let rc =
            unsafe { ffi::sqlite3_bind_text(statement, index, value.as_ptr().cast(), length, ffi::SQLITE_STATIC()) };
        self.check(rc)
    }

    pub fn opt_text(&mut self, value: Option<&'v str>) -> rusqlite::Result<()> {
        match value {
            Some(value) => self.text(value),
            None => self.null(),
        }
    }

    pub fn int(&mut self, value: i64) -> rusqlite::Result<()> {
        let (statement, index) = self.next()?;
        // SAFETY: a live statement and an in-range parameter.
        let rc = unsafe { ffi::sqlite3_bind_int64(statement, index, value) };
        self.check(rc)
    }

    pub fn opt_int(&mut self, value: Option<i64>) -> rusqlite::Result<()> {
        match value {
            Some(value) => self.int(value),
            None => self.null(),
        }
    }

    pub fn real(&mut self, value: f64) -> rusqlite::Result<()> {
        let (statement, index) = self.next()?;
        // SAFETY: a live statement and an in-range parameter.
        let rc = unsafe { ffi::sqlite3_bind_double(statement, index, value) };
        self.check(rc)
    }

    pub fn null(&mut self) -> rusqlite::Result<()> {
        let (statement, index) = self.next()?;
        // SAFETY: a live statement and an in-range parameter.
        let rc = unsafe { ffi::sqlite3_bind_null(statement, index) };
        self.check(rc)
    }
}

impl Drop for Values<'_> {
    fn drop(&mut self) {
        // SAFETY: a live statement. Reset ends its run; clearing sets every
        // parameter to NULL, so no pointer to a borrowed value remains.
        unsafe {
            ffi::sqlite3_reset(self.statement);
            ffi::sqlite3_clear_bindings(self.statement);
        }
    }
}

/// The connection's last error, as rusqlite reports one.
fn last_error(db: *mut ffi::sqlite3, rc: c_int) -> rusqlite::Error {
    // SAFETY: `db` is an open connection; its message is copied at once.
    let (code, message) = unsafe {
        let message = ffi::sqlite3_errmsg(db);
        let message =
            if message.is_null() { String::new() } else { CStr::from_ptr(message).to_string_lossy().into_owned() };
        (ffi::sqlite3_extended_errcode(db), message)
    };
    // The step's own code when the connection's says nothing more.
    let code = if code == ffi::SQLITE_OK { rc } else { code };
    rusqlite::Error::SqliteFailure(ffi::Error::new(code), Some(message))
}

fn failure(code: c_int, message: &str) -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(ffi::Error::new(code), Some(message.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (a TEXT NOT NULL UNIQUE, b INTEGER, c REAL)").unwrap();
        conn
    }

    fn rows(conn: &Connection) -> Vec<(String, Option<i64>, Option<f64>)> {
        let mut statement = conn.prepare("SELECT a, b, c FROM t ORDER BY rowid").unwrap();
        statement.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).unwrap().map(Result::unwrap).collect()
    }

    /// Values bound in place are written as given, and the statement runs
    /// again with new values once the old ones are gone.
    #[test]
    fn each_run_writes_the_values_it_was_given() {
        let conn = table();
        let mut insert = InPlace::prepare(&conn, "INSERT INTO t (a, b, c) VALUES (?, ?, ?), (?, ?, ?)").unwrap();
        for round in 0..3 {
            let (first, second) = (format!("first é {round}"), format!("second {round}"));
            insert
                .execute(|values| {
                    values.text(&first)?;
                    values.int(round)?;
                    values.real(0.5)?;
                    values.opt_text(Some(&second))?;
                    values.opt_int(None)?;
                    values.null()
                })
                .unwrap();
        }
        let written = rows(&conn);
        assert_eq!(written.len(), 6);
        assert_eq!(written[4], ("first é 2".to_string(), Some(2), Some(0.5)));
        assert_eq!(written[5], ("second 2".to_string(), None, None));
    }

    /// Too few or too many values, a failed step: an error each, nothing
    /// written by the failed run, and the statement still works after.
    #[test]
    fn a_failed_run_writes_nothing_and_leaves_the_statement_usable() {
        let conn = table();
        let mut insert = InPlace::prepare(&conn, "INSERT INTO t (a, b) VALUES (?, ?)").unwrap();
        let too_few = insert.execute(|values| values.text("x"));
        assert!(matches!(too_few, Err(rusqlite::Error::SqliteFailure(e, _)) if e.extended_code == ffi::SQLITE_RANGE));
        let too_many = insert.execute(|values| {
            values.text("x")?;
            values.int(1)?;
            values.int(2)
        });
        assert!(too_many.is_err());
        insert
            .execute(|values| {
                values.text("taken")?;
                values.int(1)
            })
            .unwrap();
        let duplicate = insert.execute(|values| {
            values.text("taken")?;
            values.int(2)
        });
        assert_eq!(duplicate.unwrap_err().sqlite_error_code(), Some(rusqlite::ErrorCode::ConstraintViolation));
        insert
            .execute(|values| {
                values.text("after")?;
                values.null()
            })
            .unwrap();
        let texts: Vec<String> = rows(&conn).into_iter().map(|(a, ..)| a).collect();
        assert_eq!(texts, ["taken", "after"]);
    }

    #[test]
    fn a_statement_that_does_not_prepare_is_an_error_that_names_it() {
        let conn = table();
        let err = InPlace::prepare(&conn, "INSERT INTO nowhere VALUES (?)").err().expect("an error");
        assert!(err.to_string().contains("no such table: nowhere"), "{err}");
    }
}
