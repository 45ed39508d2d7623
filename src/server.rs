//! Wires the parts together and runs the server until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::api::{self, AppState};
use crate::engine::Engine;
use crate::registry::Registry;
use crate::store::postgres::PgStore;
use crate::store::sqlite::SqliteStore;
use crate::store::Store;
use crate::webhooks::{Dispatcher, FormationLookup};

/// How `muxi-rt serve` was asked to run.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub dir: PathBuf,
    pub listen: String,
    pub data_dir: PathBuf,
    pub allow_webhook_hosts: Vec<String>,
    /// Extra `Host` values the MCP endpoint accepts (`*`: any).
    pub mcp_allowed_hosts: Vec<String>,
    /// Serve the web console at `/console`.
    pub console: bool,
    /// The formation also served at `/v1/...` (see `api::root`).
    pub default_formation: Option<String>,
    /// Record metrics and serve `GET /metrics` (`--no-metrics` turns both off).
    pub metrics: bool,
    /// The bearer token `GET /metrics` asks for on the main listener (`None`: open).
    pub metrics_token: Option<String>,
    /// Serve `GET /metrics` on this address instead of the main listener.
    pub metrics_listen: Option<String>,
    /// A server-wide rate limit per API key (`--rate-limit`).
    pub rate_limit: Option<crate::formation::Rate>,
    /// A PostgreSQL URL: the store is shared with other replicas.
    pub database_url: Option<String>,
}

/// How long in-flight HTTP calls get to finish after a shutdown signal.
const GRACE: Duration = Duration::from_secs(10);

pub async fn serve(config: ServeConfig) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create the data folder {}", config.data_dir.display()))?;
    if config.metrics {
        crate::observability::metrics::install().map_err(anyhow::Error::msg)?;
    }
    // One server per data folder; held until the process exits.
    let _lock = crate::data_lock::DataLock::acquire(&config.data_dir)?;
    let owner = crate::engine::owner_id();
    let store: Arc<dyn Store> = match &config.database_url {
        // The URL may hold a password: it is never put in a message.
        Some(url) => Arc::new(PgStore::connect(url).await.context("cannot open the PostgreSQL store")?),
        None => Arc::new(
            SqliteStore::open(&config.data_dir)
                .with_context(|| format!("cannot open the store in {}", config.data_dir.display()))?,
        ),
    };
    let registry = Arc::new(Registry::load(&config.dir, &config.data_dir));
    let shutdown = CancellationToken::new();
    registry.watch(shutdown.clone()).with_context(|| format!("cannot watch {}", config.dir.display()))?;

    let lookup: FormationLookup = {
        let registry = registry.clone();
        Arc::new(move |id: &str| registry.get(id))
    };
    let dispatcher = Arc::new(
        Dispatcher::new(store.clone(), lookup, config.allow_webhook_hosts.clone(), owner.clone())
            .context("cannot build the webhook client")?,
    );
    let engine = Engine::new(store.clone(), registry.clone(), dispatcher.clone(), owner, shutdown.clone());
    let dispatcher = dispatcher.spawn(shutdown.clone());

    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;

    // Agents an earlier server left running die before their work is run
    // again (safe: the lock says that server is gone).
    crate::agents::lifetime::sweep(&config.data_dir).context("cannot sweep leftover agent processes")?;
    // With SQLite the lock proves that no other server uses this store: take
    // over at once. Other replicas on PostgreSQL keep their leases until they expire.
    engine.recover(config.database_url.is_none()).await.context("cannot recover unfinished requests")?;
    engine.spawn_retention();

    let state = AppState::new(api::Shared {
        registry: registry.clone(),
        engine,
        allow_webhook_hosts: Arc::new(config.allow_webhook_hosts.clone()),
        mcp_allowed_hosts: Arc::new(crate::mcp::allowed_hosts(addr, &config.mcp_allowed_hosts)),
        started_at: std::time::Instant::now(),
        shutdown: shutdown.clone(),
        default_formation: config.default_formation.clone(),
        rate_limits: Arc::new(api::rate_limit::RateLimits::new(config.rate_limit)),
    });
    // Signal handlers are in place before anyone learns the address.
    let signals = Signals::install()?;
    let live = registry.snapshot();
    tracing::info!(
        formations = live.formations.len(),
        failed = live.failures.len(),
        "formations loaded from {}",
        config.dir.display()
    );
    // Tests and scripts read this line to find the port.
    println!("muxi-rt listening on http://{addr}");

    let app = api::router(state.clone());
    let app = if config.console { app.merge(crate::console::router()) } else { app };
    let metrics = crate::observability::endpoint::MetricsState {
        store: store.clone(),
        registry: registry.clone(),
        token: config.metrics_token.as_deref().map(Arc::from),
    };
    let app = match (&config.metrics_listen, config.metrics) {
        (_, false) => app,
        (None, true) => crate::observability::endpoint::router(metrics).merge(app),
        (Some(at), true) => {
            let listener = tokio::net::TcpListener::bind(at)
                .await
                .with_context(|| format!("cannot listen on {at} for metrics"))?;
            println!("muxi-rt metrics on http://{}/metrics", listener.local_addr()?);
            let stop = shutdown.clone();
            let router = crate::observability::endpoint::router(metrics);
            tokio::spawn(crate::http_server::serve(listener, router, async move { stop.cancelled().await }));
            app
        }
    };
    if config.metrics {
        crate::observability::endpoint::spawn_upkeep(shutdown.clone());
    }
    // The two routes clients call most are answered in front of the router.
    let app = api::front::Front::new(state, app);
    let server = crate::http_server::serve(listener, app, {
        let shutdown = shutdown.clone();
        async move {
            signals.wait().await;
            tracing::info!("shutting down");
            shutdown.cancel();
        }
    });
    let server = tokio::spawn(server);
    shutdown.cancelled().await;
    match tokio::time::timeout(GRACE, server).await {
        Ok(result) => result??,
        Err(_) => tracing::warn!("in-flight calls did not finish within {GRACE:?}; stopping anyway"),
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), dispatcher).await;
    Ok(())
}

/// SIGINT and SIGTERM, registered up front so neither can kill the process
/// before the graceful shutdown is ready for it.
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
        })
    }

    async fn wait(mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}
