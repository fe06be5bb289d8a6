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
//! | `wal`         | last seq of the segment (u64 BE)      | a segment: up to ~96 KiB of one group commit's records ([`encode_segment`]) |
//! | `idem_expiry` | first seen ms (i64, sign bit flipped, BE) ‖ last seq of the group (u64 BE) | the group's scoped keys, front-coded ([`encode_key_list`]) in at most 7 KiB: the durable idempotency index |
//! | `meta`        | `cursor`, `format_version`, `dlq_last`, `dlq_len`, `store_id`, `batch_commits` | u64 BE |
//! | `meta`        | `queue_bytes`                         | bytes waiting ‖ the last seq they count (u64 BE each) |
//! | `counts`      | event type                            | u64 BE                                |
//! | `dlq`         | id (u64 BE)                           | record envelope of a [`DlqEntry`]     |
//! | `aggregates`  | see [`crate::analytics`]              | counts, user days, cohorts, windows   |
//! | `quarantine`  | tree name `\0` original key           | the raw bytes that failed to decode   |
//! | `redo`        | part index (u32 BE)                   | the writes of the batch commit being made (`redo.rs`); empty between commits |
//!
//! ## Why packed records (format 3)
//!
//! sled pays per key written, whatever the batching: 7–17 µs an insert on
//! this class of machine (random 40-byte keys, measured alone), against about 3 µs
//! an event for a packed record. Format 1 wrote three keys per event,
//! format 2 one (the idempotency key). Format 3 writes none per event: a
//! group commit writes its records as WAL segments (split so that no value
//! passes sled's 128 KiB blob threshold), its keys as `idem_expiry`
//! entries, and the byte gauge. The log is the truth, the index is derived:
//!
//! - **The idempotency index lives in memory** (`index.rs`): a 32-bit tag
//!   of each key's fingerprint and a 32-bit group id in 8 bytes a slot,
//!   9.1–11.4 bytes a key. It is 64 parts, picked by 6 more bits of the
//!   fingerprint, so a lookup compares 38 bits; each part grows by a
//!   quarter on its own, so a growth holds a part twice, not the table.
//!   A tag hit is confirmed against the group's stored key list (one sled
//!   read, cached for the call), so a collision never drops an event; a
//!   new key pays that read with odds keys / 2^38. Fingerprints are SipHash with per-process random keys:
//!   clients cannot choose keys that collide.
//! - **A group is one `idem_expiry` entry**: a group commit whose keys
//!   encode in more than 7 KiB (ids that share few bytes, such as random
//!   ones) writes runs of consecutive seqs, each an entry and a group of
//!   its own, named by its last seq. sled splits a leaf past 16 entries
//!   and writes a page over 128 KiB as a blob file: small entries keep the
//!   tree's leaves in the log, where sled's cache weighs them by size.
//!   With one entry per commit, random ids made every leaf a blob that
//!   lived as long as its keys (batches: peak RSS 1.3 times the budget,
//!   and each flush that saw blobs change listed them all).
//! - **It is rebuilt at open** from every `idem_expiry` entry (the sweeper
//!   drops expired ones), and **expiry drops whole groups**: their entry
//!   and their index slots.
//! - A key accepted again after it expired lives in two groups; the newer
//!   answers, and sweeping the older does not count it.
//! - **Analytics' set members are cached too**: the sled store keeps the
//!   user-days, first times and minute members that committed batches
//!   found or wrote ([`crate::analytics::Known`], at most 32,768, about
//!   2.5 MiB), so a batch reads sled only for members it has not seen. It
//!   learns only after a commit's writes are made, and is empty after a
//!   start.
//!
//! A segment is removed once the cursor has passed its last seq; records
//! at or below the cursor inside a segment that is still there count as
//! gone (read_after skips them).
//!
//! Format 4 is format 3 whose `queue_bytes` also names the last seq it
//! counts (invariant 1). A format 3 store's 8-byte gauge holds for its
//! whole WAL: converting it writes the version, and every open of a store
//! whose gauge names no seq (a new one too) writes it with the last seq
//! before any group commit runs.
//!
//! Format 5 is format 4 whose batch commit (invariant 3) is plain writes
//! after a redo record, not a sled transaction: an older build would not
//! finish one a crash interrupted, so it refuses the store. Converting a
//! format 4 store writes the version only.
//!
//! Older stores are converted at open: format 1 and 2 WAL values are read
//! as they are (a version-1 WAL value is a single record, a segment of one);
//! format 1's expiry entries of one key (empty value, the key inside the
//! entry's own key) become lists of one when still current; the per-key
//! `idempotency` tree is dropped; the version is written last, so an
//! interrupted conversion runs again, and an older inletd refuses the store
//! rather than misreads it.

//! ## Invariants
//!
//! 1. **Check and append are one step.** Under the store's write lock,
//!    [`Storage::append`] looks up each idempotency key (index, then the
//!    stored key lists), writes the group's segments, then its key lists,
//!    then the byte gauge naming the group's last seq, and only then adds
//!    the keys to the index. Keys repeated inside one group are duplicates
//!    of the first. A key older than the TTL counts as absent.
//!    The three writes are plain inserts, not a sled transaction: each
//!    transaction writes sled's log buffer out twice more, and that was a
//!    quarter of a group commit's CPU. sled recovers a prefix of its log,
//!    so a crash can leave only the last group commit unfinished (segments
//!    without some of their key lists or bytes); the next open finishes it
//!    from the segments after the gauge's seq, keying those past the last
//!    key list written. Its events were never answered 202:
//!    a client's retry then finds their keys and is a duplicate.
//! 2. **Nothing is acknowledged to a client before [`Storage::flush`]
//!    returns.** The Deduper writes a whole group of requests, flushes once
//!    (group commit), then answers all of them.
//! 3. **The cursor moves with the counters.** [`Storage::commit_batch`]
//!    removes processed records, adds their counts and analytics
//!    aggregates, parks failures in the DLQ and moves the cursor as one
//!    atomic step, skipping any seq at or below the cursor; so a batch
//!    processed twice (a crash before the ack, an actor restart) is
//!    counted once. Sinks are at-least-once. The step is plain writes
//!    after a redo record that holds them all, with the values they leave
//!    (`redo.rs`): an open finishes a commit that a crash interrupted, and
//!    writing a value twice changes nothing. (A sled transaction wrote
//!    sled's log buffer out twice more, each time waiting for the device:
//!    4–5 % of the CPU an event costs.) Queries read without the lock, so
//!    one may see a batch half-written, never a batch counted twice.
//! 4. **Seqs only grow.** The next seq is `max(last WAL key, cursor) + 1`,
//!    so an emptied queue never reuses a number.
//! 5. **Nothing undecodable crashes the daemon.** Each record and segment
//!    carries a format version and a CRC-32; one that fails either check
//!    is moved to `quarantine` and reported by tree and position.
//! 6. **The byte gauge is exact.** `queue_bytes` is the sum, over the
//!    records above the cursor, of each record's size as its own envelope
//!    ([`encode_record`]); a segment's header lists those sizes, so an ack
//!    subtracts them without decoding the records. The DLQ's length is
//!    kept in `meta` the same way (sled's `len` walks the tree).
//! 7. **Less is never silent.** sled recovers a damaged log by dropping
//!    everything from the damage on, without an error. The mark
//!    (`mark.rs`, a file beside sled's) records the last durable seq while
//!    running and a summary at a clean stop; a start that finds less says
//!    so. Seqs above the cursor are contiguous in the WAL up to the last
//!    seq the store wrote, so a page lost in the middle shows as a gap,
//!    reported when it is read, unless it was set aside in `quarantine`
//!    (a damaged segment, or the tail a reopen after a failed write found
//!    missing). A read whose walk of the WAL ends below that seq (a
//!    damaged tree: an older copy of a node split since) walks on from
//!    the other end, and reports what neither walk finds.
//!
//! ## Flushing
//!
//! `durability = "fsync"`: the Deduper calls `flush()` after each group,
//! the DLQ actor after each replay and removal; the ack path does not flush
//! (a lost ack only means re-delivery, counted once since the counters
//! roll back with the cursor, and the next group commit flushes it anyway).
//! `durability = "interval"`: a background thread calls `flush()` every
//! `flush_interval_ms` and `flush()` is not called on the request path.
//! sled's own periodic flusher is off in both; the other work it did,
//! moving live pages out of mostly-dead log segments so that they are
//! reused, is a thread of the store's (`spawn_collector`, at most 2 ms
//! every 100 ms): without it the file grew to about four times its data.
//!
//! A flush is power-safe: sled's own ends in `sync_file_range`, which
//! persists neither the file size nor the drive's cache, and sled never
//! syncs `conf`, its blob files (values over `segment_size / 4`, 128 KiB)
//! or a directory. `SledStorage::flush` therefore lists the blob files
//! before and after sled's flush, fdatasyncs each one no earlier flush
//! settled and then `blobs/`, fdatasyncs `db`, and fsyncs the data
//! directory when its listing changed (a new snapshot); a flush through
//! which no file came or went (an inotify watch on both directories says
//! so) skips the listings and fdatasyncs `db` only. Opening the
//! store syncs `conf`, `db`, both directories and the data directory's
//! parent once. `tests/powercut.rs` runs the daemon on a filesystem that
//! drops every unsynced write at a simulated power cut.

mod index;
pub mod mark;
pub mod memory;
mod redo;
pub mod sled;

use serde::{Deserialize, Serialize};

use crate::analytics::{DayFigures, Facts, KvRead, Wanted};
use crate::event::{Queued, WalRecord};

/// The largest record body decoded: far above any record (bodies are at
/// most `max_body_bytes`, itself capped at 32 MiB).
pub const MAX_RECORD_BYTES: usize = 64 * 1024 * 1024;

/// The on-disk format this build writes (and the newest it reads): 2 packs
/// each group commit into one WAL segment, 3 keeps no sled key per event
/// (packed key lists, the index in memory), 4 writes a group commit
/// without a transaction, its byte gauge naming the last seq it counts
/// (invariant 1), 5 a batch commit too, after its redo record (invariant
/// 3). Record envelopes carry it too.
pub const FORMAT_VERSION: u8 = 5;

/// The envelope version of a WAL value that holds one bare [`WalRecord`]
/// (format 1, before segments).
const SINGLE_RECORD: u8 = 1;

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
    /// sled cannot read the store (it panicked or reported corruption).
    #[error(
        "the store at {path} is damaged: {reason}. Keep it aside (mv it), start inletd on an \
         empty data_dir, and see \"A damaged store\" in the README to recover what it holds"
    )]
    Damaged { path: String, reason: String },
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

/// Everything the Processor commits for one batch, as one atomic step (invariant 3).
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

/// How a sink failed an event: a [`DlqEntry`] but for the event itself.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkFailure {
    /// The sink that failed.
    pub sink: String,
    /// The last error that sink gave.
    pub error: String,
    /// How many deliveries were tried (0: none was, e.g. the circuit was open).
    pub attempts: u32,
    /// When the first attempt failed (ms since epoch).
    pub first_failed_ms: i64,
    /// When the last attempt failed (ms since epoch).
    pub last_failed_ms: i64,
}

impl BatchAck {
    /// The acknowledgement of a processed batch: `records` (as processed,
    /// with their enrichment) done up to `upto` at `now_ms`, what analytics
    /// counts of each (what `wanted` asks, and nothing of a DLQ replay, an
    /// event addressed to one sink, which was counted the first time), and
    /// one DLQ entry for each of `dead`, in its order. Pure: it reads no
    /// clock and writes nothing.
    pub fn of<'a>(
        records: &[Queued],
        upto: u64,
        now_ms: i64,
        wanted: Wanted,
        dead: impl IntoIterator<Item = (&'a Queued, SinkFailure)>,
    ) -> BatchAck {
        BatchAck {
            upto,
            processed: records
                .iter()
                .map(|q| {
                    let facts = q
                        .record
                        .only_sink
                        .is_none()
                        .then(|| Facts::of(&q.record, now_ms, wanted));
                    (q.seq, facts)
                })
                .collect(),
            now_ms,
            dead: dead
                .into_iter()
                .map(|(q, failure)| {
                    let entry = DlqEntry {
                        sink: failure.sink,
                        error: failure.error,
                        attempts: failure.attempts,
                        first_failed_ms: failure.first_failed_ms,
                        last_failed_ms: failure.last_failed_ms,
                        record: q.record.clone(),
                    };
                    (q.seq, entry)
                })
                .collect(),
        }
    }
}

/// The built-in counts as of one cursor ([`Storage::counted`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counted {
    /// Every seq at or below it is counted here, and none above.
    pub cursor: u64,
    /// Processed events per type, all time.
    pub by_type: Vec<(String, u64)>,
    /// Processed events and `sum_fields` sums per day (days since
    /// 1970-01-01) and type, over the days asked; the sums may include
    /// batches after `cursor`.
    pub days: DayFigures,
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
/// calls them from blocking tasks. As [`KvRead`] (with its own error) it
/// exposes the analytics aggregates to the `/stats` queries.
pub trait Storage: KvRead<Error = StorageError> + Send + Sync + 'static {
    /// Checks and appends a group as one step (invariant 1). Does
    /// not flush. `ttl_ms` is the idempotency window.
    fn append(
        &self,
        events: &[NewEvent],
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<Vec<AppendOutcome>, StorageError>;

    /// Makes every write so far durable.
    fn flush(&self) -> Result<(), StorageError>;

    /// The clean stop: flushes, and records what the store holds so that
    /// the next start can tell if it comes back with less (`mark`). A
    /// later write is still allowed; it withdraws that record.
    fn close(&self) -> Result<(), StorageError> {
        self.flush()
    }

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

    /// Encoded bytes waiting in the WAL; cheap enough for every request and
    /// never blocks (it may be called on the async threads). An error (the
    /// store is being reopened) is not "nothing waiting".
    fn queue_bytes(&self) -> Result<u64, StorageError>;

    /// Accepted-event counts by type, from the built-in counter.
    fn counts(&self) -> Result<Vec<(String, u64)>, StorageError>;

    /// The built-in counts, all time and per day and type for the days
    /// `from_day..=to_day`, with the cursor they count up to, read as one
    /// (no batch commits between the reads), and the sums of those days
    /// (read after): what an instance publishes to Redis, so that another
    /// can take over exactly the events after it.
    fn counted(&self, from_day: i32, to_day: i32) -> Result<Counted, StorageError>;

    /// A random number drawn when the store was created: tells this store
    /// from another started under the same `[redis] instance` name (a new
    /// data directory). 0: the store has none (the in-memory one).
    fn store_id(&self) -> Result<u64, StorageError> {
        Ok(0)
    }

    /// Parks `entries` in the DLQ, in one transaction: the failures of
    /// events this instance delivered for another (a takeover, see
    /// [`crate::mirror`]); they belong to no seq of this WAL.
    fn park(&self, entries: &[DlqEntry]) -> Result<(), StorageError>;

    /// Removes rolling-window buckets of events older than `before_ms`.
    fn prune_windows(&self, before_ms: i64) -> Result<usize, StorageError>;

    /// Merges trends' user records of the days `from_day..=to_day` into one
    /// per day and type ([`crate::analytics::merge_user_records`]), each
    /// merge in one transaction; answers how many records were merged away.
    fn merge_user_records(&self, from_day: i32, to_day: i32) -> Result<usize, StorageError>;

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

    /// Times this store was found holding less than it had acknowledged,
    /// since the process started: at open (the mark) or in the WAL (a
    /// gap). Each was logged as "acknowledged events are missing".
    fn missing_reports(&self) -> u64 {
        0
    }

    /// Moves DLQ entries back into the WAL, each addressed to its own sink
    /// only, in one transaction. Returns the ids moved and the last seq.
    fn dlq_replay(&self, ids: &[u64]) -> Result<(Vec<u64>, u64), StorageError>;
}

/// Wraps a serialisable value in the versioned, checksummed envelope:
/// `version (1 byte) ‖ crc32 of body (4 bytes BE) ‖ bincode body`.
pub fn encode_record<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = vec![0; ENVELOPE_HEADER];
    encode_body(value, &mut out);
    seal(out)
}

/// Opens an envelope written by [`encode_record`].
pub fn decode_record<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, RecordError> {
    let (_, body) = open_envelope(bytes)?;
    decode_body(body)
}

/// Version byte and checksum in front of every stored value.
const ENVELOPE_HEADER: usize = 5;

/// Appends the bincode encoding of `value` to `out`; returns its length.
fn encode_body<T: Serialize>(value: &T, out: &mut Vec<u8>) -> usize {
    let before = out.len();
    // Encoding plain structs of strings and integers into a Vec cannot fail.
    bincode::serde::encode_into_std_write(value, out, bincode::config::standard())
        .expect("bincode encodes inletd's own records");
    out.len() - before
}

/// Decodes the bincode value at the front of `body`.
fn decode_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, RecordError> {
    // A damaged length prefix must not make bincode allocate without bound
    // (found by fuzzing: it aborted the process); no record is near this.
    let config = bincode::config::standard().with_limit::<MAX_RECORD_BYTES>();
    let (value, _) = bincode::serde::decode_from_slice(body, config)
        .map_err(|e| RecordError::Body(e.to_string()))?;
    Ok(value)
}

/// Fills in the header of `out`, whose first [`ENVELOPE_HEADER`] bytes were
/// reserved: this build's version and the checksum of the rest.
fn seal(mut out: Vec<u8>) -> Vec<u8> {
    let crc = crc32fast::hash(&out[ENVELOPE_HEADER..]);
    out[0] = FORMAT_VERSION;
    out[1..ENVELOPE_HEADER].copy_from_slice(&crc.to_be_bytes());
    out
}

/// Checks an envelope's version and checksum; returns both and the body.
fn open_envelope(bytes: &[u8]) -> Result<(u8, &[u8]), RecordError> {
    if bytes.len() < ENVELOPE_HEADER {
        return Err(RecordError::Truncated(bytes.len()));
    }
    if bytes[0] > FORMAT_VERSION {
        return Err(RecordError::NewerVersion(bytes[0]));
    }
    let crc = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    let body = &bytes[ENVELOPE_HEADER..];
    if crc32fast::hash(body) != crc {
        return Err(RecordError::Checksum);
    }
    Ok((bytes[0], body))
}

/// Reads a big-endian integer of `N` bytes at `at`.
fn be<const N: usize>(body: &[u8], at: usize) -> Option<[u8; N]> {
    body.get(at..at.checked_add(N)?)?.try_into().ok()
}

/// Encodes `records`, which get the seqs `first`, `first + 1`, …, as one WAL
/// segment, keyed by its last seq. Returns the envelope and the size of each
/// record (that of its own [`encode_record`] envelope: invariant 6).
///
/// Body: `first (u64 BE) ‖ n (u32 BE) ‖ n × record length (u32 BE) ‖ the n
/// bincode records`, so that a reader finds any record, and an ack its size,
/// without decoding the others.
pub fn encode_segment(first: u64, records: &[&WalRecord]) -> (Vec<u8>, Vec<u64>) {
    let n = records.len();
    let table = ENVELOPE_HEADER + 12;
    let guess: usize = records.iter().map(|r| r.body.len() + 64).sum();
    let mut out = Vec::with_capacity(table + 4 * n + guess);
    out.resize(ENVELOPE_HEADER, 0);
    out.extend_from_slice(&first.to_be_bytes());
    out.extend_from_slice(&(n as u32).to_be_bytes());
    out.resize(table + 4 * n, 0);
    let mut sizes = Vec::with_capacity(n);
    for (i, record) in records.iter().enumerate() {
        let len = encode_body(record, &mut out);
        let at = table + 4 * i;
        out[at..at + 4].copy_from_slice(&(len as u32).to_be_bytes());
        sizes.push((len + ENVELOPE_HEADER) as u64);
    }
    (seal(out), sizes)
}

/// A WAL segment opened by [`decode_segment`]: checked, its records decoded
/// one at a time on demand.
#[derive(Debug)]
pub struct Segment<'a> {
    /// The seq of the first record.
    first: u64,
    /// Where each record's bincode lies in `body`.
    spans: Vec<std::ops::Range<usize>>,
    /// The envelope's body.
    body: &'a [u8],
}

impl Segment<'_> {
    /// The seq of the first record.
    pub fn first(&self) -> u64 {
        self.first
    }

    /// The seq of the last record (the segment's key).
    pub fn last(&self) -> u64 {
        self.first + self.spans.len() as u64 - 1
    }

    /// The size that [`QueueInfo::bytes`] counts for the record at `seq`;
    /// 0 if the segment does not hold it.
    pub fn size_of(&self, seq: u64) -> u64 {
        self.span(seq)
            .map_or(0, |s| (s.len() + ENVELOPE_HEADER) as u64)
    }

    /// Decodes the record at `seq`.
    pub fn record(&self, seq: u64) -> Result<WalRecord, RecordError> {
        let span = self
            .span(seq)
            .ok_or_else(|| RecordError::Body(format!("segment holds no seq {seq}")))?;
        decode_body(&self.body[span.clone()])
    }

    fn span(&self, seq: u64) -> Option<&std::ops::Range<usize>> {
        let i = usize::try_from(seq.checked_sub(self.first)?).ok()?;
        self.spans.get(i)
    }
}

/// Opens the WAL value stored under `key` (the segment's last seq): a
/// format-2 segment, or a format-1 single record (a segment of one).
pub fn decode_segment(key: u64, bytes: &[u8]) -> Result<Segment<'_>, RecordError> {
    let (version, body) = open_envelope(bytes)?;
    if version <= SINGLE_RECORD {
        return Ok(Segment {
            first: key,
            spans: std::iter::once(0..body.len()).collect(),
            body,
        });
    }
    let bad = |what: &str| RecordError::Body(format!("segment {what}"));
    let first = be::<8>(body, 0)
        .map(u64::from_be_bytes)
        .ok_or_else(|| bad("header is short"))?;
    let n = be::<4>(body, 8)
        .map(u32::from_be_bytes)
        .ok_or_else(|| bad("header is short"))? as usize;
    let table = 12usize;
    let mut at = n
        .checked_mul(4)
        .and_then(|t| t.checked_add(table))
        .filter(|end| *end <= body.len())
        .ok_or_else(|| bad("length table is longer than the segment"))?;
    if n == 0 || first.checked_add(n as u64 - 1) != Some(key) {
        return Err(bad(&format!(
            "of {n} records from seq {first} is not keyed by its last seq {key}"
        )));
    }
    let mut spans = Vec::with_capacity(n);
    for i in 0..n {
        let len = be::<4>(body, table + 4 * i)
            .map(u32::from_be_bytes)
            .unwrap_or(0) as usize;
        let end = at
            .checked_add(len)
            .filter(|e| *e <= body.len())
            .ok_or_else(|| bad("record runs past its end"))?;
        spans.push(at..end);
        at = end;
    }
    if at != body.len() {
        return Err(bad("has bytes after its last record"));
    }
    Ok(Segment { first, spans, body })
}

/// How a key list's body starts: front-coded (see [`encode_key_list`]).
/// The first build of format 3 wrote plain lists, `n × (length (u32 BE) ‖
/// key)`, which start with a zero byte (no key comes near 16 MiB); they
/// are still read.
const FRONT_CODED: u8 = 1;

/// Encodes one group's scoped idempotency keys for its `idem_expiry` entry,
/// in an envelope: `FRONT_CODED`, then the keys in byte order, each as
/// varint(bytes shared with the key before) ‖ varint(bytes of the rest) ‖
/// the rest. Keys of one source share its name, and ids that count up or
/// start with a time share most of their bytes: 3–6 bytes a key for such
/// ids, against 4 + the whole scoped key plain.
pub fn encode_key_list(keys: &[&[u8]]) -> Vec<u8> {
    let mut sorted = keys.to_vec();
    sorted.sort_unstable();
    let mut out = Vec::with_capacity(ENVELOPE_HEADER + 1 + keys.len() * 8);
    out.resize(ENVELOPE_HEADER, 0);
    out.push(FRONT_CODED);
    let mut before: &[u8] = &[];
    for key in sorted {
        let shared = before.iter().zip(key).take_while(|(a, b)| a == b).count();
        put_varint(&mut out, shared);
        put_varint(&mut out, key.len() - shared);
        out.extend_from_slice(&key[shared..]);
        before = key;
    }
    seal(out)
}

/// Calls `each` with every key of an entry written by [`encode_key_list`]
/// (or a plain list of the first build of format 3), in stored order;
/// returns how many. On an error, `each` may have seen some keys.
pub fn visit_key_list(bytes: &[u8], mut each: impl FnMut(&[u8])) -> Result<usize, RecordError> {
    let (_, body) = open_envelope(bytes)?;
    let cut = || RecordError::Body("key list is cut short".into());
    let mut n = 0;
    match body.first() {
        None => {}
        Some(0) => {
            let mut at = 0;
            while at < body.len() {
                let len = be::<4>(body, at).map(u32::from_be_bytes).ok_or_else(cut)? as usize;
                let key = body
                    .get(at + 4..(at + 4).saturating_add(len))
                    .ok_or_else(cut)?;
                each(key);
                n += 1;
                at += 4 + len;
            }
        }
        Some(&FRONT_CODED) => {
            let mut at = 1;
            let mut key = Vec::new();
            while at < body.len() {
                let shared = get_varint(body, &mut at).ok_or_else(cut)?;
                let rest = get_varint(body, &mut at).ok_or_else(cut)?;
                if shared > key.len() {
                    return Err(RecordError::Body(
                        "key list shares more than the key before".into(),
                    ));
                }
                let tail = body.get(at..at.saturating_add(rest)).ok_or_else(cut)?;
                key.truncate(shared);
                key.extend_from_slice(tail);
                each(&key);
                n += 1;
                at += rest;
            }
        }
        Some(other) => {
            return Err(RecordError::Body(format!(
                "key list of unknown encoding {other}"
            )));
        }
    }
    Ok(n)
}

/// The keys of an entry written by [`encode_key_list`], in stored order.
pub fn decode_key_list(bytes: &[u8]) -> Result<Vec<Vec<u8>>, RecordError> {
    let mut keys = Vec::new();
    visit_key_list(bytes, |k| keys.push(k.to_vec()))?;
    Ok(keys)
}

/// LEB128: seven bits a byte, low bits first.
fn put_varint(out: &mut Vec<u8>, mut v: usize) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads a [`put_varint`] number at `at` and moves past it; `None` when it
/// is cut short or wider than a key could be (`u32`).
fn get_varint(body: &[u8], at: &mut usize) -> Option<usize> {
    let mut v: u64 = 0;
    for shift in (0..35).step_by(7) {
        let b = *body.get(*at)?;
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return u32::try_from(v).ok().map(|v| v as usize);
        }
    }
    None
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

    fn failure(sink: &str, attempts: u32) -> SinkFailure {
        SinkFailure {
            sink: sink.into(),
            error: format!("{sink} answered 503"),
            attempts,
            first_failed_ms: 90,
            last_failed_ms: 100,
        }
    }

    #[test]
    fn an_ack_counts_new_events_and_parks_each_failure_in_order() {
        let fresh = Queued {
            seq: 7,
            record: WalRecord {
                body: r#"{"user_id":"u1"}"#.into(),
                ..record()
            },
        };
        let replayed = Queued {
            seq: 9,
            record: WalRecord {
                only_sink: Some("warehouse".into()),
                ..record()
            },
        };
        let records = [fresh.clone(), replayed.clone()];
        let dead = [
            (&replayed, failure("warehouse", 0)),
            (&fresh, failure("dashboard", 3)),
            (&fresh, failure("warehouse", 1)),
        ];
        let ack = BatchAck::of(&records, 12, 500, Wanted::default(), dead);

        assert_eq!(ack.upto, 12, "the cursor may pass a gap after the records");
        assert_eq!(ack.now_ms, 500);
        let facts = Facts::of(&fresh.record, 500, Wanted::default());
        assert_eq!(facts.user_id.as_deref(), Some("u1"));
        assert_eq!(facts.latency_ms, 499);
        assert_eq!(ack.processed, vec![(7, Some(facts)), (9, None)]);
        let parked: Vec<(u64, &str, u32, &WalRecord)> = ack
            .dead
            .iter()
            .map(|(seq, e)| (*seq, e.sink.as_str(), e.attempts, &e.record))
            .collect();
        assert_eq!(
            parked,
            vec![
                (9, "warehouse", 0, &replayed.record),
                (7, "dashboard", 3, &fresh.record),
                (7, "warehouse", 1, &fresh.record),
            ]
        );
        let (_, entry) = &ack.dead[1];
        assert_eq!(
            (
                entry.error.as_str(),
                entry.first_failed_ms,
                entry.last_failed_ms
            ),
            ("dashboard answered 503", 90, 100)
        );
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
            Err(RecordError::NewerVersion(FORMAT_VERSION + 1))
        );
    }

    fn numbered(n: u64) -> WalRecord {
        WalRecord {
            key: format!("k{n}"),
            body: format!("{{\"n\":{n}}}"),
            ..record()
        }
    }

    #[test]
    fn a_segment_holds_its_records_at_their_seqs_and_knows_their_sizes() {
        let records: Vec<WalRecord> = (0..5).map(numbered).collect();
        let refs: Vec<&WalRecord> = records.iter().collect();
        let (bytes, sizes) = encode_segment(41, &refs);
        let segment = decode_segment(45, &bytes).unwrap();
        assert_eq!((segment.first(), segment.last()), (41, 45));
        for (i, r) in records.iter().enumerate() {
            let seq = 41 + i as u64;
            assert_eq!(segment.record(seq).unwrap(), *r);
            // Invariant 6: the size an ack subtracts is the record's own envelope.
            assert_eq!(sizes[i], encode_record(r).len() as u64);
            assert_eq!(segment.size_of(seq), sizes[i]);
        }
        assert_eq!(segment.size_of(40), 0);
        assert_eq!(segment.size_of(46), 0);
        assert!(segment.record(46).is_err());
        // Stored under another key than its last seq: refused, not misread.
        assert!(matches!(
            decode_segment(44, &bytes),
            Err(RecordError::Body(_))
        ));
        let mut flipped = bytes.clone();
        flipped[20] ^= 1;
        assert_eq!(
            decode_segment(45, &flipped).unwrap_err(),
            RecordError::Checksum
        );
    }

    #[test]
    fn a_format_1_wal_value_reads_as_a_segment_of_one() {
        let mut legacy = encode_record(&record());
        legacy[0] = SINGLE_RECORD; // the version byte is outside the checksum
        let segment = decode_segment(7, &legacy).unwrap();
        assert_eq!((segment.first(), segment.last()), (7, 7));
        assert_eq!(segment.record(7).unwrap(), record());
        assert_eq!(segment.size_of(7), legacy.len() as u64);
    }

    #[test]
    fn a_segment_header_that_lies_is_an_error() {
        // Correct checksum, but n says more records than the body holds.
        let mut body = vec![0u8; ENVELOPE_HEADER];
        body.extend_from_slice(&1u64.to_be_bytes());
        body.extend_from_slice(&u32::MAX.to_be_bytes());
        let bytes = seal(body);
        assert!(matches!(
            decode_segment(1, &bytes),
            Err(RecordError::Body(_))
        ));
        let (ok, _) = encode_segment(1, &[&record()]);
        let mut cut = ok[..ok.len() - 1].to_vec();
        let crc = crc32fast::hash(&cut[ENVELOPE_HEADER..]);
        cut[1..ENVELOPE_HEADER].copy_from_slice(&crc.to_be_bytes());
        assert!(matches!(decode_segment(1, &cut), Err(RecordError::Body(_))));
    }

    #[test]
    fn key_lists_round_trip_in_byte_order() {
        let keys: [&[u8]; 5] = [
            b"default\0a",
            b"",
            b"shop\0\xff",
            b"default\0ab",
            b"default\0b",
        ];
        let mut sorted = keys.to_vec();
        sorted.sort_unstable();
        assert_eq!(decode_key_list(&encode_key_list(&keys)).unwrap(), sorted);
        let bytes = encode_key_list(&keys);
        assert!(decode_key_list(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn keys_that_count_up_take_a_few_bytes_each() {
        let owned: Vec<Vec<u8>> = (0..1000)
            .map(|n| format!("default\0r18f3a2b9c0d1e-{}-{n}", n % 64).into_bytes())
            .collect();
        let keys: Vec<&[u8]> = owned.iter().map(Vec::as_slice).collect();
        let bytes = encode_key_list(&keys);
        let plain: usize = keys.iter().map(|k| 4 + k.len()).sum();
        assert!(
            bytes.len() * 4 < plain,
            "{} bytes front-coded against {plain} plain",
            bytes.len()
        );
        assert_eq!(decode_key_list(&bytes).unwrap().len(), 1000);
    }

    /// Lists written by the first build of format 3 are still read.
    #[test]
    fn plain_key_lists_of_the_first_format_3_build_are_read() {
        let mut out = vec![0; ENVELOPE_HEADER];
        for k in [&b"default\0x"[..], b"default\0a"] {
            out.extend_from_slice(&(k.len() as u32).to_be_bytes());
            out.extend_from_slice(k);
        }
        let bytes = seal(out);
        assert_eq!(
            decode_key_list(&bytes).unwrap(),
            vec![b"default\0x".to_vec(), b"default\0a".to_vec()]
        );
    }

    #[test]
    fn a_key_list_that_shares_more_than_it_has_is_refused() {
        let mut out = vec![0; ENVELOPE_HEADER];
        out.extend_from_slice(&[FRONT_CODED, 0, 1, b'a', 5, 1, b'b']);
        assert!(matches!(
            decode_key_list(&seal(out)),
            Err(RecordError::Body(_))
        ));
    }
}
