//! The books of a crash test: clients that post events to the real daemon
//! and write down what they were told (the ledger), what the file sink
//! finally holds, and the check that the two balance with the built-in
//! counter. Shared by the kill -9 and the power-cut suites.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{Daemon, try_request};

/// Concurrent clients per cycle.
pub const CLIENTS: usize = 8;

/// The event types clients send; each id always carries the same one.
const TYPES: [&str; 3] = ["signup", "page_view", "purchase"];

/// The event type that belongs to `id` (so a re-sent id carries the same body).
pub fn type_of(id: &str) -> &'static str {
    let sum: usize = id.bytes().map(usize::from).sum();
    TYPES[sum % TYPES.len()]
}

/// Config lines for a file sink writing to `path`.
pub fn file_sink(path: &Path) -> String {
    format!(
        "[[sinks]]\nname = \"file\"\ntype = \"file\"\npath = \"{}\"\n",
        path.display()
    )
}

/// The seed for this run: the environment variable `var` or the clock;
/// printed for replay.
pub fn seed(test: &str, var: &str) -> u64 {
    let seed = std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("{test}: {var}={seed}");
    seed
}

/// What the clients send.
#[derive(Debug, Clone, Copy)]
pub struct Mix {
    /// One request in this many is a batch (0: single events only).
    pub batch_one_in: u32,
    /// Events per batch, at most.
    pub batch_events: usize,
    /// Bytes of padding in each event's metadata (a batch of 150 events of
    /// 1 KB makes a group commit over sled's 128 KiB blob threshold).
    pub pad_bytes: usize,
}

impl Mix {
    /// Small single events only.
    pub const SINGLES: Mix = Mix {
        batch_one_in: 0,
        batch_events: 0,
        pad_bytes: 0,
    };
}

/// The JSON of the event `id`: the same body whenever it is sent.
fn event(id: &str, mix: Mix) -> Value {
    if mix.pad_bytes == 0 {
        json!({"event_id": id, "event_type": type_of(id)})
    } else {
        json!({"event_id": id, "event_type": type_of(id), "metadata": {"pad": "x".repeat(mix.pad_bytes)}})
    }
}

/// What the clients were told, over every run of the daemon.
#[derive(Default)]
pub struct Ledger {
    /// Every id a client sent at least once.
    pub sent: HashSet<String>,
    /// Ids answered 202 accepted.
    pub accepted: HashSet<String>,
    /// Ids answered 200 duplicate (or "duplicate" inside a batch answer).
    pub duplicate: HashSet<String>,
    /// When each id was first acknowledged: a loss window is judged by it.
    pub acked_at: HashMap<String, Instant>,
    /// Ids sent without getting an answer; clients send them again first.
    pub unanswered: Vec<String>,
    /// Answers outside the contract, described.
    pub unexpected: Vec<String>,
    /// Ids answered 202 after they had already been acknowledged.
    pub accepted_twice: Vec<String>,
    /// 503 answers seen (draining).
    pub unavailable: usize,
    /// Transport errors by kind; "(before stop)" marks those seen while
    /// the daemon was meant to be up.
    pub io_errors: BTreeMap<String, usize>,
}

impl Ledger {
    /// Ids the daemon acknowledged (202 or 200 duplicate).
    pub fn acknowledged(&self) -> HashSet<String> {
        self.accepted.union(&self.duplicate).cloned().collect()
    }

    /// Acknowledged ids, sorted (to re-send some of them).
    pub fn acknowledged_sorted(&self) -> Vec<String> {
        let mut v: Vec<String> = self.acknowledged().into_iter().collect();
        v.sort();
        v
    }

    /// Writes down one event's answer: `accepted` (202) or a duplicate.
    fn answered(&mut self, id: String, accepted: bool, known_acked: bool) {
        if accepted && (known_acked || self.accepted.contains(&id) || self.duplicate.contains(&id))
        {
            self.accepted_twice.push(id.clone());
        }
        self.acked_at.entry(id.clone()).or_insert_with(Instant::now);
        if accepted {
            self.accepted.insert(id);
        } else {
            self.duplicate.insert(id);
        }
    }
}

/// Client threads posting events to one daemon.
pub struct Load {
    /// Ends the clients' loops.
    pub stop: Arc<AtomicBool>,
    /// Set when the daemon is being stopped: a transport error then ends a client.
    pub closing: Arc<AtomicBool>,
    /// The clients.
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    /// Starts `CLIENTS` clients against `addr`. New ids are `{prefix}-{client}-{n}`;
    /// ids in `ledger.unanswered` are sent again first; now and then an id
    /// from `acked_before` is sent again and must be answered 200.
    pub fn start(
        addr: SocketAddr,
        ledger: &Arc<Mutex<Ledger>>,
        prefix: &str,
        seed: u64,
        acked_before: Arc<Vec<String>>,
        mix: Mix,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let closing = Arc::new(AtomicBool::new(false));
        let threads = (0..CLIENTS)
            .map(|client| {
                let client = Client {
                    addr,
                    ledger: ledger.clone(),
                    prefix: format!("{prefix}-{client}"),
                    rng: fastrand::Rng::with_seed(seed ^ (client as u64).wrapping_mul(0x9E37)),
                    acked_before: acked_before.clone(),
                    mix,
                    stop: stop.clone(),
                    closing: closing.clone(),
                    n: 0,
                };
                std::thread::spawn(move || client.run())
            })
            .collect();
        Load {
            stop,
            closing,
            threads,
        }
    }

    /// Stops the clients and waits for them.
    pub fn finish(self) {
        self.closing.store(true, Ordering::SeqCst);
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join().expect("client thread panicked");
        }
    }
}

/// One client thread.
struct Client {
    /// The daemon.
    addr: SocketAddr,
    /// Where answers are written down.
    ledger: Arc<Mutex<Ledger>>,
    /// Prefix of the ids this client makes up.
    prefix: String,
    /// This client's random choices.
    rng: fastrand::Rng,
    /// Ids acknowledged in earlier runs, some sent again.
    acked_before: Arc<Vec<String>>,
    /// Singles or batches, and how big.
    mix: Mix,
    /// Ends the loop.
    stop: Arc<AtomicBool>,
    /// The daemon is going away: a transport error ends the client.
    closing: Arc<AtomicBool>,
    /// Ids made up so far.
    n: usize,
}

impl Client {
    fn run(mut self) {
        while !self.stop.load(Ordering::SeqCst) {
            let batch = self.mix.batch_one_in > 0 && self.rng.u32(0..self.mix.batch_one_in) == 0;
            let go_on = if batch {
                self.send_batch()
            } else {
                self.send_one()
            };
            if !go_on {
                return;
            }
        }
    }

    /// A fresh id.
    fn new_id(&mut self) -> String {
        self.n += 1;
        format!("{}-{}", self.prefix, self.n)
    }

    /// Posts one event; false when the client should end.
    fn send_one(&mut self) -> bool {
        let (id, known_acked) = {
            let mut l = self.ledger.lock().unwrap();
            let pick = if let Some(id) = l.unanswered.pop() {
                (id, false)
            } else if !self.acked_before.is_empty() && self.rng.u32(0..20) == 0 {
                let i = self.rng.usize(..self.acked_before.len());
                (self.acked_before[i].clone(), true)
            } else {
                drop(l);
                let id = self.new_id();
                l = self.ledger.lock().unwrap();
                (id, false)
            };
            l.sent.insert(pick.0.clone());
            pick
        };
        let body = event(&id, self.mix).to_string();
        let result = try_request(
            self.addr,
            "POST",
            "/webhook/events",
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        );
        let mut l = self.ledger.lock().unwrap();
        let unanswered = |l: &mut Ledger| {
            if !known_acked {
                l.unanswered.push(id.clone());
            }
        };
        match result {
            Ok(r) if r.status == 202 => l.answered(id.clone(), true, known_acked),
            Ok(r) if r.status == 200 => {
                let v: Value = serde_json::from_slice(&r.body).unwrap_or_default();
                if v["status"] != "duplicate" || v["event_id"] != id.as_str() {
                    l.unexpected
                        .push(format!("{id}: 200 with body {}", r.text()));
                }
                l.answered(id.clone(), false, known_acked);
            }
            Ok(r) if r.status == 503 => {
                self.unavailable(&mut l, &r, &id);
                unanswered(&mut l);
                drop(l);
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(r) => {
                l.unexpected
                    .push(format!("{id}: status {} body {}", r.status, r.text()));
                unanswered(&mut l);
            }
            Err(e) => {
                unanswered(&mut l);
                return self.transport_error(l, &e);
            }
        }
        true
    }

    /// Posts a batch of fresh events; false when the client should end.
    fn send_batch(&mut self) -> bool {
        let n = self.rng.usize(1..=self.mix.batch_events.max(1));
        let ids: Vec<String> = (0..n).map(|_| self.new_id()).collect();
        self.ledger.lock().unwrap().sent.extend(ids.iter().cloned());
        let events: Vec<Value> = ids.iter().map(|id| event(id, self.mix)).collect();
        let body = json!({ "events": events }).to_string();
        let result = try_request(
            self.addr,
            "POST",
            "/webhook/batch",
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        );
        let mut l = self.ledger.lock().unwrap();
        match result {
            Ok(r) if r.status == 202 => {
                let v: Value = serde_json::from_slice(&r.body).unwrap_or_default();
                let results = v["results"].as_array().cloned().unwrap_or_default();
                if results.len() != ids.len() {
                    l.unexpected.push(format!(
                        "batch of {}: {} results in {}",
                        ids.len(),
                        results.len(),
                        r.text().chars().take(300).collect::<String>()
                    ));
                }
                for (id, result) in ids.iter().zip(&results) {
                    match (result["event_id"].as_str(), result["status"].as_str()) {
                        (Some(e), Some("accepted")) if e == id => {
                            l.answered(id.clone(), true, false)
                        }
                        (Some(e), Some("duplicate")) if e == id => {
                            l.answered(id.clone(), false, false)
                        }
                        _ => l.unexpected.push(format!("{id}: batch result {result}")),
                    }
                }
            }
            Ok(r) if r.status == 503 => {
                self.unavailable(&mut l, &r, &ids[0]);
                l.unanswered.extend(ids);
                drop(l);
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(r) => {
                l.unexpected.push(format!(
                    "batch from {}: status {} body {}",
                    ids[0],
                    r.status,
                    r.text()
                ));
                l.unanswered.extend(ids);
            }
            Err(e) => {
                l.unanswered.extend(ids);
                return self.transport_error(l, &e);
            }
        }
        true
    }

    /// A 503 is only right while the daemon drains, and says when to retry.
    fn unavailable(&self, l: &mut Ledger, r: &super::Response, id: &str) {
        l.unavailable += 1;
        if r.header("retry-after").is_none() {
            l.unexpected
                .push(format!("{id}: 503 without Retry-After: {}", r.text()));
        }
        if !self.closing.load(Ordering::SeqCst) {
            l.unexpected.push(format!("{id}: 503 while not stopping"));
        }
    }

    /// Counts a transport error; false (end the client) once the daemon is
    /// going away.
    fn transport_error(
        &self,
        mut l: std::sync::MutexGuard<'_, Ledger>,
        e: &std::io::Error,
    ) -> bool {
        let closing = self.closing.load(Ordering::SeqCst);
        let kind = format!(
            "{:?}{}",
            e.kind(),
            if closing { "" } else { " (before stop)" }
        );
        *l.io_errors.entry(kind).or_default() += 1;
        if closing {
            return false;
        }
        drop(l);
        std::thread::sleep(Duration::from_millis(10));
        true
    }
}

/// Sends every id that never got an answer again, one at a time, until
/// each is answered 202 or 200: what a client with a retry queue does once
/// the daemon is back. Panics on any other answer.
pub fn resend_unanswered(addr: SocketAddr, ledger: &Mutex<Ledger>, mix: Mix) {
    let ids = std::mem::take(&mut ledger.lock().unwrap().unanswered);
    for id in ids {
        let body = event(&id, mix).to_string();
        let r = super::request(
            addr,
            "POST",
            "/webhook/events",
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        );
        assert!(
            r.status == 202 || r.status == 200,
            "re-sending {id}: {} {}",
            r.status,
            r.text()
        );
        ledger.lock().unwrap().answered(id, r.status == 202, false);
    }
}

/// Sends every acknowledged id again, in batches, and returns those the
/// daemon took as new (202 "accepted"): ids whose idempotency key it lost.
/// They are written down as accepted, not as accepted twice: the caller
/// judges them.
pub fn recheck_acknowledged(addr: SocketAddr, ledger: &Mutex<Ledger>, mix: Mix) -> Vec<String> {
    let ids = ledger.lock().unwrap().acknowledged_sorted();
    let mut forgotten = Vec::new();
    for chunk in ids.chunks(500) {
        let events: Vec<Value> = chunk.iter().map(|id| event(id, mix)).collect();
        let body = json!({ "events": events }).to_string();
        let r = super::request(
            addr,
            "POST",
            "/webhook/batch",
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        );
        assert_eq!(r.status, 202, "re-sending acknowledged ids: {}", r.text());
        let v = r.json();
        let results = v["results"].as_array().cloned().unwrap_or_default();
        assert_eq!(results.len(), chunk.len(), "one result per event: {v}");
        for (id, result) in chunk.iter().zip(&results) {
            assert_eq!(result["event_id"], id.as_str(), "{result}");
            match result["status"].as_str() {
                Some("duplicate") => {}
                Some("accepted") => forgotten.push(id.clone()),
                _ => panic!("{id}: re-sent, answered {result}"),
            }
        }
    }
    ledger
        .lock()
        .unwrap()
        .accepted
        .extend(forgotten.iter().cloned());
    forgotten
}

/// What the file sink holds.
pub struct SinkFile {
    /// Lines in the file.
    pub lines: usize,
    /// Each distinct event (first copy) by event_id.
    pub events: BTreeMap<String, Value>,
    /// How often each event_id was written.
    pub copies: HashMap<String, usize>,
    /// Lines that are not a JSON event with an event_id (torn writes).
    pub bad: Vec<String>,
}

pub fn read_sink(path: &Path) -> SinkFile {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut file = SinkFile {
        lines: 0,
        events: BTreeMap::new(),
        copies: HashMap::new(),
        bad: Vec::new(),
    };
    for line in text.lines() {
        file.lines += 1;
        let parsed: Option<Value> = serde_json::from_str(line).ok();
        match parsed
            .as_ref()
            .and_then(|v| v["event_id"].as_str().map(str::to_owned))
        {
            Some(id) => {
                *file.copies.entry(id.clone()).or_default() += 1;
                file.events.entry(id).or_insert_with(|| parsed.unwrap());
            }
            None => file.bad.push(line.chars().take(200).collect()),
        }
    }
    file
}

/// `total_events` and `by_type` from `/stats/summary`.
pub fn summary(d: &Daemon) -> (u64, BTreeMap<String, u64>) {
    let s = d.get("/stats/summary").json();
    let total = s["total_events"]
        .as_u64()
        .unwrap_or_else(|| panic!("no total_events in {s}"));
    let by_type = s["by_type"]
        .as_object()
        .unwrap_or_else(|| panic!("no by_type in {s}"))
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
        .filter(|(_, v)| *v > 0)
        .collect();
    (total, by_type)
}

/// Up to 20 ids, sorted, for a failure message.
pub fn sample<'a>(ids: impl IntoIterator<Item = &'a String>) -> Vec<&'a String> {
    let mut v: Vec<_> = ids.into_iter().collect();
    v.sort();
    v.truncate(20);
    v
}

/// Acknowledged ids that never reached the file sink.
pub fn missing<'a>(ledger: &'a Ledger, sink: &SinkFile) -> Vec<&'a String> {
    let mut missing: Vec<&String> = ledger
        .accepted
        .iter()
        .chain(&ledger.duplicate)
        .filter(|id| !sink.events.contains_key(*id))
        .collect();
    missing.sort();
    missing.dedup();
    missing
}

/// The books balance: every acknowledged id is in the file; the file holds
/// only events clients sent, each with the body it was sent with, on whole
/// lines; the built-in counter counted each stored event exactly once.
pub fn check_books(d: &Daemon, ledger: &Ledger, sink: &SinkFile) {
    let missing = missing(ledger, sink);
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged ids never reached the file sink, e.g. {:?}",
        missing.len(),
        ledger.acknowledged().len(),
        sample(missing.iter().copied())
    );
    check_counts(d, ledger, sink);
}

/// Everything [`check_books`] holds but the missing ids: answers in the
/// contract, no acknowledged id stored again, whole lines of events that
/// clients sent, unchanged, and a counter that counted each of them once.
pub fn check_counts(d: &Daemon, ledger: &Ledger, sink: &SinkFile) {
    assert!(
        ledger.unexpected.is_empty(),
        "answers outside the contract: {:?}",
        &ledger.unexpected[..ledger.unexpected.len().min(20)]
    );
    assert!(
        ledger.accepted_twice.is_empty(),
        "acknowledged ids accepted (stored) again: {:?}",
        ledger.accepted_twice
    );
    assert!(
        sink.bad.is_empty(),
        "torn or foreign lines in the file sink: {:?}",
        sink.bad
    );
    let strangers: Vec<&String> = sink
        .events
        .keys()
        .filter(|id| !ledger.sent.contains(*id))
        .collect();
    assert!(
        strangers.is_empty(),
        "the file sink holds events no client sent: {:?}",
        sample(strangers)
    );
    for (id, e) in &sink.events {
        assert_eq!(
            e["event_type"],
            type_of(id),
            "event {id} changed on the way: {e}"
        );
    }

    let (total, by_type) = summary(d);
    let mut file_by_type: BTreeMap<String, u64> = BTreeMap::new();
    for e in sink.events.values() {
        *file_by_type
            .entry(e["event_type"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    assert_eq!(
        total,
        sink.events.len() as u64,
        "total_events must count each stored event once (file: {} distinct events, {} lines)",
        sink.events.len(),
        sink.lines
    );
    assert_eq!(by_type, file_by_type, "by_type against the file sink");
}
