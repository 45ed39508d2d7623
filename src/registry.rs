//! The live set of formations, behind one atomic swap, and the file watcher that
//! reloads it.
//!
//! A reload re-reads the whole folder and builds a new [`Live`] value: a valid
//! file replaces its formation; an invalid one keeps its previous formation
//! serving (its errors are kept for `GET /health`); a deleted file's formation
//! stops. Readers take an `Arc` of a formation and keep it for as long as their
//! request runs, so a reload never changes a request mid-flight.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::formation::{self, Diagnostic, Formation};

/// A formation file that failed to load, with its problems.
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub file: PathBuf,
    pub errors: Vec<String>,
    /// The formation id still served from this file's last valid version, if any.
    pub still_serving: Option<String>,
}

/// One consistent view of what is loaded.
#[derive(Debug, Default)]
pub struct Live {
    pub formations: BTreeMap<String, Arc<Formation>>,
    pub failures: Vec<Failure>,
    /// Problems with the folder itself (missing, empty).
    pub problems: Vec<String>,
    /// When each formation's current revision was loaded (ms).
    pub loaded_at: BTreeMap<String, i64>,
    /// When the folder was last read (ms).
    pub reloaded_at: i64,
}

/// The registry of formations served by this process.
pub struct Registry {
    dir: PathBuf,
    data_dir: PathBuf,
    live: RwLock<Arc<Live>>,
    /// Serialises reloads so two never interleave.
    reloading: Mutex<()>,
}

fn env_secret(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

impl Registry {
    /// Loads `dir` for the first time.
    pub fn load(dir: &Path, data_dir: &Path) -> Registry {
        let registry = Registry {
            dir: dir.to_path_buf(),
            data_dir: data_dir.to_path_buf(),
            live: RwLock::new(Arc::new(Live::default())),
            reloading: Mutex::new(()),
        };
        registry.reload();
        registry
    }

    /// The folder being served.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The current formation with this id.
    pub fn get(&self, id: &str) -> Option<Arc<Formation>> {
        self.snapshot().formations.get(id).cloned()
    }

    /// The current view.
    pub fn snapshot(&self) -> Arc<Live> {
        self.live.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Re-reads the folder and swaps in the result (see the module doc).
    pub fn reload(&self) {
        let _guard = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.snapshot();
        let report = formation::load_dir(&self.dir, &env_secret);

        let mut formations = BTreeMap::new();
        let mut failures = Vec::new();
        for mut loaded in report.formations {
            match crate::keys::resolve(&self.data_dir, &loaded.id, &loaded.keys) {
                Ok((keys, generated)) => {
                    if generated {
                        print_generated_keys(&loaded.id, &keys);
                    }
                    loaded.keys = keys;
                    for warning in &loaded.warnings {
                        tracing::warn!("{warning}");
                    }
                    formations.insert(loaded.id.clone(), Arc::new(loaded));
                }
                Err(e) => failures.push(Failure {
                    file: loaded.source.clone(),
                    errors: vec![format!("{}: cannot keep generated keys: {e}", loaded.source.display())],
                    still_serving: None,
                }),
            }
        }
        for (file, diagnostics) in report.failures {
            failures.push(Failure {
                file,
                errors: diagnostics.iter().filter(|d| d.is_error()).map(Diagnostic::to_string).collect(),
                still_serving: None,
            });
        }
        // An invalid edit keeps the file's last valid formation serving.
        for failure in &mut failures {
            let previous = old.formations.values().find(|f| f.source == failure.file);
            if let Some(previous) = previous {
                if !formations.contains_key(&previous.id) {
                    formations.insert(previous.id.clone(), previous.clone());
                    failure.still_serving = Some(previous.id.clone());
                }
            }
        }
        for failure in &failures {
            for error in &failure.errors {
                tracing::error!("{error}");
            }
            if let Some(id) = &failure.still_serving {
                tracing::warn!(formation = %id, "invalid edit ignored: the previous version keeps serving");
            }
        }
        let problems: Vec<String> = report.problems.iter().map(Diagnostic::to_string).collect();
        for problem in &problems {
            tracing::error!("{problem}");
        }
        log_changes(&old.formations, &formations);

        let now = crate::time::now_ms();
        let loaded_at = loaded_times(&old, &formations, now);
        crate::observability::metrics::formations_loaded(formations.len(), failures.len() + problems.len());
        let live = Arc::new(Live { formations, failures, problems, loaded_at, reloaded_at: now });
        *self.live.write().unwrap_or_else(|e| e.into_inner()) = live;
    }

    /// Watches the folder and reloads on change until `shutdown`. Bursts of
    /// events (an editor's save) are coalesced into one reload.
    pub fn watch(self: &Arc<Self>, shutdown: CancellationToken) -> notify::Result<()> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if let Ok(event) = event {
                if !event.kind.is_access() {
                    let _ = tx.send(());
                }
            }
        })?;
        watcher.watch(&self.dir, RecursiveMode::Recursive)?;
        let registry = self.clone();
        tokio::spawn(async move {
            let _watcher = watcher; // lives as long as this task
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    got = rx.recv() => if got.is_none() { return },
                }
                // Debounce: wait until the folder has been quiet for a moment.
                loop {
                    match tokio::time::timeout(Duration::from_millis(150), rx.recv()).await {
                        Ok(Some(())) => continue,
                        Ok(None) => return,
                        Err(_) => break,
                    }
                }
                let registry = registry.clone();
                let _ = tokio::task::spawn_blocking(move || registry.reload()).await;
            }
        });
        Ok(())
    }
}

/// A formation keeps its load time while its revision stays the same.
fn loaded_times(old: &Live, new: &BTreeMap<String, Arc<Formation>>, now: i64) -> BTreeMap<String, i64> {
    new.iter()
        .map(|(id, formation)| {
            let same = old.formations.get(id).is_some_and(|previous| previous.revision == formation.revision);
            let at = if same { old.loaded_at.get(id).copied().unwrap_or(now) } else { now };
            (id.clone(), at)
        })
        .collect()
}

fn log_changes(old: &BTreeMap<String, Arc<Formation>>, new: &BTreeMap<String, Arc<Formation>>) {
    for (id, formation) in new {
        match old.get(id) {
            None => tracing::info!(formation = %id, file = %formation.source.display(), "formation loaded"),
            Some(previous) if !Arc::ptr_eq(previous, formation) && previous.revision != formation.revision => {
                tracing::info!(formation = %id, revision = %formation.revision, "formation reloaded")
            }
            _ => {}
        }
    }
    for id in old.keys().filter(|id| !new.contains_key(*id)) {
        tracing::info!(formation = %id, "formation removed");
    }
}

/// Generated keys are shown once, on the terminal, when they are created; they
/// never go through the log.
fn print_generated_keys(id: &str, keys: &crate::formation::ApiKeys) {
    eprintln!(
        "generated keys for formation `{id}` (kept in the data folder):\n  admin key:  {}\n  client key: {}",
        keys.admin.as_deref().unwrap_or_default(),
        keys.client.as_deref().unwrap_or_default()
    );
}
