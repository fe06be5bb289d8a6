//! The pipeline, in process, over a store that misbehaves or a child that
//! dies: a 202 is only ever sent for an event the store holds, a restart
//! hands no batch out twice, and a store that hangs stops the daemon.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use inletd::analytics::KvRead;
use inletd::config::{Config, Durability};
use inletd::event::Queued;
use inletd::pipeline::{BATCHER, METRICS};
use inletd::sinks::{Delivery, Sink};
use inletd::storage::memory::MemoryStorage;
use inletd::storage::{
    AppendOutcome, BatchAck, Counted, DlqEntry, NewEvent, Quarantined, QueueInfo, Storage,
    StorageError,
};

/// The in-memory store with faults that a test can switch on.
#[derive(Default)]
struct Faulty {
    inner: MemoryStorage,
    /// `append` stores every event but answers for one fewer.
    short_outcomes: AtomicBool,
    /// `queue_bytes` fails, as while the store is being reopened.
    bytes_unknown: AtomicBool,
    /// `flush` does not return while this is set, as a deadlocked store.
    hang_flush: AtomicBool,
    /// `append` panics, as a bug in the store would.
    panic_append: AtomicBool,
    /// How many events each `append` was handed: the group commits.
    groups: Mutex<Vec<usize>>,
    /// Records `read_after` has answered: what was read back from the WAL.
    records_read: AtomicUsize,
}

impl KvRead for Faulty {
    type Error = StorageError;
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner.get(key)
    }
    fn scan(
        &self,
        from: &[u8],
        to: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StorageError> {
        self.inner.scan(from, to, f)
    }
}

impl Storage for Faulty {
    fn append(
        &self,
        events: &[NewEvent],
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<Vec<AppendOutcome>, StorageError> {
        self.groups.lock().unwrap().push(events.len());
        if self.panic_append.load(Ordering::SeqCst) {
            panic!("the store's append panicked (test fault)");
        }
        let mut outcomes = self.inner.append(events, now_ms, ttl_ms)?;
        if self.short_outcomes.load(Ordering::SeqCst) {
            outcomes.pop();
        }
        Ok(outcomes)
    }
    fn flush(&self) -> Result<(), StorageError> {
        while self.hang_flush.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.inner.flush()
    }
    fn read_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<Queued>, Vec<Quarantined>), StorageError> {
        let read = self.inner.read_after(after, limit)?;
        self.records_read.fetch_add(read.0.len(), Ordering::SeqCst);
        Ok(read)
    }
    fn commit_batch(&self, ack: &BatchAck) -> Result<(), StorageError> {
        self.inner.commit_batch(ack)
    }
    fn queue_info(&self) -> Result<QueueInfo, StorageError> {
        self.inner.queue_info()
    }
    fn queue_bytes(&self) -> Result<u64, StorageError> {
        if self.bytes_unknown.load(Ordering::SeqCst) {
            return Err(StorageError::Io("the store is being reopened".into()));
        }
        self.inner.queue_bytes()
    }
    fn counts(&self) -> Result<Vec<(String, u64)>, StorageError> {
        self.inner.counts()
    }
    fn counted(&self, from_day: i32, to_day: i32) -> Result<Counted, StorageError> {
        self.inner.counted(from_day, to_day)
    }
    fn park(&self, entries: &[DlqEntry]) -> Result<(), StorageError> {
        self.inner.park(entries)
    }
    fn prune_windows(&self, before_ms: i64) -> Result<usize, StorageError> {
        self.inner.prune_windows(before_ms)
    }
    fn merge_user_records(&self, from_day: i32, to_day: i32) -> Result<usize, StorageError> {
        self.inner.merge_user_records(from_day, to_day)
    }
    fn sweep_keys(&self, before_ms: i64, limit: usize) -> Result<usize, StorageError> {
        self.inner.sweep_keys(before_ms, limit)
    }
    fn dlq_list(&self, after: u64, limit: usize) -> Result<Vec<(u64, DlqEntry)>, StorageError> {
        self.inner.dlq_list(after, limit)
    }
    fn dlq_get(&self, id: u64) -> Result<Option<DlqEntry>, StorageError> {
        self.inner.dlq_get(id)
    }
    fn dlq_remove(&self, ids: &[u64]) -> Result<usize, StorageError> {
        self.inner.dlq_remove(ids)
    }
    fn dlq_len(&self) -> Result<u64, StorageError> {
        self.inner.dlq_len()
    }
    fn dlq_replay(&self, ids: &[u64]) -> Result<(Vec<u64>, u64), StorageError> {
        self.inner.dlq_replay(ids)
    }
}

/// Records every event it is handed; each delivery takes `hold`.
struct SlowSink {
    hold: Duration,
    deliveries: AtomicUsize,
    got: Mutex<Vec<String>>,
}

impl Sink for SlowSink {
    fn name(&self) -> &str {
        "slow"
    }

    fn deliver<'a>(&'a self, events: &'a [Queued]) -> Delivery<'a> {
        Box::pin(async move {
            self.deliveries.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.hold).await;
            self.got
                .lock()
                .unwrap()
                .extend(events.iter().map(|q| q.record.key.clone()));
            Ok(())
        })
    }
}

fn config(extra: impl FnOnce(&mut Config)) -> Config {
    let mut c = Config {
        bind: "127.0.0.1:0".into(),
        data_dir: std::env::temp_dir().join("inletd-pipeline-faults-unused"),
        batch_timeout_ms: 20,
        ..Config::default()
    };
    extra(&mut c);
    c
}

/// POSTs JSON `body` to `path` with the tests' shared client (blocking,
/// so off the runtime); returns the status and the body.
async fn post(addr: std::net::SocketAddr, path: &str, body: String) -> (u16, String) {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let answer = common::request(
            addr,
            "POST",
            &path,
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        );
        (
            answer.status,
            String::from_utf8_lossy(&answer.body).into_owned(),
        )
    })
    .await
    .unwrap()
}

fn event(id: &str) -> String {
    format!(r#"{{"event_id":"{id}","event_type":"signup"}}"#)
}

/// Posts one event; `None` if no answer came within 10 s.
async fn post_event_within_10s(addr: std::net::SocketAddr, id: &str) -> Option<(u16, String)> {
    tokio::time::timeout(
        Duration::from_secs(10),
        post(addr, "/webhook/events", event(id)),
    )
    .await
    .ok()
}

/// The store answers for fewer events than it was given: no request of
/// that group is told its events were accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_answers_for_fewer_events_gets_no_202() {
    let store = Arc::new(Faulty::default());
    store.short_outcomes.store(true, Ordering::SeqCst);
    let running = inletd::app::start(config(|_| {}), store.clone(), Some(Vec::new()))
        .await
        .unwrap();
    let batch = format!(
        r#"{{"events":[{},{},{}]}}"#,
        event("a"),
        event("b"),
        event("c")
    );
    let (status, body) = post(running.addr, "/webhook/batch", batch).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("storage_unavailable"), "{body}");
    let (status, body) = post(running.addr, "/webhook/events", event("d")).await;
    assert_eq!(status, 503, "{body}");

    // Once the store answers for every event, the re-sent ones are taken.
    store.short_outcomes.store(false, Ordering::SeqCst);
    let (status, body) = post(running.addr, "/webhook/events", event("e")).await;
    assert_eq!(status, 202, "{body}");
    running.stop().await;
}

/// A group commit panics in the store: its request is answered 503, not
/// left hanging, and the next request is written as its own group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_commit_that_panics_answers_503_and_the_next_is_written() {
    let store = Arc::new(Faulty::default());
    let running = inletd::app::start(config(|_| {}), store.clone(), Some(Vec::new()))
        .await
        .unwrap();
    store.panic_append.store(true, Ordering::SeqCst);
    let (status, body) = post_event_within_10s(running.addr, "a")
        .await
        .expect("a request whose group panicked must still be answered");
    assert_eq!(status, 503, "{body}");

    store.panic_append.store(false, Ordering::SeqCst);
    let (status, body) = post_event_within_10s(running.addr, "b")
        .await
        .expect("the group after a panic must be written");
    assert_eq!(status, 202, "{body}");
    assert_eq!(*store.groups.lock().unwrap(), [1, 1]);
    assert_eq!(
        store.inner.queue_info().unwrap().last_seq,
        1,
        "only b is stored"
    );
    running.stop().await;
}

/// Requests that arrive while a group is being flushed wait for it, and
/// all of them become the next group: one more flush, not one for the
/// first of them and another for the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_wait_for_a_flush_share_the_next_one() {
    let store = Arc::new(Faulty::default());
    let running = inletd::app::start(config(|_| {}), store.clone(), Some(Vec::new()))
        .await
        .unwrap();
    store.hang_flush.store(true, Ordering::SeqCst);
    let first = tokio::spawn(post(running.addr, "/webhook/events", event("first")));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while store.groups.lock().unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the first request was never written"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Five more clients post while that group's flush hangs.
    let waiting: Vec<_> = (0..5)
        .map(|i| {
            tokio::spawn(post(
                running.addr,
                "/webhook/events",
                event(&format!("waiting-{i}")),
            ))
        })
        .collect();
    // Each reaches the Deduper in about a millisecond; two seconds leave a
    // slow machine its margin.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        *store.groups.lock().unwrap(),
        [1],
        "nothing written meanwhile"
    );
    store.hang_flush.store(false, Ordering::SeqCst);
    for answer in std::iter::once(first).chain(waiting) {
        let (status, body) = answer.await.unwrap();
        assert_eq!(status, 202, "{body}");
    }
    assert_eq!(
        *store.groups.lock().unwrap(),
        [1, 5],
        "one group for the five"
    );
    running.stop().await;
}

/// With a byte limit set, a store that cannot say how many bytes wait
/// takes nothing: unknown is not empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_queue_size_refuses_intake_under_a_byte_limit() {
    let store = Arc::new(Faulty::default());
    let running = inletd::app::start(
        config(|c| c.max_queue_bytes = 1 << 20),
        store.clone(),
        Some(Vec::new()),
    )
    .await
    .unwrap();
    store.bytes_unknown.store(true, Ordering::SeqCst);
    let (status, body) = post(running.addr, "/webhook/events", event("a")).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(store.queue_info().unwrap().last_seq, 0, "nothing stored");
    store.bytes_unknown.store(false, Ordering::SeqCst);
    let (status, body) = post(running.addr, "/webhook/events", event("a")).await;
    assert_eq!(status, 202, "{body}");
    running.stop().await;
}

/// The Metrics actor dies while a batch is out at a slow sink: it is
/// restarted, and the sink gets each event once (a restart of a child
/// that holds no batch must not hand the running one out again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metrics_restart_hands_no_batch_out_twice() {
    restart_while_a_batch_is_out(METRICS.name).await;
}

/// The Batcher dies while the Processor holds a batch at a slow sink: the
/// new Batcher waits for that batch instead of reading it again from the
/// cursor, so the sink gets each event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batcher_restart_hands_no_batch_out_twice() {
    restart_while_a_batch_is_out(BATCHER.name).await;
}

/// A client sends five events one at a time to a daemon that keeps up,
/// each delivered before the next is sent. With `durability = "fsync"`
/// each group is synced when the Deduper passes it on, and the Batcher
/// hands it to the sink from memory: nothing is read back from the WAL.
/// With `"interval"` a group is not synced yet when it is passed on (a
/// store that failed before the sync would reopen without it), so every
/// record is read back from the WAL, as the store then holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caught_up_daemon_reads_back_only_the_groups_not_yet_synced() {
    for (durability, read_back) in [(Durability::Fsync, 0), (Durability::Interval, 5)] {
        let store = Arc::new(Faulty::default());
        let sink = Arc::new(SlowSink {
            hold: Duration::ZERO,
            deliveries: AtomicUsize::new(0),
            got: Mutex::new(Vec::new()),
        });
        let running = inletd::app::start(
            config(|c| c.durability = durability),
            store.clone(),
            Some(vec![sink.clone() as Arc<dyn Sink>]),
        )
        .await
        .unwrap();
        for n in 1..=5 {
            let id = format!("e{n}");
            assert_eq!(
                post(running.addr, "/webhook/events", event(&id)).await.0,
                202
            );
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while sink.got.lock().unwrap().len() < n {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{durability:?}: {id} never reached the sink"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        assert_eq!(
            *sink.got.lock().unwrap(),
            ["e1", "e2", "e3", "e4", "e5"],
            "{durability:?}: each once, in order"
        );
        assert_eq!(
            store.records_read.load(Ordering::SeqCst),
            read_back,
            "{durability:?}: records read back from the WAL"
        );
        running.stop().await;
    }
}

/// Kills the child `role` while a batch is held at a slow sink, then
/// checks that every event reached the sink once and the child was
/// restarted.
async fn restart_while_a_batch_is_out(role: &str) {
    let store = Arc::new(Faulty::default());
    let sink = Arc::new(SlowSink {
        hold: Duration::from_millis(400),
        deliveries: AtomicUsize::new(0),
        got: Mutex::new(Vec::new()),
    });
    let running = inletd::app::start(
        config(|_| {}),
        store.clone(),
        Some(vec![sink.clone() as Arc<dyn Sink>]),
    )
    .await
    .unwrap();
    for id in ["a", "b", "c"] {
        assert_eq!(
            post(running.addr, "/webhook/events", event(id)).await.0,
            202
        );
    }
    for _ in 0..100 {
        if sink.deliveries.load(Ordering::SeqCst) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(sink.deliveries.load(Ordering::SeqCst), 1, "a batch is out");

    let name = running.actor_name(role);
    ractor::registry::where_is(name)
        .unwrap_or_else(|| panic!("the {role} actor is registered"))
        .kill();
    for _ in 0..300 {
        if store.queue_info().unwrap().depth == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(store.queue_info().unwrap().depth, 0, "processed");
    // A batch handed out again would reach the sink after the first one.
    tokio::time::sleep(sink.hold * 2).await;
    assert_eq!(sink.deliveries.load(Ordering::SeqCst), 1, "one delivery");
    let mut got = sink.got.lock().unwrap().clone();
    got.sort();
    assert_eq!(got, vec!["a", "b", "c"], "each event delivered once");
    let rendered = running.pipeline.render_metrics().await.unwrap_or_default();
    assert!(
        rendered.contains(&format!(
            "inletd_actor_restarts_total{{actor=\"{role}\"}} 1"
        )),
        "the {role} actor was restarted:\n{rendered}"
    );
    // Intake and processing go on after the restart.
    assert_eq!(
        post(running.addr, "/webhook/events", event("d")).await.0,
        202
    );
    for _ in 0..300 {
        if sink.got.lock().unwrap().len() == 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        sink.got.lock().unwrap().len(),
        4,
        "the next event is processed"
    );
    running.stop().await;
}

/// The store stops answering in the middle of a group commit: after
/// `store_stall_secs` the daemon stops with an error that says what hung
/// (the binary then exits non-zero for systemd to restart it), and the
/// request in that group got no answer while it hung.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_hangs_stops_the_daemon_with_an_error() {
    let store = Arc::new(Faulty::default());
    let running = inletd::app::start(
        config(|c| c.store_stall_secs = 1),
        store.clone(),
        Some(Vec::new()),
    )
    .await
    .unwrap();
    store.hang_flush.store(true, Ordering::SeqCst);
    let addr = running.addr;
    // Answered only once the store returns (or never, in the binary).
    let answer = tokio::task::spawn_blocking(move || {
        common::try_request(
            addr,
            "POST",
            "/webhook/events",
            &[("Content-Type", "application/json")],
            event("hung").as_bytes(),
        )
    });
    let started = std::time::Instant::now();
    let outcome = tokio::time::timeout(
        Duration::from_secs(10),
        running.run_until(std::future::pending()),
    )
    .await
    .expect("the daemon should stop on its own");
    let waited = started.elapsed();
    let error = outcome
        .expect_err("a hung store must end in an error")
        .to_string();
    assert!(error.contains("group commit of 1 events"), "{error}");
    assert!(error.contains("store_stall_secs"), "{error}");
    assert!(
        waited >= Duration::from_secs(1),
        "not before the limit: {waited:?}"
    );
    assert!(!answer.is_finished(), "no answer while the write hung");
    // Let the blocked write return so the test's runtime can end (the
    // binary exits instead).
    store.hang_flush.store(false, Ordering::SeqCst);
    let _ = answer.await;
}
