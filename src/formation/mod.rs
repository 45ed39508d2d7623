//! What a formation is: its typed settings ([`config`]), how formation files are
//! found ([`discover`]), how `${{ secrets.NAME }}` is resolved ([`secrets`]), how a
//! file is checked against the embedded JSON Schema ([`schema`]) with problems
//! located back in the YAML source ([`locate`]), and the whole pipeline ([`load`]).

pub mod config;
pub mod diagnostics;
pub mod discover;
pub mod load;
pub mod locate;
pub mod schema;
pub mod secrets;

pub use config::*;
pub use diagnostics::{Diagnostic, Severity};
pub use load::{load_dir, load_file, LoadReport};
