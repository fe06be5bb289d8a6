//! The per-event work on the intake and processing paths, each on its own:
//!
//! * `record`: the envelope, `encode_record` / `decode_record` of one
//!   `WalRecord` (bincode + crc32);
//! * `segment`: a WAL segment of 100 records, encoded, and opened with
//!   every record decoded;
//! * `parse`: `parse_single` of one event body and `parse_batch` of a
//!   100-event body (JSON + validation);
//! * `idempotency_lookup`: `Storage::append` of a group whose every key is
//!   already stored (all duplicates: the lookups, no record written), on a
//!   real sled store in a temp dir, at 1 and 100 keys per group; no flush;
//! * `facts`: `Facts::of` of one stored record (what analytics reads of
//!   its body), once per processed event;
//! * `analytics_apply`: `analytics::apply` of a batch of 100 `Facts` into a
//!   `BTreeMap`-backed `KvWrite` (the aggregate arithmetic without sled),
//!   with nothing known ahead (`batch_100`) and with the members of the
//!   batch before known (`batch_100_known`, the steady state).
//!
//! ```sh
//! cargo bench --bench hot_path            # or -- --quick for a short run
//! ```

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use inletd::analytics::{self, Facts, Known, KvWrite, Wanted};
use inletd::event::{WalRecord, parse_batch, parse_single};
use inletd::storage::sled::{SledOptions, SledStorage};
use inletd::storage::{
    AppendOutcome, NewEvent, Storage, decode_record, decode_segment, encode_record, encode_segment,
};

const NOW_MS: i64 = 1_700_000_000_000;
const TTL_MS: i64 = 86_400_000;

fn body(n: u64) -> String {
    format!(
        r#"{{"event_id":"evt_{n:012}","event_type":"page_view","user_id":"user_{}","timestamp":"2023-11-14T22:13:20Z","properties":{{"page":"/pricing","ref":"newsletter"}}}}"#,
        n % 1000
    )
}

fn record(n: u64) -> WalRecord {
    WalRecord {
        source: "default".into(),
        key: format!("evt_{n:012}"),
        event_type: "page_view".into(),
        received_at_ms: NOW_MS,
        occurred_at_ms: NOW_MS,
        only_sink: None,
        body: body(n),
    }
}

fn records(c: &mut Criterion) {
    let mut g = c.benchmark_group("record");
    g.throughput(Throughput::Elements(1));
    let rec = record(42);
    let bytes = encode_record(&rec);
    g.bench_function("encode", |b| b.iter(|| encode_record(black_box(&rec))));
    g.bench_function("decode", |b| {
        b.iter(|| decode_record::<WalRecord>(black_box(&bytes)).unwrap())
    });
    g.finish();

    // A group commit's segment of 100 records: written once per group,
    // opened (checksum and record table) once per hand-over, each record
    // decoded on its own.
    let mut g = c.benchmark_group("segment");
    let group: Vec<WalRecord> = (0..100).map(record).collect();
    let refs: Vec<&WalRecord> = group.iter().collect();
    let (segment, _) = encode_segment(1, &refs);
    g.throughput(Throughput::Elements(100));
    g.bench_function("encode_100", |b| {
        b.iter(|| encode_segment(1, black_box(&refs)))
    });
    g.bench_function("decode_100", |b| {
        b.iter(|| {
            let s = decode_segment(100, black_box(&segment)).unwrap();
            (1..=100)
                .map(|seq| s.record(seq).unwrap())
                .collect::<Vec<_>>()
        })
    });
    g.finish();
}

fn parsing(c: &mut Criterion) {
    let mut g = c.benchmark_group("parse");
    let single = body(7).into_bytes();
    g.throughput(Throughput::Elements(1));
    g.bench_function("single", |b| {
        b.iter(|| {
            parse_single(black_box(&single), None, NOW_MS)
                .unwrap()
                .unwrap()
        })
    });
    let events: Vec<String> = (0..100).map(body).collect();
    let batch = format!(r#"{{"events":[{}]}}"#, events.join(",")).into_bytes();
    g.throughput(Throughput::Elements(100));
    g.bench_function("batch_100", |b| {
        b.iter(|| {
            let parsed = parse_batch(black_box(&batch), 1000, NOW_MS).unwrap();
            assert_eq!(parsed.len(), 100);
            parsed
        })
    });
    g.finish();
}

fn facts(c: &mut Criterion) {
    let mut g = c.benchmark_group("facts");
    g.throughput(Throughput::Elements(1));
    let rec = record(42);
    g.bench_function("of", |b| {
        b.iter(|| Facts::of(black_box(&rec), NOW_MS, Wanted::default()))
    });
    g.finish();
}

fn idempotency(c: &mut Criterion) {
    let mut g = c.benchmark_group("idempotency_lookup");
    g.sample_size(30);
    let dir = tempfile::tempdir().unwrap();
    let store = SledStorage::open(dir.path(), &SledOptions::default()).unwrap();
    // 10,000 keys stored, so the lookups walk a tree of some size.
    let stored: Vec<NewEvent> = (0..10_000)
        .map(|n| NewEvent { record: record(n) })
        .collect();
    for chunk in stored.chunks(1000) {
        store.append(chunk, NOW_MS, TTL_MS).unwrap();
    }
    store.flush().unwrap();
    for size in [1usize, 100] {
        // Spread over the stored keys.
        let group: Vec<NewEvent> = (0..size as u64)
            .map(|i| NewEvent {
                record: record(i * 97 % 10_000),
            })
            .collect();
        let outcomes = store.append(&group, NOW_MS + 1, TTL_MS).unwrap();
        assert!(
            outcomes
                .iter()
                .all(|o| matches!(o, AppendOutcome::Duplicate { .. })),
            "every key of the group is already stored"
        );
        g.throughput(Throughput::Elements(size as u64));
        g.bench_with_input(
            BenchmarkId::new("all_duplicates", size),
            &group,
            |b, group| b.iter(|| store.append(black_box(group), NOW_MS + 1, TTL_MS).unwrap()),
        );
    }
    g.finish();
}

/// The aggregates in a `BTreeMap`: what `apply` computes, without sled.
#[derive(Default)]
struct MapKv(BTreeMap<Vec<u8>, Vec<u8>>);

impl KvWrite for MapKv {
    type Error = Infallible;
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, Infallible> {
        Ok(self.0.get(key).cloned())
    }
    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), Infallible> {
        self.0.insert(key.to_vec(), value.to_vec());
        Ok(())
    }
    fn remove(&mut self, key: &[u8]) -> Result<(), Infallible> {
        self.0.remove(key);
        Ok(())
    }
}

fn analytics_apply(c: &mut Criterion) {
    let mut g = c.benchmark_group("analytics_apply");
    let mut rng = fastrand::Rng::with_seed(11);
    let types = [
        "page_view",
        "click",
        "signup",
        "login",
        "purchase",
        "search",
    ];
    let facts: Vec<Facts> = (0..100)
        .map(|i| {
            let event_type = types[rng.usize(..types.len())];
            Facts {
                event_type: event_type.to_owned(),
                occurred_at_ms: NOW_MS - rng.i64(0..600_000),
                user_id: Some(format!("user_{}", rng.u32(0..1000))),
                session_id: Some(format!("sess_{}", i % 20)),
                page: (event_type == "page_view").then(|| format!("/page/{}", rng.u32(0..10))),
                latency_ms: rng.i64(1..500),
                sums: Vec::new(),
                windows: Vec::new(),
            }
        })
        .collect();
    let facts: Vec<&Facts> = facts.iter().collect();
    // Steady state: the same users and days already have aggregates.
    let mut kv = MapKv::default();
    let nothing_known = Known::default();
    let mut known = Known::default();
    known.learn(analytics::apply(&mut kv, &facts, NOW_MS, 1, &nothing_known).unwrap());
    g.throughput(Throughput::Elements(facts.len() as u64));
    // Each batch its own seq, as in the daemon (it names trends' records).
    let mut batch = 1;
    // Every member read from the map (as after a start).
    g.bench_function("batch_100", |b| {
        b.iter(|| {
            batch += 1;
            analytics::apply(&mut kv, black_box(&facts), NOW_MS, batch, &nothing_known).unwrap()
        })
    });
    // The members known from the batch before (as in the daemon's steady
    // state): the map's reads are cheap, so this shows the work skipped,
    // not the cost of sled's reads that it saves.
    g.bench_function("batch_100_known", |b| {
        b.iter(|| {
            batch += 1;
            analytics::apply(&mut kv, black_box(&facts), NOW_MS, batch, &known).unwrap()
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    records,
    parsing,
    facts,
    idempotency,
    analytics_apply
);
criterion_main!(benches);
