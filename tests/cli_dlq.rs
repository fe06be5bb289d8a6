//! `inletd dlq list|show|replay|purge` run as an operator runs them: the
//! real binary against a real daemon whose HTTP sink fails, so that the
//! dead-letter queue fills; then the sink recovers and the CLI replays.

mod common;

use std::net::TcpListener;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Daemon, SinkServer, eventually};
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

impl Run {
    /// Stdout as JSON (panics with the run when it is not).
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }
}

/// Runs `inletd ARGS…` with no INLETD_* settings from the environment and
/// no terminal on stdin.
fn inletd(args: &[&str]) -> Run {
    let output = Command::new(env!("CARGO_BIN_EXE_inletd"))
        .args(args)
        .env_remove("INLETD_CONFIG")
        .env_remove("INLETD_BIND")
        .env_remove("INLETD_ADMIN_TOKEN")
        .output()
        .expect("run inletd");
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Runs `inletd --config <the daemon's config> dlq ARGS… --url <the daemon>`.
fn dlq(daemon: &Daemon, args: &[&str]) -> Run {
    let config = daemon.config_path.display().to_string();
    let url = format!("http://{}", daemon.addr);
    let mut all = vec!["--config", config.as_str(), "dlq"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--url", &url]);
    inletd(&all)
}

/// An HTTP sink that retries quickly and gives up after 2 retries.
fn http_sink(url: &str) -> String {
    format!(
        "max_retries = 2\nretry_base_ms = 10\nretry_max_ms = 50\n[[sinks]]\nname = \"dashboard\"\ntype = \"http\"\nurl = \"{url}\"\ntimeout_ms = 2000\n"
    )
}

/// Posts events `ids` one by one and waits until they were processed.
fn post_events(d: &Daemon, ids: &[&str]) {
    for (i, id) in ids.iter().enumerate() {
        let event_type = if i % 2 == 0 { "signup" } else { "upgrade" };
        let r = d.post_json(
            "/webhook/events",
            &json!({"event_id": id, "event_type": event_type, "user_id": "u1"}),
        );
        assert_eq!(r.status, 202, "{}", r.text());
    }
    d.wait_processed(Duration::from_secs(20));
}

/// The DLQ ids, oldest first, straight from the admin API.
fn dlq_ids(d: &Daemon) -> Vec<u64> {
    d.get("/admin/dlq").json()["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["id"].as_u64())
        .collect()
}

/// The dashboard is down: two events are parked. The operator lists them
/// (a table, then JSON, then page by page), looks at one, replays an id
/// that is not there (exit 1), and once the dashboard is back replays one
/// by id and the rest without ids; the dashboard gets both, the DLQ is
/// empty, a further replay has nothing to do (exit 1), and the built-in
/// counter did not count the replays again.
#[test]
fn list_show_and_replay_a_failing_sinks_events() {
    let healthy = Arc::new(AtomicBool::new(false));
    let h = healthy.clone();
    let sink = SinkServer::start(Box::new(
        move |_| if h.load(Ordering::SeqCst) { 200 } else { 500 },
    ));
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &http_sink(&sink.url()));
    post_events(&d, &["evt_a", "evt_b"]);
    let ids = dlq_ids(&d);
    assert_eq!(ids.len(), 2, "both events parked");

    let run = dlq(&d, &["list"]);
    assert_eq!(run.code, 0, "{run:?}");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert!(
        lines[0].starts_with("ID ") && lines[0].contains("ERROR"),
        "{run:?}"
    );
    assert_eq!(lines.len(), 3, "a header and two rows: {run:?}");
    for (line, (id, key, event_type)) in lines[1..]
        .iter()
        .zip([(ids[0], "evt_a", "signup"), (ids[1], "evt_b", "upgrade")])
    {
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cells[0], id.to_string(), "{run:?}");
        assert_eq!(cells[1], "dashboard", "{run:?}");
        assert_eq!(cells[2], "3", "one try and two retries: {run:?}");
        assert!(
            line.contains(event_type) && line.contains(key) && line.contains("500"),
            "{run:?}"
        );
    }

    let run = dlq(&d, &["list", "--json"]);
    assert_eq!(run.code, 0, "{run:?}");
    let page = run.json();
    assert_eq!(page["entries"].as_array().map(Vec::len), Some(2), "{page}");
    assert_eq!(page["next_after"], ids[1]);

    let run = dlq(&d, &["list", "--limit", "1"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout
            .contains(&format!("inletd dlq list --after {}", ids[0])),
        "a full page points at the next: {run:?}"
    );
    let run = dlq(&d, &["list", "--after", &ids[0].to_string(), "--json"]);
    let page = run.json();
    assert_eq!(page["entries"][0]["id"], ids[1], "{page}");
    assert_eq!(page["entries"].as_array().map(Vec::len), Some(1), "{page}");

    let run = dlq(&d, &["show", &ids[0].to_string()]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("sink          dashboard\n"), "{run:?}");
    assert!(run.stdout.contains("event         evt_a\n"), "{run:?}");
    assert!(run.stdout.contains("\"user_id\": \"u1\""), "{run:?}");
    let run = dlq(&d, &["show", &ids[0].to_string(), "--json"]);
    assert_eq!(run.json()["record"]["key"], "evt_a", "{run:?}");
    let run = dlq(&d, &["show", "999999"]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("no DLQ entry 999999"), "{run:?}");

    let run = dlq(&d, &["replay", "999999"]);
    assert_eq!(run.code, 1, "an id not in the DLQ: {run:?}");
    assert!(run.stderr.contains("not in the DLQ"), "{run:?}");
    assert_eq!(dlq_ids(&d), ids, "nothing moved");

    healthy.store(true, Ordering::SeqCst);
    let run = dlq(&d, &["replay", &ids[0].to_string()]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.contains("replayed 1 entry") && run.stdout.contains("1 remains"),
        "{run:?}"
    );
    eventually(Duration::from_secs(10), "evt_a delivered", || {
        sink.events().iter().any(|e| e["event_id"] == "evt_a")
    });
    let run = dlq(&d, &["replay", "--json"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.json(), json!({"replayed": 1, "remaining": 0}));
    eventually(Duration::from_secs(10), "evt_b delivered", || {
        sink.events().iter().any(|e| e["event_id"] == "evt_b")
    });
    d.wait_processed(Duration::from_secs(10));

    let run = dlq(&d, &["list"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.stdout, "the DLQ is empty\n", "{run:?}");
    let run = dlq(&d, &["replay"]);
    assert_eq!(run.code, 1, "nothing to do: {run:?}");
    assert!(run.stderr.contains("the DLQ is empty"), "{run:?}");
    assert_eq!(sink.events().len(), 2, "each event delivered once");
    assert_eq!(d.get("/stats/summary").json()["total_events"], 2);
}

/// A sink that refuses for good: three events parked. Purging one by id
/// removes it, the same id again is not there (exit 1); purging everything
/// without --yes and without a terminal is refused (exit 2) and deletes
/// nothing; with --yes it deletes the rest; again, there is nothing to do.
#[test]
fn purge_by_id_and_everything_with_yes() {
    let sink = SinkServer::start(Box::new(|_| 400));
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &http_sink(&sink.url()));
    post_events(&d, &["p1", "p2", "p3"]);
    let ids = dlq_ids(&d);
    assert_eq!(ids.len(), 3);

    let first = ids[0].to_string();
    let run = dlq(&d, &["purge", &first]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.stdout, "removed 1 entry\n", "{run:?}");
    let run = dlq(&d, &["purge", &first, "--json"]);
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(run.json(), json!({"removed": 0, "missing": [ids[0]]}));
    assert!(
        run.stderr.contains(&format!("not in the DLQ: {first}")),
        "{run:?}"
    );

    let run = dlq(&d, &["purge"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("--yes"), "{run:?}");
    assert_eq!(dlq_ids(&d), ids[1..], "nothing deleted");

    let run = dlq(&d, &["purge", "--yes", "--json"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.json()["removed"], 2, "{run:?}");
    assert!(dlq_ids(&d).is_empty());
    let run = dlq(&d, &["purge", "--yes"]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("already empty"), "{run:?}");
    // The built-in counter still has all three: they were accepted.
    assert_eq!(d.get("/stats/summary").json()["total_events"], 3);
}

/// With an admin_token, the CLI sends the config's token; a config with
/// the wrong one is refused with the daemon's detail (exit 2), and so is a
/// daemon that is not there.
#[test]
fn the_token_comes_from_the_config_and_refusals_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), "admin_token = \"s3cret\"");
    let run = dlq(&d, &["list"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.stdout, "the DLQ is empty\n");

    let wrong = dir.path().join("wrong.toml");
    std::fs::write(&wrong, "admin_token = \"nope\"\n").unwrap();
    let url = format!("http://{}", d.addr);
    let wrong = wrong.display().to_string();
    for args in [
        vec!["--config", &wrong, "dlq", "list", "--url", &url],
        vec!["--config", &wrong, "dlq", "replay", "--url", &url],
        vec!["--config", &wrong, "dlq", "purge", "--yes", "--url", &url],
    ] {
        let run = inletd(&args);
        assert_eq!(run.code, 2, "{run:?}");
        assert!(
            run.stderr.contains("401") && run.stderr.contains("unauthorized"),
            "{run:?}"
        );
        assert!(run.stderr.contains("admin_token"), "{run:?}");
    }

    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let nowhere = format!("http://127.0.0.1:{port}");
    let run = inletd(&["dlq", "list", "--url", &nowhere]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("cannot reach the daemon"), "{run:?}");
}
