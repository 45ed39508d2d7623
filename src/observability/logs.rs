//! Logging set-up (filled in below).
