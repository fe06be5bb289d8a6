//! WAL append with group commit: one transaction and one flush per group,
//! at several group sizes, on a real sled store in a temp dir. The
//! per-event cost falling with the group size is what group commit buys;
//! the same appends without a flush show the CPU share.

use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use inletd::event::WalRecord;
use inletd::storage::sled::{SledOptions, SledStorage};
use inletd::storage::{NewEvent, Storage};

fn record(n: u64) -> NewEvent {
    NewEvent {
        record: WalRecord {
            source: "default".into(),
            key: format!("evt_{n:012}"),
            event_type: "page_view".into(),
            received_at_ms: 1_700_000_000_000,
            occurred_at_ms: 1_700_000_000_000,
            only_sink: None,
            body: format!(
                r#"{{"event_id":"evt_{n:012}","event_type":"page_view","user_id":"user_{}","properties":{{"page":"/pricing","ref":"newsletter"}}}}"#,
                n % 1000
            ),
        },
    }
}

/// Appends groups of each size to a fresh store, flushing after each group
/// or not.
fn appends(c: &mut Criterion, name: &str, sizes: &[u64], flush: bool) {
    let mut g = c.benchmark_group(name);
    g.sample_size(20);
    for &size in sizes {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Storage> =
            Arc::new(SledStorage::open(dir.path(), &SledOptions::default()).unwrap());
        let mut next = 0u64;
        g.throughput(Throughput::Elements(size));
        g.bench_with_input(BenchmarkId::from_parameter(size), &size, |b, &size| {
            b.iter(|| {
                let group: Vec<NewEvent> = (0..size).map(|i| record(next + i)).collect();
                next += size;
                store.append(&group, 1_700_000_000_000, 86_400_000).unwrap();
                if flush {
                    store.flush().unwrap();
                }
            })
        });
    }
    g.finish();
}

fn group_commit(c: &mut Criterion) {
    appends(c, "wal_append_flush", &[1, 10, 100, 1000], true);
}

/// The same appends without the flush: the CPU a group costs, which the
/// Deduper spends serially (it holds the write lock).
fn append_only(c: &mut Criterion) {
    appends(c, "wal_append_no_flush", &[64, 1000], false);
}

criterion_group!(benches, group_commit, append_only);
criterion_main!(benches);
