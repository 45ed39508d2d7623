//! The SQLite store (stub: being written).
