//! Test helpers: the real `inletd` binary started on port 0 with a temp
//! data dir, the one blocking HTTP/1.1 client of the tests ([`http`]: it
//! also sends the malformed requests a real client library would refuse
//! to), and a scriptable sink server that records what it was sent.
#![allow(dead_code)]

pub mod books;
pub mod http;
pub mod redis;
pub mod webdriver;

// Each test target uses some of these.
#[allow(unused_imports)]
pub use http::{RawConnection, Response, read_response, request, request_bytes, try_request};

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A running `inletd` process.
pub struct Daemon {
    /// The process.
    pub child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its data directory (kept across restarts).
    pub data_dir: PathBuf,
    /// Its config file.
    pub config_path: PathBuf,
    /// Every log line it wrote so far.
    pub log: Arc<Mutex<Vec<String>>>,
    /// The thread copying its stderr into `log`: joined once it exits, so
    /// that its last lines are in `log` before a test reads them.
    reader: Option<std::thread::JoinHandle<()>>,
}

/// For a test that needs what this machine lacks (root, a mount): fails
/// with `why`, unless `INLETD_SKIP_PRIVILEGED=1` asks to skip such tests,
/// in which case it says so and the caller returns. Never a silent pass.
pub fn cannot_run_here(why: &str) {
    if std::env::var("INLETD_SKIP_PRIVILEGED").as_deref() == Ok("1") {
        eprintln!("SKIPPED (INLETD_SKIP_PRIVILEGED=1): {why}");
        return;
    }
    panic!("{why}; run as root (CI does), or set INLETD_SKIP_PRIVILEGED=1 to skip this test");
}

/// Writes `inletd.toml` into `dir` with the test defaults plus `extra`
/// (a key in `extra` replaces the default of the same name).
pub fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("inletd.toml");
    let data = dir.join("data");
    let defaults = [
        ("bind", "\"127.0.0.1:0\"".to_owned()),
        ("data_dir", format!("\"{}\"", data.display())),
        ("log_format", "\"json\"".to_owned()),
        ("batch_timeout_ms", "50".to_owned()),
    ];
    let mut text = String::new();
    for (key, value) in defaults {
        let overridden = extra
            .lines()
            .any(|l| l.split('=').next().is_some_and(|k| k.trim() == key));
        if !overridden {
            text.push_str(&format!("{key} = {value}\n"));
        }
    }
    text.push_str(extra);
    text.push('\n');
    std::fs::write(&path, text).expect("write config");
    path
}

impl Daemon {
    /// Starts the binary with a config written into `dir` (test defaults + `extra`).
    pub fn start(dir: &Path, extra: &str) -> Daemon {
        let config_path = write_config(dir, extra);
        Daemon::start_with(dir, &config_path, &[])
    }

    /// Starts the binary with an existing config file and extra environment.
    pub fn start_with(dir: &Path, config_path: &Path, env: &[(&str, &str)]) -> Daemon {
        Daemon::try_start_with(dir, config_path, env)
            .unwrap_or_else(|log| panic!("inletd did not start; log:\n{log}"))
    }

    /// Starts the binary; when it does not start listening within 30 s (it
    /// exited, or hangs), kills it and returns everything it logged.
    pub fn try_start_with(
        dir: &Path,
        config_path: &Path,
        env: &[(&str, &str)],
    ) -> Result<Daemon, String> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_inletd"));
        cmd.arg("--config")
            .arg(config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // The daemon's own jemalloc settings, unless a test sets them.
            .env_remove("_RJEM_MALLOC_CONF");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn inletd");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = {
            let log = log.clone();
            std::thread::spawn(move || {
                let mut tx = Some(tx);
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if let Some(addr) = listening_addr(&line)
                        && let Some(tx) = tx.take()
                    {
                        let _ = tx.send(addr);
                    }
                    log.lock().unwrap().push(line);
                }
            })
        };
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let _ = reader.join();
                return Err(log.lock().unwrap().join("\n"));
            }
        };
        Ok(Daemon {
            child,
            addr,
            data_dir: dir.join("data"),
            config_path: config_path.to_owned(),
            log,
            reader: Some(reader),
        })
    }

    /// Sends a request; see [`request`].
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Response {
        request(self.addr, method, path, headers, body)
    }

    /// POSTs JSON.
    pub fn post_json(&self, path: &str, body: &Value) -> Response {
        self.request(
            "POST",
            path,
            &[("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        )
    }

    /// GETs a path.
    pub fn get(&self, path: &str) -> Response {
        self.request("GET", path, &[], b"")
    }

    /// Sends SIGTERM and waits (up to `limit`) for the exit status.
    pub fn terminate(&mut self, limit: Duration) -> ExitStatus {
        signal(&self.child, "TERM");
        self.wait(limit)
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.take_last_lines();
    }

    /// Waits for exit, failing the test past `limit`.
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.take_last_lines();
                return status;
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                panic!(
                    "inletd did not exit within {limit:?}; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Once the process has exited: waits for the reader to copy what it
    /// wrote last (its stderr closes at exit).
    fn take_last_lines(&mut self) {
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }

    /// The log so far as one string.
    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Polls `/admin/queue` until the queue is empty.
    pub fn wait_processed(&self, limit: Duration) {
        let start = Instant::now();
        loop {
            let q = self.get("/admin/queue").json();
            if q["depth"] == 0 {
                return;
            }
            if start.elapsed() > limit {
                panic!("queue not drained in {limit:?}: {q}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the daemon stored (`total_events` of `/stats/summary`), once
    /// it has processed everything.
    pub fn stored(&self) -> u64 {
        self.wait_processed(Duration::from_secs(20));
        let summary = self.get("/stats/summary").json();
        summary["total_events"]
            .as_u64()
            .unwrap_or_else(|| panic!("no total_events: {summary}"))
    }

    /// Fails the test, with the log, when the daemon has exited.
    pub fn assert_alive(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("inletd exited with {status}; log:\n{}", self.log_text());
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends a signal by name with kill(1).
pub fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(child.id().to_string())
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{name} failed");
}

fn listening_addr(line: &str) -> Option<SocketAddr> {
    let v: Value = serde_json::from_str(line).ok()?;
    if v["fields"]["message"] != "inletd is accepting events" {
        return None;
    }
    v["fields"]["addr"].as_str()?.parse().ok()
}

/// What the fake sink answers to its n-th request (0-based).
pub type Script = Box<dyn Fn(usize) -> u16 + Send + Sync>;

/// A local HTTP server standing in for a dashboard: answers per `script`,
/// records every request body (as JSON) that it answered 2xx.
pub struct SinkServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Requests seen so far, whatever the answer.
    pub requests: Arc<AtomicUsize>,
    /// Bodies of the requests answered 2xx.
    pub delivered: Arc<Mutex<Vec<Value>>>,
    /// `Idempotency-Key` headers of all requests.
    pub keys: Arc<Mutex<Vec<String>>>,
}

impl SinkServer {
    /// Starts the server on a free loopback port.
    pub fn start(script: Script) -> SinkServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind sink");
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let delivered = Arc::new(Mutex::new(Vec::new()));
        let keys = Arc::new(Mutex::new(Vec::new()));
        let (r, d, k) = (requests.clone(), delivered.clone(), keys.clone());
        let script = Arc::new(script);
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let (r, d, k, script) = (r.clone(), d.clone(), k.clone(), script.clone());
                std::thread::spawn(move || serve_sink(stream, &r, &d, &k, &script));
            }
        });
        SinkServer {
            addr,
            requests,
            delivered,
            keys,
        }
    }

    /// The URL to configure.
    pub fn url(&self) -> String {
        format!("http://{}/update", self.addr)
    }

    /// Every event delivered (flattened out of the `{"events":[…]}` bodies).
    pub fn events(&self) -> Vec<Value> {
        self.delivered
            .lock()
            .unwrap()
            .iter()
            .flat_map(|b| b["events"].as_array().cloned().unwrap_or_default())
            .collect()
    }
}

fn serve_sink(
    stream: TcpStream,
    requests: &AtomicUsize,
    delivered: &Mutex<Vec<Value>>,
    keys: &Mutex<Vec<String>>,
    script: &Script,
) {
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut length = 0;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                match k.to_ascii_lowercase().as_str() {
                    "content-length" => length = v.trim().parse().unwrap_or(0),
                    "idempotency-key" => keys.lock().unwrap().push(v.trim().to_owned()),
                    _ => {}
                }
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let n = requests.fetch_add(1, Ordering::SeqCst);
        let status = script(n);
        if (200..300).contains(&status)
            && let Ok(v) = serde_json::from_slice(&body)
        {
            delivered.lock().unwrap().push(v);
        }
        let answer = format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\nRetry-After: 0\r\n\r\n");
        if reader.get_mut().write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

/// Polls `f` until it is true, failing with `what` past `limit`.
pub fn eventually(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        if start.elapsed() > limit {
            panic!("timed out waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How fast `/health` must answer while a test attacks the daemon: a
/// generous bound, no tight timing.
pub const HEALTH_BOUND: Duration = Duration::from_secs(2);

/// `/health` must answer 200 within [`HEALTH_BOUND`]; returns how long it
/// took.
pub fn health(addr: SocketAddr) -> Result<Duration, String> {
    let start = Instant::now();
    let r = try_request(addr, "GET", "/health", &[], b"")
        .map_err(|e| format!("/health failed: {e}"))?;
    let took = start.elapsed();
    if r.status != 200 {
        return Err(format!("/health answered {}: {}", r.status, r.text()));
    }
    if took > HEALTH_BOUND {
        return Err(format!("/health took {took:?}"));
    }
    Ok(took)
}

/// A fresh good event must be accepted.
pub fn good_event(addr: SocketAddr, id: &str) -> Result<(), String> {
    let body = serde_json::json!({"event_id": id, "event_type": "good", "user_id": "u-good"});
    let r = try_request(
        addr,
        "POST",
        "/webhook/events",
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
    .map_err(|e| format!("good event {id} failed: {e}"))?;
    if r.status != 202 {
        return Err(format!("good event {id}: {} {}", r.status, r.text()));
    }
    Ok(())
}

/// Checks `/health` and takes good events every 200 ms while `busy` holds;
/// returns how many good events were sent.
pub fn serve_meanwhile(
    addr: SocketAddr,
    prefix: &'static str,
    busy: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Result<u64, String>> {
    std::thread::spawn(move || {
        let mut n = 0u64;
        while busy.load(Ordering::SeqCst) {
            health(addr)?;
            good_event(addr, &format!("{prefix}-{n}"))?;
            n += 1;
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(n)
    })
}
