//! `SledStorage` checked against `MemoryStorage`, the reference model.
//!
//! In the style of sled's own `tests/tree/mod.rs`: proptest generates a
//! random sequence of operations (appends under a clock that only moves
//! forward, processed batches with dead letters, re-committed acks, key
//! sweeps, window pruning, DLQ list/get/remove/replay, restarts) and applies
//! each to both stores. Every result must be identical, and after every
//! operation the whole observable state is compared: queue figures, the WAL,
//! the counters, the DLQ and the analytics key space.
//!
//! Beside the model, a few properties are checked on sled alone (seqs only
//! grow, depth is `last_seq - cursor`), because a model can share a bug with
//! the implementation it checks.
//!
//! Failures are not persisted to a regressions file (this test writes no
//! file beside itself); proptest prints the shrunk operation list instead.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use inletd::analytics::{self, WINDOW_RETENTION_MINUTES, Wanted};
use inletd::event::{Queued, WalRecord};
use inletd::storage::memory::MemoryStorage;
use inletd::storage::sled::{SledOptions, SledStorage};
use inletd::storage::{
    AppendOutcome, BatchAck, DlqEntry, NewEvent, QueueInfo, SinkFailure, Storage, StorageError,
    encode_record,
};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;
use serde_json::json;
use tempfile::TempDir;

/// The idempotency window; short so that keys expire within a case.
const TTL_MS: i64 = 1_000;
const DAY_MS: i64 = 86_400_000;
/// A realistic clock start: 30 s before midnight UTC (2023-11-15), so that
/// cases cross a day boundary.
const T0: i64 = 19_676 * DAY_MS - 30_000;
/// More than any case can ever hold: a limit that never binds.
const ALL: usize = 100_000;
const SOURCES: [&str; 2] = ["default", "shop"];
const TYPES: [&str; 3] = ["page_view", "signup", "purchase"];
const SINKS: [&str; 2] = ["dashboard", "warehouse"];

// ---------------------------------------------------------------------------
// Operations

/// One generated event.
#[derive(Debug, Clone)]
struct Ev {
    source: usize,
    key: u8,
    event_type: usize,
    user: Option<u8>,
    session: Option<u8>,
    page: Option<u8>,
    /// How long before receipt the event happened.
    age_ms: i64,
}

/// A DLQ id: an existing one (picked from the model's list) or any number.
#[derive(Debug, Clone)]
enum IdSel {
    Existing(Index),
    Raw(u64),
}

#[derive(Debug, Clone)]
enum Op {
    /// One group commit.
    Append(Vec<Ev>),
    /// Moves the clock forward.
    Advance(i64),
    /// Reads a batch at the cursor and, if `commit`, commits its ack; the
    /// ack is kept either way (an uncommitted one is a crash before the ack).
    Process {
        limit: usize,
        /// Bit i set: record i failed on its (first) sink.
        dead: u16,
        /// Bit i set: record i also failed on the second sink.
        dead_too: u16,
        commit: bool,
    },
    /// Commits an earlier ack again (a batch processed twice).
    Recommit(Index),
    /// `sweep_keys(now - ttl, limit)`, then a sweep without a binding limit.
    Sweep(usize),
    /// `prune_windows` as the daemon's sweeper calls it.
    PruneWindows,
    DlqReplay(Vec<IdSel>),
    DlqRemove(Vec<IdSel>),
    DlqList {
        after: IdSel,
        limit: usize,
    },
    DlqGet(IdSel),
    /// Parks this many failures of events delivered for another instance
    /// (a takeover): DLQ entries that belong to no seq here.
    Park(usize),
    /// Drops sled and reopens it on the same directory. Without `flush`,
    /// sled still flushes: dropping the last handle of a tree
    /// (`TreeInner::drop`) flushes the page cache until nothing is dirty.
    Restart {
        flush: bool,
    },
}

fn ev() -> impl Strategy<Value = Ev> {
    (
        0..SOURCES.len(),
        0..12u8,
        0..TYPES.len(),
        proptest::option::of(0..4u8),
        proptest::option::of(0..3u8),
        proptest::option::of(0..3u8),
        prop_oneof![Just(0i64), 0..2 * 3_600_000i64, 0..3 * DAY_MS],
    )
        .prop_map(
            |(source, key, event_type, user, session, page, age_ms)| Ev {
                source,
                key,
                event_type,
                user,
                session,
                page,
                age_ms,
            },
        )
}

fn id_sel() -> impl Strategy<Value = IdSel> {
    prop_oneof![
        3 => any::<Index>().prop_map(IdSel::Existing),
        1 => (0..40u64).prop_map(IdSel::Raw),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => proptest::collection::vec(ev(), 1..=8).prop_map(Op::Append),
        // Exact TTL steps land on the boundary (a key exactly `ttl` old is
        // absent; one a millisecond younger is not).
        3 => prop_oneof![
            0..300i64,
            0..1_500i64,
            Just(TTL_MS),
            Just(TTL_MS - 1),
            Just(1)
        ]
        .prop_map(Op::Advance),
        5 => (1..10usize, any::<u16>(), any::<u16>(), proptest::bool::weighted(0.8)).prop_map(
            |(limit, dead, dead_too, commit)| Op::Process {
                limit,
                // About one record in eight fails.
                dead: dead & dead.rotate_left(5) & dead.rotate_left(11),
                dead_too: dead_too & dead_too.rotate_left(7),
                commit,
            }
        ),
        1 => any::<Index>().prop_map(Op::Recommit),
        2 => prop_oneof![1..5usize, Just(ALL)].prop_map(Op::Sweep),
        1 => Just(Op::PruneWindows),
        1 => proptest::collection::vec(id_sel(), 0..4).prop_map(Op::DlqReplay),
        1 => proptest::collection::vec(id_sel(), 0..4).prop_map(Op::DlqRemove),
        1 => (id_sel(), 0..5usize).prop_map(|(after, limit)| Op::DlqList { after, limit }),
        1 => id_sel().prop_map(Op::DlqGet),
        1 => (0..3usize).prop_map(Op::Park),
        1 => any::<bool>().prop_map(|flush| Op::Restart { flush }),
    ]
}

// ---------------------------------------------------------------------------
// The two stores side by side

/// Opens sled on `dir`. Right after the previous handle is dropped, sled's
/// background threads may still hold the directory's file lock for a moment
/// (sled's own test builds block on the lock for this reason), so a lock
/// error is retried for a while.
fn open(dir: &TempDir) -> SledStorage {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match SledStorage::open(dir.path(), &SledOptions::default()) {
            Ok(store) => return store,
            Err(StorageError::Open { reason, .. })
                if reason.contains("could not acquire lock") && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("sled does not open: {e}"),
        }
    }
}

fn record(e: &Ev, now: i64) -> WalRecord {
    let key = format!("k{}", e.key);
    let mut body = json!({ "event_id": key, "event_type": TYPES[e.event_type] });
    if let Some(u) = e.user {
        body["user_id"] = json!(format!("u{u}"));
    }
    if let Some(s) = e.session {
        body["session_id"] = json!(format!("s{s}"));
    }
    if let Some(p) = e.page {
        body["properties"] = json!({ "page": format!("/p{p}") });
    }
    WalRecord {
        source: SOURCES[e.source].into(),
        key,
        event_type: TYPES[e.event_type].into(),
        received_at_ms: now,
        occurred_at_ms: now - e.age_ms,
        only_sink: None,
        body: body.to_string(),
    }
}

/// The whole analytics key space.
fn aggregates(s: &dyn Storage) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    s.scan(&[], &[0xff; 9], &mut |k, v| {
        out.push((k.to_vec(), v.to_vec()));
        true
    })
    .expect("scan");
    out
}

struct Harness {
    dir: TempDir,
    sled: Option<SledStorage>,
    model: MemoryStorage,
    now: i64,
    /// Every ack built so far, committed or not.
    acks: Vec<BatchAck>,
    /// The highest seq sled ever handed out, tracked by the test itself.
    high_water: u64,
}

macro_rules! both {
    ($h:expr, $s:ident => $e:expr) => {{
        let sled_result = {
            let $s: &dyn Storage = $h.sled();
            $e
        };
        let model_result = {
            let $s: &dyn Storage = &$h.model;
            $e
        };
        prop_assert_eq!(&sled_result, &model_result, "sled (left) vs model (right)");
        sled_result
    }};
}

impl Harness {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let sled = open(&dir);
        Harness {
            dir,
            sled: Some(sled),
            model: MemoryStorage::new(),
            now: T0,
            acks: Vec::new(),
            high_water: 0,
        }
    }

    fn sled(&self) -> &SledStorage {
        self.sled.as_ref().expect("sled is open")
    }

    fn dlq_ids(&self) -> Vec<u64> {
        self.model
            .dlq_list(0, ALL)
            .expect("model list")
            .into_iter()
            .map(|(id, _)| id)
            .collect()
    }

    fn resolve(&self, sel: &IdSel) -> u64 {
        match sel {
            IdSel::Existing(i) => {
                let ids = self.dlq_ids();
                if ids.is_empty() {
                    1
                } else {
                    ids[i.index(ids.len())]
                }
            }
            IdSel::Raw(id) => *id,
        }
    }

    fn saw_seq(&mut self, seq: u64) -> Result<(), TestCaseError> {
        prop_assert!(
            seq > self.high_water,
            "seq {seq} handed out again (high water {})",
            self.high_water
        );
        self.high_water = seq;
        Ok(())
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match op {
            Op::Append(group) => {
                let now = self.now;
                let events: Vec<NewEvent> = group
                    .iter()
                    .map(|e| NewEvent {
                        record: record(e, now),
                    })
                    .collect();
                let outcomes = both!(self, s => s.append(&events, now, TTL_MS).expect("append"));
                for o in outcomes {
                    if let AppendOutcome::Accepted { seq } = o {
                        self.saw_seq(seq)?;
                    }
                }
                // The Deduper flushes after each group.
                self.sled().flush().expect("flush");
            }
            Op::Advance(ms) => self.now += ms,
            Op::Process {
                limit,
                dead,
                dead_too,
                commit,
            } => {
                let cursor = both!(self, s => s.queue_info().expect("queue_info").cursor);
                let (records, damaged) =
                    both!(self, s => s.read_after(cursor, *limit).expect("read_after"));
                prop_assert!(damaged.is_empty());
                prop_assert!(records.len() <= *limit);
                let Some(last) = records.last() else {
                    return Ok(());
                };
                let ack = self.ack(&records, last.seq, *dead, *dead_too);
                if *commit {
                    both!(self, s => s.commit_batch(&ack).expect("commit"));
                }
                self.acks.push(ack);
            }
            Op::Recommit(i) => {
                if !self.acks.is_empty() {
                    let ack = self.acks[i.index(self.acks.len())].clone();
                    both!(self, s => s.commit_batch(&ack).expect("commit"));
                }
            }
            Op::Sweep(limit) => {
                let before = self.now - TTL_MS;
                let first = both_unchecked(self, |s| s.sweep_keys(before, *limit).expect("sweep"));
                prop_assert!(
                    first.0 <= *limit && first.1 <= *limit,
                    "{first:?} > {limit}"
                );
                // Which expired keys a binding limit removes first is not
                // specified (sled goes by time, the model by key); after a
                // sweep without a binding limit both must have removed the
                // same number of keys, and hold the same ones.
                let rest = both_unchecked(self, |s| s.sweep_keys(before, ALL).expect("sweep"));
                prop_assert_eq!(
                    first.0 + rest.0,
                    first.1 + rest.1,
                    "keys swept: sled {:?} vs model {:?}",
                    (first.0, rest.0),
                    (first.1, rest.1)
                );
                if *limit == ALL {
                    prop_assert_eq!(first.0, first.1);
                }
                both!(self, s => s.sweep_keys(before, ALL).expect("sweep"));
            }
            Op::PruneWindows => {
                let stale = self.now - WINDOW_RETENTION_MINUTES * 60_000;
                both!(self, s => s.prune_windows(stale).expect("prune"));
            }
            Op::DlqReplay(sel) => {
                let ids: Vec<u64> = sel.iter().map(|s| self.resolve(s)).collect();
                let before = self.sled().queue_info().expect("queue_info").last_seq;
                let (moved, last) = both!(self, s => s.dlq_replay(&ids).expect("replay"));
                prop_assert_eq!(last, before + moved.len() as u64);
                if !moved.is_empty() {
                    self.saw_seq(last)?;
                }
            }
            Op::DlqRemove(sel) => {
                let ids: Vec<u64> = sel.iter().map(|s| self.resolve(s)).collect();
                both!(self, s => s.dlq_remove(&ids).expect("remove"));
            }
            Op::DlqList { after, limit } => {
                let after = self.resolve(after).saturating_sub(1);
                both!(self, s => s.dlq_list(after, *limit).expect("list"));
            }
            Op::DlqGet(sel) => {
                let id = self.resolve(sel);
                both!(self, s => s.dlq_get(id).expect("get"));
            }
            Op::Park(n) => {
                let entries: Vec<DlqEntry> = (0..*n)
                    .map(|i| DlqEntry {
                        sink: SINKS[i % SINKS.len()].into(),
                        error: "taken over, then 503".into(),
                        attempts: 2,
                        first_failed_ms: self.now - 5,
                        last_failed_ms: self.now,
                        record: WalRecord {
                            source: "orphan".into(),
                            key: format!("taken-{i}"),
                            event_type: "signup".into(),
                            received_at_ms: self.now - 100,
                            occurred_at_ms: self.now - 100,
                            only_sink: None,
                            body: "{}".into(),
                        },
                    })
                    .collect();
                both!(self, s => s.park(&entries).expect("park"));
            }
            Op::Restart { flush } => {
                let sled = self.sled.take().expect("sled is open");
                if *flush {
                    sled.flush().expect("flush");
                }
                drop(sled);
                self.sled = Some(open(&self.dir));
            }
        }
        self.check_state()
    }

    /// The ack the Processor builds for `records` when the records whose
    /// bit is set in `dead` failed on their sink (their own, or the first),
    /// and those also set in `dead_too` on the second sink as well.
    fn ack(&self, records: &[Queued], upto: u64, dead: u16, dead_too: u16) -> BatchAck {
        let now = self.now;
        let failure = |sink: &str| SinkFailure {
            sink: sink.into(),
            error: format!("{sink} answered 503"),
            attempts: 3,
            first_failed_ms: now - 10,
            last_failed_ms: now,
        };
        let mut failed = Vec::new();
        for (i, q) in records.iter().enumerate() {
            let bit = 1u16 << (i % 16);
            if dead & bit == 0 {
                continue;
            }
            match &q.record.only_sink {
                Some(sink) => failed.push((q, failure(sink))),
                None => {
                    failed.push((q, failure(SINKS[0])));
                    if dead_too & bit != 0 {
                        failed.push((q, failure(SINKS[1])));
                    }
                }
            }
        }
        BatchAck::of(records, upto, now, Wanted::default(), failed)
    }

    /// Everything observable, compared; plus sled's own invariants.
    fn check_state(&self) -> Result<(), TestCaseError> {
        let info: QueueInfo = both!(self, s => s.queue_info().expect("queue_info"));
        prop_assert_eq!(info.depth, info.last_seq - info.cursor);
        prop_assert_eq!(info.last_seq, self.high_water);
        let counts = both!(self, s => s.counts().expect("counts"));
        // What a publish to Redis reads: the same counts, with the cursor
        // they count up to.
        let counted = both!(self, s => s.counted(0, 100_000).expect("counted"));
        prop_assert_eq!(&counted.by_type, &counts);
        prop_assert_eq!(counted.cursor, info.cursor);
        let per_day: u64 = counted.days.counts.iter().map(|(_, _, n)| n).sum();
        prop_assert_eq!(per_day, counts.iter().map(|(_, n)| n).sum::<u64>());
        let dlq_len = both!(self, s => s.dlq_len().expect("dlq_len"));
        let dlq = both!(self, s => s.dlq_list(0, ALL).expect("dlq_list"));
        prop_assert_eq!(dlq.len() as u64, dlq_len);
        let (wal, damaged) = both!(self, s => s.read_after(0, ALL).expect("read_after"));
        prop_assert!(damaged.is_empty());
        // The byte gauge is the encoded size of exactly what waits.
        let bytes: u64 = wal
            .iter()
            .map(|q| encode_record(&q.record).len() as u64)
            .sum();
        prop_assert_eq!(info.bytes, bytes, "queue bytes vs the WAL's records");
        let seqs: BTreeSet<u64> = wal.iter().map(|q| q.seq).collect();
        prop_assert_eq!(seqs.len(), wal.len());
        // Everything at or below the cursor is done and gone; nothing
        // above the last seq exists.
        prop_assert!(
            wal.iter()
                .all(|q| q.seq > info.cursor && q.seq <= info.last_seq),
            "WAL {:?} outside ({}, {}]",
            seqs,
            info.cursor,
            info.last_seq
        );
        both!(self, s => aggregates(s));
        Ok(())
    }
}

/// Runs `f` on both stores without requiring equal results.
fn both_unchecked<T>(h: &Harness, f: impl Fn(&dyn Storage) -> T) -> (T, T) {
    (f(h.sled()), f(&h.model))
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn sled_matches_the_model(ops in proptest::collection::vec(op(), 1..60)) {
        let mut h = Harness::new();
        for op in &ops {
            h.apply(op)?;
        }
        // One last restart: everything above must survive it.
        h.apply(&Op::Restart { flush: false })?;
    }
}

// ---------------------------------------------------------------------------
// Deterministic checks on sled

fn event(key: &str, event_type: &str, now: i64) -> NewEvent {
    NewEvent {
        record: WalRecord {
            source: "default".into(),
            key: key.into(),
            event_type: event_type.into(),
            received_at_ms: now,
            occurred_at_ms: now,
            only_sink: None,
            body: json!({ "event_id": key, "user_id": "u1" }).to_string(),
        },
    }
}

fn ack_all(s: &dyn Storage, dead_seq: Option<u64>, now: i64) -> BatchAck {
    let cursor = s.queue_info().unwrap().cursor;
    let (records, damaged) = s.read_after(cursor, ALL).unwrap();
    assert!(damaged.is_empty());
    assert!(
        records.iter().all(|q| q.record.only_sink.is_none()),
        "every record is counted"
    );
    let upto = records.last().expect("a non-empty batch").seq;
    let failure = SinkFailure {
        sink: "dashboard".into(),
        error: "503".into(),
        attempts: 3,
        first_failed_ms: now,
        last_failed_ms: now,
    };
    let failed = records
        .iter()
        .filter(|q| Some(q.seq) == dead_seq)
        .map(|q| (q, failure.clone()));
    BatchAck::of(&records, upto, now, Wanted::default(), failed)
}

#[test]
fn a_batch_committed_twice_is_counted_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(&dir);
    let now = T0;
    let group = [
        event("a", "signup", now),
        event("b", "signup", now),
        event("c", "purchase", now),
    ];
    let outcomes = store.append(&group, now, TTL_MS).unwrap();
    assert_eq!(
        outcomes,
        (1..=3)
            .map(|seq| AppendOutcome::Accepted { seq })
            .collect::<Vec<_>>()
    );
    let ack = ack_all(&store, Some(2), now);

    store.commit_batch(&ack).unwrap();
    let counts = vec![("purchase".to_owned(), 1), ("signup".to_owned(), 2)];
    assert_eq!(store.counts().unwrap(), counts);
    assert_eq!(store.dlq_len().unwrap(), 1);
    let aggregates_once = aggregates(&store);
    assert!(!aggregates_once.is_empty());

    // The same batch again (an actor restarted before it saw the ack).
    store.commit_batch(&ack).unwrap();
    assert_eq!(store.counts().unwrap(), counts);
    assert_eq!(store.dlq_len().unwrap(), 1);
    assert_eq!(aggregates(&store), aggregates_once);

    // And again after a restart (a crash before the ack was acknowledged).
    drop(store);
    store = open(&dir);
    store.commit_batch(&ack).unwrap();
    assert_eq!(store.counts().unwrap(), counts);
    assert_eq!(store.dlq_len().unwrap(), 1);
    assert_eq!(aggregates(&store), aggregates_once);
    let info = store.queue_info().unwrap();
    assert_eq!(
        (
            info.depth,
            info.cursor,
            info.last_seq,
            info.oldest_received_ms
        ),
        (0, 3, 3, None)
    );

    // A batch overlapping a committed one counts only its new part.
    store
        .append(&[event("d", "signup", now + 1)], now + 1, TTL_MS)
        .unwrap();
    let mut overlapping = ack_all(&store, None, now + 1);
    overlapping.processed.splice(0..0, ack.processed.clone());
    store.commit_batch(&overlapping).unwrap();
    assert_eq!(
        store.counts().unwrap(),
        vec![("purchase".to_owned(), 1), ("signup".to_owned(), 3)]
    );
}

#[test]
fn seqs_never_repeat_after_the_queue_empties_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(&dir);
    let mut now = T0;
    let mut next_key = 0;
    let mut last = 0;
    for round in 0..4 {
        let group: Vec<NewEvent> = (0..3)
            .map(|_| {
                next_key += 1;
                event(&format!("k{next_key}"), "signup", now)
            })
            .collect();
        for outcome in store.append(&group, now, TTL_MS).unwrap() {
            let AppendOutcome::Accepted { seq } = outcome else {
                panic!("a new key was taken for a duplicate: {outcome:?}");
            };
            assert!(seq > last, "round {round}: seq {seq} after {last}");
            last = seq;
        }
        // Process everything: the WAL is empty, only the cursor remembers.
        let ack = ack_all(&store, Some(last), now);
        store.commit_batch(&ack).unwrap();
        assert!(store.read_after(0, ALL).unwrap().0.is_empty());
        let info = store.queue_info().unwrap();
        assert_eq!((info.depth, info.cursor, info.last_seq), (0, last, last));

        // Restart, with and without an explicit flush.
        if round % 2 == 0 {
            store.flush().unwrap();
        }
        drop(store);
        store = open(&dir);
        let info = store.queue_info().unwrap();
        assert_eq!((info.depth, info.cursor, info.last_seq), (0, last, last));
        now += 10;
    }

    // A DLQ replay after a restart is numbered after everything too.
    let ids: Vec<u64> = store
        .dlq_list(0, ALL)
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(ids, vec![1, 2, 3, 4]);
    let (moved, replay_last) = store.dlq_replay(&ids[..1]).unwrap();
    assert_eq!((moved, replay_last), (vec![1], last + 1));
    drop(store);
    store = open(&dir);
    let outcomes = store
        .append(&[event("fresh", "signup", now)], now, TTL_MS)
        .unwrap();
    assert_eq!(outcomes, vec![AppendOutcome::Accepted { seq: last + 2 }]);
}

/// Times before the epoch sort before later ones in the expiry index: a
/// sweep up to a negative time removes only keys first seen before it.
#[test]
fn a_sweep_before_the_epoch_removes_nothing_unexpired() {
    let dir = tempfile::tempdir().unwrap();
    let sled = open(&dir);
    let model = MemoryStorage::new();
    for s in [&sled as &dyn Storage, &model] {
        assert_eq!(
            s.append(&[event("a", "t", 500)], 500, 1000).unwrap(),
            vec![AppendOutcome::Accepted { seq: 1 }]
        );
        assert_eq!(s.sweep_keys(500 - 1000, 100).unwrap(), 0);
        assert!(matches!(
            s.append(&[event("a", "t", 600)], 600, 1000).unwrap()[..],
            [AppendOutcome::Duplicate { first_seen_ms: 500 }]
        ));
        assert_eq!(s.sweep_keys(1501, 100).unwrap(), 1);
    }
}

/// `n` events with ids that share no bytes (32 hex digits, as random
/// UUIDs), received at `now`.
fn random_id_events(n: usize, now: i64) -> Vec<NewEvent> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            event(&format!("{x:016x}{:016x}", x.rotate_left(23)), "t", now)
        })
        .collect()
}

/// sled itself on `dir`, once the store there has let go of it.
fn raw_sled(dir: &TempDir) -> sled::Db {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match sled::open(dir.path()) {
            Ok(db) => return db,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("sled does not open: {e}"),
        }
    }
}

fn all_duplicates_of(outcomes: &[AppendOutcome], first_seen_ms: i64) -> bool {
    outcomes
        .iter()
        .all(|o| matches!(o, AppendOutcome::Duplicate { first_seen_ms: t } if *t == first_seen_ms))
}

/// A group commit of 10,000 ids that share no bytes (random ones) has a
/// key list of about 360 KB: it is written as several `idem_expiry`
/// entries of at most 8 KiB, so that a leaf of 16 stays under sled's blob
/// threshold, 128 KiB (blob leaves stayed on disk, and were listed at
/// every flush that saw blobs change, for as long as their keys lived).
/// Every key stays a duplicate over a restart, and the sweep after the TTL
/// removes each once.
#[test]
fn a_group_of_random_ids_is_listed_in_entries_under_the_blob_threshold() {
    let dir = tempfile::tempdir().unwrap();
    let events = random_id_events(10_000, 500);
    let accepted: Vec<AppendOutcome> = (1..=10_000)
        .map(|seq| AppendOutcome::Accepted { seq })
        .collect();
    {
        let sled = open(&dir);
        let model = MemoryStorage::new();
        for s in [&sled as &dyn Storage, &model] {
            assert_eq!(s.append(&events, 500, 1000).unwrap(), accepted);
        }
        sled.close().unwrap();
    }
    let sizes: Vec<usize> = {
        let db = raw_sled(&dir);
        let expiry = db.open_tree("idem_expiry").unwrap();
        expiry.iter().map(|e| e.unwrap().1.len()).collect()
    };
    assert!(sizes.len() > 1, "one entry of {sizes:?} bytes");
    assert!(
        sizes.iter().all(|&n| n <= 8 * 1024),
        "an entry of more than 8 KiB: {sizes:?}"
    );
    let sled = open(&dir);
    assert!(
        all_duplicates_of(&sled.append(&events, 600, 1000).unwrap(), 500),
        "a key was forgotten over the restart"
    );
    assert_eq!(sled.sweep_keys(1501, 100_000).unwrap(), 10_000);
    assert_eq!(
        sled.append(&events[..1], 1600, 1000).unwrap(),
        vec![AppendOutcome::Accepted { seq: 10_001 }]
    );
}

/// A crash inside a group commit of random ids, after its segments and
/// the first half of its key list entries (sled recovers a prefix of its
/// log: the rest of the entries and the byte gauge are gone). The next
/// open keys every seq after the last entry found, so each of the group's
/// events is still a duplicate, and the queue and its bytes are whole.
#[test]
fn a_crash_between_key_list_entries_forgets_no_key() {
    let dir = tempfile::tempdir().unwrap();
    let events = random_id_events(10_000, 500);
    let queue = {
        let sled = open(&dir);
        assert_eq!(sled.append(&events, 500, 1000).unwrap().len(), 10_000);
        sled.flush().unwrap();
        sled.queue_info().unwrap()
        // Dropped without `close`: the mark says it was running.
    };
    {
        let db = raw_sled(&dir);
        let expiry = db.open_tree("idem_expiry").unwrap();
        let entries: Vec<_> = expiry.iter().keys().map(|k| k.unwrap()).collect();
        assert!(entries.len() >= 4, "{} entries", entries.len());
        for k in &entries[entries.len() / 2..] {
            expiry.remove(k).unwrap();
        }
        // The gauge as it was before the group: nothing counted.
        let meta = db.open_tree("meta").unwrap();
        meta.insert("queue_bytes", &[0u8; 16]).unwrap();
        db.flush().unwrap();
    }
    let sled = open(&dir);
    assert_eq!(sled.queue_info().unwrap(), queue);
    // The keys the open listed again count from that open.
    let again = sled.append(&events, 600, 1000).unwrap();
    let forgotten = again
        .iter()
        .filter(|o| !matches!(o, AppendOutcome::Duplicate { .. }))
        .count();
    assert_eq!(forgotten, 0, "keys forgotten by the crash");
    assert!(all_duplicates_of(&again[..1], 500), "{:?}", again[0]);
}

/// A store written by format 1 kept one expiry entry per key, with the key
/// in the entry's own key and an empty value, and each key in its own
/// `idempotency` tree. Opened now, it is converted to the current format: a key whose
/// entry was current is still a duplicate until it expires, and only then
/// swept; one whose entry was stale (accepted again later) keeps its newer
/// first-seen time.
#[test]
fn a_format_1_store_is_converted_and_its_keys_kept() {
    let dir = tempfile::tempdir().unwrap();
    let sign = 1u64 << 63;
    {
        // Written with sled itself, as format 1 left it.
        let db = sled::open(dir.path()).unwrap();
        let meta = db.open_tree("meta").unwrap();
        meta.insert("format_version", &1u64.to_be_bytes()).unwrap();
        let keys = db.open_tree("idempotency").unwrap();
        let expiry = db.open_tree("idem_expiry").unwrap();
        // `old` first seen at 500 (seq 1); `renewed` seen at 500, then
        // accepted again at 1600 (seq 2), its first entry left behind.
        for (key, entries, current) in [
            ("old", vec![500i64], (500i64, 1u64)),
            ("renewed", vec![500, 1600], (1600, 2)),
        ] {
            let scoped = format!("default\0{key}");
            let mut value = current.0.to_be_bytes().to_vec();
            value.extend_from_slice(&current.1.to_be_bytes());
            keys.insert(scoped.as_bytes(), value).unwrap();
            for seen in entries {
                let mut entry = ((seen as u64) ^ sign).to_be_bytes().to_vec();
                entry.extend_from_slice(scoped.as_bytes());
                expiry.insert(entry, b"").unwrap();
            }
        }
        meta.insert("cursor", &2u64.to_be_bytes()).unwrap();
        db.flush().unwrap();
    }
    let sled = open(&dir);
    assert!(matches!(
        sled.append(&[event("old", "t", 1000)], 1000, 1000).unwrap()[..],
        [AppendOutcome::Duplicate { first_seen_ms: 500 }]
    ));
    assert!(matches!(
        sled.append(&[event("renewed", "t", 1000)], 1000, 1000)
            .unwrap()[..],
        [AppendOutcome::Duplicate {
            first_seen_ms: 1600
        }]
    ));
    assert_eq!(sled.sweep_keys(1501, 100).unwrap(), 1, "only `old`");
    assert_eq!(
        sled.append(&[event("old", "t", 1700)], 1700, 1000).unwrap(),
        vec![AppendOutcome::Accepted { seq: 3 }],
        "an expired key is accepted again"
    );
    assert!(matches!(
        sled.append(&[event("renewed", "t", 1700)], 1700, 1000)
            .unwrap()[..],
        [AppendOutcome::Duplicate {
            first_seen_ms: 1600
        }]
    ));
}

/// Trends' user records: one per day and type per batch until the sweeper
/// merges a finished day's into one. On sled and on the model alike, the
/// merge leaves one record per day and type, each user once, and every
/// trends answer as it was; a second merge finds nothing to do.
#[test]
fn merging_trends_user_records_changes_no_answer() {
    let dir = tempfile::tempdir().unwrap();
    let sled = open(&dir);
    let model = MemoryStorage::new();
    let day0 = T0.div_euclid(DAY_MS) - 3;
    for store in [&sled as &dyn Storage, &model] {
        // Five batches over three days, users and types overlapping.
        let mut n = 0;
        for batch in 0..5 {
            let mut group = Vec::new();
            for i in 0..12 {
                n += 1;
                let day = day0 + (i % 3);
                let mut e = event(&format!("e{n}"), TYPES[(batch + i as usize) % 3], 0);
                e.record.occurred_at_ms = day * DAY_MS + 1_000 * i;
                e.record.body =
                    json!({"event_id": format!("e{n}"), "user_id": format!("u{}", (n * 7) % 5)})
                        .to_string();
                group.push(e);
            }
            store.append(&group, T0, TTL_MS).unwrap();
            store.commit_batch(&ack_all(store, None, T0)).unwrap();
        }
        let trends = |s: &dyn Storage| {
            [
                analytics::Interval::Day,
                analytics::Interval::Week,
                analytics::Interval::Month,
            ]
            .map(|interval| {
                TYPES
                    .iter()
                    .map(|t| Some(*t))
                    .chain([None])
                    .map(|t| analytics::trends(s, day0 as i32, day0 as i32 + 2, interval, t, None))
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap()
            })
        };
        let records = |s: &dyn Storage| {
            let (from, to) = analytics::user_record_range(day0 as i32, day0 as i32 + 2);
            let mut keys = Vec::new();
            s.scan(&from, &to, &mut |k, _| {
                keys.push(k.to_vec());
                true
            })
            .unwrap();
            keys.len()
        };
        let before = trends(store);
        assert!(
            before[0][3].series.iter().all(|p| p.users > 0),
            "{:?}",
            before[0][3]
        );
        let records_before = records(store);
        let merged = store
            .merge_user_records(day0 as i32, day0 as i32 + 2)
            .unwrap();
        // Three days, three types: nine records left.
        assert_eq!(records(store), 9);
        assert_eq!(merged, records_before - 9);
        assert_eq!(trends(store), before);
        assert_eq!(
            store
                .merge_user_records(day0 as i32, day0 as i32 + 2)
                .unwrap(),
            0
        );
    }
    assert_eq!(aggregates(&sled), aggregates(&model));
}

#[test]
fn a_store_keeps_its_id_over_restarts_and_another_store_has_another() {
    // Published to Redis with the figures: a takeover's range is trusted
    // only by the store it was recorded for.
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let id = store.store_id().unwrap();
    assert_ne!(id, 0);
    store.flush().unwrap();
    drop(store);
    assert_eq!(open(&dir).store_id().unwrap(), id);
    let other = tempfile::tempdir().unwrap();
    assert_ne!(open(&other).store_id().unwrap(), id);
}
