//! The `/stats` endpoints against hand-computed answers on a small fixed
//! data set sent out of order, through the real binary.

mod common;

use std::time::Duration;

use common::Daemon;
use serde_json::{Value, json};

fn ev(id: &str, kind: &str, user: Option<&str>, at: &str) -> Value {
    let mut e = json!({"event_id": id, "event_type": kind, "occurred_at": at});
    if let Some(u) = user {
        e["user_id"] = json!(u);
    }
    e
}

/// The data set, in the order it is sent (deliberately not time order):
///
/// | user | events (UTC)                                              |
/// |------|-----------------------------------------------------------|
/// | ann  | 01-02 09:00 login, 01-01 23:59:59 signup (arrives late)   |
/// | bob  | 01-02 00:00:00 signup, 01-04 login, 01-09 login           |
/// | cid  | 01-03 login, then 01-01 00:00 signup (arrives last)       |
/// | —    | 01-02 12:00 page_view without a user                      |
fn data_set() -> Vec<Value> {
    vec![
        ev("1", "login", Some("ann"), "2024-01-02T09:00:00Z"),
        ev("2", "signup", Some("bob"), "2024-01-02T00:00:00Z"),
        ev("3", "login", Some("cid"), "2024-01-03T10:00:00Z"),
        ev("4", "page_view", None, "2024-01-02T12:00:00Z"),
        ev("5", "signup", Some("ann"), "2024-01-01T23:59:59Z"),
        ev("6", "login", Some("bob"), "2024-01-04T08:00:00Z"),
        ev("7", "login", Some("bob"), "2024-01-09T08:00:00Z"),
        ev("8", "signup", Some("cid"), "2024-01-01T00:00:00+00:00"),
    ]
}

fn loaded() -> (tempfile::TempDir, Daemon) {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), "batch_size = 3");
    for chunk in data_set().chunks(3) {
        let r = d.post_json("/webhook/batch", &json!({"events": chunk}));
        assert_eq!(r.json()["accepted"], chunk.len(), "{}", r.text());
    }
    d.wait_processed(Duration::from_secs(10));
    (dir, d)
}

/// DAU counts distinct users per UTC day; an event without a user counts
/// for nothing; days without events are listed with 0.
#[test]
fn dau_counts_distinct_users_per_utc_day() {
    let (_dir, d) = loaded();
    let r = d.get("/stats/dau?from=2024-01-01&to=2024-01-05").json();
    assert_eq!(r["from"], "2024-01-01");
    assert_eq!(r["to"], "2024-01-05");
    let users: Vec<(String, u64)> = r["days"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["date"].as_str().unwrap().to_owned(),
                d["users"].as_u64().unwrap(),
            )
        })
        .collect();
    let expected = [
        ("2024-01-01", 2),
        ("2024-01-02", 2),
        ("2024-01-03", 1),
        ("2024-01-04", 1),
        ("2024-01-05", 0),
    ];
    assert_eq!(users, expected.map(|(d, n)| (d.to_owned(), n)));
}

/// Top events over a range, most first; the range bounds are inclusive
/// UTC days.
#[test]
fn top_events_rank_types_within_the_range() {
    let (_dir, d) = loaded();
    let r = d
        .get("/stats/top-events?from=2024-01-01&to=2024-01-31&limit=10")
        .json();
    assert_eq!(
        r["events"],
        json!([
            {"event_type": "login", "count": 4},
            {"event_type": "signup", "count": 3},
            {"event_type": "page_view", "count": 1},
        ])
    );
    let r = d
        .get("/stats/top-events?from=2024-01-02&to=2024-01-02&limit=1")
        .json();
    assert_eq!(
        r["events"],
        json!([{"event_type": "login", "count": 1}]),
        "ties broken by name"
    );
}

/// Cohorts by first event (earliest by event time, whatever the arrival
/// order): cid's and ann's late signups move them to 01-01. The table is a
/// triangle: cohort i has `windows − i` entries.
#[test]
fn retention_uses_the_earliest_event_and_forms_a_triangle() {
    let (_dir, d) = loaded();
    let r = d
        .get("/stats/retention?start_date=2024-01-01&windows=4&window_type=daily")
        .json();
    assert_eq!(r["window_type"], "daily");
    assert_eq!(
        r["cohorts"],
        json!([
            // ann, cid: ann active 01-02; cid active 01-03.
            {"cohort": "2024-01-01", "size": 2, "retained": [2, 1, 1, 0]},
            // bob: active 01-04 (window 3 = k 2).
            {"cohort": "2024-01-02", "size": 1, "retained": [1, 0, 1]},
            {"cohort": "2024-01-03", "size": 0, "retained": [0, 0]},
            {"cohort": "2024-01-04", "size": 0, "retained": [0]},
        ])
    );
    let r = d
        .get("/stats/retention?start_date=2024-01-01&windows=2&window_type=weekly")
        .json();
    // Week 1 (01-01..07): ann, bob, cid; week 2 (01-08..14): bob.
    assert_eq!(
        r["cohorts"],
        json!([
            {"cohort": "2024-01-01", "size": 3, "retained": [3, 1]},
            {"cohort": "2024-01-08", "size": 0, "retained": [0]},
        ])
    );
}

/// Rolling windows count events of the last minutes by event time: old
/// events do not count; page views come from properties.page or metadata.page.
#[test]
fn rolling_windows_count_recent_activity() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), "");
    let now = inletd::event::format_ms(inletd::event::now_ms());
    let events = json!({"events": [
        {"event_id": "w1", "event_type": "page_view", "user_id": "u1", "session_id": "s1", "occurred_at": now, "properties": {"page": "/home"}},
        {"event_id": "w2", "event_type": "page_view", "user_id": "u2", "session_id": "s2", "occurred_at": now, "metadata": {"page": "/home"}},
        {"event_id": "w3", "event_type": "page_view", "user_id": "u1", "session_id": "s1", "occurred_at": now, "properties": {"page": "/pricing"}},
        {"event_id": "w4", "event_type": "click", "user_id": "u3", "occurred_at": now},
        {"event_id": "w5", "event_type": "page_view", "user_id": "u4", "occurred_at": "2024-01-01T00:00:00Z", "properties": {"page": "/old"}},
    ]});
    assert_eq!(d.post_json("/webhook/batch", &events).json()["accepted"], 5);
    d.wait_processed(Duration::from_secs(10));
    let w = d.get("/stats/windows").json();
    assert_eq!(w["active_users_5m"], 3, "{w}");
    assert_eq!(w["active_sessions_5m"], 2, "{w}");
    assert_eq!(w["page_views_15m"], 3, "{w}");
    assert_eq!(
        w["top_pages_15m"],
        json!([{"page": "/home", "views": 2}, {"page": "/pricing", "views": 1}])
    );
}

/// Seed 002's revenue view: `sum_fields` names the amount; trends by week
/// count events, distinct users and the sum per Monday-started week (the
/// range widened to whole weeks), skipping amounts that are not numbers;
/// top events rank by the sum.
#[test]
fn trends_sum_an_amount_per_week_and_rank_types_by_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), "sum_fields = [\"properties.amount\"]");
    let sale = |id: &str, kind: &str, user: &str, at: &str, amount: Value| {
        let mut e = ev(id, kind, Some(user), at);
        e["properties"] = json!({ "amount": amount });
        e
    };
    let events = vec![
        // Week of Monday 2024-01-01.
        sale("1", "booking", "ann", "2024-01-01T10:00:00Z", json!(19.99)),
        sale("2", "booking", "bob", "2024-01-07T23:59:59Z", json!(5)),
        sale("3", "refund", "ann", "2024-01-03T10:00:00Z", json!(-4.5)),
        sale(
            "4",
            "booking",
            "ann",
            "2024-01-02T10:00:00Z",
            json!("12.00"),
        ),
        // Week of Monday 2024-01-08.
        sale("5", "booking", "cid", "2024-01-08T00:00:00Z", json!(100.01)),
        ev("6", "booking", Some("cid"), "2024-01-09T00:00:00Z"),
    ];
    let r = d.post_json("/webhook/batch", &json!({ "events": events }));
    assert_eq!(r.json()["accepted"], 6, "{}", r.text());
    d.wait_processed(Duration::from_secs(10));

    let t = d
        .get("/stats/trends?from=2024-01-03&to=2024-01-09&interval=week&event_type=booking&sum=properties.amount")
        .json();
    assert_eq!(
        t,
        json!({
            "interval": "week", "from": "2024-01-01", "to": "2024-01-14",
            "event_type": "booking", "sum": "properties.amount",
            "series": [
                {"period": "2024-01-01", "count": 3, "users": 2, "sum": 24.99, "skipped": 1},
                {"period": "2024-01-08", "count": 2, "users": 1, "sum": 100.01, "skipped": 1},
            ],
            "skipped": 2, "summable": ["properties.amount"],
        })
    );
    let months = d
        .get("/stats/trends?from=2024-01-01&to=2024-01-31&interval=month")
        .json();
    assert_eq!(
        months["series"],
        json!([{"period": "2024-01-01", "count": 6, "users": 3, "sum": null, "skipped": null}])
    );
    let top = d
        .get("/stats/top-events?from=2024-01-01&to=2024-01-31&by=sum&sum=properties.amount")
        .json();
    assert_eq!(
        top["events"],
        json!([
            {"event_type": "booking", "count": 5, "sum": 125.0},
            {"event_type": "refund", "count": 1, "sum": -4.5},
        ])
    );
}

/// Bad parameters answer 400 naming the parameter; ranges are capped.
#[test]
fn bad_stats_parameters_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), "");
    for (path, param) in [
        ("/stats/dau?from=2024-02-30&to=2024-03-01", "from"),
        ("/stats/dau?from=2024-03-01&to=2024-02-01", "to"),
        ("/stats/dau?from=2020-01-01&to=2024-01-01", "to"),
        (
            "/stats/top-events?from=2024-01-01&to=2024-01-02&limit=0",
            "limit",
        ),
        (
            "/stats/top-events?from=2024-01-01&to=2024-01-02&limit=lots",
            "limit",
        ),
        ("/stats/retention?windows=3", "start_date"),
        (
            "/stats/retention?start_date=2024-01-01&windows=1000",
            "windows",
        ),
        (
            "/stats/retention?start_date=2024-01-01&window_type=hourly",
            "window_type",
        ),
        ("/stats/trends?interval=fortnight", "interval"),
        ("/stats/trends?from=2020-01-01&to=2024-01-01", "to"),
        ("/stats/trends?event_type=", "event_type"),
        // Only the config's sum_fields are summed.
        ("/stats/trends?sum=properties.amount", "sum"),
        ("/stats/top-events?by=sum", "sum"),
        ("/stats/top-events?by=size", "by"),
    ] {
        let r = d.get(path);
        assert_eq!(r.status, 400, "{path}");
        let b = r.json();
        assert_eq!(
            (b["error"].clone(), b["field"].clone()),
            (json!("invalid_parameter"), json!(param)),
            "{path}: {b}"
        );
    }
    assert_eq!(d.get("/stats/nope").status, 404);
}

/// RFC 3339 text `seconds` before now.
fn ago(seconds: i64) -> String {
    let t = time::OffsetDateTime::now_utc() - time::Duration::seconds(seconds);
    t.format(&time::format_description::well_known::Rfc3339)
        .expect("a time formats")
}

/// Seed 004's engagement view: a `[[windows]]` window of plays and pauses
/// over the last 10 minutes, grouped by content and ranked by summed
/// duration; another counts clicks per button over 5 minutes. Events of
/// other types, without a group, or older than the window are not
/// counted; the answers are the same after a kill -9 and a restart.
#[test]
fn custom_windows_rank_groups_by_sum_or_count() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::write_config(
        dir.path(),
        "[[windows]]\nname = \"engagement_10m\"\nminutes = 10\nevent_types = [\"play\", \"pause\"]\n\
         group_by = \"properties.content_id\"\nsum = \"properties.duration_ms\"\n\
         [[windows]]\nname = \"clicks_5m\"\nminutes = 5\ngroup_by = \"properties.button\"\n",
    );
    let mut d = Daemon::start_with(dir.path(), &config, &[]);
    let event = |id: &str, kind: &str, seconds_ago: i64, properties: Value| {
        json!({"event_id": id, "event_type": kind, "occurred_at": ago(seconds_ago),
               "properties": properties})
    };
    let events = vec![
        event(
            "1",
            "play",
            60,
            json!({"content_id": "c1", "duration_ms": 1000}),
        ),
        event(
            "2",
            "pause",
            120,
            json!({"content_id": "c1", "duration_ms": 500}),
        ),
        event(
            "3",
            "play",
            180,
            json!({"content_id": "c2", "duration_ms": 3000}),
        ),
        event(
            "4",
            "play",
            30,
            json!({"content_id": "c3", "duration_ms": 200}),
        ),
        // A number as the group; a duration that is not a number adds 0.
        event(
            "5",
            "play",
            30,
            json!({"content_id": 42, "duration_ms": "long"}),
        ),
        // Older than the window, another type, no group: not counted.
        event(
            "6",
            "play",
            15 * 60,
            json!({"content_id": "c1", "duration_ms": 9999}),
        ),
        event(
            "7",
            "view",
            60,
            json!({"content_id": "c1", "duration_ms": 9999}),
        ),
        event("8", "play", 60, json!({"duration_ms": 9999})),
        event("9", "click", 60, json!({"button": "buy"})),
        event("10", "click", 90, json!({"button": "buy"})),
        event("11", "click", 60, json!({"button": "help"})),
        event("12", "click", 6 * 60 + 30, json!({"button": "old"})),
    ];
    let r = d.post_json("/webhook/batch", &json!({ "events": events }));
    assert_eq!(r.json()["accepted"], 12, "{}", r.text());
    d.wait_processed(Duration::from_secs(10));

    let engagement = json!({"name": "engagement_10m", "minutes": 10, "groups": [
        {"key": "c2", "count": 1, "sum": 3000.0},
        {"key": "c1", "count": 2, "sum": 1500.0},
        {"key": "c3", "count": 1, "sum": 200.0},
        {"key": "42", "count": 1, "sum": 0.0},
    ]});
    let clicks = json!({"name": "clicks_5m", "minutes": 5, "groups": [
        {"key": "buy", "count": 2, "sum": null},
        {"key": "help", "count": 1, "sum": null},
    ]});
    let check = |d: &Daemon| {
        assert_eq!(d.get("/stats/windows/engagement_10m").json(), engagement);
        assert_eq!(d.get("/stats/windows/clicks_5m").json(), clicks);
        let top2 = d.get("/stats/windows/engagement_10m?limit=2").json();
        assert_eq!(top2["groups"].as_array().unwrap().len(), 2, "{top2}");
        let all = d.get("/stats/windows").json();
        assert_eq!(
            all["custom"],
            json!(["engagement_10m", "clicks_5m"]),
            "{all}"
        );
    };
    check(&d);

    let missing = d.get("/stats/windows/nope");
    assert_eq!(
        (missing.status, missing.json()["error"].clone()),
        (404, json!("unknown_window"))
    );
    let bad = d.get("/stats/windows/clicks_5m?limit=0");
    assert_eq!(
        (bad.status, bad.json()["field"].clone()),
        (400, json!("limit"))
    );

    d.kill9();
    let d = Daemon::start_with(dir.path(), &config, &[]);
    // A batch whose ack the kill cut off is processed again, once.
    d.wait_processed(Duration::from_secs(10));
    check(&d);
}

/// A window that cannot work is refused at start, naming it.
#[test]
fn a_bad_window_is_refused_naming_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::write_config(
        dir.path(),
        "[[windows]]\nname = \"Bad Name\"\nminutes = 0\ngroup_by = \"properties..id\"\n",
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_inletd"))
        .args(["--config", path.to_str().unwrap(), "check-config"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for key in [
        "windows[0].name",
        "windows[0].minutes",
        "windows[0].group_by",
    ] {
        assert!(err.contains(key), "{key} in: {err}");
    }
}
