//! Forwarding to sinks against the real binary: retries, the dead-letter
//! queue, and replay once the sink recovers.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Daemon, SinkServer, eventually};
use serde_json::json;

fn http_sink(url: &str) -> String {
    format!(
        "max_retries = 3\nretry_base_ms = 10\nretry_max_ms = 50\n[[sinks]]\nname = \"dashboard\"\ntype = \"http\"\nurl = \"{url}\"\ntimeout_ms = 2000\n"
    )
}

fn ids(events: &[serde_json::Value]) -> Vec<String> {
    let mut ids: Vec<String> = events
        .iter()
        .map(|e| e["event_id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

/// The dashboard fails twice, then takes the batch: it is delivered once,
/// carrying its event ids and an Idempotency-Key, and the DLQ stays empty.
#[test]
fn a_sink_failing_twice_then_succeeding_gets_the_batch_once() {
    let sink = SinkServer::start(Box::new(|n| if n < 2 { 503 } else { 200 }));
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(
        dir.path(),
        &format!(
            "batch_size = 3\nbatch_timeout_ms = 5000\n{}",
            http_sink(&sink.url())
        ),
    );
    for i in 0..3 {
        let r = d.post_json(
            "/webhook/events",
            &json!({"event_id": format!("e{i}"), "event_type": "signup"}),
        );
        assert_eq!(r.status, 202);
    }
    d.wait_processed(Duration::from_secs(10));
    assert_eq!(
        sink.requests.load(Ordering::SeqCst),
        3,
        "two failures, one success"
    );
    assert_eq!(ids(&sink.events()), vec!["e0", "e1", "e2"]);
    let keys = sink.keys.lock().unwrap().clone();
    assert!(
        keys.iter()
            .all(|k| k == &keys[0] && k.starts_with("inletd-")),
        "{keys:?}"
    );
    assert_eq!(d.get("/admin/dlq").json()["entries"], json!([]));
    let metrics = d.get("/metrics").text();
    assert!(
        metrics.contains("inletd_sink_retries_total{sink=\"dashboard\"} 2"),
        "{metrics}"
    );
}

/// A sink that always fails: after max_retries its events are parked in
/// the DLQ with the error and attempts; other events keep flowing; once the
/// sink recovers, a replay delivers them and empties the DLQ.
#[test]
fn a_failing_sink_parks_events_in_the_dlq_and_replay_delivers_them() {
    let healthy = Arc::new(AtomicBool::new(false));
    let h = healthy.clone();
    let sink = SinkServer::start(Box::new(
        move |_| if h.load(Ordering::SeqCst) { 200 } else { 500 },
    ));
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(
        dir.path(),
        &format!("batch_size = 2\n{}", http_sink(&sink.url())),
    );
    let batch = json!({"events": [
        {"event_id": "a", "event_type": "signup"},
        {"event_id": "b", "event_type": "upgrade"},
    ]});
    assert_eq!(d.post_json("/webhook/batch", &batch).status, 202);
    d.wait_processed(Duration::from_secs(10));
    assert_eq!(
        sink.requests.load(Ordering::SeqCst),
        4,
        "1 attempt + 3 retries"
    );

    let list = d.get("/admin/dlq").json();
    let entries = list["entries"].as_array().unwrap().clone();
    assert_eq!(entries.len(), 2, "{list}");
    for e in &entries {
        assert_eq!(e["sink"], "dashboard");
        assert_eq!(e["attempts"], 4);
        assert!(e["error"].as_str().unwrap().contains("500"), "{e}");
        assert!(e["first_failed_ms"].as_i64().unwrap() <= e["last_failed_ms"].as_i64().unwrap());
    }
    let id = entries[0]["id"].as_u64().unwrap();
    let one = d.get(&format!("/admin/dlq/{id}"));
    assert_eq!(one.status, 200);
    assert!(
        one.json()["record"]["body"]
            .as_str()
            .unwrap()
            .contains("\"event_id\":\"a\"")
    );
    assert_eq!(d.get("/admin/dlq/999999").status, 404);
    // The built-in counter still counted both: they were accepted and processed.
    assert_eq!(d.get("/stats/summary").json()["total_events"], 2);

    healthy.store(true, Ordering::SeqCst);
    // The README's own recovery command, `curl -X POST …/admin/dlq/replay`:
    // no body, not even a Content-Length.
    let r = {
        let mut s = std::net::TcpStream::connect(d.addr).unwrap();
        let head = format!(
            "POST /admin/dlq/replay HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            d.addr
        );
        std::io::Write::write_all(&mut s, head.as_bytes()).unwrap();
        common::read_response(&mut s).unwrap()
    };
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json(), json!({"replayed": 2, "remaining": 0}));
    eventually(Duration::from_secs(10), "replayed events delivered", || {
        sink.events().len() == 2
    });
    assert_eq!(ids(&sink.events()), vec!["a", "b"]);
    d.wait_processed(Duration::from_secs(10));
    assert_eq!(d.get("/admin/dlq").json()["entries"], json!([]));
    // Replays are not counted twice.
    assert_eq!(d.get("/stats/summary").json()["total_events"], 2);
}

/// A permanent refusal (4xx) is not retried; deleting a DLQ entry removes it.
#[test]
fn a_permanent_refusal_goes_straight_to_the_dlq_and_can_be_deleted() {
    let sink = SinkServer::start(Box::new(|_| 400));
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &http_sink(&sink.url()));
    assert_eq!(
        d.post_json(
            "/webhook/events",
            &json!({"event_id": "x", "event_type": "t"})
        )
        .status,
        202
    );
    d.wait_processed(Duration::from_secs(10));
    assert_eq!(sink.requests.load(Ordering::SeqCst), 1);
    let entries = d.get("/admin/dlq").json()["entries"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(entries.len(), 1);
    let id = entries[0]["id"].as_u64().unwrap();
    assert_eq!(
        d.request("DELETE", &format!("/admin/dlq/{id}"), &[], b"")
            .status,
        200
    );
    assert_eq!(
        d.request("DELETE", &format!("/admin/dlq/{id}"), &[], b"")
            .status,
        404
    );
    assert_eq!(d.get("/admin/dlq").json()["entries"], json!([]));
}

/// One sink failing does not hold back another: the file sink gets every
/// event while the HTTP sink's copies go to the DLQ.
#[test]
fn one_failing_sink_does_not_stall_the_other() {
    let sink = SinkServer::start(Box::new(|_| 503));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("out.jsonl");
    let extra = format!(
        "{}\n[[sinks]]\nname = \"file\"\ntype = \"file\"\npath = \"{}\"\n",
        http_sink(&sink.url()),
        file.display()
    );
    let d = Daemon::start(dir.path(), &extra);
    for i in 0..5 {
        assert_eq!(
            d.post_json(
                "/webhook/events",
                &json!({"event_id": format!("f{i}"), "event_type": "t"})
            )
            .status,
            202
        );
    }
    d.wait_processed(Duration::from_secs(20));
    let text = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(ids(&lines), vec!["f0", "f1", "f2", "f3", "f4"]);
    let dlq = d.get("/admin/dlq").json()["entries"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(dlq.len(), 5);
    assert!(dlq.iter().all(|e| e["sink"] == "dashboard"));
}

fn batch_of(n: usize) -> serde_json::Value {
    let events: Vec<_> = (0..n)
        .map(|i| json!({"event_id": format!("b{i:02}"), "event_type": "signup"}))
        .collect();
    json!({ "events": events })
}

/// A backlog larger than one micro-batch is handed over and committed
/// together, but the dashboard still receives it `batch_size` events at a
/// time, each event once.
#[test]
fn a_backlog_reaches_the_sink_one_micro_batch_at_a_time() {
    let sink = SinkServer::start(Box::new(|_| 200));
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(
        dir.path(),
        &format!(
            "batch_size = 10\nbatch_timeout_ms = 300\n{}",
            http_sink(&sink.url())
        ),
    );
    assert_eq!(d.post_json("/webhook/batch", &batch_of(35)).status, 202);
    d.wait_processed(Duration::from_secs(10));
    let sizes: Vec<usize> = sink
        .delivered
        .lock()
        .unwrap()
        .iter()
        .map(|b| b["events"].as_array().map_or(0, Vec::len))
        .collect();
    assert_eq!(sizes, vec![10, 10, 10, 5], "bodies as the sink got them");
    let expected: Vec<String> = (0..35).map(|i| format!("b{i:02}")).collect();
    assert_eq!(ids(&sink.events()), expected);
}

/// When the first micro-batch of a hand-over fails after its retries, the
/// others go to the DLQ with it instead of waiting through the retries
/// again: the sink sees one batch's attempts, the DLQ holds every event.
#[test]
fn a_failed_micro_batch_parks_the_rest_of_its_hand_over_without_more_retries() {
    let sink = SinkServer::start(Box::new(|_| 503));
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(
        dir.path(),
        &format!(
            "batch_size = 10\nbatch_timeout_ms = 5000\n{}",
            http_sink(&sink.url())
        ),
    );
    assert_eq!(d.post_json("/webhook/batch", &batch_of(30)).status, 202);
    eventually(Duration::from_secs(10), "30 events in the DLQ", || {
        d.get("/admin/queue").json()["dlq_size"] == 30
    });
    assert_eq!(
        sink.requests.load(Ordering::SeqCst),
        4,
        "max_retries = 3: one first try and three retries, for the first micro-batch only"
    );
}

/// An operator watches a sink go down and come back in `/stats/summary`:
/// `retrying` after a failed batch, `open` once the breaker isolates it
/// (and `inletd_sink_circuit_open` says 1), `ok` once a probe succeeds;
/// `/stats/rate` counts every event accepted and processed meanwhile.
#[test]
fn the_summary_follows_a_sink_through_its_circuit_breaker() {
    let healthy = Arc::new(AtomicBool::new(false));
    let h = healthy.clone();
    let sink = SinkServer::start(Box::new(
        move |_| {
            if h.load(Ordering::SeqCst) { 200 } else { 500 }
        },
    ));
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(
        dir.path(),
        &format!(
            "breaker_failures = 2\nbreaker_cooldown_ms = 300\n{}",
            http_sink(&sink.url()).replace("max_retries = 3", "max_retries = 0")
        ),
    );
    let sink_state = |d: &Daemon| d.get("/stats/summary").json()["sinks"][0].clone();
    assert_eq!(sink_state(&d)["state"], "ok", "configured, not yet tried");
    assert_eq!(sink_state(&d)["name"], "dashboard");

    let post = |i: usize| {
        let r = d.post_json(
            "/webhook/events",
            &json!({"event_id": format!("e{i}"), "event_type": "signup"}),
        );
        assert_eq!(r.status, 202);
        d.wait_processed(Duration::from_secs(10));
    };
    post(0);
    let state = sink_state(&d);
    assert_eq!(state["state"], "retrying", "{state}");
    assert_eq!(state["consecutive_failures"], 1, "{state}");
    assert!(
        state["last_error"].as_str().unwrap().contains("500"),
        "{state}"
    );
    post(1);
    let state = sink_state(&d);
    assert_eq!(state["state"], "open", "{state}");
    assert!(state["open_until_ms"].as_i64().is_some(), "{state}");
    let metrics = d.get("/metrics").text();
    assert!(
        metrics.contains("inletd_sink_circuit_open{sink=\"dashboard\"} 1"),
        "{metrics}"
    );

    // The cool-down (300 ms) passes with no batch: the circuit waits,
    // half-open, for the next batch to probe the sink.
    healthy.store(true, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(400));
    let state = sink_state(&d);
    assert_eq!(state["state"], "half_open", "{state}");
    post(2);
    let state = sink_state(&d);
    assert_eq!(state["state"], "ok", "{state}");
    assert_eq!(state["last_error"], json!(null), "{state}");
    let metrics = d.get("/metrics").text();
    assert!(
        metrics.contains("inletd_sink_circuit_open{sink=\"dashboard\"} 0"),
        "{metrics}"
    );

    // Every whole second is counted once the second is over.
    eventually(Duration::from_secs(3), "the rate to count 3 events", || {
        let rate = d.get("/stats/rate").json();
        let sum = |k: &str| {
            rate[k]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_u64().unwrap())
                .sum::<u64>()
        };
        assert_eq!(rate["accepted"].as_array().unwrap().len(), 300, "{rate}");
        sum("accepted") == 3 && sum("processed") == 3
    });
}

/// The daemon delivered five events and sat idle for a couple of seconds;
/// then the machine lost it (kill -9). After the restart the sink is not
/// sent those five again: processed batches are made durable within a
/// second even when no new event comes to flush them.
#[test]
fn an_idle_daemon_killed_does_not_deliver_again_what_it_had_delivered() {
    let sink = SinkServer::start(Box::new(|_| 200));
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path(), &http_sink(&sink.url()));
    for i in 0..5 {
        let e = json!({"event_id": format!("idle{i}"), "event_type": "signup"});
        assert_eq!(d.post_json("/webhook/events", &e).status, 202);
    }
    d.wait_processed(Duration::from_secs(10));
    assert_eq!(sink.events().len(), 5);
    std::thread::sleep(Duration::from_millis(2500));
    d.kill9();
    let d = Daemon::start_with(dir.path(), &d.config_path, &[]);
    // A replay would come within the first batch timeout after the start.
    std::thread::sleep(Duration::from_millis(1500));
    let summary = d.get("/stats/summary").json();
    assert_eq!(summary["queue_depth"], 0, "{summary}");
    assert_eq!(
        ids(&sink.events()),
        ["idle0", "idle1", "idle2", "idle3", "idle4"],
        "delivered again after the restart"
    );
}
