//! Wires storage, the actor pipeline and the HTTP server together, and runs
//! the shutdown sequence:
//!
//! 1. `draining` is set: `/ready` and new intake requests answer 503 (the
//!    listener stays open, so load balancers and clients see why);
//!    requests already past that check finish first (each is answered only
//!    after its group commit), so that everything answered 202 is in the
//!    WAL before step 2; they get at most half of `drain_timeout`.
//! 2. The Batcher processes what the WAL holds, partial batch included,
//!    until it is caught up or `drain_timeout` (counted from step 1) has
//!    passed.
//! 3. The listener closes and open connections finish (bounded).
//! 4. The actors stop; the store is flushed. What was not processed stays
//!    in the WAL for the next start.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorRef};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

use crate::config::{Config, Durability, LogFormat, redacted_redis_url};
use crate::http::{self, Api};
use crate::mirror::Mirror;
use crate::pipeline::supervisor::{Supervisor, SupervisorMsg};
use crate::pipeline::takeover::takeover_rounds;
use crate::pipeline::{Context, Live, Pipeline, blocking, every_publish_interval};
use crate::storage::sled::{SledOptions, SledStorage};
use crate::storage::{Storage, StorageError};

/// Why the daemon could not start or did not stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot create data directory {path}: {reason}")]
    DataDir { path: String, reason: String },
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("cannot listen on {addr}: {reason}")]
    Bind { addr: String, reason: String },
    #[error("the actor pipeline did not start: {0}")]
    Spawn(String),
    #[error(transparent)]
    Redis(#[from] crate::mirror::MirrorError),
    #[error("the actor pipeline stopped: {0}")]
    PipelineStopped(String),
    #[error(
        "the store stopped answering: {what} has not returned after {waited_secs} s (store_stall_secs)"
    )]
    StoreStalled { what: String, waited_secs: u64 },
}

/// A started daemon.
pub struct Running {
    /// The address actually bound (port 0 resolved).
    pub addr: SocketAddr,
    /// The pipeline handle (tests inspect it).
    pub pipeline: Pipeline,
    /// What the pipeline runs on: the drain, the timers and the watchdog
    /// use the store and the status directly.
    context: Arc<Context>,
    /// The root of the actor tree.
    supervisor: ActorRef<SupervisorMsg>,
    /// Completes when the supervisor stops (on purpose or not).
    supervisor_done: JoinHandle<()>,
    /// Tells the HTTP server to stop accepting.
    stop_http: oneshot::Sender<()>,
    /// Completes when every connection has finished.
    http_done: JoinHandle<()>,
    /// Timers: the idempotency-key sweeper, and the Redis mirror's round
    /// when Redis is on.
    background: Vec<JoinHandle<()>>,
}

/// Changes the log filter of the running process (SIGHUP).
static LOG_FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Installs the global log subscriber (once per process): JSON lines under
/// systemd (journald sets `JOURNAL_STREAM`) or when asked, text otherwise.
pub fn init_logging(config: &Config) {
    let filter = EnvFilter::try_new(&config.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let json = match config.log_format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => std::env::var_os("JOURNAL_STREAM").is_some() && !terminal,
    };
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(terminal)
        .with_writer(std::io::stderr);
    let fmt = if json {
        fmt.json().boxed()
    } else {
        fmt.boxed()
    };
    if tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init()
        .is_ok()
    {
        let _ = LOG_FILTER.set(handle);
    }
}

/// Reads the configuration again and puts what can change live in force:
/// log level, sources and their secrets and rate limits, sinks, batch and
/// retry policy, limits. A config that does not load is refused and the
/// old one kept.
pub fn reload(context: &Context) {
    let current = context.live().config.clone();
    let (new, ignored) = match current.reload() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "reload refused; the running configuration is unchanged");
            return;
        }
    };
    for key in &ignored {
        tracing::warn!(
            key,
            "changed in the file but only takes effect after a restart"
        );
    }
    for warning in &new.warnings {
        tracing::warn!("{warning}");
    }
    if new.log_level != current.log_level
        && let Some(handle) = LOG_FILTER.get()
        && let Ok(filter) = EnvFilter::try_new(&new.log_level)
    {
        let _ = handle.modify(|f| *f = filter);
    }
    let sources = new.sources.len();
    let sinks = new.sinks.len();
    context.set_live(Live::new(new, None));
    tracing::info!(sources, sinks, "configuration reloaded");
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
    // `Config::load` checks a loaded config; one built in code (an embedder,
    // a test) is checked here, so that no setting out of range reaches an
    // actor.
    config.validate()?;
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    let live = Live::new(config, sinks);
    let config = live.config.clone();
    let sink_count = live.sinks.len();
    let mirror = if config.redis.enabled() {
        let mirror = Mirror::connect(&config.redis)?;
        tracing::info!(url = %redacted_redis_url(&config.redis.url), instance = mirror.instance(),
            "sharing idempotency keys and figures through redis");
        Some(mirror)
    } else {
        None
    };
    let context = Arc::new(Context::new(live, storage).with_mirror(mirror.clone()));
    if let Some(mirror) = &mirror {
        // Before the Processor starts, and before the first publish
        // replaces what a takeover left.
        resume_after_takeover(&context, mirror).await;
    }
    let (supervisor, supervisor_done) = Actor::spawn(None, Supervisor, context.clone())
        .await
        .map_err(|e| AppError::Spawn(e.to_string()))?;
    let pipeline = Pipeline::new(context.clone());

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
    let routes = http::routes(Api::new(pipeline.clone()));
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
    let mut background = vec![tokio::spawn(sweep_keys(context.clone()))];
    if config.durability == Durability::Fsync {
        background.push(tokio::spawn(settle_acks(context.clone())));
    }
    if let Some(mirror) = mirror {
        background.push(tokio::spawn(mirror_rounds(context.clone(), mirror.clone())));
        background.push(tokio::spawn(analytics_rounds(
            context.clone(),
            mirror.clone(),
        )));
        background.push(tokio::spawn(takeover_rounds(context.clone(), mirror)));
    }
    tracing::info!(%addr, data_dir = %config.data_dir.display(), durability = ?config.durability,
        sinks = sink_count, "inletd is accepting events");
    Ok(Running {
        addr,
        pipeline,
        context,
        supervisor,
        supervisor_done,
        stop_http,
        http_done,
        background,
    })
}

impl Running {
    /// The registry name of the actor playing `role` (tests kill it and
    /// watch the supervisor restart it).
    pub fn actor_name(&self, role: &str) -> String {
        self.context.names.of(role)
    }

    /// Runs until `shutdown` completes, then drains. Fails if the pipeline
    /// stops on its own (restart budget exhausted).
    pub async fn run_until(mut self, shutdown: impl Future<Output = ()>) -> Result<(), AppError> {
        tokio::select! {
            _ = shutdown => {}
            stalled = watch_store_writes(self.context.clone()) => {
                // No drain: it would wait on the same store. What was
                // answered 202 is on disk; the rest was never answered.
                abort_all(&self.background);
                self.http_done.abort();
                return Err(stalled);
            }
            _ = &mut self.supervisor_done => {
                abort_all(&self.background);
                self.http_done.abort();
                let _ = blocking(&self.context.storage, |s| s.flush()).await;
                return Err(AppError::PipelineStopped("restart budget exhausted".into()));
            }
        }
        self.stop().await;
        Ok(())
    }

    /// The drain sequence (module docs).
    pub async fn stop(self) {
        let started = Instant::now();
        let deadline = self.context.live().config.drain_timeout();
        let context = &self.context;
        context.status.draining.store(true, Ordering::SeqCst);
        // What the requests in flight commit must be in the WAL before the
        // Batcher drains it: they were answered 202. A client that sends its
        // body slowly gets half the drain's time, not all of it; what such a
        // request commits later stays queued for the next start.
        let settled = context.status.intake_settled(deadline / 2).await;
        if !settled {
            tracing::warn!(
                "intake requests still in flight after half of drain_timeout; draining without them"
            );
        }
        let caught_up = self
            .pipeline
            .drain(deadline.saturating_sub(started.elapsed()))
            .await
            && settled;
        let _ = self.stop_http.send(());
        let left = deadline
            .saturating_sub(started.elapsed())
            .max(Duration::from_secs(1));
        if tokio::time::timeout(left, self.http_done).await.is_err() {
            tracing::warn!("connections still open at the drain deadline");
        }
        abort_all(&self.background);
        let _ = self
            .supervisor
            .stop_and_wait(None, Some(Duration::from_secs(5)))
            .await;
        // The deployment's totals get this instance's last figures.
        if let Some(mirror) = &context.mirror {
            mirror_round(context, mirror).await;
        }
        let flushed = blocking(&context.storage, |s| s.close()).await;
        let remaining = context.status.queue_depth();
        tracing::info!(
            caught_up,
            remaining,
            took_ms = started.elapsed().as_millis() as u64,
            flushed = flushed.is_ok(),
            "drained; what remains stays in the queue"
        );
    }
}

/// Starts the daemon and runs it until `shutdown` completes.
///
/// Under systemd (`Type=notify`) it reports READY=1 once the store is open
/// and the listener bound, STOPPING=1 when the drain starts, and pings the
/// watchdog when `WatchdogSec` is set. SIGHUP reloads the configuration.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), AppError> {
    init_logging(&config);
    // Registered before anything else: a SIGHUP's default action is to exit.
    let hangups = signal_hook_tokio::Signals::new([signal_hook::consts::SIGHUP]);
    let storage = open_storage(&config)?;
    let running = start(config, storage, None).await?;
    let reloader = tokio::spawn(reload_on_sighup(hangups, running.context.clone()));
    let watchdog = tokio::spawn(watchdog(running.context.clone()));
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    let stopping = async {
        shutdown.await;
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    };
    let result = running.run_until(stopping).await;
    reloader.abort();
    watchdog.abort();
    result
}

/// Reloads the configuration on every SIGHUP.
async fn reload_on_sighup(
    signals: std::io::Result<signal_hook_tokio::Signals>,
    context: Arc<Context>,
) {
    use futures_util::StreamExt;
    let Ok(mut signals) = signals else {
        tracing::warn!("cannot listen for SIGHUP; reload needs a restart");
        return;
    };
    while signals.next().await.is_some() {
        tracing::info!("SIGHUP: reloading the configuration");
        reload(&context);
    }
}

/// Pings systemd's watchdog at half its interval, each time after the
/// store has answered a read: sled 0.34 can deadlock under heavy writes
/// (spacejam/sled#1412; seen here once in interval mode, BENCHMARKS.md), and
/// a daemon whose store hangs must be restarted, not kept alive by a
/// runtime that still ticks. A store that answers with an error is not
/// hung (the reopen logic deals with it). Acknowledged events are on disk,
/// so systemd's restart loses none.
async fn watchdog(context: Arc<Context>) {
    let Some(interval) = sd_notify::watchdog_enabled().filter(|d| !d.is_zero()) else {
        return;
    };
    let mut every = tokio::time::interval(interval / 2);
    let mut probe: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        every.tick().await;
        // At most one probe at a time: a hung one is not joined by more.
        let running = probe.get_or_insert_with(|| {
            let context = context.clone();
            tokio::spawn(async move {
                let _ = blocking(&context.storage, |s| s.queue_info()).await;
            })
        });
        match tokio::time::timeout(interval / 4, running).await {
            Ok(_) => {
                probe = None;
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            }
            Err(_) => tracing::error!(
                waited_ms = interval.as_millis() as u64 / 4,
                "the store has not answered a read; withholding the watchdog ping so that systemd restarts inletd"
            ),
        }
    }
}

/// Resolves once a storage write has been in flight for longer than
/// `store_stall_secs` (read at each check, so a reload applies), having
/// logged what it was.
async fn watch_store_writes(context: Arc<Context>) -> AppError {
    let mut every = tokio::time::interval(Duration::from_millis(250));
    loop {
        every.tick().await;
        let limit = context.live().config.store_stall();
        if let Some((waited, what)) = context.status.store_writes.oldest()
            && waited > limit
        {
            tracing::error!(
                %what,
                waited_ms = waited.as_millis() as u64,
                "the store stopped answering; exiting non-zero so that the service manager restarts inletd"
            );
            return AppError::StoreStalled {
                what,
                waited_secs: waited.as_secs(),
            };
        }
    }
}

/// Once a minute: removes expired idempotency keys, prunes the
/// rolling-window buckets that no window reaches any more, and merges the
/// trends' user records of the days just over.
/// Makes the acknowledgements of processed batches durable within a
/// second (`fsync` mode). Intake's group commits flush them too, but an
/// idle daemon would otherwise keep them in sled's memory, and after a
/// crash deliver everything processed since the last event again.
async fn settle_acks(context: Arc<Context>) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut settled = context.status.cursor.load(Ordering::Relaxed);
    loop {
        every.tick().await;
        let cursor = context.status.cursor.load(Ordering::Relaxed);
        if cursor == settled {
            continue;
        }
        match blocking(&context.storage, |s| s.flush()).await {
            Ok(()) => settled = cursor,
            Err(e) => tracing::warn!(error = %e, "flushing acknowledged batches failed"),
        }
    }
}

fn abort_all(tasks: &[JoinHandle<()>]) {
    for task in tasks {
        task.abort();
    }
}

/// With Redis on, at start: the events of this store that another
/// instance delivered while it was stopped (from this store's last
/// publish to the taker's cursor, `crate::mirror`'s `handoff.rs`) are
/// counted here but not delivered again. Those between the store's durable
/// cursor and its last publish are delivered again: what this store did
/// not make durable (a DLQ entry too) is done again.
async fn resume_after_takeover(context: &Context, mirror: &Mirror) {
    let read = blocking(&context.storage, |s| Ok((s.store_id()?, s.queue_info()?))).await;
    let Ok((store_id, queue)) = read else {
        return;
    };
    let Some((from, upto)) = mirror.taken_while_stopped(store_id).await else {
        return;
    };
    // Only what this store still holds and has not processed.
    let (from, upto) = (from.max(queue.cursor), upto.min(queue.last_seq));
    if upto > from {
        *context
            .status
            .delivered_elsewhere
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = (from, upto);
        tracing::info!(
            events = upto - from,
            after = from,
            upto,
            "events of this store were delivered while it was stopped, by the instance \
             that took its queue over: counted here, not delivered again"
        );
    }
}

/// Every `publish_interval_ms`: the Redis mirror's round (module docs of
/// [`crate::mirror`]), which carries this instance's heartbeat.
async fn mirror_rounds(context: Arc<Context>, mirror: Arc<Mirror>) {
    let mut every = every_publish_interval(&context);
    loop {
        every.tick().await;
        mirror_round(&context, &mirror).await;
    }
}

/// Every `publish_interval_ms`, what the deployment's analytics need read
/// from the store: the rolling windows' minutes and the first days noted
/// since the last round, then the heals that are due (windows first: they
/// are the cheapest). Their own task, apart from the round that carries
/// the heartbeat: a heal may read a month of users, or every user, and
/// the heartbeat must not wait for it (nor does the last round at a stop).
async fn analytics_rounds(context: Arc<Context>, mirror: Arc<Mirror>) {
    let mut every = every_publish_interval(&context);
    loop {
        every.tick().await;
        let windows = context.live().config.windows.clone();
        mirror
            .share_windows(&windows, |minute| {
                blocking(&context.storage, move |s| {
                    crate::analytics::minute_cells(s, minute)
                })
            })
            .await;
        mirror
            .share_first_days(|users| {
                blocking(&context.storage, move |s| {
                    crate::analytics::first_days(s, &users)
                })
            })
            .await;
        mirror
            .heal_windows(&windows, |minute| {
                blocking(&context.storage, move |s| {
                    crate::analytics::minute_members(s, minute)
                })
            })
            .await;
        mirror
            .heal_dau(|day| {
                blocking(&context.storage, move |s| {
                    crate::analytics::users_of_day(s, day)
                })
            })
            .await;
        mirror
            .heal_cohorts(|after, page| {
                blocking(&context.storage, move |s| {
                    crate::analytics::first_days_page(s, after.as_deref(), page)
                })
            })
            .await;
    }
}

/// Probes Redis if it was down, writes the key backlog, publishes this
/// instance's processed counts and shares the users and sessions it
/// processed since the last round ([`analytics_rounds`] does the rest).
async fn mirror_round(context: &Arc<Context>, mirror: &Mirror) {
    let today = crate::analytics::day_of(crate::event::now_ms());
    let first_shared_day = mirror.first_shared_day();
    let counted = blocking(&context.storage, move |s| {
        // Tomorrow too, as the day sets: a sender's clock a little ahead.
        s.counted(first_shared_day, today + 1)
    })
    .await;
    match counted {
        Ok(counted) => {
            mirror
                .maintain(&counted, context.live().config.idempotency_ttl_ms())
                .await
        }
        Err(e) => tracing::warn!(error = %e, "reading the counts to publish to redis failed"),
    }
}

async fn sweep_keys(context: Arc<Context>) {
    const BATCH: usize = 10_000;
    let mut every = tokio::time::interval(Duration::from_secs(60));
    loop {
        every.tick().await;
        let stale = crate::event::now_ms() - crate::analytics::WINDOW_RETENTION_MINUTES * 60_000;
        if let Err(e) = blocking(&context.storage, move |s| s.prune_windows(stale)).await {
            tracing::warn!(error = %e, "pruning rolling-window buckets failed");
        }
        // The last three days before today, whose batches are over (an
        // event for an older day, rare, keeps its own record).
        let today = crate::analytics::day_of(crate::event::now_ms());
        if let Err(e) = blocking(&context.storage, move |s| {
            s.merge_user_records(today - 3, today - 1)
        })
        .await
        {
            tracing::warn!(error = %e, "merging trends' user records failed");
        }
        let before = crate::event::now_ms() - context.live().config.idempotency_ttl_ms();
        loop {
            match blocking(&context.storage, move |s| s.sweep_keys(before, BATCH)).await {
                Ok(n) if n == BATCH => continue,
                Ok(n) => {
                    if n > 0 {
                        tracing::debug!(removed = n, "expired idempotency keys swept");
                    }
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "sweeping idempotency keys failed");
                    break;
                }
            }
        }
    }
}
