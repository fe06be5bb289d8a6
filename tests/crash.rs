//! Crashes and stops against the real binary: kill -9 under load, SIGTERM
//! under load, a second signal during a stuck drain, and a backlog that
//! outlives the process. What a client was told (202 accepted, 200
//! duplicate) is checked against what the file sink finally holds and what
//! the built-in counter says.
//!
//! `CRASH_CYCLES` sets the number of kill -9 cycles (default 20) and
//! `CRASH_SEED` replays a run's random choices (the seed is printed).

mod common;

use std::collections::HashSet;
use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::books::{
    Ledger, Load, Mix, check_books, file_sink, read_sink, sample, seed, summary, type_of,
};
use common::{Daemon, eventually, signal, try_request, write_config};
use serde_json::{Value, json};

/// Config lines for an http sink that hangs on `addr`: no retries, a
/// timeout far longer than any test waits.
fn hanging_sink(addr: SocketAddr) -> String {
    format!(
        "max_retries = 0\n[[sinks]]\nname = \"dashboard\"\ntype = \"http\"\nurl = \"http://{addr}/update\"\ntimeout_ms = 30000\n"
    )
}

/// A downstream that accepts connections, reads what it is sent and never
/// answers: a delivery to it hangs until the sink's timeout.
struct HangingServer {
    addr: SocketAddr,
    /// Bytes received over all connections.
    received: Arc<AtomicUsize>,
}

impl HangingServer {
    fn start() -> HangingServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind hanging server");
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(AtomicUsize::new(0));
        let r = received.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let r = r.clone();
                // The stream lives as long as its reader: open, silent.
                std::thread::spawn(move || {
                    let mut stream = stream;
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = stream.read(&mut buf) {
                        if n == 0 {
                            return;
                        }
                        r.fetch_add(n, Ordering::SeqCst);
                    }
                });
            }
        });
        HangingServer { addr, received }
    }
}

/// The first JSON log line whose message starts with `prefix`.
fn log_line(d: &Daemon, prefix: &str) -> Option<Value> {
    d.log
        .lock()
        .unwrap()
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| {
            v["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with(prefix))
        })
}

/// The user ran clients against inletd and pulled the plug (kill -9) at a
/// random moment, again and again, restarting it on the same data each
/// time; clients re-sent what got no answer. Every event that was ever
/// answered 202 (or 200 duplicate) ends up in the file sink, nothing that
/// was not sent appears there, re-sent acknowledged ids stay duplicates,
/// and `total_events` counts each stored event exactly once. One pull in
/// ten comes while it is still opening the store; no restart reports
/// missing events.
#[test]
fn kill_9_under_load_loses_nothing_acknowledged() {
    let started = Instant::now();
    let cycles: usize = std::env::var("CRASH_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let seed = seed("kill_9_under_load_loses_nothing_acknowledged", "CRASH_SEED");
    let mut rng = fastrand::Rng::with_seed(seed);
    let dir = tempfile::tempdir().unwrap();
    let sink_path = dir.path().join("processed.jsonl");
    let config = write_config(
        dir.path(),
        &format!("batch_size = 20\n{}", file_sink(&sink_path)),
    );
    let ledger = Arc::new(Mutex::new(Ledger::default()));

    let mut during_startup = 0;
    for cycle in 0..cycles {
        // One cycle in ten pulls the plug while the daemon is still
        // opening the store (before it listens): it must come back after
        // that too.
        if rng.u32(..10) == 0 {
            let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_inletd"))
                .arg("--config")
                .arg(&config)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("spawn inletd");
            std::thread::sleep(Duration::from_millis(rng.u64(0..=30)));
            let _ = child.kill();
            let _ = child.wait();
            during_startup += 1;
        }
        let mut d = Daemon::start_with(dir.path(), &config, &[]);
        assert!(
            !d.log_text().contains("acknowledged events are missing"),
            "cycle {cycle}: a restart after kill -9 reported missing events:\n{}",
            d.log_text()
        );
        let acked_before = ledger.lock().unwrap().acknowledged_sorted();
        let before = ledger.lock().unwrap().accepted.len();
        let load = Load::start(
            d.addr,
            &ledger,
            &format!("c{cycle}"),
            rng.u64(..),
            Arc::new(acked_before),
            Mix::SINGLES,
        );
        let up_for = rng.u64(50..=400);
        std::thread::sleep(Duration::from_millis(up_for));
        // Clients stop starting requests, then the plug is pulled on the
        // ones in flight (stopping first keeps them off a reused port).
        load.closing.store(true, Ordering::SeqCst);
        load.stop.store(true, Ordering::SeqCst);
        d.kill9();
        load.finish();
        let l = ledger.lock().unwrap();
        eprintln!(
            "cycle {cycle}: up {up_for} ms, {} new 202s, {} unanswered to re-send",
            l.accepted.len() - before,
            l.unanswered.len()
        );
    }

    let d = Daemon::start_with(dir.path(), &config, &[]);
    d.wait_processed(Duration::from_secs(30));
    let ledger = ledger.lock().unwrap();
    let sink = read_sink(&sink_path);
    eprintln!(
        "after {cycles} kill -9s under load and {during_startup} during start-up: {} sent, \
         {} accepted, {} duplicates, {} never answered, file: {} lines, {} distinct; \
         io errors {:?}; {:?}",
        ledger.sent.len(),
        ledger.accepted.len(),
        ledger.duplicate.len(),
        ledger.unanswered.len(),
        sink.lines,
        sink.events.len(),
        ledger.io_errors,
        started.elapsed()
    );
    assert!(
        ledger.accepted.len() >= cycles,
        "the load never got going: {} accepted in {cycles} cycles",
        ledger.accepted.len()
    );
    check_books(&d, &ledger, &sink);
}

/// The user stopped inletd with SIGTERM while clients were posting (once,
/// or `SIGTERM_CYCLES` times on the same data). It exits 0 within
/// drain_timeout, having said it drained; clients only ever
/// saw 202, 200, 503 (or a closed port); everything accepted was already
/// delivered when it exited (the partial batch too: the batch timeout is a
/// minute, so only the drain can flush it), and after a restart the counter
/// matches the file.
#[test]
fn sigterm_under_load_drains_and_exits_zero() {
    let cycles: usize = std::env::var("SIGTERM_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let seed = seed("sigterm_under_load_drains_and_exits_zero", "CRASH_SEED");
    let mut rng = fastrand::Rng::with_seed(seed);
    let dir = tempfile::tempdir().unwrap();
    let sink_path = dir.path().join("processed.jsonl");
    let drain_timeout = 10;
    let config = write_config(
        dir.path(),
        &format!(
            "drain_timeout_secs = {drain_timeout}\nbatch_size = 100\nbatch_timeout_ms = 60000\n{}",
            file_sink(&sink_path)
        ),
    );
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut drains = Vec::new();
    for cycle in 0..cycles {
        let mut d = Daemon::start_with(dir.path(), &config, &[]);
        let before = ledger.lock().unwrap().accepted.len();
        let acked_before = ledger.lock().unwrap().acknowledged_sorted();
        let load = Load::start(
            d.addr,
            &ledger,
            &format!("t{cycle}"),
            rng.u64(..),
            Arc::new(acked_before),
            Mix::SINGLES,
        );
        eventually(Duration::from_secs(10), "some events accepted", || {
            ledger.lock().unwrap().accepted.len() >= before + 50
        });
        // Under load for a while: the drain has a partial batch and
        // whatever the clients keep posting to deal with.
        std::thread::sleep(Duration::from_millis(rng.u64(100..=1000)));

        load.closing.store(true, Ordering::SeqCst);
        let signalled = Instant::now();
        let status = d.terminate(Duration::from_secs(drain_timeout + 5));
        let took = signalled.elapsed();
        load.finish();
        drains.push(took);
        assert!(
            status.success(),
            "cycle {cycle}: exit status {status}; log:\n{}",
            d.log_text()
        );
        let drained = log_line(&d, "drained")
            .unwrap_or_else(|| panic!("no drain line in the log:\n{}", d.log_text()));
        assert_eq!(
            drained["fields"]["caught_up"], true,
            "a file sink keeps up; the drain should catch up: {drained}"
        );
        assert_eq!(drained["fields"]["remaining"], 0, "{drained}");

        // Drained means delivered: every 202 is in the file before any restart.
        let ledger = ledger.lock().unwrap();
        eprintln!(
            "cycle {cycle}: SIGTERM under load: exited {status} after {took:?}; clients so far: \
             {} accepted, {} duplicates, {} 503s, io errors {:?}",
            ledger.accepted.len(),
            ledger.duplicate.len(),
            ledger.unavailable,
            ledger.io_errors
        );
        assert!(
            !ledger.io_errors.keys().any(|k| k.contains("before stop")),
            "transport errors before SIGTERM: {:?}",
            ledger.io_errors
        );
        let delivered = read_sink(&sink_path);
        let missing: Vec<&String> = ledger
            .accepted
            .iter()
            .filter(|id| !delivered.events.contains_key(*id))
            .collect();
        assert!(
            missing.is_empty(),
            "{} accepted events were not delivered by the drain, e.g. {:?}",
            missing.len(),
            sample(missing.iter().copied())
        );
        // A request cut off by the closing listener got no answer; it must
        // not have been stored all the same (in-flight requests finish).
        let stored_unanswered: Vec<&String> = ledger
            .unanswered
            .iter()
            .filter(|id| delivered.events.contains_key(*id))
            .collect();
        assert!(
            stored_unanswered.is_empty(),
            "in-flight requests must finish: stored but never answered: {stored_unanswered:?}"
        );
    }
    drains.sort();
    eprintln!(
        "{cycles} SIGTERMs under load: all exited 0; drain took median {:?}, max {:?}",
        drains[drains.len() / 2],
        drains[drains.len() - 1]
    );

    let d = Daemon::start_with(dir.path(), &config, &[]);
    assert_eq!(
        d.get("/admin/queue").json()["depth"],
        0,
        "the drain left nothing behind"
    );
    d.wait_processed(Duration::from_secs(10));
    let ledger = ledger.lock().unwrap();
    check_books(&d, &ledger, &read_sink(&sink_path));
}

/// Posts `ids` as single events from a few threads; each must be answered 202.
fn post_all(addr: SocketAddr, ids: &[String]) {
    let ids = Arc::new(ids.to_vec());
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let ids = ids.clone();
            std::thread::spawn(move || {
                for id in ids.iter().skip(t).step_by(4) {
                    let body = json!({"event_id": id, "event_type": type_of(id)}).to_string();
                    let r = try_request(
                        addr,
                        "POST",
                        "/webhook/events",
                        &[("Content-Type", "application/json")],
                        body.as_bytes(),
                    )
                    .unwrap_or_else(|e| panic!("POST {id}: {e}"));
                    assert_eq!(r.status, 202, "{id}: {}", r.text());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("poster panicked");
    }
}

/// Restarts on `dir` with the sink switched to a file, waits until the
/// queue is empty and checks that exactly `ids` were delivered and counted.
fn restart_with_file_sink_and_check(dir: &Path, ids: &[String]) -> Daemon {
    let sink_path: PathBuf = dir.join("processed.jsonl");
    let config = write_config(dir, &file_sink(&sink_path));
    let d = Daemon::start_with(dir, &config, &[]);
    d.wait_processed(Duration::from_secs(60));
    let sink = read_sink(&sink_path);
    assert!(sink.bad.is_empty(), "bad lines: {:?}", sink.bad);
    let expected: HashSet<&String> = ids.iter().collect();
    let got: HashSet<&String> = sink.events.keys().collect();
    let missing: Vec<&String> = expected.difference(&got).copied().collect();
    let extra: Vec<&String> = got.difference(&expected).copied().collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {:?}, unexpected {:?}",
        sample(missing),
        sample(extra)
    );
    let (total, by_type) = summary(&d);
    assert_eq!(total, ids.len() as u64, "total_events");
    assert_eq!(
        by_type.values().sum::<u64>(),
        ids.len() as u64,
        "{by_type:?}"
    );
    assert_eq!(d.get("/stats/summary").json()["dlq_size"], 0);
    d
}

/// The user sent SIGTERM while a delivery hung on an unresponsive
/// downstream, then lost patience and sent it again: inletd exits at once
/// (non-zero) instead of waiting out drain_timeout, and after a restart
/// (the downstream replaced by a file) every accepted event is processed
/// and counted once.
#[test]
fn second_signal_exits_at_once_and_keeps_the_queue() {
    let hanging = HangingServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(
        dir.path(),
        &format!("batch_size = 5\n{}", hanging_sink(hanging.addr)),
    );
    let ids: Vec<String> = (0..20).map(|i| format!("second-{i}")).collect();
    post_all(d.addr, &ids);
    eventually(
        Duration::from_secs(10),
        "a delivery hangs downstream",
        || hanging.received.load(Ordering::SeqCst) > 0,
    );

    signal(&d.child, "TERM");
    eventually(Duration::from_secs(5), "the drain starts", || {
        log_line(&d, "signal received").is_some()
    });
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "the first SIGTERM should wait for the hung batch (drain_timeout 25 s)"
    );
    let second = Instant::now();
    signal(&d.child, "TERM");
    let status = d.wait(Duration::from_secs(5));
    let took = second.elapsed();
    eprintln!("second SIGTERM: exited {status} after {took:?}");
    assert!(
        !status.success(),
        "a cut-short drain is not a clean exit: {status}"
    );
    assert_eq!(status.code(), Some(130), "{status}");
    assert!(
        log_line(&d, "second signal").is_some(),
        "log:\n{}",
        d.log_text()
    );
    drop(d);

    restart_with_file_sink_and_check(dir.path(), &ids);
}

/// The downstream hung while 500 events piled up, then the machine died
/// (kill -9). On the next start with a working sink, the whole backlog is
/// replayed from the WAL: all 500 delivered and counted once.
#[test]
fn backlog_is_replayed_after_restart() {
    let hanging = HangingServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path(), &hanging_sink(hanging.addr));
    let ids: Vec<String> = (0..500).map(|i| format!("backlog-{i}")).collect();
    let posting = Instant::now();
    post_all(d.addr, &ids);
    eprintln!("500 events accepted in {:?}", posting.elapsed());
    assert_eq!(d.get("/admin/queue").json()["depth"], 500);
    d.kill9();
    drop(d);

    let d = restart_with_file_sink_and_check(dir.path(), &ids);
    let replay = log_line(&d, "replaying the queue")
        .unwrap_or_else(|| panic!("no replay line:\n{}", d.log_text()));
    assert_eq!(replay["fields"]["depth"], 500, "{replay}");
}

/// While it drains, the daemon stays reachable: `/ready` and new intake
/// answer 503 with Retry-After, `/health` answers 200; it exits 0 once the
/// drain deadline passes, and the event it could not deliver is processed
/// after the next start.
#[test]
fn a_draining_daemon_answers_503_and_stays_healthy() {
    let dir = tempfile::tempdir().unwrap();
    let hole = HangingServer::start();
    let extra = format!(
        "drain_timeout_secs = 2\nbatch_size = 1\n{}",
        hanging_sink(hole.addr)
    );
    let mut d = Daemon::start(dir.path(), &extra);
    let r = d.post_json(
        "/webhook/events",
        &json!({"event_id": "stuck", "event_type": "t"}),
    );
    assert_eq!(r.status, 202);
    eventually(
        Duration::from_secs(5),
        "the sink received the batch",
        || hole.received.load(Ordering::SeqCst) > 0,
    );
    signal(&d.child, "TERM");
    eventually(Duration::from_secs(5), "/ready turns 503", || {
        d.get("/ready").status == 503
    });
    assert_eq!(d.get("/ready").json()["status"], "draining");
    assert_eq!(d.get("/health").status, 200);
    let r = d.post_json(
        "/webhook/events",
        &json!({"event_id": "late", "event_type": "t"}),
    );
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (503, json!("draining"))
    );
    assert!(r.header("retry-after").is_some());
    let status = d.wait(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");

    let sink_path = dir.path().join("out.jsonl");
    let config = write_config(dir.path(), &file_sink(&sink_path));
    let d = Daemon::start_with(dir.path(), &config, &[]);
    d.wait_processed(Duration::from_secs(10));
    let text = std::fs::read_to_string(&sink_path).unwrap();
    assert!(text.contains("\"stuck\""), "{text}");
    assert!(!text.contains("\"late\""), "a 503 stored nothing");
}

/// A client is still sending its body, slowly, when SIGTERM comes: the
/// drain waits for it at most half of `drain_timeout`, then delivers what
/// was accepted before within the timeout, and exits 0.
#[test]
fn a_slow_client_does_not_starve_the_drain() {
    let dir = tempfile::tempdir().unwrap();
    let sink_path = dir.path().join("processed.jsonl");
    let drain_timeout = 4;
    let mut d = Daemon::start(
        dir.path(),
        &format!(
            "drain_timeout_secs = {drain_timeout}\nbatch_size = 100\nbatch_timeout_ms = 60000\n{}",
            file_sink(&sink_path)
        ),
    );
    let ids: Vec<String> = (0..10).map(|i| format!("before-{i}")).collect();
    post_all(d.addr, &ids);

    // Headers and half a body, then nothing: the request is in flight.
    let mut slow = std::net::TcpStream::connect(d.addr).unwrap();
    let body = r#"{"event_id":"slow","event_type":"signup"}"#;
    std::io::Write::write_all(
        &mut slow,
        format!(
            "POST /webhook/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{}",
            body.len(),
            &body[..10]
        )
        .as_bytes(),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));

    // The drain delivers what was accepted while the slow request is still
    // open: once it has waited half of drain_timeout for it, not after.
    signal(&d.child, "TERM");
    let signalled = Instant::now();
    let all_delivered = || {
        let delivered = read_sink(&sink_path);
        ids.iter().all(|id| delivered.events.contains_key(id))
    };
    while !all_delivered() && signalled.elapsed() < Duration::from_secs(drain_timeout + 5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let delivered_after = signalled.elapsed();
    let status = d.wait(Duration::from_secs(drain_timeout + 5));
    assert!(
        status.success(),
        "exit status {status}; log:\n{}",
        d.log_text()
    );
    assert!(
        all_delivered(),
        "accepted before SIGTERM but not delivered by the drain; log:\n{}",
        d.log_text()
    );
    assert!(
        delivered_after < Duration::from_secs(drain_timeout),
        "delivered {delivered_after:?} after SIGTERM: the drain waited out drain_timeout \
         ({drain_timeout} s) for the slow request"
    );
    drop(slow);
}
