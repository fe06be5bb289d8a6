//! The client subcommands (`import`, `stats`, `demo`) run as a user runs
//! them: the real `inletd` binary against a real running daemon (or, for
//! the daemon's busy and too-large answers, a scripted stand-in).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Daemon;
use serde_json::{Value, json};

/// What one run of the CLI printed and how it exited.
#[derive(Debug)]
struct Run {
    /// Exit code (-1 if killed by a signal).
    code: i32,
    /// Everything on stdout.
    stdout: String,
    /// Everything on stderr.
    stderr: String,
}

/// Runs `inletd ARGS…` (no INLETD_* settings from the environment).
fn inletd(args: &[&str]) -> Run {
    let output = Command::new(env!("CARGO_BIN_EXE_inletd"))
        .args(args)
        .env_remove("INLETD_CONFIG")
        .env_remove("INLETD_BIND")
        .output()
        .expect("run inletd");
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Runs a client subcommand against `daemon` with its config and `--url`.
fn against(daemon: &Daemon, args: &[&str]) -> Run {
    let config = daemon.config_path.display().to_string();
    let url = format!("http://{}", daemon.addr);
    let mut all = vec!["--config", &config];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--url", &url]);
    inletd(&all)
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write input file");
    path.display().to_string()
}

/// The events the file sink wrote, by event_id.
fn archived(path: &Path, event_id: &str) -> Value {
    let text = std::fs::read_to_string(path).expect("read archive");
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|e| e["event_id"] == event_id)
        .unwrap_or_else(|| panic!("{event_id} not archived:\n{text}"))
}

/// A user backfills seed 001's CSV export: one row with a quoted
/// properties_json, one with none, one with a bad timestamp and one with
/// no event_type, in batches of 2. The report counts 3 accepted and names
/// lines 4 and 5 with the reason; the exit code is 1; the daemon counted 3
/// events with their properties intact. Running the same import again
/// reports all 3 as duplicates and counts nothing twice.
#[test]
fn a_csv_import_names_bad_lines_and_a_second_run_is_all_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive.jsonl");
    let sink = format!(
        "[[sinks]]\nname = \"archive\"\ntype = \"file\"\npath = \"{}\"\n",
        archive.display()
    );
    let daemon = Daemon::start(dir.path(), &sink);
    let csv = write(
        dir.path(),
        "events.csv",
        concat!(
            "event_id,occurred_at,user_id,event_type,properties_json\n",
            "csv-1,2024-01-15T10:30:00Z,user_1,page_view,\"{\"\"page\"\": \"\"/home\"\"}\"\n",
            "csv-2,2024-01-15T11:00:00Z,user_2,user_signup,\n",
            "csv-3,yesterday at noon,user_3,page_view,\n",
            "csv-4,2024-01-16T09:00:00Z,user_1,,\"{\"\"page\"\": \"\"/docs\"\"}\"\n",
            "csv-5,2024-01-16T10:00:00Z,user_4,page_view,\"{\"\"page\"\": \"\"/pricing\"\", \"\"ref\"\": \"\"a,b\"\"}\"\n",
        ),
    );

    let first = against(&daemon, &["import", &csv, "--batch-size", "2"]);
    assert_eq!(first.code, 1, "{first:?}");
    assert!(
        first
            .stdout
            .contains("3 accepted, 0 duplicates, 2 rejected (5 records read)"),
        "{first:?}"
    );
    assert!(first.stdout.contains("line 4: occurred_at:"), "{first:?}");
    assert!(
        first.stdout.contains("line 5: event_type: is required"),
        "{first:?}"
    );
    for good in ["line 2:", "line 3:", "line 6:"] {
        assert!(!first.stdout.contains(good), "{good} {first:?}");
    }

    daemon.wait_processed(Duration::from_secs(10));
    let summary = daemon.get("/stats/summary").json();
    assert_eq!(summary["total_events"], 3, "{summary}");
    assert_eq!(
        summary["by_type"],
        json!({"page_view": 2, "user_signup": 1})
    );
    let home = archived(&archive, "csv-1");
    assert_eq!(home["properties"], json!({"page": "/home"}), "{home}");
    assert_eq!(home["occurred_at"], "2024-01-15T10:30:00Z");
    let pricing = archived(&archive, "csv-5");
    assert_eq!(
        pricing["properties"],
        json!({"page": "/pricing", "ref": "a,b"})
    );
    assert!(archived(&archive, "csv-2").get("properties").is_none());

    let second = against(&daemon, &["import", &csv]);
    assert_eq!(second.code, 1, "{second:?}");
    assert!(
        second
            .stdout
            .contains("0 accepted, 3 duplicates, 2 rejected"),
        "{second:?}"
    );
    daemon.wait_processed(Duration::from_secs(10));
    assert_eq!(daemon.get("/stats/summary").json()["total_events"], 3);
}

/// A user imports JSON lines where line 2 is not JSON (and line 3 is
/// blank): line 2 is reported without being sent, the other three are
/// accepted, exit 1. A clean file that repeats one of them then exits 0
/// with 1 accepted and 1 duplicate.
#[test]
fn a_jsonl_import_reports_the_line_that_is_not_json_and_a_clean_one_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), "");
    let jsonl = write(
        dir.path(),
        "events.jsonl",
        concat!(
            "{\"event_id\":\"j-1\",\"event_type\":\"user_signup\",\"user_id\":\"u1\"}\n",
            "this line is not JSON\n",
            "\n",
            "{\"event_id\":\"j-2\",\"event_type\":\"page_view\",\"properties\":{\"page\":\"/home\"}}\n",
            "{\"event_id\":\"j-3\",\"event_type\":\"feature_usage\",\"occurred_at\":\"2024-01-15T10:30:00Z\"}\n",
        ),
    );
    let run = against(&daemon, &["import", &jsonl]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stdout
            .contains("3 accepted, 0 duplicates, 1 rejected (4 records read)"),
        "{run:?}"
    );
    assert!(run.stdout.contains("line 2: not JSON"), "{run:?}");

    // Any extension but .csv is read as JSON lines; --format says so explicitly.
    let clean = write(
        dir.path(),
        "more.txt",
        "{\"event_id\":\"j-1\",\"event_type\":\"user_signup\"}\r\n{\"event_id\":\"j-4\",\"event_type\":\"user_signup\"}\r\n",
    );
    let run = against(&daemon, &["import", &clean, "--format", "jsonl"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.contains("1 accepted, 1 duplicate, 0 rejected"),
        "{run:?}"
    );
    assert!(!run.stdout.contains("rejected lines"), "{run:?}");

    daemon.wait_processed(Duration::from_secs(10));
    let summary = daemon.get("/stats/summary").json();
    assert_eq!(summary["total_events"], 4, "{summary}");
    assert_eq!(summary["by_type"]["user_signup"], 2);
}

/// A user pipes an export straight in (`… | inletd import -`): standard
/// input is read as JSON lines, the report names it, and the events are
/// counted like a file's.
#[test]
fn import_dash_reads_standard_input() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), "");
    let config = daemon.config_path.display().to_string();
    let url = format!("http://{}", daemon.addr);
    let mut child = Command::new(env!("CARGO_BIN_EXE_inletd"))
        .args(["--config", &config, "import", "-", "--url", &url])
        .env_remove("INLETD_CONFIG")
        .env_remove("INLETD_BIND")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run inletd import -");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(
            concat!(
                "{\"event_id\":\"s-1\",\"event_type\":\"user_signup\"}\n",
                "{\"event_id\":\"s-2\",\"event_type\":\"page_view\"}\n",
                "not json\n",
            )
            .as_bytes(),
        )
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("imported standard input: 2 accepted, 0 duplicates, 1 rejected"),
        "{stdout}"
    );
    assert!(stdout.contains("line 3: not JSON"), "{stdout}");
    daemon.wait_processed(Duration::from_secs(10));
    assert_eq!(daemon.get("/stats/summary").json()["total_events"], 2);
}

/// An operator points `stats` at the daemon through the config and
/// `--bind` (no `--url`): `--json` prints exactly what /stats/summary
/// says, and the table lists every type with its count, most first.
#[test]
fn stats_prints_the_summary_as_json_and_as_a_table() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), "");
    for (i, kind) in [
        "page_view",
        "page_view",
        "page_view",
        "user_signup",
        "user_signup",
        "checkout",
    ]
    .iter()
    .enumerate()
    {
        let event = json!({"event_id": format!("s-{i}"), "event_type": kind});
        assert_eq!(daemon.post_json("/webhook/events", &event).status, 202);
    }
    daemon.wait_processed(Duration::from_secs(10));
    let config = daemon.config_path.display().to_string();
    let bind = daemon.addr.to_string();

    let run = inletd(&["--config", &config, "--bind", &bind, "stats", "--json"]);
    assert_eq!(run.code, 0, "{run:?}");
    let printed: Value = serde_json::from_str(&run.stdout).expect("stats --json is JSON");
    let summary = daemon.get("/stats/summary").json();
    for key in ["total_events", "by_type", "queue_depth", "dlq_size"] {
        assert_eq!(printed[key], summary[key], "{key}: {printed} vs {summary}");
    }
    for key in ["p50", "p99", "ack_p50", "ack_p99"] {
        assert!(printed["latency_ms"][key].is_number(), "{printed}");
    }

    let run = inletd(&["--config", &config, "--bind", &bind, "stats"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("total events    6\n"), "{run:?}");
    assert!(run.stdout.contains("queue depth     0\n"), "{run:?}");
    assert!(run.stdout.contains("DLQ size        0\n"), "{run:?}");
    let rows: Vec<(String, String)> = run
        .stdout
        .lines()
        .skip_while(|l| !l.starts_with("event type"))
        .skip(1)
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            Some((parts.next()?.to_owned(), parts.next()?.to_owned()))
        })
        .collect();
    let expected = [("page_view", "3"), ("user_signup", "2"), ("checkout", "1")]
        .map(|(t, n)| (t.to_owned(), n.to_owned()));
    assert_eq!(rows, expected, "{run:?}");
}

/// A newcomer runs `demo idempotency` twice: each run sends one event
/// three times and shows 1 accepted and 2 duplicates, because each run
/// uses a new event id; the daemon counted 2 events in all.
#[test]
fn demo_idempotency_shows_one_accept_and_the_rest_duplicates_every_run() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), "");
    for _ in 0..2 {
        let run = against(&daemon, &["demo", "idempotency"]);
        assert_eq!(run.code, 0, "{run:?}");
        assert!(run.stdout.contains("send 1: accepted"), "{run:?}");
        assert!(run.stdout.contains("send 2: duplicate"), "{run:?}");
        assert!(run.stdout.contains("send 3: duplicate"), "{run:?}");
        assert!(
            run.stdout
                .contains("demo idempotency: 1 accepted, 2 duplicates, 0 rejected"),
            "{run:?}"
        );
    }
    daemon.wait_processed(Duration::from_secs(10));
    assert_eq!(daemon.get("/stats/summary").json()["total_events"], 2);
}

/// The other three demos: basic sends 3 events of different types, burst
/// 200 at once, batch 20 in one request; all accepted, exit 0, and the
/// daemon counted all 223.
#[test]
fn demos_basic_burst_and_batch_are_all_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), "");
    for (scenario, line) in [
        ("basic", "demo basic: 3 accepted, 0 duplicates, 0 rejected"),
        (
            "burst",
            "demo burst: 200 accepted, 0 duplicates, 0 rejected",
        ),
        ("batch", "demo batch: 20 accepted, 0 duplicates, 0 rejected"),
    ] {
        let run = against(&daemon, &["demo", scenario]);
        assert_eq!(run.code, 0, "{run:?}");
        assert!(run.stdout.contains(line), "{run:?}");
    }
    daemon.wait_processed(Duration::from_secs(20));
    let summary = daemon.get("/stats/summary").json();
    assert_eq!(summary["total_events"], 223, "{summary}");
    assert_eq!(
        summary["by_type"]["user_signup"].as_u64().map(|n| n > 0),
        Some(true)
    );
}

/// Nothing listens at the address, or the file is missing: the command
/// says why and exits 2 (not 1, which means "some lines were rejected").
#[test]
fn an_unreachable_daemon_or_a_missing_file_exits_2() {
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}");
    for args in [
        vec!["stats", "--url", &url],
        vec!["demo", "basic", "--url", &url],
    ] {
        let run = inletd(&args);
        assert_eq!(run.code, 2, "{run:?}");
        assert!(run.stderr.contains("cannot reach the daemon"), "{run:?}");
    }
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "e.jsonl",
        "{\"event_id\":\"x\",\"event_type\":\"t\"}\n",
    );
    let run = inletd(&["import", &file, "--url", &url]);
    assert_eq!(run.code, 2, "{run:?}");
    let missing = dir.path().join("missing.csv").display().to_string();
    let run = inletd(&["import", &missing, "--url", &url]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("cannot read"), "{run:?}");
    assert_eq!(
        run.stderr.matches(&missing).count(),
        1,
        "named once: {run:?}"
    );
    // An empty CSV file is called empty, not a header without event_id.
    let empty = write(dir.path(), "empty.csv", "");
    let run = inletd(&["import", &empty, "--url", &url]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("the file is empty"), "{run:?}");
    assert_eq!(run.stderr.matches(&empty).count(), 1, "named once: {run:?}");
}

/// A stand-in daemon that answers each batch request per `script` (given
/// the request number and the events) and records how many events each
/// request held.
fn scripted_daemon(
    script: impl Fn(usize, &[Value]) -> (u16, &'static str, String) + Send + 'static,
) -> (String, Arc<Mutex<Vec<usize>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let sizes = Arc::new(Mutex::new(Vec::new()));
    let seen = sizes.clone();
    std::thread::spawn(move || {
        for (n, stream) in listener.incoming().map_while(Result::ok).enumerate() {
            let Some(body) = read_request(&stream) else {
                continue;
            };
            let events = body["events"].as_array().cloned().unwrap_or_default();
            seen.lock().unwrap().push(events.len());
            let (status, extra_header, answer) = script(n, &events);
            let reply = format!(
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n{extra_header}\r\n{answer}",
                answer.len()
            );
            let mut stream = stream;
            let _ = stream.write_all(reply.as_bytes());
        }
    });
    (url, sizes)
}

/// Reads one request's JSON body.
fn read_request(stream: &TcpStream) -> Option<Value> {
    let mut reader = BufReader::new(stream);
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().ok()?;
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    serde_json::from_slice(&body).ok()
}

/// The daemon is busy at first (503 with Retry-After: 0), then finds the
/// batch of 5 too large (413 above 2 events): import retries, halves the
/// batch until it fits, and still reports every event with its own line.
#[test]
fn import_waits_out_a_busy_daemon_and_splits_a_batch_that_is_too_large() {
    let (url, sizes) = scripted_daemon(|n, events| {
        if n == 0 {
            let busy = r#"{"error":"queue_full","detail":"retry later"}"#.to_owned();
            return (503, "Retry-After: 0\r\n", busy);
        }
        if events.len() > 2 {
            let big = r#"{"error":"payload_too_large","detail":"too big"}"#.to_owned();
            return (413, "", big);
        }
        let rejected: Vec<Value> = events
            .iter()
            .enumerate()
            .filter(|(_, e)| e["event_type"] == "bad")
            .map(|(i, _)| json!({"index": i, "error": "schema_violation", "field": "event_type", "detail": "is bad"}))
            .collect();
        let answer = json!({
            "accepted": events.len() - rejected.len(), "duplicates": 0, "rejected": rejected
        });
        (202, "", answer.to_string())
    });
    let dir = tempfile::tempdir().unwrap();
    let lines: String = ["a", "b", "c", "bad", "e"]
        .iter()
        .enumerate()
        .map(|(i, t)| format!("{{\"event_id\":\"{i}\",\"event_type\":\"{t}\"}}\n"))
        .collect();
    let file = write(dir.path(), "e.jsonl", &lines);
    let run = inletd(&["import", &file, "--batch-size", "5", "--url", &url]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stdout.contains("4 accepted, 0 duplicates, 1 rejected"),
        "{run:?}"
    );
    assert!(run.stdout.contains("line 4: event_type: is bad"), "{run:?}");
    assert!(run.stderr.contains("503"), "the wait is reported: {run:?}");
    assert_eq!(*sizes.lock().unwrap(), vec![5, 5, 2, 3, 1, 2]);
}

/// The operator checked a config file: the answer names the file it
/// checked, and with no file says that only the defaults and the
/// environment were read.
#[test]
fn check_config_says_which_file_it_checked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mine.toml");
    std::fs::write(&path, "batch_size = 7\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_inletd"))
        .args(["--config", path.to_str().unwrap(), "check-config"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("configuration is valid ({})", path.display())),
        "{err}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("batch_size = 7"));

    // The unit's --quiet: the verdict only, and still the exit status.
    let quiet = inletd(&[
        "--config",
        path.to_str().unwrap(),
        "check-config",
        "--quiet",
    ]);
    assert_eq!((quiet.code, quiet.stdout.as_str()), (0, ""), "{quiet:?}");
    assert!(quiet.stderr.contains("configuration is valid"), "{quiet:?}");
    std::fs::write(&path, "batch_size = 0\n").unwrap();
    let bad = inletd(&[
        "--config",
        path.to_str().unwrap(),
        "check-config",
        "--quiet",
    ]);
    assert_eq!(bad.code, 1, "{bad:?}");
    assert!(bad.stderr.contains("batch_size"), "{bad:?}");
}

/// An operator's edit left six problems in the config: check-config names
/// every one in one run, each with its line and column, in the file's
/// order, and suggests the setting a typo meant.
#[test]
fn check_config_names_every_problem_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "bad.toml",
        concat!(
            "bind = \"not an address\"\n",
            "bathc_size = 100\n",
            "batch_timeout_ms = \"fast\"\n",
            "max_retries = 1000\n",
            "durability = \"sometimes\"\n",
            "\n",
            "[[sinks]]\n",
            "name = \"dash\"\n",
            "type = \"http\"\n",
            "url = \"ftp://x\"\n",
            "\n",
            "[redis]\n",
            "url = \"redis://127.0.0.1:6379\"\n",
            "timeout_ms = 0\n",
        ),
    );
    let run = inletd(&["--config", &path, "check-config"]);
    assert_ne!(run.code, 0, "{run:?}");
    let problems: Vec<&str> = run
        .stderr
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- "))
        .collect();
    let expected = [
        ("line 1, column 1: bind:", "not an address like"),
        (
            "line 2, column 1: unknown setting `bathc_size`",
            "did you mean `batch_size`?",
        ),
        ("line 3, column 1: batch_timeout_ms:", "invalid type"),
        ("line 4, column 1: max_retries:", "out of range"),
        ("line 5, column 1: durability:", "sometimes"),
        // A setting inside a table is found where it is, not at the table.
        ("line 10, column 1: sinks[0].url:", "plain http:// URL"),
        ("line 14, column 1: redis.timeout_ms:", "out of range"),
    ];
    assert_eq!(problems.len(), expected.len(), "{}", run.stderr);
    for (problem, (starts, has)) in problems.iter().zip(expected) {
        assert!(
            problem.starts_with(starts) && problem.contains(has),
            "{problem}"
        );
    }

    // A file that is not TOML: every syntax error, with its position.
    let broken = write(
        dir.path(),
        "broken.toml",
        "batch_size = 5\nsinks = [\nbind = \"x\n",
    );
    let run = inletd(&["--config", &broken, "check-config"]);
    assert_ne!(run.code, 0, "{run:?}");
    assert!(
        run.stderr
            .contains("line 3, column 6: unexpected `=` in array"),
        "{run:?}"
    );
    assert!(!run.stderr.contains("panicked"), "{run:?}");
}
