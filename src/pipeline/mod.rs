//! The supervised actor pipeline:
//!
//! ```text
//! HTTP ─► Receiver ─► Deduper ─► WAL ─► Batcher ─► Processor ─► sinks
//!                        └── answer after the group commit   └─► DLQ
//! ```
//!
//! [`Pipeline`] is the handle everything outside uses: admission, queries
//! and every call to an actor go through it.
//!
//! Actors find each other by name in ractor's registry, so a restarted
//! actor is reachable under the same name ([`Names`] keeps the actor it
//! found until that one stops). Names carry a per-pipeline prefix so that
//! several pipelines can live in one process (tests).

pub mod batcher;
mod breaker;
pub mod deduper;
pub mod dlq;
mod handle;
pub mod messages;
pub mod metrics;
pub mod processor;
pub mod receiver;
pub mod supervisor;
pub mod takeover;

pub use handle::{
    Admission, Pipeline, QueueStatus, Readiness, Refusal, StatsAnswer, StatsError, Summary,
};

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use ractor::{ActorRef, Message};

use crate::config::Config;
use crate::mirror::Mirror;
use crate::ratelimit::TokenBucket;
use crate::signature::Verifier;
use crate::sinks::Sink;
use crate::storage::{Storage, StorageError};
use messages::{
    BatcherMsg, DeduperMsg, DlqMsg, MetricsMsg, Observation, ProcessorMsg, ReceiverMsg,
};

/// Live figures shared by the actors, `app` and [`Pipeline`], read without
/// asking an actor.
#[derive(Debug, Default)]
pub struct Status {
    /// Set once on SIGTERM: intake answers 503, /ready answers 503.
    pub draining: AtomicBool,
    /// Cleared when a commit to storage fails; set again by the next success.
    pub storage_failed: AtomicBool,
    /// Highest seq durable in the WAL.
    pub last_seq: AtomicU64,
    /// The ack cursor.
    pub cursor: AtomicU64,
    /// The last seq of the batch the Processor holds, 0 while it holds
    /// none: a restarted Batcher waits for that batch to be acknowledged
    /// instead of handing it out a second time.
    pub processing: AtomicU64,
    /// Intake requests past the draining check and not yet answered: the
    /// drain waits for them before it processes the WAL.
    intake_in_flight: AtomicUsize,
    /// Storage writes in flight, watched for a store that stopped answering.
    pub store_writes: StoreWrites,
    /// The seqs after the first and up to the second were delivered by
    /// another instance that took this one's queue over while it was
    /// stopped (Redis, `handoff.rs`): the Processor counts them but does
    /// not deliver them again. Set once at start.
    pub delivered_elsewhere: Mutex<(u64, u64)>,
}

/// Storage writes in flight (group commits, batch commits): a store that
/// stops answering leaves one here, and the daemon's stall watch exits
/// rather than hang with requests unanswered (`store_stall_secs`).
#[derive(Debug, Default)]
pub struct StoreWrites {
    /// The id of the next write.
    next: AtomicU64,
    /// Each write in flight: since when, and what it is.
    in_flight: Mutex<HashMap<u64, (Instant, StoreWriteKind)>>,
}

/// What a storage write in flight is; rendered only when one stalls, so
/// that registering costs no allocation on the hot path.
#[derive(Debug, Clone, Copy)]
pub enum StoreWriteKind {
    /// The Deduper's append and flush of one group.
    GroupCommit { events: usize, requests: usize },
    /// The Processor's acknowledgement of a batch.
    BatchAck { upto: u64, events: usize },
}

impl std::fmt::Display for StoreWriteKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreWriteKind::GroupCommit { events, requests } => {
                write!(
                    f,
                    "a group commit of {events} events from {requests} requests"
                )
            }
            StoreWriteKind::BatchAck { upto, events } => {
                write!(
                    f,
                    "acknowledging the batch up to seq {upto} ({events} events)"
                )
            }
        }
    }
}

/// A storage write in flight; it leaves [`StoreWrites`] when dropped.
pub struct StoreWrite<'a> {
    writes: &'a StoreWrites,
    id: u64,
}

impl Drop for StoreWrite<'_> {
    fn drop(&mut self) {
        self.writes.lock().remove(&self.id);
    }
}

impl StoreWrites {
    /// Registers a write until the returned guard drops.
    pub fn begin(&self, what: StoreWriteKind) -> StoreWrite<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, (Instant::now(), what));
        StoreWrite { writes: self, id }
    }

    /// The write in flight the longest: for how long, and what it is.
    pub fn oldest(&self) -> Option<(Duration, String)> {
        self.lock()
            .values()
            .min_by_key(|(since, _)| *since)
            .map(|(since, what)| (since.elapsed(), what.to_string()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (Instant, StoreWriteKind)>> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An intake request in flight; counted until dropped.
pub struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Status {
    /// Counts an intake request in, or answers `None` once draining. A
    /// request that got `Some` is waited for by [`Status::intake_settled`]:
    /// both sides use `SeqCst`, so either the request sees `draining` or the
    /// drain sees the request.
    pub fn begin_intake(&self) -> Option<InFlight<'_>> {
        self.intake_in_flight.fetch_add(1, Ordering::SeqCst);
        let guard = InFlight(&self.intake_in_flight);
        (!self.draining.load(Ordering::SeqCst)).then_some(guard)
    }

    /// Once `draining` is set: waits until every intake request that got
    /// past the check is answered, or `limit` passes; `false` if it passed.
    pub async fn intake_settled(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while self.intake_in_flight.load(Ordering::SeqCst) > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        true
    }

    /// Events waiting in the WAL.
    pub fn queue_depth(&self) -> u64 {
        self.last_seq
            .load(Ordering::Relaxed)
            .saturating_sub(self.cursor.load(Ordering::Relaxed))
    }
}

/// Registry names of one pipeline's actors, and the actor last found for
/// each role.
#[derive(Debug, Clone)]
pub struct Names {
    /// Makes the names unique within the process.
    prefix: String,
    /// Each role's actor as last found in the registry (shared by clones):
    /// used while it runs, so that a message on the request path costs no
    /// name built and looked up. ractor takes an actor out of the registry
    /// as it starts to stop, so one that is stopping or stopped is looked
    /// up again, and its restarted successor found.
    found: Arc<[parking_lot::Mutex<Option<ractor::ActorCell>>; ROLES]>,
}

impl Names {
    /// Fresh names, unique within this process.
    pub fn unique() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        Names {
            prefix: format!("inletd{}", NEXT.fetch_add(1, Ordering::Relaxed)),
            found: Arc::new(std::array::from_fn(|_| parking_lot::Mutex::new(None))),
        }
    }

    /// The registry name of actor `role`.
    pub fn of(&self, role: &str) -> String {
        format!("{}.{role}", self.prefix)
    }

    /// The live actor playing `role`, if any.
    pub fn find<M: Message>(&self, role: Role<M>) -> Option<ActorRef<M>> {
        let mut found = self.found[role.slot].lock();
        if let Some(cell) = found.as_ref()
            && cell.get_status() < ractor::ActorStatus::Stopping
        {
            return Some(cell.clone().into());
        }
        *found = ractor::registry::where_is(self.of(role.name));
        found.clone().map(Into::into)
    }

    /// Sends `msg` to `role`; a missing actor (mid-restart) drops it.
    pub fn cast<M: Message>(&self, role: Role<M>, msg: M) {
        if let Some(actor) = self.find::<M>(role) {
            let _ = actor.cast(msg);
        }
    }

    /// Records an observation with the Metrics actor.
    pub fn observe(&self, observation: Observation) {
        self.cast(METRICS, MetricsMsg::Observe(observation));
    }
}

/// How many roles there are: [`Names`] keeps one actor for each.
const ROLES: usize = 6;

/// An actor's role: the suffix of its registry name, and the messages it
/// takes, so that a lookup can only ask for the type the actor has.
pub struct Role<M> {
    /// The registry name suffix (and the `actor` label of restarts).
    pub name: &'static str,
    /// Its place in [`Names`]' actors found (below [`ROLES`]).
    slot: usize,
    /// The actor's message type.
    messages: PhantomData<fn() -> M>,
}

impl<M> Role<M> {
    const fn new(name: &'static str, slot: usize) -> Self {
        Role {
            name,
            slot,
            messages: PhantomData,
        }
    }
}

impl<M> Clone for Role<M> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<M> Copy for Role<M> {}

/// The actors' roles.
pub const RECEIVER: Role<ReceiverMsg> = Role::new("receiver", 0);
pub const DEDUPER: Role<DeduperMsg> = Role::new("deduper", 1);
pub const BATCHER: Role<BatcherMsg> = Role::new("batcher", 2);
pub const PROCESSOR: Role<ProcessorMsg> = Role::new("processor", 3);
pub const DLQ: Role<DlqMsg> = Role::new("dlq", 4);
pub const METRICS: Role<MetricsMsg> = Role::new("metrics", 5);

/// What a reload (SIGHUP) may change, swapped as a whole: readers take
/// one snapshot per message or request and see a consistent set.
pub struct Live {
    /// The configuration in force.
    pub config: Arc<Config>,
    /// Every source by name (`default` always).
    pub sources: HashMap<String, Source>,
    /// The forwarding sinks.
    pub sinks: Vec<Arc<dyn Sink>>,
}

impl std::fmt::Debug for Live {
    /// The names of the sources and how many sinks: the config and the
    /// verifiers hold secrets, so neither is shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live")
            .field("sources", &self.sources.keys().collect::<Vec<_>>())
            .field("sinks", &self.sinks.len())
            .finish()
    }
}

/// A source's runtime parts.
pub struct Source {
    /// Its signature check, if it has one.
    pub verifier: Option<Verifier>,
    /// Its rate limit, if it has one.
    pub limiter: Option<TokenBucket>,
}

impl Live {
    /// Builds the runtime parts of `config`; sinks from the config unless given.
    pub fn new(config: Config, sinks: Option<Vec<Arc<dyn Sink>>>) -> Live {
        let mut sources: HashMap<String, Source> = config
            .sources
            .iter()
            .map(|s| {
                let source = Source {
                    verifier: s.verifier(),
                    limiter: s.rate_limit_per_sec.map(TokenBucket::new),
                };
                (s.name.clone(), source)
            })
            .collect();
        sources.entry("default".to_owned()).or_insert(Source {
            verifier: None,
            limiter: None,
        });
        Live {
            sinks: sinks.unwrap_or_else(|| crate::sinks::build(&config)),
            config: Arc::new(config),
            sources,
        }
    }
}

/// What every actor is started with.
pub struct Context {
    /// Config, sources and sinks; replaced on reload.
    live: RwLock<Arc<Live>>,
    /// The store.
    pub storage: Arc<dyn Storage>,
    /// Figures the actors, `app` and [`Pipeline`] share.
    pub status: Arc<Status>,
    /// Where the other actors are.
    pub names: Names,
    /// The deployment's Redis, when `[redis] url` is set.
    pub mirror: Option<Arc<Mirror>>,
}

impl Context {
    /// A context for a new pipeline.
    pub fn new(live: Live, storage: Arc<dyn Storage>) -> Self {
        Context {
            live: RwLock::new(Arc::new(live)),
            storage,
            status: Arc::new(Status::default()),
            names: Names::unique(),
            mirror: None,
        }
    }

    /// The same context, sharing keys and figures through `mirror`.
    pub fn with_mirror(mut self, mirror: Option<Arc<Mirror>>) -> Self {
        self.mirror = mirror;
        self
    }

    /// The current config, sources and sinks.
    pub fn live(&self) -> Arc<Live> {
        self.live.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Puts a reloaded config, sources and sinks in force.
    pub fn set_live(&self, live: Live) {
        *self.live.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(live);
    }
}

/// Runs a storage call off the async worker threads (there are two): every
/// storage call from an actor, [`Pipeline`] or a timer goes through here
/// (but `Storage::queue_bytes`, an atomic read that never blocks), so that
/// a slow or hung store holds a blocking-pool thread, never the runtime.
pub async fn blocking<T: Send + 'static>(
    storage: &Arc<dyn Storage>,
    call: impl FnOnce(&dyn Storage) -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    let storage = storage.clone();
    tokio::task::spawn_blocking(move || call(storage.as_ref()))
        .await
        .map_err(|e| StorageError::Io(format!("storage task failed: {e}")))?
}

/// Error type shared by actors for unexpected failures (they crash the
/// actor, and the supervisor restarts it).
pub type ActorError = ractor::ActorProcessingErr;

/// Ticks every `[redis] publish_interval_ms`, a late tick delayed rather
/// than bunched: the pace of the Redis rounds, the DAU heal and takeovers.
pub fn every_publish_interval(context: &Context) -> tokio::time::Interval {
    let period = std::time::Duration::from_millis(context.live().config.redis.publish_interval_ms);
    let mut every = tokio::time::interval(period);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every
}
