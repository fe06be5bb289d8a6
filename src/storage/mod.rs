//! Durable state: the write-ahead queue, idempotency keys, the ack cursor,
//! the built-in counters and the dead-letter queue.
//!
//! # Design
//!
//! Everything inletd promises rests on this module; `sled.rs` is the only
//! file that imports sled, `memory.rs` is the reference model that tests
//! compare it with.
//!
//! ## Layout (sled trees)
//!
//! | tree          | key                                   | value                                 |
//! |---------------|---------------------------------------|---------------------------------------|
//! | `wal`         | seq (u64 big-endian)                  | record envelope ([`encode_record`])   |
//! | `idempotency` | source `\0` key                       | first seen ms (i64 BE) ‖ seq (u64 BE) |
//! | `idem_expiry` | first seen ms (i64, sign bit flipped, BE) ‖ source `\0` key | empty            |
//! | `meta`        | `cursor`, `format_version`, `dlq_last`, `queue_bytes` | u64 BE                |
//! | `counts`      | event type                            | u64 BE                                |
//! | `dlq`         | id (u64 BE)                           | record envelope of a [`DlqEntry`]     |
//! | `aggregates`  | see [`crate::analytics`]              | counts, user days, cohorts, windows   |
//! | `quarantine`  | tree name `\0` original key           | the raw bytes that failed to decode   |
//!
//! ## Invariants
//!
//! 1. **Check and append are one transaction.** [`Storage::append`] looks up
//!    each idempotency key and, for a new one, writes the key and the WAL
//!    record together. Keys repeated inside one group are duplicates of the
//!    first. A key older than the TTL counts as absent.
//! 2. **Nothing is acknowledged to a client before [`Storage::flush`]
//!    returns.** The Deduper writes a whole group of requests, flushes once
//!    (group commit), then answers all of them.
//! 3. **The cursor moves with the counters.** [`Storage::commit_batch`]
//!    removes processed records, adds their counts and analytics
//!    aggregates, parks failures in the DLQ and moves the cursor in one
//!    transaction, skipping any seq at or
//!    below the cursor; so a batch processed twice (a crash before the ack,
//!    an actor restart) is counted once. Sinks are at-least-once.
//! 4. **Seqs only grow.** The next seq is `max(last WAL key, cursor) + 1`,
//!    so an emptied queue never reuses a number.
//! 5. **Nothing undecodable crashes the daemon.** Each record carries a
//!    format version and a CRC-32; a record that fails either check is moved
//!    to `quarantine` and reported by tree and position.
//!
//! ## Flushing
//!
//! `durability = "fsync"`: the Deduper calls `flush()` after each group;
//! the ack path does not flush (a lost ack only means re-delivery, and the
//! next group commit flushes it anyway). `durability = "interval"`: sled
//! flushes every `flush_interval_ms` in the background and `flush()` is not
//! called on the request path.

pub mod memory;
pub mod sled;

use serde::{Deserialize, Serialize};

use crate::analytics::{Facts, KvRead};
use crate::event::{Queued, WalRecord};

/// The largest record body decoded: far above any record (bodies are at
/// most `max_body_bytes`, itself capped at 32 MiB).
pub const MAX_RECORD_BYTES: usize = 64 * 1024 * 1024;

/// The on-disk format this build writes and reads.
pub const FORMAT_VERSION: u8 = 1;

/// Errors from the store. None of them is a panic.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The underlying store failed (I/O, disk full, ...).
    #[error("storage I/O failed: {0}")]
    Io(String),
    /// The data directory was written by a newer inletd.
    #[error(
        "data directory has format version {found}; this inletd reads up to {supported}: upgrade inletd"
    )]
    NewerFormat { found: u64, supported: u8 },
    /// The store cannot be opened at all.
    #[error(
        "cannot open the store at {path}: {reason}. Is another inletd using this data_dir? \
         Check the directory's owner, permissions and free space; a store that sled cannot \
         read can be moved aside (the daemon then starts empty)"
    )]
    Open { path: String, reason: String },
}

/// Why a record envelope did not decode.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RecordError {
    #[error("record is {0} bytes, shorter than its header")]
    Truncated(usize),
    #[error("record has format version {0}, newer than this build's")]
    NewerVersion(u8),
    #[error("record checksum mismatch")]
    Checksum,
    #[error("record body does not decode: {0}")]
    Body(String),
}

/// One new event for [`Storage::append`].
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// The record to append; `record.source` and `record.key` form the
    /// idempotency key.
    pub record: WalRecord,
}

/// What [`Storage::append`] did with one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendOutcome {
    /// Stored at this seq.
    Accepted { seq: u64 },
    /// The key was seen before (within the TTL); nothing was written.
    Duplicate { first_seen_ms: i64 },
}

/// A record that could not be decoded and was moved aside.
#[derive(Debug, Clone, PartialEq)]
pub struct Quarantined {
    /// Tree and position of the damaged record.
    pub position: String,
    /// Why it did not decode.
    pub reason: String,
}

/// One (event, sink) pair that kept failing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DlqEntry {
    /// The sink that failed.
    pub sink: String,
    /// The last error that sink gave.
    pub error: String,
    /// How many deliveries were tried.
    pub attempts: u32,
    /// When the first attempt failed (ms since epoch).
    pub first_failed_ms: i64,
    /// When the last attempt failed (ms since epoch).
    pub last_failed_ms: i64,
    /// The event, as the WAL held it.
    pub record: WalRecord,
}

/// Everything the Processor commits for one batch, in one transaction.
#[derive(Debug, Clone, Default)]
pub struct BatchAck {
    /// The highest seq of the batch: the cursor moves here.
    pub upto: u64,
    /// Every seq of the batch with what analytics counts of it; `None` for
    /// DLQ replays, which were counted the first time.
    pub processed: Vec<(u64, Option<Facts>)>,
    /// Processing time: decides which events feed the rolling windows.
    pub now_ms: i64,
    /// Failures to park, each with the seq of the event it belongs to.
    pub dead: Vec<(u64, DlqEntry)>,
}

/// Queue figures for `/admin/queue` and the high-water check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct QueueInfo {
    /// Encoded bytes of the records waiting in the WAL (`max_queue_bytes`).
    pub bytes: u64,
    /// Records waiting in the WAL: `last_seq - cursor` (O(1); a quarantined
    /// record still counts until the cursor passes it).
    pub depth: u64,
    /// The ack cursor: every seq at or below it is done.
    pub cursor: u64,
    /// The highest seq ever assigned.
    pub last_seq: u64,
    /// Receipt time of the oldest waiting record (ms since epoch).
    pub oldest_received_ms: Option<i64>,
}

/// The store. Implementations are internally synchronised; the pipeline
/// calls them from blocking tasks. As [`KvRead`] it exposes the analytics
/// aggregates to the `/stats` queries.
pub trait Storage: KvRead + Send + Sync + 'static {
    /// Checks and appends a group in one transaction (invariant 1). Does
    /// not flush. `ttl_ms` is the idempotency window.
    fn append(
        &self,
        events: &[NewEvent],
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<Vec<AppendOutcome>, StorageError>;

    /// Makes every write so far durable.
    fn flush(&self) -> Result<(), StorageError>;

    /// Up to `limit` records with seq greater than `after`, in order.
    /// Records that do not decode are quarantined and reported, not returned.
    fn read_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<Queued>, Vec<Quarantined>), StorageError>;

    /// Commits a processed batch (invariant 3).
    fn commit_batch(&self, ack: &BatchAck) -> Result<(), StorageError>;

    /// Depth, bytes, cursor and last seq.
    fn queue_info(&self) -> Result<QueueInfo, StorageError>;

    /// Encoded bytes waiting in the WAL; cheap enough for every request.
    fn queue_bytes(&self) -> u64;

    /// Accepted-event counts by type, from the built-in counter.
    fn counts(&self) -> Result<Vec<(String, u64)>, StorageError>;

    /// Removes rolling-window buckets of events older than `before_ms`.
    fn prune_windows(&self, before_ms: i64) -> Result<usize, StorageError>;

    /// Removes idempotency keys first seen before `before_ms`; at most
    /// `limit` per call. Returns how many were removed.
    fn sweep_keys(&self, before_ms: i64, limit: usize) -> Result<usize, StorageError>;

    /// Up to `limit` DLQ entries with id greater than `after`.
    fn dlq_list(&self, after: u64, limit: usize) -> Result<Vec<(u64, DlqEntry)>, StorageError>;

    /// One DLQ entry.
    fn dlq_get(&self, id: u64) -> Result<Option<DlqEntry>, StorageError>;

    /// Removes DLQ entries; returns how many existed.
    fn dlq_remove(&self, ids: &[u64]) -> Result<usize, StorageError>;

    /// Number of DLQ entries.
    fn dlq_len(&self) -> Result<u64, StorageError>;

    /// Moves DLQ entries back into the WAL, each addressed to its own sink
    /// only, in one transaction. Returns the ids moved and the last seq.
    fn dlq_replay(&self, ids: &[u64]) -> Result<(Vec<u64>, u64), StorageError>;
}

/// Wraps a serialisable value in the versioned, checksummed envelope:
/// `version (1 byte) ‖ crc32 of body (4 bytes BE) ‖ bincode body`.
pub fn encode_record<T: Serialize>(value: &T) -> Vec<u8> {
    // Encoding plain structs of strings and integers into a Vec cannot fail.
    let body = bincode::serde::encode_to_vec(value, bincode::config::standard())
        .expect("bincode encodes inletd's own records");
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(FORMAT_VERSION);
    out.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Opens an envelope written by [`encode_record`].
pub fn decode_record<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, RecordError> {
    if bytes.len() < 5 {
        return Err(RecordError::Truncated(bytes.len()));
    }
    if bytes[0] > FORMAT_VERSION {
        return Err(RecordError::NewerVersion(bytes[0]));
    }
    let crc = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    let body = &bytes[5..];
    if crc32fast::hash(body) != crc {
        return Err(RecordError::Checksum);
    }
    // A damaged length prefix must not make bincode allocate without bound
    // (found by fuzzing: it aborted the process); no record is near this.
    let config = bincode::config::standard().with_limit::<MAX_RECORD_BYTES>();
    let (value, _) = bincode::serde::decode_from_slice(body, config)
        .map_err(|e| RecordError::Body(e.to_string()))?;
    Ok(value)
}

/// The idempotency key of a record within its source scope.
pub fn scoped_key(record: &WalRecord) -> Vec<u8> {
    let mut k = Vec::with_capacity(record.source.len() + 1 + record.key.len());
    k.extend_from_slice(record.source.as_bytes());
    k.push(0);
    k.extend_from_slice(record.key.as_bytes());
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> WalRecord {
        WalRecord {
            source: "default".into(),
            key: "k".into(),
            event_type: "t".into(),
            received_at_ms: 1,
            occurred_at_ms: 2,
            only_sink: None,
            body: "{}".into(),
        }
    }

    #[test]
    fn envelope_round_trips_and_detects_damage() {
        let bytes = encode_record(&record());
        assert_eq!(decode_record::<WalRecord>(&bytes).unwrap(), record());
        let mut flipped = bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0xff;
        assert_eq!(
            decode_record::<WalRecord>(&flipped),
            Err(RecordError::Checksum)
        );
        assert_eq!(
            decode_record::<WalRecord>(&bytes[..3]),
            Err(RecordError::Truncated(3))
        );
        let mut newer = bytes.clone();
        newer[0] = FORMAT_VERSION + 1;
        assert_eq!(
            decode_record::<WalRecord>(&newer),
            Err(RecordError::NewerVersion(2))
        );
    }
}
