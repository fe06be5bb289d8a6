//! Intake against the real binary: what a sender sees for good, duplicate
//! and bad requests, and that the daemon stays healthy and accepting.

mod common;

use std::time::Duration;

use common::Daemon;
use serde_json::json;

fn event(id: &str, kind: &str) -> serde_json::Value {
    json!({"event_id": id, "event_type": kind, "user_id": "user_1", "timestamp": "2025-12-16T10:00:00Z"})
}

/// A sender retries the same event three times: one is accepted, two are
/// duplicates, and after a restart it is still a duplicate.
#[test]
fn the_same_event_three_times_is_accepted_once_even_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path(), "");
    let e = event("evt_123456", "user_signup");
    let answers: Vec<_> = (0..3).map(|_| d.post_json("/webhook/events", &e)).collect();
    assert_eq!(answers[0].status, 202);
    assert_eq!(
        answers[0].json(),
        json!({"status": "accepted", "event_id": "evt_123456"})
    );
    for a in &answers[1..] {
        assert_eq!(a.status, 200);
        assert_eq!(
            a.json(),
            json!({"status": "duplicate", "event_id": "evt_123456"})
        );
    }
    assert!(d.terminate(Duration::from_secs(30)).success());

    let d = Daemon::start_with(dir.path(), &d.config_path.clone(), &[]);
    let again = d.post_json("/webhook/events", &e);
    assert_eq!(again.status, 200, "{}", again.text());
    d.wait_processed(Duration::from_secs(10));
    let summary = d.get("/stats/summary").json();
    assert_eq!(summary["total_events"], 1, "{summary}");
    assert_eq!(summary["by_type"]["user_signup"], 1);
}

/// Keys are scoped per source: the same id on two sources is two events.
#[test]
fn idempotency_is_scoped_per_source_and_headers_give_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), "[[sources]]\nname = \"stripe\"\n");
    let e = event("evt_1", "charge");
    assert_eq!(d.post_json("/webhook/events", &e).status, 202);
    assert_eq!(d.post_json("/webhook/stripe/events", &e).status, 202);
    assert_eq!(d.post_json("/webhook/stripe/events", &e).status, 200);
    let unknown = d.post_json("/webhook/nope/events", &e);
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.json()["error"], "unknown_source");

    // No event_id in the body: the Idempotency-Key or webhook-id header is the key.
    let body = json!({"event_type": "ping"}).to_string();
    let ct = ("Content-Type", "application/json");
    let a = d.request(
        "POST",
        "/webhook/events",
        &[ct, ("Idempotency-Key", "hdr-1")],
        body.as_bytes(),
    );
    assert_eq!(
        (a.status, a.json()["event_id"].clone()),
        (202, json!("hdr-1"))
    );
    let b = d.request(
        "POST",
        "/webhook/events",
        &[ct, ("webhook-id", "hdr-1")],
        body.as_bytes(),
    );
    assert_eq!(b.status, 200);
    let c = d.request(
        "POST",
        "/webhook/events",
        &[ct, ("webhook-id", "msg_2")],
        body.as_bytes(),
    );
    assert_eq!(c.status, 202);
}

/// A batch mixing valid, invalid and duplicate events gets a result per
/// event; the valid ones are taken.
#[test]
fn a_mixed_batch_is_answered_event_by_event() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), "");
    assert_eq!(
        d.post_json("/webhook/events", &event("old", "a")).status,
        202
    );
    let batch = json!({"events": [
        event("new_1", "signup"),
        {"event_id": "bad", "event_type": 42},
        event("old", "a"),
        {"event_type": "no_id"},
        event("new_1", "signup"),
        {"event_id": "new_2", "event_type": "page_view", "occurred_at": "2024-01-15T10:30:00Z", "properties": {"page": "/home"}},
    ]});
    let r = d.post_json("/webhook/batch", &batch);
    assert_eq!(r.status, 202, "{}", r.text());
    let body = r.json();
    assert_eq!(body["accepted"], 2, "{body}");
    assert_eq!(body["duplicates"], 2, "{body}");
    let rejected = body["rejected"].as_array().unwrap();
    let fields: Vec<_> = rejected
        .iter()
        .map(|r| (r["index"].clone(), r["field"].clone()))
        .collect();
    assert_eq!(
        fields,
        vec![
            (json!(1), json!("event_type")),
            (json!(3), json!("event_id"))
        ]
    );
    assert!(
        rejected
            .iter()
            .all(|r| r["error"] == "schema_violation" && r["detail"].is_string())
    );
    let statuses: Vec<_> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].clone())
        .collect();
    assert_eq!(
        statuses,
        vec![
            "accepted",
            "rejected",
            "duplicate",
            "rejected",
            "duplicate",
            "accepted"
        ]
    );

    // The seed-001 endpoint takes the same shape.
    let r = d.post_json("/events", &json!({"events": [event("new_3", "x")]}));
    assert_eq!((r.status, r.json()["accepted"].clone()), (202, json!(1)));

    d.wait_processed(Duration::from_secs(10));
    let summary = d.get("/stats/summary").json();
    assert_eq!(summary["total_events"], 4, "{summary}");
    assert_eq!(
        summary["by_type"],
        json!({"a": 1, "signup": 1, "page_view": 1, "x": 1})
    );
}

/// Every error status, each with a JSON body naming the problem, and the
/// daemon healthy and accepting afterwards.
#[test]
fn bad_requests_get_clear_errors_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), "max_body_bytes = 2048\nmax_batch_events = 3");
    let ct = ("Content-Type", "application/json");

    let r = d.request(
        "POST",
        "/webhook/events",
        &[ct],
        b"{\n  \"event_id\": \"a\",\n  \"event_type\": ,\n}",
    );
    assert_eq!(r.status, 400);
    let b = r.json();
    assert_eq!(
        (b["error"].clone(), b["line"].clone(), b["column"].clone()),
        (json!("malformed_json"), json!(3), json!(17)),
        "{b}"
    );

    let r = d.request(
        "POST",
        "/webhook/events",
        &[("Content-Type", "text/plain")],
        b"{}",
    );
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (415, json!("unsupported_media_type"))
    );
    let r = d.request(
        "POST",
        "/webhook/events",
        &[],
        event("x", "y").to_string().as_bytes(),
    );
    assert_eq!(r.status, 415, "a body without Content-Type is refused");

    let big = json!({"event_id": "big", "event_type": "t", "metadata": {"pad": "x".repeat(4096)}});
    let r = d.post_json("/webhook/events", &big);
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (413, json!("payload_too_large"))
    );
    let four =
        json!({"events": [event("1", "t"), event("2", "t"), event("3", "t"), event("4", "t")]});
    let r = d.post_json("/webhook/batch", &four);
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (413, json!("too_many_events"))
    );

    for (body, field) in [
        (json!({"event_id": "a"}), "event_type"),
        (
            json!({"event_id": "a", "event_type": "t", "timestamp": "yesterday"}),
            "timestamp",
        ),
        (
            json!({"event_id": "a", "event_type": "t", "metadata": "no"}),
            "metadata",
        ),
        (
            json!({"event_id": "a".repeat(257), "event_type": "t"}),
            "event_id",
        ),
        (json!(["not", "an", "object"]), ""),
    ] {
        let r = d.post_json("/webhook/events", &body);
        assert_eq!(r.status, 422, "{body}");
        let b = r.json();
        assert_eq!(
            (b["error"].clone(), b["field"].clone()),
            (json!("schema_violation"), json!(field)),
            "{b}"
        );
        assert!(b["detail"].as_str().is_some_and(|s| !s.is_empty()));
    }
    let r = d.post_json("/webhook/batch", &json!({"items": []}));
    assert_eq!(
        (r.status, r.json()["field"].clone()),
        (422, json!("events"))
    );

    let r = d.get("/no/such/path");
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (404, json!("not_found"))
    );
    let r = d.get("/webhook/events");
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (405, json!("method_not_allowed"))
    );

    // Nothing bad was stored; the daemon still answers and accepts.
    assert_eq!(d.get("/health").status, 200);
    assert_eq!(d.get("/ready").status, 200);
    assert_eq!(
        d.post_json("/webhook/events", &event("good", "t")).status,
        202
    );
    d.wait_processed(Duration::from_secs(10));
    assert_eq!(d.get("/stats/summary").json()["total_events"], 1);
    let metrics = d.get("/metrics").text();
    assert!(
        metrics.contains("inletd_rejected_total{reason=\"malformed_json\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("inletd_events_accepted_total 1"),
        "{metrics}"
    );
}

/// Above the queue's high-water mark intake answers 503 with Retry-After
/// instead of filling the disk; it accepts again once the queue drains.
#[test]
fn a_full_queue_sheds_load_with_503() {
    let dir = tempfile::tempdir().unwrap();
    // A sink that never answers keeps events queued.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let extra = format!(
        "max_queue_events = 3\nmax_retries = 0\n[[sinks]]\nname = \"hole\"\ntype = \"http\"\nurl = \"http://{}/\"\ntimeout_ms = 60000",
        hole.local_addr().unwrap()
    );
    let d = Daemon::start(dir.path(), &extra);
    for i in 0..3 {
        assert_eq!(
            d.post_json("/webhook/events", &event(&format!("e{i}"), "t"))
                .status,
            202
        );
    }
    let r = d.post_json("/webhook/events", &event("e3", "t"));
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"], "queue_full");
    assert!(r.header("retry-after").is_some());
    assert_eq!(d.get("/health").status, 200);
}

/// The admin API answers loopback callers without a token only when no
/// token is set; with one it wants `Authorization: Bearer`.
#[test]
fn the_admin_api_wants_its_token() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), "admin_token = \"s3cret\"");
    assert_eq!(d.get("/admin/queue").status, 401);
    let wrong = d.request(
        "GET",
        "/admin/queue",
        &[("Authorization", "Bearer nope")],
        b"",
    );
    assert_eq!(
        (wrong.status, wrong.json()["error"].clone()),
        (401, json!("unauthorized"))
    );
    let ok = d.request(
        "GET",
        "/admin/queue",
        &[("Authorization", "Bearer s3cret")],
        b"",
    );
    assert_eq!(ok.status, 200);
    assert_eq!(ok.json()["depth"], 0);
}

/// With `stats_token` set, the analytics want it (or the admin token):
/// 401 without, 200 with either, for every `/stats` endpoint; intake and
/// `/health` stay open, and `inletd stats` sends the token from the config.
#[test]
fn the_stats_want_the_stats_token_or_the_admin_token() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(
        dir.path(),
        "stats_token = \"figures\"\nadmin_token = \"s3cret\"",
    );
    assert_eq!(
        d.post_json("/webhook/events", &event("e1", "t")).status,
        202
    );
    assert_eq!(d.get("/health").status, 200);
    let paths = [
        "/stats/summary",
        "/stats/dau",
        "/stats/top-events",
        "/stats/retention?start_date=2025-12-01",
        "/stats/windows",
        "/stats/rate",
    ];
    for path in paths {
        let none = d.get(path);
        assert_eq!(
            (none.status, none.json()["error"].clone()),
            (401, json!("unauthorized")),
            "{path}"
        );
        let wrong = d.request("GET", path, &[("Authorization", "Bearer nope")], b"");
        assert_eq!(wrong.status, 401, "{path}");
        for token in ["figures", "s3cret"] {
            let bearer = format!("Bearer {token}");
            let ok = d.request("GET", path, &[("Authorization", &bearer)], b"");
            assert_eq!(ok.status, 200, "{path} with {token}: {}", ok.text());
        }
    }
    // The stats token opens nothing else.
    let admin = d.request(
        "GET",
        "/admin/queue",
        &[("Authorization", "Bearer figures")],
        b"",
    );
    assert_eq!(admin.status, 401);

    // The CLI sends a token from its config: with the stats token alone,
    // `inletd stats` answers.
    let cli_dir = dir.path().join("cli");
    std::fs::create_dir_all(&cli_dir).unwrap();
    let cli_config = common::write_config(
        &cli_dir,
        &format!("bind = \"{}\"\nstats_token = \"figures\"", d.addr),
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_inletd"))
        .args(["--config", cli_config.to_str().unwrap(), "stats", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(summary["total_events"].is_u64(), "{summary}");
}

/// A bad configuration is refused at start, naming the key, exit non-zero.
#[test]
fn a_bad_config_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::write_config(dir.path(), "batch_size = 0\ndurability = \"sometimes\"");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_inletd"))
        .args(["--config", path.to_str().unwrap(), "check-config"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("durability"), "{err}");

    let path = common::write_config(dir.path(), "batch_size = 0");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_inletd"))
        .args(["--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("batch_size"));

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_inletd"))
        .args(["--config", path.to_str().unwrap(), "check-config"])
        .env("INLETD_BATCH_SIZE", "7")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("batch_size = 7"));
}

/// A source with a rate limit answers 429 with Retry-After past its burst;
/// other sources are not affected.
#[test]
fn a_rate_limited_source_answers_429() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(
        dir.path(),
        "[[sources]]\nname = \"github\"\nrate_limit_per_sec = 2\n",
    );
    let statuses: Vec<u16> = (0..5)
        .map(|i| {
            d.post_json("/webhook/github/events", &event(&format!("g{i}"), "push"))
                .status
        })
        .collect();
    assert_eq!(&statuses[..2], &[202, 202], "{statuses:?}");
    assert!(statuses[2..].contains(&429), "{statuses:?}");
    let r = d.post_json("/webhook/github/events", &event("g9", "push"));
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"], "rate_limited");
    assert!(
        r.header("retry-after")
            .is_some_and(|s| s.parse::<u64>().is_ok_and(|n| n >= 1))
    );
    assert_eq!(
        d.post_json("/webhook/events", &event("d1", "push")).status,
        202
    );
}

/// The byte high-water mark: once the queued records hold max_queue_bytes,
/// intake answers 503; /admin/queue shows the bytes.
#[test]
fn a_queue_over_its_byte_limit_sheds_load_with_503() {
    let dir = tempfile::tempdir().unwrap();
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let extra = format!(
        "max_queue_bytes = 1000\nmax_retries = 0\n[[sinks]]\nname = \"hole\"\ntype = \"http\"\nurl = \"http://{}/\"\ntimeout_ms = 60000",
        hole.local_addr().unwrap()
    );
    let d = Daemon::start(dir.path(), &extra);
    let mut accepted = 0;
    let refused = loop {
        let r = d.post_json("/webhook/events", &event(&format!("b{accepted}"), "t"));
        if r.status != 202 {
            break r;
        }
        accepted += 1;
        assert!(accepted < 100, "the byte limit never applied");
    };
    assert_eq!(
        (refused.status, refused.json()["error"].clone()),
        (503, json!("queue_full"))
    );
    assert!(
        refused.json()["detail"]
            .as_str()
            .unwrap()
            .contains("max_queue_bytes")
    );
    let queue = d.get("/admin/queue").json();
    assert!(queue["bytes"].as_u64().unwrap() >= 1000, "{queue}");
    assert!(accepted >= 2, "{accepted}");
}

/// A client used the wrong method: the 405 says which ones the path takes
/// (`Allow`), so that the client can tell a wrong method from a wrong path.
#[test]
fn a_wrong_method_is_told_the_allowed_ones() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), "");
    for (method, path, allow) in [
        ("GET", "/webhook/events", "POST"),
        ("PUT", "/webhook/default/batch", "POST"),
        ("POST", "/health", "GET"),
        ("POST", "/stats/dau", "GET"),
        ("GET", "/admin/dlq/replay", "POST"),
        ("PUT", "/admin/dlq", "GET, DELETE"),
        ("POST", "/admin/dlq/7", "GET, DELETE"),
    ] {
        let r = d.request(method, path, &[], b"");
        assert_eq!(r.status, 405, "{method} {path}: {}", r.text());
        assert_eq!(r.json()["error"], "method_not_allowed");
        assert_eq!(r.header("allow"), Some(allow), "{method} {path}");
    }
    // A path that does not exist is a 404, with no Allow.
    let r = d.request("PUT", "/nope", &[], b"");
    assert_eq!(r.status, 404);
    assert_eq!(r.header("allow"), None);
}

/// An operator points a standard Prometheus dashboard at inletd: the
/// `process_*` figures every client library exports are there, for the
/// daemon's own process, and `inletd_build_info` names the version.
#[test]
fn metrics_carry_the_standard_process_figures_and_the_build() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), "");
    let metrics = d.get("/metrics").text();
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
    };
    // The daemon's RSS, as the kernel counts it for its PID.
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.child.id())).unwrap();
    let rss_kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    let rss = value("process_resident_memory_bytes");
    assert!(
        rss > rss_kib * 1024.0 / 2.0 && rss < rss_kib * 1024.0 * 2.0,
        "{rss} against {rss_kib} KiB"
    );
    assert!(value("process_open_fds") >= 3.0);
    assert!(value("process_max_fds") >= value("process_open_fds"));
    assert!(value("process_cpu_seconds_total") >= 0.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let started = value("process_start_time_seconds");
    assert!(
        started <= now + 1.0 && started > now - 120.0,
        "{started} vs {now}"
    );
    assert!(
        metrics.contains(&format!(
            "inletd_build_info{{version=\"{}\",storage_format=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION"),
            inletd::storage::FORMAT_VERSION
        )),
        "{metrics}"
    );
}
