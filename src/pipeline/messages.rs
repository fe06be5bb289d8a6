//! The typed messages of every actor, and the payloads they carry.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use ractor::RpcReplyPort;

use super::Live;
use crate::event::{BodyError, FieldError, Queued};
use crate::signature::{SignatureError, SignedHeaders};
use crate::storage::{BatchAck, DlqEntry, NewEvent};

/// What the HTTP layer hands the Receiver.
#[derive(Debug)]
pub struct IngestRequest {
    /// The configured source the request came in on.
    pub source: String,
    /// One event or a batch.
    pub shape: Shape,
    /// The request's Content-Type header, checked by the Receiver.
    pub content_type: Option<String>,
    /// The headers a signature scheme may need, checked by the Receiver.
    pub signed: SignedHeaders,
    /// The raw body (already size-limited by the HTTP layer).
    pub body: Bytes,
    /// Receipt time (wall clock, ms since epoch) stored with each event.
    pub received_at_ms: i64,
    /// Receipt time (monotonic) for the receipt→accepted histogram.
    pub received: Instant,
    /// The config and sources it was admitted under: its signature check
    /// and limits use these, so a reload while its body arrives does not
    /// judge it by rules its headers were not read for.
    pub live: Arc<Live>,
}

/// The two request shapes.
#[derive(Debug, Clone)]
pub enum Shape {
    /// `POST …/events`: one event; the key may come from a header.
    Single { header_key: Option<String> },
    /// `POST …/batch`, `POST /events`: `{"events":[…]}`.
    Batch,
}

/// The fate of one event of a request, in request order.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Stored durably (or, in interval mode, written) under this id.
    Accepted { event_id: String },
    /// Seen before within the TTL; not stored again.
    Duplicate { event_id: String },
    /// Another instance of the deployment is committing the same key right
    /// now; not stored here. Retry: it is then a duplicate, or new if that
    /// commit failed.
    InProgress { event_id: String },
    /// Broke the schema; not stored.
    Rejected(FieldError),
}

/// Why a request as a whole was not taken.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum IngestError {
    #[error("{0}")]
    Body(BodyError),
    #[error("signature check failed: {0}")]
    Signature(SignatureError),
    #[error("content type `{}` is not JSON; send Content-Type: application/json", .0.as_deref().unwrap_or("(none)"))]
    NotJson(Option<String>),
    #[error("the queue could not be written: {0}")]
    Storage(String),
    #[error("the pipeline is restarting; retry shortly")]
    Unavailable,
}

/// The answer to an ingest request: one verdict per event.
pub type IngestResult = Result<Vec<Verdict>, IngestError>;

/// Receiver: parses and validates, then hands on without waiting.
pub enum ReceiverMsg {
    Ingest(IngestRequest, RpcReplyPort<IngestResult>),
}

/// A validated request waiting for the group commit.
pub struct AppendRequest {
    /// The events to check and append, in request order.
    pub events: Vec<NewEvent>,
    /// For each of `events`, its index in `verdicts`.
    pub slots: Vec<usize>,
    /// Verdicts so far; rejected ones are final, the others are filled in.
    pub verdicts: Vec<Verdict>,
    /// Monotonic receipt time, for the ack latency.
    pub received: Instant,
    /// Where the answer goes once the group is durable.
    pub reply: RpcReplyPort<IngestResult>,
}

/// Deduper: idempotency check + WAL append + group commit.
pub enum DeduperMsg {
    /// A request to add to the next group.
    Append(AppendRequest),
    /// With Redis: commit everything gathered so far (sent by the Deduper
    /// to itself).
    Commit,
}

/// Batcher: turns the WAL into micro-batches.
pub enum BatcherMsg {
    /// Records up to `upto` are in the WAL. `records` are the ones a group
    /// commit just wrote and synced, in seq order (empty when only the WAL
    /// has them: a DLQ replay's, or a group not synced yet under
    /// `durability = "interval"`): a Batcher that is caught up hands them
    /// on without reading them back.
    Appended { upto: u64, records: Vec<Queued> },
    /// The batch timeout fired.
    Tick,
    /// The Processor finished (and acknowledged) the batch ending at this seq.
    Done(u64),
    /// Forget the in-flight batch and re-read from the ack cursor (after a restart).
    Reset,
    /// Process everything now; answer when the WAL is caught up.
    Drain(RpcReplyPort<()>),
}

/// Processor: delivers a batch to every sink and acknowledges it.
pub enum ProcessorMsg {
    /// Deliver `records` (one or more micro-batches of `batch_size`, each
    /// sent to the sinks on its own) and move the cursor to `upto` (its last
    /// seq, or past a gap of quarantined records) in one commit.
    Process { records: Vec<Queued>, upto: u64 },
    /// Deliver events taken over from a dead instance (they are not in
    /// this WAL), park what fails in this DLQ, and answer what analytics
    /// counts of them: the takeover adds it to that instance's figures in
    /// Redis, not to this instance's counts.
    Foreign {
        records: Vec<Queued>,
        reply: RpcReplyPort<Result<BatchAck, String>>,
    },
}

/// One DLQ entry and its id.
#[derive(Debug, Clone)]
pub struct DlqItem {
    /// The entry's id (for show, replay, delete).
    pub id: u64,
    /// The entry.
    pub entry: DlqEntry,
}

/// What a replay did.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayReport {
    /// Entries moved back into the queue.
    pub replayed: usize,
    /// Entries still parked (a replay of "all" moves at most `limit`).
    pub remaining: u64,
}

/// DLQ: the admin side of the dead-letter queue.
pub enum DlqMsg {
    List {
        after: u64,
        limit: usize,
        reply: RpcReplyPort<Result<Vec<DlqItem>, String>>,
    },
    Get {
        id: u64,
        reply: RpcReplyPort<Result<Option<DlqItem>, String>>,
    },
    /// Replays the given ids, or the oldest `limit` entries when `ids` is None.
    Replay {
        ids: Option<Vec<u64>>,
        limit: usize,
        reply: RpcReplyPort<Result<ReplayReport, String>>,
    },
    /// Removes the given ids, or every entry when None; answers how many.
    Remove {
        ids: Option<Vec<u64>>,
        reply: RpcReplyPort<Result<usize, String>>,
    },
}

/// Something worth counting.
#[derive(Debug, Clone)]
pub enum Observation {
    /// A group commit answered its requests: events accepted, duplicates,
    /// and each request's seconds from receipt to its answer.
    Ingested {
        accepted: u64,
        duplicates: u64,
        latencies: Vec<f64>,
    },
    /// Events or requests rejected, by reason.
    Rejected { reason: &'static str, count: u64 },
    /// A batch was processed; receipt→processed seconds of each event.
    Batch {
        events: u64,
        failed: u64,
        latencies: Vec<f64>,
    },
    /// A sink delivery attempt failed with `error` and will be retried.
    Retry { sink: String, error: String },
    /// Where a sink's circuit breaker stands after a batch.
    Sink(SinkHealth),
    /// Events parked in the DLQ for a sink.
    DeadLettered { sink: String, count: u64 },
    /// Events a sink took.
    Delivered { sink: String, count: u64 },
    /// An actor was restarted by the supervisor.
    Restart { actor: &'static str },
    /// Damaged records moved out of the WAL into quarantine.
    Quarantined { count: u64 },
}

/// Metrics: counters, gauges and histograms in Prometheus text format.
pub enum MetricsMsg {
    Observe(Observation),
    Render(RpcReplyPort<String>),
    /// Latency, sink health and the intake rate, for `/stats/*` and the
    /// dashboard.
    Live(RpcReplyPort<LiveFigures>),
}

/// What the Metrics actor knows that the store does not: figures since
/// start.
#[derive(Debug, Clone, Default)]
pub struct LiveFigures {
    /// Latency percentiles.
    pub latency: LatencySummary,
    /// Every sink that reported since start, by name.
    pub sinks: Vec<SinkHealth>,
    /// Events accepted and processed per second, recent seconds.
    pub rate: RateSeries,
}

/// A sink's health as its circuit breaker sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkHealth {
    /// The sink's configured name.
    pub name: String,
    /// What an operator should read first.
    pub state: SinkState,
    /// Batches in a row that failed (0 when ok).
    pub consecutive_failures: u32,
    /// The last error the sink gave, kept while it is not ok.
    pub last_error: Option<String>,
    /// While the circuit is open: when it lets a probe through (ms since epoch).
    pub open_until_ms: Option<i64>,
}

impl SinkHealth {
    /// A sink with nothing against it: configured, and not yet failed.
    pub fn ok(name: &str) -> Self {
        SinkHealth {
            name: name.to_owned(),
            state: SinkState::Ok,
            consecutive_failures: 0,
            last_error: None,
            open_until_ms: None,
        }
    }
}

/// A sink's state as its circuit breaker sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkState {
    /// Its last batch was delivered (or none was sent yet).
    Ok,
    /// Deliveries are failing and being tried again.
    Retrying,
    /// The circuit breaker isolates it: batches go to the DLQ untried.
    Open,
}

/// Events per second over the last [`RATE_SECONDS`] whole seconds, oldest
/// first: the dashboard's intake chart.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RateSeries {
    /// The end of the last second counted (ms since epoch).
    pub end_ms: i64,
    /// Events accepted (written to the queue) in each second.
    pub accepted: Vec<u64>,
    /// Events processed (their batch committed) in each second.
    pub processed: Vec<u64>,
}

/// How many seconds [`RateSeries`] covers: five minutes.
pub const RATE_SECONDS: usize = 300;

/// Latency percentiles in milliseconds, estimated from the histograms.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LatencySummary {
    /// Receipt→processed, median.
    pub p50: f64,
    /// Receipt→processed, 99th percentile.
    pub p99: f64,
    /// Receipt→durable answer, median.
    pub ack_p50: f64,
    /// Receipt→durable answer, 99th percentile.
    pub ack_p99: f64,
}
