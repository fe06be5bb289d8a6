//! The `/stats` queries over a real sled store holding `BENCH_EVENTS`
//! processed events (default 1,000,000) spread over 30 days and 20,000
//! users, loaded through the same commit path the Processor uses. Also
//! reports the load rate (events/s through `commit_batch` with analytics).

use std::sync::Arc;
use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use inletd::analytics::{self, Facts};
use inletd::storage::sled::{SledOptions, SledStorage};
use inletd::storage::{BatchAck, Storage};

const DAY_MS: i64 = 86_400_000;
const START_MS: i64 = 1_704_067_200_000; // 2024-01-01T00:00:00Z

fn load(store: &dyn Storage, events: u64) {
    let mut rng = fastrand::Rng::with_seed(7);
    let types = [
        "page_view",
        "click",
        "signup",
        "login",
        "purchase",
        "search",
    ];
    let started = Instant::now();
    let mut seq = 0;
    while seq < events {
        let n = 1000.min(events - seq);
        let processed = (0..n)
            .map(|i| {
                let facts = Facts {
                    event_type: types[rng.usize(..types.len())].to_owned(),
                    occurred_at_ms: START_MS + rng.i64(0..30 * DAY_MS),
                    user_id: Some(format!("user_{}", rng.u32(0..20_000))),
                    session_id: None,
                    page: None,
                    latency_ms: rng.i64(1..500),
                    sums: Vec::new(),
                    windows: Vec::new(),
                };
                (seq + i + 1, Some(facts))
            })
            .collect();
        seq += n;
        store
            .commit_batch(&BatchAck {
                upto: seq,
                processed,
                now_ms: START_MS + 31 * DAY_MS,
                dead: Vec::new(),
            })
            .unwrap();
    }
    store.flush().unwrap();
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "loaded {events} events in {secs:.1} s: {:.0} events/s through commit_batch",
        events as f64 / secs
    );
}

fn queries(c: &mut Criterion) {
    let events = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Storage> =
        Arc::new(SledStorage::open(dir.path(), &SledOptions::default()).unwrap());
    load(store.as_ref(), events);
    let from = analytics::day_of(START_MS);
    let to = from + 29;
    let mut g = c.benchmark_group("stats");
    g.sample_size(10);
    g.bench_function("dau_30_days", |b| {
        b.iter(|| analytics::dau(store.as_ref(), from, to).unwrap())
    });
    g.bench_function("top_events_30_days", |b| {
        b.iter(|| {
            analytics::top_events(store.as_ref(), from, to, 10, None, analytics::RankBy::Count)
                .unwrap()
        })
    });
    g.bench_function("retention_daily_7", |b| {
        b.iter(|| analytics::retention(store.as_ref(), from, 7, 1).unwrap())
    });
    g.bench_function("retention_weekly_4", |b| {
        b.iter(|| analytics::retention(store.as_ref(), from, 4, 7).unwrap())
    });
    g.finish();
}

criterion_group!(benches, queries);
criterion_main!(benches);
