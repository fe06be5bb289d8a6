//! Wires storage, the actor pipeline and the HTTP server together, and runs
//! the shutdown sequence:
//!
//! 1. `draining` is set: `/ready` and new intake requests answer 503 (the
//!    listener stays open, so load balancers and clients see why);
//!    requests already past that check finish (each is answered only
//!    after its group commit).
//! 2. The Batcher processes what the WAL holds, partial batch included,
//!    until it is caught up or `drain_timeout` has passed.
//! 3. The listener closes and open connections finish (bounded).
//! 4. The actors stop; the store is flushed. What was not processed stays
//!    in the WAL for the next start.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorRef};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::config::{Config, Durability, LogFormat};
use crate::http::{self, Api};
use crate::pipeline::supervisor::{Supervisor, SupervisorMsg};
use crate::pipeline::{Context, Names, Pipeline, Status};
use crate::storage::sled::{SledOptions, SledStorage};
use crate::storage::{Storage, StorageError};

/// Why the daemon could not start or did not stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot create data directory {path}: {reason}")]
    DataDir { path: String, reason: String },
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("cannot listen on {addr}: {reason}")]
    Bind { addr: String, reason: String },
    #[error("the actor pipeline did not start: {0}")]
    Spawn(String),
    #[error("the actor pipeline stopped: {0}")]
    PipelineStopped(String),
}

/// A started daemon.
pub struct Running {
    /// The address actually bound (port 0 resolved).
    pub addr: SocketAddr,
    /// The pipeline handle (tests inspect it).
    pub pipeline: Pipeline,
    /// The configuration it runs with.
    config: Arc<Config>,
    /// The root of the actor tree.
    supervisor: ActorRef<SupervisorMsg>,
    /// Completes when the supervisor stops (on purpose or not).
    supervisor_done: JoinHandle<()>,
    /// Tells the HTTP server to stop accepting.
    stop_http: oneshot::Sender<()>,
    /// Completes when every connection has finished.
    http_done: JoinHandle<()>,
    /// The idempotency-key sweeper.
    sweeper: JoinHandle<()>,
}

/// Installs the global log subscriber (once per process).
pub fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _ = match config.log_format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Opens the store in `config.data_dir`.
pub fn open_storage(config: &Config) -> Result<Arc<dyn Storage>, AppError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|e| AppError::DataDir {
        path: config.data_dir.display().to_string(),
        reason: e.to_string(),
    })?;
    let options = SledOptions {
        cache_bytes: config.cache_capacity_mb * 1024 * 1024,
        background_flush_ms: (config.durability == Durability::Interval)
            .then_some(config.flush_interval_ms),
    };
    Ok(Arc::new(SledStorage::open(&config.data_dir, &options)?))
}

/// Starts everything on `storage`; the sinks are built from the config
/// unless given.
pub async fn start(
    config: Config,
    storage: Arc<dyn Storage>,
    sinks: Option<Vec<Arc<dyn crate::sinks::Sink>>>,
) -> Result<Running, AppError> {
    let config = Arc::new(config);
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    let context = Arc::new(Context {
        sinks: sinks.unwrap_or_else(|| crate::sinks::build(&config)),
        sources: crate::pipeline::sources(&config),
        config: config.clone(),
        storage,
        status: Arc::new(Status::default()),
        names: Names::unique(),
    });
    let (supervisor, supervisor_done) = Actor::spawn(None, Supervisor, context.clone())
        .await
        .map_err(|e| AppError::Spawn(e.to_string()))?;
    let pipeline = Pipeline {
        context: context.clone(),
    };

    let listener = tokio::net::TcpListener::bind(config.bind_addr())
        .await
        .map_err(|e| AppError::Bind {
            addr: config.bind.clone(),
            reason: e.to_string(),
        });
    let listener = match listener {
        Ok(l) => l,
        Err(e) => {
            supervisor.stop(None);
            return Err(e);
        }
    };
    let addr = listener.local_addr().map_err(|e| AppError::Bind {
        addr: config.bind.clone(),
        reason: e.to_string(),
    })?;
    let (stop_http, stopped) = oneshot::channel::<()>();
    let routes = http::routes(Api::new(pipeline.clone(), config.clone()));
    let http_done = tokio::spawn(http::server::serve(
        listener,
        routes,
        http::server::Limits {
            header_read_timeout: Duration::from_secs(config.header_read_timeout_secs),
            max_connections: config.max_connections,
        },
        async move {
            let _ = stopped.await;
        },
    ));
    let sweeper = tokio::spawn(sweep_keys(context.clone()));
    tracing::info!(%addr, data_dir = %config.data_dir.display(), durability = ?config.durability,
        sinks = context.sinks.len(), "inletd is accepting events");
    Ok(Running {
        addr,
        pipeline,
        config,
        supervisor,
        supervisor_done,
        stop_http,
        http_done,
        sweeper,
    })
}

impl Running {
    /// Runs until `shutdown` completes, then drains. Fails if the pipeline
    /// stops on its own (restart budget exhausted).
    pub async fn run_until(mut self, shutdown: impl Future<Output = ()>) -> Result<(), AppError> {
        tokio::select! {
            _ = shutdown => {}
            _ = &mut self.supervisor_done => {
                self.sweeper.abort();
                self.http_done.abort();
                let _ = self.pipeline.context.storage.flush();
                return Err(AppError::PipelineStopped("restart budget exhausted".into()));
            }
        }
        self.stop().await;
        Ok(())
    }

    /// The drain sequence (module docs).
    pub async fn stop(self) {
        let started = Instant::now();
        let deadline = self.config.drain_timeout();
        let context = &self.pipeline.context;
        context.status.draining.store(true, Ordering::SeqCst);
        let caught_up = self.pipeline.drain(deadline).await;
        let _ = self.stop_http.send(());
        let left = deadline
            .saturating_sub(started.elapsed())
            .max(Duration::from_secs(1));
        if tokio::time::timeout(left, self.http_done).await.is_err() {
            tracing::warn!("connections still open at the drain deadline");
        }
        self.sweeper.abort();
        let _ = self
            .supervisor
            .stop_and_wait(None, Some(Duration::from_secs(5)))
            .await;
        let storage = context.storage.clone();
        let flushed = tokio::task::spawn_blocking(move || storage.flush()).await;
        let remaining = context.status.queue_depth();
        tracing::info!(
            caught_up,
            remaining,
            took_ms = started.elapsed().as_millis() as u64,
            flushed = matches!(flushed, Ok(Ok(()))),
            "drained; what remains stays in the queue"
        );
    }
}

/// Starts the daemon and runs it until `shutdown` completes.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), AppError> {
    init_logging(&config);
    let storage = open_storage(&config)?;
    let running = start(config, storage, None).await?;
    running.run_until(shutdown).await
}

/// Once a minute: removes expired idempotency keys and prunes the
/// rolling-window buckets that no window reaches any more.
async fn sweep_keys(context: Arc<Context>) {
    const BATCH: usize = 10_000;
    let mut every = tokio::time::interval(Duration::from_secs(60));
    loop {
        every.tick().await;
        let storage = context.storage.clone();
        let stale = crate::event::now_ms() - crate::analytics::WINDOW_RETENTION_MINUTES * 60_000;
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || storage.prune_windows(stale)).await
        {
            tracing::warn!(error = %e, "pruning rolling-window buckets failed");
        }
        let before = crate::event::now_ms() - context.config.idempotency_ttl_ms();
        loop {
            let storage = context.storage.clone();
            match tokio::task::spawn_blocking(move || storage.sweep_keys(before, BATCH)).await {
                Ok(Ok(n)) if n == BATCH => continue,
                Ok(Ok(n)) => {
                    if n > 0 {
                        tracing::debug!(removed = n, "expired idempotency keys swept");
                    }
                    break;
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "sweeping idempotency keys failed");
                    break;
                }
                Err(_) => break,
            }
        }
    }
}
