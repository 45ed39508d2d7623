//! A prepared statement that binds its text values in place, for the
//! writer's many-row `INSERT` of new requests ([`super::inserts`]), and reads
//! a row's text in place, for a status poll ([`super::readers`]).
//!
//! rusqlite binds every text as `SQLITE_TRANSIENT`: SQLite copies it into a
//! buffer of its own, and frees the copies when the statement goes back to
//! rusqlite's cache (which also hashes the statement's text on each use). A
//! 64-row insert binds 1,088 values. Bound as `SQLITE_STATIC`, SQLite reads the
//! caller's bytes where they are, which is sound only while those bytes live:
//! [`InPlace::execute`] takes the values for one run of the statement and
//! clears every binding before it returns, even when binding or stepping fails
//! or a caller's closure panics.
//!
//! rusqlite reads each column of a row through `ValueRef`: three calls into
//! SQLite and a match on the value's type, about 300 instructions for a text
//! column. [`InPlace::query_row`] lends the row as [`Columns`], which asks a
//! text column for its text and length only (a NULL answers no text).

use std::ffi::{c_int, CStr};
use std::marker::PhantomData;
use std::ptr::{self, NonNull};

use rusqlite::{ffi, Connection};

/// A statement prepared on a connection it cannot outlive.
pub(super) struct InPlace<'conn> {
    statement: NonNull<ffi::sqlite3_stmt>,
    db: *mut ffi::sqlite3,
    parameters: c_int,
    /// How many columns a row of it has (0 for an `INSERT`).
    columns: c_int,
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
            let columns = ffi::sqlite3_column_count(statement.as_ptr());
            Ok(InPlace { statement, db, parameters, columns, _conn: PhantomData })
        }
    }

    /// Binds the values `bind` gives, in order, and runs the statement to its
    /// end. Every parameter must be bound; the bindings are cleared before
    /// this returns, so no borrowed value is left behind in the statement.
    pub fn execute<'v>(&mut self, bind: impl FnOnce(&mut Values<'v>) -> rusqlite::Result<()>) -> rusqlite::Result<()> {
        let values = self.bound(bind)?;
        // SAFETY: the statement is live, and each value bound to it lives for
        // 'v, which outlasts this call (dropping `values` clears them).
        let rc = unsafe { ffi::sqlite3_step(values.statement) };
        let result = match rc {
            ffi::SQLITE_DONE => Ok(()),
            ffi::SQLITE_ROW => Err(rusqlite::Error::ExecuteReturnedResults),
            rc => Err(last_error(self.db, rc)),
        };
        drop(values);
        result
    }

    /// Binds the values `bind` gives, as [`InPlace::execute`] does, and lends
    /// the statement's first row, if it has one, to `read`.
    pub fn query_row<'v, T>(
        &mut self,
        bind: impl FnOnce(&mut Values<'v>) -> rusqlite::Result<()>,
        read: impl FnOnce(&Columns<'_>) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<Option<T>> {
        let values = self.bound(bind)?;
        // SAFETY: as in `execute`.
        let rc = unsafe { ffi::sqlite3_step(values.statement) };
        let result = match rc {
            // The row is lent for the call only: `values`, whose drop resets
            // the statement, outlives it.
            ffi::SQLITE_ROW => {
                read(&Columns { statement: values.statement, db: self.db, columns: self.columns, _row: PhantomData })
                    .map(Some)
            }
            ffi::SQLITE_DONE => Ok(None),
            rc => Err(last_error(self.db, rc)),
        };
        drop(values);
        result
    }

    /// The statement with every parameter bound by `bind`; reset and cleared
    /// when the `Values` returned (or dropped on error) drops.
    fn bound<'v>(
        &mut self,
        bind: impl FnOnce(&mut Values<'v>) -> rusqlite::Result<()>,
    ) -> rusqlite::Result<Values<'v>> {
        let statement = self.statement.as_ptr();
        let mut values = Values { statement, db: self.db, parameters: self.parameters, next: 0, _values: PhantomData };
        bind(&mut values)?;
        if values.next != values.parameters {
            return Err(failure(ffi::SQLITE_RANGE, "not every parameter is bound"));
        }
        Ok(values)
    }
}

/// The row an [`InPlace`] statement stands on, lent by
/// [`InPlace::query_row`]; its text is borrowed where SQLite keeps it.
pub(super) struct Columns<'row> {
    statement: *mut ffi::sqlite3_stmt,
    db: *mut ffi::sqlite3,
    columns: c_int,
    _row: PhantomData<&'row ()>,
}

impl Columns<'_> {
    /// The column's number for SQLite, or an error past the last column.
    fn index(&self, column: usize) -> rusqlite::Result<c_int> {
        c_int::try_from(column)
            .ok()
            .filter(|&index| index < self.columns)
            .ok_or_else(|| rusqlite::Error::InvalidColumnIndex(column))
    }

    /// The storage class of the column's value (`SQLITE_TEXT`, ...).
    fn kind(&self, index: c_int) -> c_int {
        // SAFETY: the statement stands on a row and `index` is in range.
        unsafe { ffi::sqlite3_column_type(self.statement, index) }
    }

    /// The column's text, or `None` for NULL. A TEXT column holds text or
    /// NULL (its affinity makes text of any number written to it), so the
    /// text and its length are all that is asked; a BLOB is checked as UTF-8
    /// like any text.
    pub fn opt_text(&self, column: usize) -> rusqlite::Result<Option<&str>> {
        let index = self.index(column)?;
        // SAFETY: the statement stands on a row, lent as `self`, and `index`
        // is in range. The text SQLite returns stays where it is until the
        // statement steps, is reset or converts this column's value, and none
        // of those can happen while `self` (so the `&str`) is borrowed.
        unsafe {
            let text = ffi::sqlite3_column_text(self.statement, index);
            if text.is_null() {
                return match self.kind(index) {
                    ffi::SQLITE_NULL => Ok(None),
                    _ => Err(last_error(self.db, ffi::SQLITE_NOMEM)),
                };
            }
            let length = usize::try_from(ffi::sqlite3_column_bytes(self.statement, index)).unwrap_or(0);
            let bytes = std::slice::from_raw_parts(text, length);
            std::str::from_utf8(bytes).map(Some).map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Text, Box::new(e))
            })
        }
    }

    /// The column's integer, or `None` for NULL; any other value is an error.
    pub fn opt_int(&self, column: usize) -> rusqlite::Result<Option<i64>> {
        let index = self.index(column)?;
        match self.kind(index) {
            ffi::SQLITE_NULL => Ok(None),
            // SAFETY: as in `kind`.
            ffi::SQLITE_INTEGER => Ok(Some(unsafe { ffi::sqlite3_column_int64(self.statement, index) })),
            other => Err(wrong_type(column, other)),
        }
    }

    /// The column's number, or `None` for NULL; any other value is an error.
    pub fn opt_real(&self, column: usize) -> rusqlite::Result<Option<f64>> {
        let index = self.index(column)?;
        match self.kind(index) {
            ffi::SQLITE_NULL => Ok(None),
            // SAFETY: as in `kind`.
            ffi::SQLITE_FLOAT | ffi::SQLITE_INTEGER => {
                Ok(Some(unsafe { ffi::sqlite3_column_double(self.statement, index) }))
            }
            other => Err(wrong_type(column, other)),
        }
    }
}

/// A column holding a value of storage class `kind` where another was expected.
fn wrong_type(column: usize, kind: c_int) -> rusqlite::Error {
    use rusqlite::types::Type;
    let found = match kind {
        ffi::SQLITE_INTEGER => Type::Integer,
        ffi::SQLITE_FLOAT => Type::Real,
        ffi::SQLITE_TEXT => Type::Text,
        ffi::SQLITE_BLOB => Type::Blob,
        _ => Type::Null,
    };
    rusqlite::Error::InvalidColumnType(column, String::new(), found)
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

    /// A row is lent with its text where SQLite keeps it, NULLs as `None`,
    /// numbers as stored; no row is `None`; a wrong type or column is an
    /// error; the statement answers again with each new value bound.
    #[test]
    fn a_row_is_read_in_place() {
        let conn = table();
        conn.execute_batch("INSERT INTO t VALUES ('é ✓', 7, 0.25), ('n', NULL, NULL), ('whole', 3, 2.0)").unwrap();
        let mut select = InPlace::prepare(&conn, "SELECT a, b, c FROM t WHERE a = ?1").unwrap();
        type Row = (Option<String>, Option<i64>, Option<f64>);
        fn read(select: &mut InPlace, a: &str) -> rusqlite::Result<Option<Row>> {
            select.query_row(
                |values| values.text(a),
                |row| Ok((row.opt_text(0)?.map(str::to_owned), row.opt_int(1)?, row.opt_real(2)?)),
            )
        }
        assert_eq!(read(&mut select, "é ✓").unwrap(), Some((Some("é ✓".to_string()), Some(7), Some(0.25))));
        assert_eq!(read(&mut select, "n").unwrap(), Some((Some("n".to_string()), None, None)));
        assert_eq!(read(&mut select, "whole").unwrap(), Some((Some("whole".to_string()), Some(3), Some(2.0))));
        assert_eq!(read(&mut select, "absent").unwrap(), None);

        let wrong = select.query_row(|values| values.text("é ✓"), |row| row.opt_int(0));
        assert!(
            matches!(wrong, Err(rusqlite::Error::InvalidColumnType(0, _, rusqlite::types::Type::Text))),
            "{wrong:?}"
        );
        let past = select.query_row(|values| values.text("é ✓"), |row| Ok(row.opt_text(3)?.map(str::to_owned)));
        assert!(matches!(past, Err(rusqlite::Error::InvalidColumnIndex(3))), "{past:?}");
        let unbound = select.query_row(|_| Ok(()), |row| Ok(row.opt_text(0)?.map(str::to_owned)));
        assert!(unbound.is_err());
        // A BLOB is text only if it is UTF-8.
        conn.execute_batch("INSERT INTO t VALUES (x'ff00', 1, 1.0)").unwrap();
        let mut blob = InPlace::prepare(&conn, "SELECT a FROM t WHERE b = ?1 AND typeof(a) = 'blob'").unwrap();
        let invalid = blob.query_row(|values| values.int(1), |row| Ok(row.opt_text(0)?.map(str::to_owned)));
        assert!(matches!(invalid, Err(rusqlite::Error::FromSqlConversionFailure(0, ..))), "{invalid:?}");
        assert_eq!(read(&mut select, "n").unwrap(), Some((Some("n".to_string()), None, None)));
    }

    #[test]
    fn a_statement_that_does_not_prepare_is_an_error_that_names_it() {
        let conn = table();
        let err = InPlace::prepare(&conn, "INSERT INTO nowhere VALUES (?)").err().expect("an error");
        assert!(err.to_string().contains("no such table: nowhere"), "{err}");
    }
}
