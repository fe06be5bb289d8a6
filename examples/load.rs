//! Load harness for the real inletd binary (or any HTTP server that takes
//! the same requests).
//!
//! ```sh
//! cargo build --release --bins --examples
//! # start the daemon itself on a free port with a fresh data dir, kill it at the end
//! target/release/examples/load --spawn target/release/inletd --durability fsync \
//!     --connections 64 --duration 10 --mode closed
//! # open loop at a fixed offered rate, batches of 100
//! target/release/examples/load --spawn target/release/inletd --durability fsync \
//!     --mode open --rate 200 --batch 100
//! # a server started elsewhere (its PID for CPU and RSS)
//! target/release/examples/load --url http://127.0.0.1:5015 --pid "$(pidof inletd)"
//! ```
//!
//! * **closed** loop: every connection sends its next request as soon as
//!   the previous answer is in (the maximum rate).
//! * **open** loop: `--rate` requests/s spread evenly over the connections,
//!   on a fixed schedule; latency runs from the *scheduled* send time, so a
//!   slow server is charged for the requests it kept waiting (no coordinated
//!   omission). Requests still unsent when the window closes are counted
//!   (`unsent`) and recorded with their latency so far as a lower bound.
//!
//! Every event carries a unique `event_id` (a per-run prefix, the connection
//! and a counter). One task per connection, hyper 1 HTTP/1.1 client over a
//! persistent keep-alive connection. Reports requests/s, events/s,
//! p50/p99/p999, non-2xx answers, the server's CPU (utime+stime from
//! `/proc/PID/stat` over the measured window, 100 % = one core), the load
//! generator's own CPU and the whole machine's, the server's peak RSS
//! (`VmHWM`), and the server's `/stats/summary` latency and queue depth at
//! the end. `--json` prints one JSON line instead.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpStream;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Each connection sends as fast as the answers come back.
    Closed,
    /// A fixed offered rate (`--rate`), latency from the scheduled time.
    Open,
}

#[derive(Debug, Parser)]
#[command(about = "Drives inletd over HTTP and reports throughput, latency, CPU and RSS")]
struct Args {
    /// Base URL of a running server, e.g. http://127.0.0.1:5015.
    #[arg(long, conflicts_with = "spawn", required_unless_present = "spawn")]
    url: Option<String>,
    /// Start this inletd binary on a free port (fresh temp data dir), kill it at the end.
    #[arg(long)]
    spawn: Option<PathBuf>,
    /// `durability` for the spawned daemon: fsync or interval.
    #[arg(long, default_value = "fsync")]
    durability: String,
    /// Extra TOML appended to the spawned daemon's config file.
    #[arg(long)]
    config_extra: Option<String>,
    /// Use (and keep) this data dir for the spawned daemon instead of a fresh temp one
    /// (to measure a restart over a backlog).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// `log_level` for the spawned daemon (the start-up line must stay visible).
    #[arg(long, default_value = "warn,inletd::app=info")]
    log_level: String,
    /// PID of an external server, for its CPU and RSS.
    #[arg(long)]
    pid: Option<u32>,
    /// Concurrent keep-alive connections.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// closed: as fast as answers come; open: fixed --rate.
    #[arg(long, value_enum, default_value = "closed")]
    mode: Mode,
    /// Open loop: requests/s offered, spread over the connections.
    #[arg(long, required_if_eq("mode", "open"))]
    rate: Option<f64>,
    /// Events per request: 1 → POST /webhook/events, more → POST /webhook/batch.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// `event_id`s of 32 random hex digits, as UUIDs are, instead of run,
    /// connection and a counter (which share most of their bytes).
    #[arg(long)]
    random_ids: bool,
    /// Worker threads of the load generator's runtime.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Print requests/s, the server's queue depth, CPU per event and RSS every second.
    #[arg(long)]
    progress: bool,
    /// A name copied into the JSON line.
    #[arg(long, default_value = "")]
    label: String,
    /// One JSON line on stdout instead of the report.
    #[arg(long)]
    json: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.connections == 0 || args.batch == 0 || args.duration <= 0.0 {
        bail!("--connections, --batch and --duration must be positive");
    }
    if let Some(rate) = args.rate
        && rate <= 0.0
    {
        bail!("--rate must be positive");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

// ---------------------------------------------------------------------------
// Histogram: log-bucketed, 64 sub-buckets per power of two (≤ 1.6 % error),
// values in microseconds, exact below 128 µs.

const SUB: u64 = 64;
const MAX_EXP: u64 = 40; // 2^40 µs ≈ 12 days

#[derive(Clone)]
struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

impl Histogram {
    fn new() -> Self {
        Histogram {
            counts: vec![0; (2 * SUB + (MAX_EXP - 6) * SUB) as usize],
            total: 0,
            max: 0,
        }
    }

    fn index(v: u64) -> usize {
        let v = v.min((1 << MAX_EXP) - 1);
        if v < 2 * SUB {
            return v as usize;
        }
        let e = 63 - u64::from(v.leading_zeros()); // ≥ 7
        let m = v >> (e - 6); // top 7 bits: 64..=127
        (2 * SUB + (e - 7) * SUB + (m - SUB)) as usize
    }

    /// Highest value that lands in bucket `i`.
    fn upper(i: usize) -> u64 {
        let i = i as u64;
        if i < 2 * SUB {
            return i;
        }
        let e = (i - 2 * SUB) / SUB + 7;
        let m = (i - 2 * SUB) % SUB + SUB;
        ((m + 1) << (e - 6)) - 1
    }

    fn record(&mut self, d: Duration) {
        let us = d.as_micros().min(u128::from(u64::MAX)) as u64;
        self.counts[Self::index(us)] += 1;
        self.total += 1;
        self.max = self.max.max(us);
    }

    fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
    }

    /// The `q` quantile in milliseconds (bucket upper bound, at most the max).
    fn quantile_ms(&self, q: f64) -> f64 {
        if self.total == 0 {
            return f64::NAN;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::upper(i).min(self.max) as f64 / 1000.0;
            }
        }
        self.max as f64 / 1000.0
    }
}

// ---------------------------------------------------------------------------
// The server: spawned or external.

/// The bytes of every file under `dir` (0 when it does not exist).
fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(_) => e.metadata().map_or(0, |m| m.len()),
            Err(_) => 0,
        })
        .sum()
}

struct Spawned {
    child: Child,
    _dir: Option<tempfile::TempDir>,
    startup: Duration,
    /// The daemon's data dir: its size is the disk the run kept.
    data_dir: PathBuf,
    /// The data dir held nothing before this run, so its size per event
    /// answered is what each event costs on disk.
    fresh: bool,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_inletd(args: &Args, bin: &PathBuf) -> anyhow::Result<(Spawned, SocketAddr)> {
    let dir = tempfile::Builder::new().prefix("inletd-load-").tempdir()?;
    let data_dir = match &args.data_dir {
        Some(d) => d.clone(),
        None => dir.path().join("data"),
    };
    let fresh = dir_bytes(&data_dir) == 0;
    let config = dir.path().join("inletd.toml");
    let mut text = format!(
        "durability = {}\nlog_format = \"json\"\nlog_level = {}\n",
        toml_str(&args.durability),
        toml_str(&args.log_level)
    );
    if let Some(extra) = &args.config_extra {
        text.push_str(extra);
        text.push('\n');
    }
    std::fs::write(&config, text)?;
    let started = Instant::now();
    let mut child = Command::new(bin)
        .arg("--config")
        .arg(&config)
        .arg("--bind")
        .arg("127.0.0.1:0")
        .arg("--data-dir")
        .arg(&data_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stderr = child.stderr.take().expect("stderr is piped");
    let (tx, rx) = std::sync::mpsc::channel::<Result<SocketAddr, String>>();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        let mut early = Vec::new();
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let Some(sender) = &tx else { continue }; // keep draining the pipe
            let parsed: Option<Value> = serde_json::from_str(&line).ok();
            let fields = parsed.as_ref().and_then(|v| v.get("fields"));
            let is_ready = fields
                .and_then(|f| f.get("message"))
                .and_then(Value::as_str)
                == Some("inletd is accepting events");
            match fields.and_then(|f| f.get("addr")).and_then(Value::as_str) {
                Some(addr) if is_ready => {
                    let _ = sender.send(addr.parse().map_err(|e| format!("{addr}: {e}")));
                    tx = None;
                }
                _ => {
                    if early.len() < 20 {
                        early.push(line);
                    }
                }
            }
        }
        if let Some(sender) = tx {
            let _ = sender.send(Err(format!(
                "inletd exited before accepting; its log:\n{}",
                early.join("\n")
            )));
        }
    });
    let mut spawned = Spawned {
        child,
        _dir: Some(dir),
        startup: Duration::ZERO,
        data_dir,
        fresh,
    };
    let addr = rx
        .recv_timeout(Duration::from_secs(300))
        .map_err(|_| anyhow!("inletd did not log its address within 300 s"))?
        .map_err(|e| anyhow!(e))?;
    spawned.startup = started.elapsed();
    Ok((spawned, addr))
}

fn toml_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serialises")
}

// ---------------------------------------------------------------------------
// /proc figures.

fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime in ticks of a process ("self" for this one).
fn proc_cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; fields after the closing paren.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime 15.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Ticks of the whole machine.
#[derive(Clone, Copy)]
struct MachineTicks {
    /// user, nice, system, irq, softirq.
    busy: u64,
    iowait: u64,
    /// Time the hypervisor gave this VM's vCPUs to someone else.
    steal: u64,
    total: u64,
}

fn machine_ticks() -> Option<MachineTicks> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest counted in user)
    let total: u64 = v.iter().take(8).sum();
    let (idle, iowait, steal) = (*v.get(3)?, *v.get(4)?, *v.get(7)?);
    Some(MachineTicks {
        busy: total - idle - iowait - steal,
        iowait,
        steal,
        total,
    })
}

fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Ticks of each thread of a process: tid → (name, ticks).
fn thread_ticks(pid: u32) -> HashMap<u32, (String, u64)> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<u32>().ok())
        else {
            continue;
        };
        let name = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
            .map(|n| n.trim().to_owned())
            .unwrap_or_default();
        if let Some(t) = proc_cpu_ticks(&format!("{pid}/task/{tid}")) {
            out.insert(tid, (name, t));
        }
    }
    out
}

struct CpuSample {
    server: Option<u64>,
    threads: HashMap<u32, (String, u64)>,
    me: Option<u64>,
    machine: Option<MachineTicks>,
}

fn cpu_sample(pid: Option<u32>) -> CpuSample {
    CpuSample {
        server: pid.and_then(|p| proc_cpu_ticks(&p.to_string())),
        threads: pid.map(thread_ticks).unwrap_or_default(),
        me: proc_cpu_ticks("self"),
        machine: machine_ticks(),
    }
}

// ---------------------------------------------------------------------------
// HTTP.

type Sender = SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> anyhow::Result<Sender> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// Sends one request and reads the whole answer; the status code.
async fn exchange(sender: &mut Sender, req: Request<Full<Bytes>>) -> anyhow::Result<u16> {
    sender.ready().await?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    resp.into_body().collect().await?;
    Ok(status)
}

/// The server's queue depth (`/admin/queue`), if it answers within a second.
async fn queue_depth(addr: SocketAddr) -> Option<u64> {
    tokio::time::timeout(Duration::from_secs(1), get_json(addr, "/admin/queue"))
        .await
        .ok()?
        .ok()
        .and_then(|q| q.get("depth").and_then(Value::as_u64))
}

/// Whether the queue's drain after the load can be measured: the server
/// answers `/admin/queue`. A server without one (`bare_warp`) answers it
/// 404 or 405, and an inletd with an `admin_token` 401 or 403: the depth
/// cannot be read from either, so the drain is not waited for (60 s) in
/// vain.
async fn has_queue(addr: SocketAddr) -> bool {
    let status = async {
        let mut sender = connect(addr).await?;
        let req = Request::get("/admin/queue")
            .header("host", addr.to_string())
            .body(Full::new(Bytes::new()))?;
        sender.ready().await?;
        anyhow::Ok(sender.send_request(req).await?.status())
    };
    match tokio::time::timeout(Duration::from_secs(1), status).await {
        Ok(Ok(status)) if status.is_client_error() => {
            if matches!(status.as_u16(), 401 | 403) {
                eprintln!("load: /admin/queue answered {status}: the drain is not measured");
            }
            false
        }
        _ => true,
    }
}

async fn get_json(addr: SocketAddr, path: &str) -> anyhow::Result<Value> {
    let mut sender = connect(addr).await?;
    let req = Request::get(path)
        .header("host", addr.to_string())
        .body(Full::new(Bytes::new()))?;
    sender.ready().await?;
    let resp = sender.send_request(req).await?;
    if !resp.status().is_success() {
        bail!("{path}: {}", resp.status());
    }
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(serde_json::from_slice(&body)?)
}

fn event_json(out: &mut String, plan: &Plan, conn: usize, n: u64) {
    use std::fmt::Write as _;
    let run = &plan.run;
    let id = if plan.random_ids {
        format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
    } else {
        format!("{run}-{conn}-{n}")
    };
    let _ = write!(
        out,
        r#"{{"event_id":"{id}","event_type":"page_view","user_id":"user_{}","properties":{{"page":"/pricing"}}}}"#,
        n % 1000
    );
}

struct Plan {
    addr: SocketAddr,
    run: String,
    batch: usize,
    random_ids: bool,
    mode: Mode,
    /// Time between two scheduled sends on one connection (open loop).
    interval: Duration,
    connections: usize,
    t0: Instant,
    measure_from: Instant,
    end: Instant,
    completed_events: AtomicU64,
}

#[derive(Clone)]
struct ConnResult {
    /// From the scheduled send (open) or the actual send (closed).
    latency: Histogram,
    /// From the actual send: what the server took.
    service: Histogram,
    requests: u64,
    non2xx: u64,
    errors: u64,
    unsent: u64,
}

async fn connection(plan: Arc<Plan>, id: usize) -> ConnResult {
    let mut r = ConnResult {
        latency: Histogram::new(),
        service: Histogram::new(),
        requests: 0,
        non2xx: 0,
        errors: 0,
        unsent: 0,
    };
    let (path, events) = if plan.batch == 1 {
        ("/webhook/events", 1)
    } else {
        ("/webhook/batch", plan.batch)
    };
    let host = plan.addr.to_string();
    let mut sender: Option<Sender> = None;
    let mut n: u64 = 0;
    let mut k: u64 = 0;
    // Spread the connections' schedules evenly over one interval.
    let phase = plan.interval.mul_f64(id as f64 / plan.connections as f64);
    let mut body = String::with_capacity(events * 130 + 16);
    loop {
        let scheduled = match plan.mode {
            Mode::Closed => {
                let now = Instant::now();
                if now >= plan.end {
                    break;
                }
                now
            }
            Mode::Open => {
                let t = plan.t0 + phase + plan.interval.mul_f64(k as f64);
                k += 1;
                if t >= plan.end {
                    break;
                }
                let now = Instant::now();
                if now >= plan.end {
                    // Window closed with this one (and maybe more) still due:
                    // the server kept them waiting at least this long.
                    let mut t = t;
                    while t < plan.end {
                        if t >= plan.measure_from {
                            r.unsent += 1;
                            r.latency.record(plan.end - t);
                        }
                        t += plan.interval;
                    }
                    break;
                }
                if now < t {
                    tokio::time::sleep_until(t.into()).await;
                }
                t
            }
        };
        body.clear();
        if plan.batch == 1 {
            event_json(&mut body, &plan, id, n);
            n += 1;
        } else {
            body.push_str(r#"{"events":["#);
            for i in 0..events {
                if i > 0 {
                    body.push(',');
                }
                event_json(&mut body, &plan, id, n);
                n += 1;
            }
            body.push_str("]}");
        }
        let req = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header("host", &host)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.clone())))
            .expect("a valid request");
        if sender.is_none() {
            match connect(plan.addr).await {
                Ok(s) => sender = Some(s),
                Err(_) => {
                    r.errors += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        }
        let sent = Instant::now();
        let outcome = exchange(sender.as_mut().expect("connected"), req).await;
        let done = Instant::now();
        let status = match outcome {
            Ok(s) => s,
            Err(_) => {
                r.errors += 1;
                sender = None;
                continue;
            }
        };
        plan.completed_events
            .fetch_add(events as u64, Ordering::Relaxed);
        if scheduled >= plan.measure_from {
            r.requests += 1;
            if !(200..300).contains(&status) {
                r.non2xx += 1;
            }
            r.latency.record(done - scheduled);
            r.service.record(done - sent);
        }
    }
    r
}

async fn run(args: Args) -> anyhow::Result<()> {
    let (spawned, addr, pid) = match (&args.spawn, &args.url) {
        (Some(bin), _) => {
            let (s, addr) = spawn_inletd(&args, bin)?;
            let pid = s.child.id();
            (Some(s), addr, Some(pid))
        }
        (None, Some(url)) => {
            let hostport = url
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .to_owned();
            let addr = tokio::net::lookup_host(&hostport)
                .await
                .with_context(|| format!("resolving {hostport}"))?
                .next()
                .ok_or_else(|| anyhow!("{hostport} does not resolve"))?;
            (None, addr, args.pid)
        }
        (None, None) => bail!("give --url or --spawn"),
    };
    let tck = clk_tck();
    let run_id = format!(
        "r{:x}{:04x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        fastrand::u16(..)
    );
    let interval = match (args.mode, args.rate) {
        (Mode::Open, Some(rate)) => Duration::from_secs_f64(args.connections as f64 / rate),
        _ => Duration::ZERO,
    };
    let t0 = Instant::now() + Duration::from_millis(20);
    let measure_from = t0 + Duration::from_secs_f64(args.warmup.max(0.0));
    let end = measure_from + Duration::from_secs_f64(args.duration);
    let plan = Arc::new(Plan {
        addr,
        run: run_id.clone(),
        batch: args.batch,
        random_ids: args.random_ids,
        mode: args.mode,
        interval,
        connections: args.connections,
        t0,
        measure_from,
        end,
        completed_events: AtomicU64::new(0),
    });
    let tasks: Vec<_> = (0..args.connections)
        .map(|id| tokio::spawn(connection(plan.clone(), id)))
        .collect();

    let progress = args.progress.then(|| {
        let plan = plan.clone();
        tokio::spawn(async move {
            let mut last = 0;
            let mut last_ticks = pid.and_then(|p| proc_cpu_ticks(&p.to_string()));
            let mut lines = Vec::new();
            let mut tick = tokio::time::interval_at(
                (plan.t0 + Duration::from_secs(1)).into(),
                Duration::from_secs(1),
            );
            loop {
                let at = tick.tick().await;
                if at.into_std() > plan.end + Duration::from_millis(500) {
                    break;
                }
                let done = plan.completed_events.load(Ordering::Relaxed);
                let depth = queue_depth(plan.addr).await;
                let t = (at.into_std() - plan.t0).as_secs_f64();
                let eps = done - last;
                last = done;
                // The server's CPU this second, per event answered in it.
                let ticks = pid.and_then(|p| proc_cpu_ticks(&p.to_string()));
                let cpu_us = match (last_ticks, ticks) {
                    (Some(a), Some(b)) if eps > 0 => {
                        Some((b.saturating_sub(a)) as f64 / tck * 1e6 / eps as f64)
                    }
                    _ => None,
                };
                last_ticks = ticks;
                let rss_mib = pid
                    .and_then(|p| status_kib(p, "VmRSS:"))
                    .map(|k| k as f64 / 1024.0);
                eprintln!(
                    "t={t:5.1}s events/s={eps:>8} queue_depth={} cpu_us_per_event={} rss_mib={}",
                    depth.map_or("?".to_owned(), |d| d.to_string()),
                    cpu_us.map_or("?".to_owned(), |c| format!("{c:.1}")),
                    rss_mib.map_or("?".to_owned(), |r| format!("{r:.1}"))
                );
                lines.push(
                    json!({"t": t.round(), "events_per_s": eps, "queue_depth": depth,
                    "cpu_us_per_event": cpu_us, "rss_mib": rss_mib}),
                );
            }
            lines
        })
    });

    // The queue's depth through the measured window, ten times a second:
    // whether processing keeps up with intake.
    let depths = {
        let plan = plan.clone();
        tokio::spawn(async move {
            let mut depths = Vec::new();
            let mut tick =
                tokio::time::interval_at(plan.measure_from.into(), Duration::from_millis(100));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                if tick.tick().await.into_std() >= plan.end {
                    break depths;
                }
                if let Some(depth) = queue_depth(plan.addr).await {
                    depths.push(depth);
                }
            }
        })
    };

    // CPU at the start and end of the measured window.
    tokio::time::sleep_until(measure_from.into()).await;
    let cpu_start = cpu_sample(pid);
    let window_start = Instant::now();
    tokio::time::sleep_until(end.into()).await;
    let cpu_end = cpu_sample(pid);
    let window = window_start.elapsed().as_secs_f64();

    let mut total = ConnResult {
        latency: Histogram::new(),
        service: Histogram::new(),
        requests: 0,
        non2xx: 0,
        errors: 0,
        unsent: 0,
    };
    for t in tasks {
        let r = t.await?;
        total.latency.merge(&r.latency);
        total.service.merge(&r.service);
        total.requests += r.requests;
        total.non2xx += r.non2xx;
        total.errors += r.errors;
        total.unsent += r.unsent;
    }
    // How long after the last request the queue took to empty.
    let mut drain_ms = None;
    let queued = has_queue(addr).await;
    while queued && end.elapsed() < Duration::from_secs(60) {
        if queue_depth(addr).await == Some(0) {
            drain_ms = Some(end.elapsed().as_secs_f64() * 1000.0);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let intervals = match progress {
        Some(p) => Some(p.await?),
        None => None,
    };
    let mut depths = depths.await?;
    depths.sort_unstable();
    let depth_at = |q: f64| {
        (!depths.is_empty()).then(|| depths[((depths.len() - 1) as f64 * q).round() as usize])
    };
    let summary = get_json(addr, "/stats/summary").await.ok();
    let peak_rss_kib = pid.and_then(|p| status_kib(p, "VmHWM:"));
    let rss_kib = pid.and_then(|p| status_kib(p, "VmRSS:"));
    let startup_ms = spawned.as_ref().map(|s| s.startup.as_secs_f64() * 1000.0);
    let disk_bytes = spawned.as_ref().map(|s| dir_bytes(&s.data_dir));
    // Every event answered, warm-up included: all of them are on disk.
    let answered = plan.completed_events.load(Ordering::Relaxed);
    let disk_per_event = match (&spawned, disk_bytes) {
        (Some(s), Some(bytes)) if s.fresh && answered > 0 => Some(bytes as f64 / answered as f64),
        _ => None,
    };
    drop(spawned);

    let pct = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) => Some((b.saturating_sub(a)) as f64 / tck / window * 100.0),
        _ => None,
    };
    let server_cpu = pct(cpu_start.server, cpu_end.server);
    // The server's busiest threads: one near 100 % means a serial stage.
    let mut busiest: Vec<(String, f64)> = cpu_end
        .threads
        .iter()
        .map(|(tid, (name, t))| {
            let before = cpu_start.threads.get(tid).map_or(0, |(_, b)| *b);
            (
                format!("{name}/{tid}"),
                t.saturating_sub(before) as f64 / tck / window * 100.0,
            )
        })
        .filter(|(_, p)| *p >= 1.0)
        .collect();
    busiest.sort_by(|a, b| b.1.total_cmp(&a.1));
    busiest.truncate(6);
    let loadgen_cpu = pct(cpu_start.me, cpu_end.me);
    let (machine_busy, machine_iowait, machine_steal) = match (cpu_start.machine, cpu_end.machine) {
        (Some(a), Some(b)) if b.total > a.total => {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
            let f = |x: u64, y: u64| (y - x) as f64 / (b.total - a.total) as f64 * cores * 100.0;
            (
                Some(f(a.busy, b.busy)),
                Some(f(a.iowait, b.iowait)),
                Some(f(a.steal, b.steal)),
            )
        }
        _ => (None, None, None),
    };
    let others_cpu = match (machine_busy, server_cpu, loadgen_cpu) {
        (Some(m), s, Some(l)) => Some((m - s.unwrap_or(0.0) - l).max(0.0)),
        _ => None,
    };
    let duration = args.duration;
    let rps = total.requests as f64 / duration;
    let eps = rps * args.batch as f64;
    let round = |v: f64, d: i32| {
        let p = 10f64.powi(d);
        (v * p).round() / p
    };
    let q = |h: &Histogram, p: f64| round(h.quantile_ms(p), 3);
    let mib = |k: Option<u64>| k.map(|k| round(k as f64 / 1024.0, 1));
    let out = json!({
        "label": args.label,
        "mode": match args.mode { Mode::Closed => "closed", Mode::Open => "open" },
        "durability": args.spawn.as_ref().map(|_| args.durability.clone()),
        "connections": args.connections,
        "batch": args.batch,
        "offered_rps": args.rate,
        "duration_s": duration,
        "requests": total.requests,
        "rps": round(rps, 1),
        "events_per_s": round(eps, 1),
        "p50_ms": q(&total.latency, 0.5),
        "p99_ms": q(&total.latency, 0.99),
        "p999_ms": q(&total.latency, 0.999),
        "max_ms": round(total.latency.max as f64 / 1000.0, 3),
        "service_p50_ms": q(&total.service, 0.5),
        "service_p99_ms": q(&total.service, 0.99),
        "non2xx": total.non2xx,
        "errors": total.errors,
        "unsent": total.unsent,
        "server_cpu_pct": server_cpu.map(|v| round(v, 1)),
        "server_threads_cpu_pct": busiest
            .iter()
            .map(|(n, p)| json!([n, round(*p, 1)]))
            .collect::<Vec<_>>(),
        "loadgen_cpu_pct": loadgen_cpu.map(|v| round(v, 1)),
        "machine_busy_pct": machine_busy.map(|v| round(v, 1)),
        "machine_iowait_pct": machine_iowait.map(|v| round(v, 1)),
        "machine_steal_pct": machine_steal.map(|v| round(v, 1)),
        // Whatever else ran on the machine meanwhile (other builds, tests).
        "others_cpu_pct": others_cpu.map(|v| round(v, 1)),
        "peak_rss_mib": mib(peak_rss_kib),
        "rss_mib": mib(rss_kib),
        "startup_ms": startup_ms.map(|v| round(v, 1)),
        "disk_bytes": disk_bytes,
        "disk_bytes_per_event": disk_per_event.map(|v| round(v, 1)),
        "server_latency_ms": summary.as_ref().and_then(|s| s.get("latency_ms").cloned()),
        "queue_depth": summary.as_ref().and_then(|s| s.get("queue_depth").cloned()),
        "queue_depth_while_measured": json!({
            "p50": depth_at(0.5), "p99": depth_at(0.99), "max": depths.last(),
            "samples": depths.len(),
        }),
        "drain_ms": drain_ms.map(|v| round(v, 1)),
        "intervals": intervals,
    });
    let mut stdout = std::io::stdout().lock();
    if args.json {
        writeln!(stdout, "{out}")?;
        return Ok(());
    }
    let opt = |v: Option<f64>, unit: &str| v.map_or("n/a".to_owned(), |v| format!("{v:.1}{unit}"));
    let opt_u64 = |v: Option<u64>| v.map_or("n/a".to_owned(), |v| v.to_string());
    writeln!(
        stdout,
        "{} loop, {} connections, {} event(s)/request, {:.0} s measured after {:.0} s warm-up{}",
        out["mode"].as_str().unwrap_or(""),
        args.connections,
        args.batch,
        duration,
        args.warmup,
        args.rate
            .map(|r| format!(", offered {r:.0} requests/s"))
            .unwrap_or_default()
    )?;
    if let Some(ms) = startup_ms {
        writeln!(
            stdout,
            "server: spawned {} (durability {}), accepting after {ms:.0} ms",
            addr, args.durability
        )?;
    }
    writeln!(
        stdout,
        "throughput: {rps:.0} requests/s, {eps:.0} events/s ({} requests; {} non-2xx, {} errors, {} unsent)",
        total.requests, total.non2xx, total.errors, total.unsent
    )?;
    writeln!(
        stdout,
        "latency{}: p50 {:.2} ms, p99 {:.2} ms, p999 {:.2} ms, max {:.2} ms",
        if args.mode == Mode::Open {
            " (from the scheduled send)"
        } else {
            ""
        },
        total.latency.quantile_ms(0.5),
        total.latency.quantile_ms(0.99),
        total.latency.quantile_ms(0.999),
        total.latency.max as f64 / 1000.0
    )?;
    if args.mode == Mode::Open {
        writeln!(
            stdout,
            "service time (from the actual send): p50 {:.2} ms, p99 {:.2} ms",
            total.service.quantile_ms(0.5),
            total.service.quantile_ms(0.99)
        )?;
    }
    writeln!(
        stdout,
        "cpu (100% = one core): server {}, load generator {}, other processes {}; whole machine {} busy + {} iowait + {} stolen by the hypervisor",
        opt(server_cpu, "%"),
        opt(loadgen_cpu, "%"),
        opt(others_cpu, "%"),
        opt(machine_busy, "%"),
        opt(machine_iowait, "%"),
        opt(machine_steal, "%")
    )?;
    if !busiest.is_empty() {
        let list: Vec<String> = busiest
            .iter()
            .map(|(n, p)| format!("{n} {p:.0}%"))
            .collect();
        writeln!(stdout, "server's busiest threads: {}", list.join(", "))?;
    }
    writeln!(
        stdout,
        "server memory: peak RSS (VmHWM) {}, RSS at the end {}",
        opt(mib(peak_rss_kib), " MiB"),
        opt(mib(rss_kib), " MiB")
    )?;
    if let Some(bytes) = disk_bytes {
        writeln!(
            stdout,
            "server data dir at the end: {:.1} MiB{}",
            bytes as f64 / 1_048_576.0,
            disk_per_event.map_or(String::new(), |b| format!(
                ", {b:.1} bytes per event answered ({answered} events)"
            ))
        )?;
    }
    writeln!(
        stdout,
        "queue depth while measured (10 a second): p50 {}, p99 {}, max {}; empty {} after the last request",
        opt_u64(depth_at(0.5)),
        opt_u64(depth_at(0.99)),
        opt_u64(depths.last().copied()),
        opt(drain_ms, " ms")
    )?;
    match &summary {
        Some(s) => writeln!(
            stdout,
            "server /stats/summary: latency_ms {}, queue_depth {}",
            s.get("latency_ms").unwrap_or(&Value::Null),
            s.get("queue_depth").unwrap_or(&Value::Null)
        )?,
        None => writeln!(stdout, "server /stats/summary: not available")?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Histogram;

    #[test]
    fn buckets_round_trip_within_their_precision() {
        for v in [0u64, 1, 127, 128, 129, 1000, 65_535, 1_000_000, 123_456_789] {
            let i = Histogram::index(v);
            assert!(Histogram::upper(i) >= v, "{v}");
            assert!(Histogram::upper(i) as f64 <= v as f64 * 1.016 + 1.0, "{v}");
            assert!(i == 0 || Histogram::upper(i - 1) < v, "{v}");
        }
    }
}
