//! The whole actor pipeline in process, on the in-memory reference store
//! (`MemoryStorage`), without spawning the binary: quick feedback on what
//! a user does (HTTP on the pipeline's own listener) and on what must hold
//! afterwards (the store's queue, counters and DLQ, and what the sink got).
//!
//! Each test waits with [`eventually`] (a short poll with a deadline), and
//! uses [`Pipeline::drain`] as a barrier: once the Batcher answers it is
//! caught up, every batch handed out so far has been delivered and
//! committed, so "exactly once" is checked after the fact, not after a
//! sleep.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use inletd::app::Running;
use inletd::config::{Config, Durability};
use inletd::event::Queued;
use inletd::pipeline::Pipeline;
use inletd::sinks::{Delivery, Sink, SinkError};
use inletd::storage::Storage;
use inletd::storage::memory::MemoryStorage;

/// The test sink's name, as DLQ entries and `/stats/summary` show it.
const SINK: &str = "recorder";

/// How long [`eventually`] waits before it fails.
const PATIENCE: Duration = Duration::from_secs(5);

/// One event a sink was handed: (source, idempotency key, event type).
type Got = (String, String, String);

/// Records every event it delivers; can be told to fail every delivery
/// permanently, or to take a while over each.
#[derive(Default)]
struct Recorder {
    /// Every delivery fails with a permanent error while set.
    failing: AtomicBool,
    /// Each delivery takes this long (ms) before it succeeds or fails.
    hold_ms: AtomicU64,
    /// Deliveries begun, failed ones included.
    attempts: AtomicUsize,
    /// The events of every delivery that succeeded, in order.
    got: Mutex<Vec<Got>>,
}

impl Recorder {
    fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    /// The keys delivered, sorted (a key delivered twice shows twice).
    fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.got().into_iter().map(|(_, k, _)| k).collect();
        keys.sort();
        keys
    }
}

impl Sink for Recorder {
    fn name(&self) -> &str {
        SINK
    }

    fn deliver<'a>(&'a self, events: &'a [Queued]) -> Delivery<'a> {
        Box::pin(async move {
            self.attempts.fetch_add(1, Ordering::SeqCst);
            let hold = self.hold_ms.load(Ordering::SeqCst);
            if hold > 0 {
                tokio::time::sleep(Duration::from_millis(hold)).await;
            }
            if self.failing.load(Ordering::SeqCst) {
                return Err(SinkError::Permanent("the receiver answered 400".into()));
            }
            self.got.lock().unwrap().extend(events.iter().map(|q| {
                (
                    q.record.source.clone(),
                    q.record.key.clone(),
                    q.record.event_type.clone(),
                )
            }));
            Ok(())
        })
    }
}

/// The test config: any port, short batches, no retries, fsync mode;
/// then `extra`.
fn config(extra: impl FnOnce(&mut Config)) -> Config {
    let mut c = Config {
        bind: "127.0.0.1:0".into(),
        // Never created: the store is in memory.
        data_dir: std::env::temp_dir().join("inletd-pipeline-memory-unused"),
        durability: Durability::Fsync,
        batch_timeout_ms: 10,
        max_retries: 0,
        retry_base_ms: 1,
        retry_max_ms: 5,
        ..Config::default()
    };
    extra(&mut c);
    c
}

/// Starts the pipeline on `store` with `sink` as its only sink.
async fn start(config: Config, store: &Arc<MemoryStorage>, sink: &Arc<Recorder>) -> Running {
    inletd::app::start(
        config,
        store.clone(),
        Some(vec![sink.clone() as Arc<dyn Sink>]),
    )
    .await
    .expect("the pipeline starts")
}

/// One request with the tests' shared (blocking) client, off the runtime.
async fn call(
    addr: SocketAddr,
    method: &'static str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> common::Response {
    let path = path.to_owned();
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        common::request(addr, method, &path, &headers, &body)
    })
    .await
    .unwrap()
}

/// POSTs `body` as JSON to `path`, with `headers` too.
async fn post(
    addr: SocketAddr,
    path: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> common::Response {
    let mut all = vec![("Content-Type", "application/json")];
    all.extend_from_slice(headers);
    call(addr, "POST", path, &all, body.to_string().into_bytes()).await
}

/// GETs `path` and answers its JSON, failing on anything but 200.
async fn get_json(addr: SocketAddr, path: &str) -> Value {
    let answer = call(addr, "GET", path, &[], Vec::new()).await;
    assert_eq!(answer.status, 200, "GET {path}: {}", answer.text());
    answer.json()
}

/// Polls `check` every few ms until it holds; fails naming `what` after
/// [`PATIENCE`].
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "still not true after {PATIENCE:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until the Batcher is caught up: every batch handed out so far
/// has been delivered and committed.
async fn caught_up(pipeline: &Pipeline) {
    assert!(
        pipeline.drain(PATIENCE).await,
        "the Batcher did not catch up within {PATIENCE:?}"
    );
}

/// The built-in counter, by event type.
fn counts(store: &MemoryStorage) -> BTreeMap<String, u64> {
    store.counts().unwrap().into_iter().collect()
}

/// Events waiting in the store's queue.
fn depth(store: &MemoryStorage) -> u64 {
    store.queue_info().unwrap().depth
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// A client posts one batch of four events: two new ones, the first one
/// again (under another event type) and one without `event_type`. The
/// answer counts 2 accepted, 1 duplicate and 1 rejected (naming the event
/// and the field); the sink gets exactly the two accepted events, once and
/// as first sent; the store holds two records, and its counter one of
/// each accepted type and nothing of the repeat's type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_a_duplicate_and_a_schema_error_delivers_the_accepted_once() {
    let store = Arc::new(MemoryStorage::new());
    let sink = Arc::new(Recorder::default());
    let running = start(config(|_| {}), &store, &sink).await;

    let batch = json!({"events": [
        {"event_id": "e1", "event_type": "signup"},
        {"event_id": "e2", "event_type": "purchase"},
        {"event_id": "e1", "event_type": "page_view"},
        {"event_id": "e3"},
    ]});
    let answer = post(running.addr, "/webhook/batch", &batch, &[]).await;
    assert_eq!(answer.status, 202, "{}", answer.text());
    let body = answer.json();
    assert_eq!(body["accepted"], 2, "{body}");
    assert_eq!(body["duplicates"], 1, "{body}");
    let rejected = body["rejected"].as_array().expect("a list of rejections");
    assert_eq!(rejected.len(), 1, "{body}");
    assert_eq!(rejected[0]["index"], 3, "{body}");
    assert_eq!(rejected[0]["field"], "event_type", "{body}");
    assert_eq!(
        store.queue_info().unwrap().last_seq,
        2,
        "only the accepted events are stored"
    );

    eventually("the accepted events reach the sink", || {
        sink.got().len() >= 2
    })
    .await;
    caught_up(&running.pipeline).await;
    let expected: Vec<Got> = [("e1", "signup"), ("e2", "purchase")]
        .into_iter()
        .map(|(k, t)| ("default".to_owned(), k.to_owned(), t.to_owned()))
        .collect();
    let mut got = sink.got();
    got.sort();
    assert_eq!(got, expected, "the accepted events, each once");
    assert_eq!(depth(&store), 0, "nothing left queued");
    assert_eq!(
        counts(&store),
        BTreeMap::from([("purchase".to_owned(), 1), ("signup".to_owned(), 1)]),
        "the counter holds the accepted events, not the repeat's type"
    );
    running.stop().await;
}

/// The sink refuses everything: the events end in the DLQ (as GET
/// /admin/dlq shows from loopback), addressed to that sink. Once it
/// accepts again, an operator replays the DLQ (POST /admin/dlq/replay with
/// no body): the sink gets each event once, the DLQ is empty, the counter
/// is what it was before the replay (a replay counts nothing), and
/// /stats/summary shows the DLQ and the sink's state at each step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_lettered_events_are_delivered_by_a_replay_and_counted_once() {
    let store = Arc::new(MemoryStorage::new());
    let sink = Arc::new(Recorder::default());
    sink.failing.store(true, Ordering::SeqCst);
    let running = start(config(|_| {}), &store, &sink).await;

    let batch = json!({"events": [
        {"event_id": "d1", "event_type": "signup"},
        {"event_id": "d2", "event_type": "purchase"},
    ]});
    let answer = post(running.addr, "/webhook/batch", &batch, &[]).await;
    assert_eq!(answer.status, 202, "{}", answer.text());
    assert_eq!(answer.json()["accepted"], 2);

    eventually("both events are parked in the DLQ", || {
        store.dlq_len().unwrap() == 2
    })
    .await;
    caught_up(&running.pipeline).await;
    assert!(
        sink.attempts.load(Ordering::SeqCst) >= 1,
        "a delivery was tried"
    );
    assert!(sink.got().is_empty(), "nothing was delivered");
    let listed = get_json(running.addr, "/admin/dlq").await;
    let entries = listed["entries"].as_array().expect("a list of entries");
    let mut parked: Vec<String> = entries
        .iter()
        .map(|e| {
            assert_eq!(e["sink"], SINK, "{e}");
            assert_eq!(e["error"], "the receiver answered 400", "{e}");
            assert_eq!(e["attempts"], 1, "no retry of a permanent error: {e}");
            e["record"]["key"].as_str().unwrap_or_default().to_owned()
        })
        .collect();
    parked.sort();
    assert_eq!(parked, strings(&["d1", "d2"]), "{listed}");
    let before = counts(&store);
    assert_eq!(
        before,
        BTreeMap::from([("purchase".to_owned(), 1), ("signup".to_owned(), 1)]),
        "processed (if not delivered) events are counted once"
    );
    let summary = get_json(running.addr, "/stats/summary").await;
    assert_eq!(summary["dlq_size"], 2, "{summary}");
    assert_eq!(summary["sinks"][0]["state"], "retrying", "{summary}");
    assert_eq!(
        summary["sinks"][0]["last_error"], "the receiver answered 400",
        "{summary}"
    );

    sink.failing.store(false, Ordering::SeqCst);
    let answer = call(running.addr, "POST", "/admin/dlq/replay", &[], Vec::new()).await;
    assert_eq!(answer.status, 202, "{}", answer.text());
    assert_eq!(answer.json(), json!({"replayed": 2, "remaining": 0}));
    eventually("the replayed events reach the sink", || {
        sink.got().len() >= 2
    })
    .await;
    caught_up(&running.pipeline).await;

    assert_eq!(sink.keys(), strings(&["d1", "d2"]), "each delivered once");
    assert_eq!(depth(&store), 0, "nothing left queued");
    assert_eq!(store.dlq_len().unwrap(), 0, "the DLQ is empty");
    let listed = running.pipeline.dlq_list(0, 100).await.unwrap();
    assert!(listed.is_empty(), "the DLQ actor lists nothing: {listed:?}");
    let listed = get_json(running.addr, "/admin/dlq").await;
    assert_eq!(listed["entries"], json!([]), "{listed}");
    assert_eq!(counts(&store), before, "the replay counted nothing again");
    let summary = get_json(running.addr, "/stats/summary").await;
    assert_eq!(summary["total_events"], 2, "{summary}");
    assert_eq!(summary["dlq_size"], 0, "{summary}");
    assert_eq!(summary["sinks"][0]["state"], "ok", "{summary}");
    running.stop().await;
}

/// The Batcher hands a caught-up group on from memory, and reads from the
/// WAL what only the WAL holds. Here both meet: the sink refuses `r1` and
/// `r2` (they are parked), then takes a while over `n1`; while `n1` is out
/// at it, an operator replays the DLQ (its events are in the WAL only) and
/// a client sends `n2` (a group the Batcher holds, behind the replay's
/// seqs). The sink gets `n1`, `r1`, `r2`, `n2`: each once, in the order
/// they were queued; nothing is left queued and the counter has each new
/// event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_queued_between_two_events_is_delivered_between_them_once() {
    let store = Arc::new(MemoryStorage::new());
    let sink = Arc::new(Recorder::default());
    sink.failing.store(true, Ordering::SeqCst);
    let running = start(config(|_| {}), &store, &sink).await;
    let send = |key: &str| json!({"event_id": key, "event_type": "signup"});

    let batch = json!({"events": [send("r1"), send("r2")]});
    let answer = post(running.addr, "/webhook/batch", &batch, &[]).await;
    assert_eq!(answer.status, 202, "{}", answer.text());
    eventually("r1 and r2 are parked", || store.dlq_len().unwrap() == 2).await;
    caught_up(&running.pipeline).await;

    sink.failing.store(false, Ordering::SeqCst);
    sink.hold_ms.store(300, Ordering::SeqCst);
    let tried = sink.attempts.load(Ordering::SeqCst);
    let answer = post(running.addr, "/webhook/events", &send("n1"), &[]).await;
    assert_eq!(answer.status, 202, "{}", answer.text());
    eventually("n1 is out at the sink", || {
        sink.attempts.load(Ordering::SeqCst) > tried
    })
    .await;
    let answer = call(running.addr, "POST", "/admin/dlq/replay", &[], Vec::new()).await;
    assert_eq!(answer.json(), json!({"replayed": 2, "remaining": 0}));
    let answer = post(running.addr, "/webhook/events", &send("n2"), &[]).await;
    assert_eq!(answer.status, 202, "{}", answer.text());
    assert!(
        sink.got().is_empty(),
        "n1 was still out at the sink when r1, r2 and n2 were queued"
    );

    eventually("all four reach the sink", || sink.got().len() >= 4).await;
    caught_up(&running.pipeline).await;
    let keys: Vec<String> = sink.got().into_iter().map(|(_, k, _)| k).collect();
    assert_eq!(
        keys,
        strings(&["n1", "r1", "r2", "n2"]),
        "each once, in seq order"
    );
    assert_eq!(depth(&store), 0, "nothing left queued");
    assert_eq!(
        counts(&store),
        BTreeMap::from([("signup".to_owned(), 4)]),
        "r1 and r2 counted when first processed, n1 and n2 now; the replay adds nothing"
    );
    running.stop().await;
}

/// Two sources, `a` and `b`, are configured. A client sends the same
/// Idempotency-Key to both: each takes it (keys are scoped per source);
/// the same key again on either is a duplicate (200), not stored again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_is_scoped_to_its_source() {
    let file = "[[sources]]\nname = \"a\"\n\n[[sources]]\nname = \"b\"\n";
    let from_file = Config::from_parts(file, &[], &[]).expect("the sources config loads");
    let store = Arc::new(MemoryStorage::new());
    let sink = Arc::new(Recorder::default());
    let running = start(config(|c| c.sources = from_file.sources), &store, &sink).await;

    let event = json!({"event_type": "signup"});
    let key = [("Idempotency-Key", "k-1")];
    for (source, status, verdict) in [
        ("a", 202, "accepted"),
        ("b", 202, "accepted"),
        ("a", 200, "duplicate"),
        ("b", 200, "duplicate"),
    ] {
        let path = format!("/webhook/{source}/events");
        let answer = post(running.addr, &path, &event, &key).await;
        assert_eq!(answer.status, status, "{path}: {}", answer.text());
        assert_eq!(
            answer.json(),
            json!({"status": verdict, "event_id": "k-1"}),
            "{path}"
        );
    }
    assert_eq!(
        store.queue_info().unwrap().last_seq,
        2,
        "one record per source"
    );

    eventually("both events reach the sink", || sink.got().len() >= 2).await;
    caught_up(&running.pipeline).await;
    let mut got = sink.got();
    got.sort();
    let expected: Vec<Got> = ["a", "b"]
        .into_iter()
        .map(|s| (s.to_owned(), "k-1".to_owned(), "signup".to_owned()))
        .collect();
    assert_eq!(got, expected, "one event from each source, once");
    assert_eq!(counts(&store), BTreeMap::from([("signup".to_owned(), 2)]));
    running.stop().await;
}

/// Events queue behind a slow sink, one batch is acknowledged while they
/// wait, and the daemon is stopped while the next batch is out at the
/// sink, its drain deadline already passed (0 s: below the validated
/// minimum of 1 s, to reach the deadline at once): every event answered
/// 202 was either delivered or is still in the store's queue, none lost
/// and none both. Starting again on the same store delivers exactly what
/// was queued, each event once, and the counter counts every event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_behind_a_slow_sink_loses_nothing_and_a_restart_delivers_the_rest() {
    let store = Arc::new(MemoryStorage::new());
    let sink = Arc::new(Recorder::default());
    let cfg = config(|c| {
        c.batch_size = 2;
        // The shortest drain a config may ask for; the slow sink below
        // holds each batch for longer.
        c.drain_timeout_secs = 1;
    });
    let running = start(cfg.clone(), &store, &sink).await;
    let keys: Vec<String> = (0..8).map(|i| format!("s{i}")).collect();
    let send = |key: &String| json!({"event_id": key, "event_type": "signup"});
    let mut answered = Vec::new();

    // Two events go through while the sink is quick.
    for key in &keys[..2] {
        let answer = post(running.addr, "/webhook/events", &send(key), &[]).await;
        assert_eq!(answer.status, 202, "{key}: {}", answer.text());
        answered.push(key.clone());
    }
    eventually("the first two are delivered", || sink.got().len() >= 2).await;
    caught_up(&running.pipeline).await;
    // The sink slows down: the third event is out at it and the rest
    // queue behind it; it is acknowledged while they wait, and the next
    // batch is out at the sink when the daemon stops.
    sink.hold_ms.store(2_000, Ordering::SeqCst);
    let tried = sink.attempts.load(Ordering::SeqCst);
    let answer = post(running.addr, "/webhook/events", &send(&keys[2]), &[]).await;
    assert_eq!(answer.status, 202, "{}", answer.text());
    answered.push(keys[2].clone());
    eventually("the third event's delivery has begun", || {
        sink.attempts.load(Ordering::SeqCst) > tried
    })
    .await;
    for key in &keys[3..] {
        let answer = post(running.addr, "/webhook/events", &send(key), &[]).await;
        assert_eq!(answer.status, 202, "{key}: {}", answer.text());
        answered.push(key.clone());
    }
    eventually("the batch after the third event is out at the sink", || {
        sink.attempts.load(Ordering::SeqCst) > tried + 1
    })
    .await;
    assert_eq!(
        sink.keys(),
        strings(&["s0", "s1", "s2"]),
        "delivered so far"
    );
    running.stop().await;

    let before_restart = sink.keys();
    let delivered: BTreeSet<String> = before_restart.iter().cloned().collect();
    let info = store.queue_info().unwrap();
    let (waiting, damaged) = store.read_after(info.cursor, 100).unwrap();
    assert!(damaged.is_empty(), "{damaged:?}");
    let mut queued: Vec<String> = waiting.into_iter().map(|q| q.record.key).collect();
    queued.sort();
    let queued_set: BTreeSet<String> = queued.iter().cloned().collect();
    assert_eq!(info.depth, queued.len() as u64, "depth counts what waits");
    assert!(
        info.depth > 0,
        "the stop left events queued (else this test proves nothing); delivered {delivered:?}"
    );
    assert_eq!(
        before_restart.len(),
        delivered.len(),
        "nothing delivered twice before the stop: {before_restart:?}"
    );
    assert!(
        delivered.is_disjoint(&queued_set),
        "what was delivered was acknowledged: delivered {delivered:?}, queued {queued:?}"
    );
    let kept: BTreeSet<String> = delivered.union(&queued_set).cloned().collect();
    let all: BTreeSet<String> = answered.iter().cloned().collect();
    assert_eq!(kept, all, "every 202 was delivered or is still queued");

    sink.hold_ms.store(0, Ordering::SeqCst);
    let running = start(cfg, &store, &sink).await;
    eventually("the queued events are delivered after the restart", || {
        sink.got().len() >= before_restart.len() + queued.len()
    })
    .await;
    caught_up(&running.pipeline).await;
    let mut after_restart: Vec<String> = sink.got()[before_restart.len()..]
        .iter()
        .map(|(_, k, _)| k.clone())
        .collect();
    after_restart.sort();
    assert_eq!(
        after_restart, queued,
        "the restart delivers what was queued, once"
    );
    assert_eq!(depth(&store), 0, "nothing left queued");
    assert_eq!(
        counts(&store),
        BTreeMap::from([("signup".to_owned(), answered.len() as u64)]),
        "each event counted once"
    );
    running.stop().await;
}

/// A client sends single events and a batch, a repeat among them; once
/// they are processed, GET /stats/summary reports as many events as were
/// accepted, by type, nothing queued or dead-lettered, and the sink ok.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_summary_counts_what_was_accepted() {
    let store = Arc::new(MemoryStorage::new());
    let sink = Arc::new(Recorder::default());
    let running = start(config(|_| {}), &store, &sink).await;

    let mut accepted = 0;
    for (id, kind) in [("t1", "signup"), ("t2", "page_view"), ("t1", "signup")] {
        let event = json!({"event_id": id, "event_type": kind});
        let answer = post(running.addr, "/webhook/events", &event, &[]).await;
        assert!(matches!(answer.status, 200 | 202), "{}", answer.text());
        accepted += u64::from(answer.status == 202);
    }
    let batch = json!({"events": [
        {"event_id": "t3", "event_type": "page_view"},
        {"event_id": "t4", "event_type": "purchase"},
        {"event_id": "t2", "event_type": "page_view"},
    ]});
    let answer = post(running.addr, "/events", &batch, &[]).await;
    assert_eq!(answer.status, 202, "{}", answer.text());
    accepted += answer.json()["accepted"].as_u64().expect("a count");
    assert_eq!(accepted, 4, "t1, t2, t3 and t4, once each");

    eventually("every accepted event is processed", || {
        sink.got().len() as u64 >= accepted
    })
    .await;
    caught_up(&running.pipeline).await;
    let summary = get_json(running.addr, "/stats/summary").await;
    assert_eq!(summary["total_events"], accepted, "{summary}");
    assert_eq!(
        summary["by_type"],
        json!({"page_view": 2, "purchase": 1, "signup": 1}),
        "{summary}"
    );
    assert_eq!(summary["queue_depth"], 0, "{summary}");
    assert_eq!(summary["dlq_size"], 0, "{summary}");
    assert_eq!(summary["sinks"][0]["name"], SINK, "{summary}");
    assert_eq!(summary["sinks"][0]["state"], "ok", "{summary}");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_built_in_code_is_checked_before_anything_starts() {
    // An embedder sets a batch size of 0, which the config file would refuse.
    let store = Arc::new(MemoryStorage::new());
    let refused =
        inletd::app::start(config(|c| c.batch_size = 0), store.clone(), Some(vec![])).await;
    let Err(error) = refused else {
        panic!("a pipeline started with batch_size = 0");
    };
    assert!(error.to_string().contains("batch_size"), "{error}");
    assert_eq!(depth(&store), 0, "nothing was written");
}
