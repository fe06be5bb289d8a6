//! Supervision, in process: a sink that panics takes the Processor down;
//! the supervisor restarts it, the batch is read again from the WAL, and
//! the built-in counter still counts each event once. A child that keeps
//! failing exhausts the restart budget and the daemon stops with an error.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use inletd::config::Config;
use inletd::event::Queued;
use inletd::sinks::{Delivery, Sink};
use inletd::storage::Storage;
use inletd::storage::sled::{SledOptions, SledStorage};

/// Panics on its first `panics` deliveries, then records what it gets.
struct PanickySink {
    panics: usize,
    calls: AtomicUsize,
    got: Mutex<Vec<String>>,
}

impl Sink for PanickySink {
    fn name(&self) -> &str {
        "panicky"
    }

    fn deliver<'a>(&'a self, events: &'a [Queued]) -> Delivery<'a> {
        Box::pin(async move {
            if self.calls.fetch_add(1, Ordering::SeqCst) < self.panics {
                panic!("sink bug");
            }
            self.got
                .lock()
                .unwrap()
                .extend(events.iter().map(|q| q.record.key.clone()));
            Ok(())
        })
    }
}

fn config(dir: &std::path::Path) -> Config {
    Config {
        bind: "127.0.0.1:0".into(),
        data_dir: dir.to_owned(),
        batch_timeout_ms: 20,
        max_restarts_per_minute: 3,
        ..Config::default()
    }
}

/// POSTs one event (from a blocking thread) and returns the status.
async fn post(addr: std::net::SocketAddr, id: &str) -> u16 {
    let body = format!(r#"{{"event_id":"{id}","event_type":"signup"}}"#);
    tokio::task::spawn_blocking(move || {
        common::request(
            addr,
            "POST",
            "/webhook/events",
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
        .status
    })
    .await
    .unwrap()
}

/// A sink panics on the first batch: the Processor is restarted, the batch
/// is processed again and counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_actor_is_restarted_and_nothing_is_lost_or_counted_twice() {
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn Storage> =
        Arc::new(SledStorage::open(dir.path(), &SledOptions::default()).unwrap());
    let sink = Arc::new(PanickySink {
        panics: 1,
        calls: AtomicUsize::new(0),
        got: Mutex::new(Vec::new()),
    });
    let running = inletd::app::start(
        config(dir.path()),
        storage.clone(),
        Some(vec![sink.clone() as Arc<dyn Sink>]),
    )
    .await
    .unwrap();
    for id in ["a", "b", "c"] {
        assert_eq!(post(running.addr, id).await, 202);
    }
    for _ in 0..200 {
        if storage.queue_info().unwrap().depth == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut got = sink.got.lock().unwrap().clone();
    got.sort();
    got.dedup();
    assert_eq!(got, vec!["a", "b", "c"]);
    assert_eq!(storage.counts().unwrap(), vec![("signup".to_owned(), 3)]);
    let metrics = running.pipeline.render_metrics().await.unwrap();
    assert!(
        metrics.contains("inletd_actor_restarts_total{actor=\"processor\"} 1"),
        "{metrics}"
    );
    // Still accepting after the restart.
    assert_eq!(post(running.addr, "d").await, 202);
    running.stop().await;
}

/// A child that fails every time exhausts the restart budget: the daemon
/// stops with an error (systemd restarts it), and the WAL keeps the events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_that_keeps_failing_stops_the_daemon_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn Storage> =
        Arc::new(SledStorage::open(dir.path(), &SledOptions::default()).unwrap());
    let sink = Arc::new(PanickySink {
        panics: usize::MAX,
        calls: AtomicUsize::new(0),
        got: Mutex::new(Vec::new()),
    });
    let running = inletd::app::start(
        config(dir.path()),
        storage.clone(),
        Some(vec![sink as Arc<dyn Sink>]),
    )
    .await
    .unwrap();
    assert_eq!(post(running.addr, "kept").await, 202);
    let outcome = tokio::time::timeout(
        Duration::from_secs(30),
        running.run_until(std::future::pending()),
    )
    .await;
    let result = outcome.expect("the daemon should stop on its own");
    assert!(result.is_err(), "a restart loop must end in an error");
    assert_eq!(
        storage.queue_info().unwrap().depth,
        1,
        "the event stays queued for the next start"
    );
}
