//! The live dashboard at `GET /`, opened in a real headless Chromium: it
//! shows what `/stats` says, moves without a reload, replays the DLQ from
//! its buttons, fits a phone, reconnects by itself after a restart, and
//! says whose figures it shows when several instances share a Redis.
//! Screenshots go to `target/dashboard.png` and `target/dashboard-phone.png`.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use time::OffsetDateTime;

use common::webdriver::Browser;
use common::{Daemon, SinkServer};

const TOKEN: &str = "dashboard-test-token";
/// How long the page may take to show a change (it polls every 2 s).
const PAGE: Duration = Duration::from_secs(15);

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
}

/// `days` days ago at noon UTC, as RFC 3339.
fn days_ago(days: i64) -> String {
    let t = OffsetDateTime::now_utc() - time::Duration::days(days);
    format!(
        "{:04}-{:02}-{:02}T12:00:00Z",
        t.year(),
        u8::from(t.month()),
        t.day()
    )
}

/// The events the operator's app sent: three users over four days.
fn known_events() -> Vec<Value> {
    let plan: [(&str, &str, i64, Option<&str>); 12] = [
        ("page_view", "ann", 0, Some("/pricing")),
        ("page_view", "ann", 0, Some("/docs")),
        ("page_view", "bob", 0, Some("/pricing")),
        ("signup", "cy", 0, None),
        ("page_view", "ann", 1, Some("/")),
        ("signup", "bob", 1, None),
        ("purchase", "ann", 1, None),
        ("page_view", "cy", 3, Some("/")),
        ("signup", "ann", 3, None),
        ("purchase", "bob", 3, None),
        ("page_view", "bob", 3, Some("/docs")),
        ("signup", "dee", 3, None),
    ];
    plan.iter()
        .enumerate()
        .map(|(i, (kind, user, ago, page))| {
            let mut event = json!({
                "event_id": format!("known-{i}"),
                "event_type": kind,
                "user_id": user,
                "timestamp": days_ago(*ago),
            });
            if let Some(page) = page {
                event["properties"] = json!({ "page": page });
            }
            event
        })
        .collect()
}

fn post_batch(daemon: &Daemon, events: &[Value]) {
    let answer = daemon.post_json("/webhook/batch", &json!({ "events": events }));
    assert_eq!(answer.status, 202, "{}", answer.text());
    assert_eq!(answer.json()["accepted"], events.len(), "{}", answer.text());
}

fn admin_get(daemon: &Daemon, path: &str) -> Value {
    let bearer = format!("Bearer {TOKEN}");
    let answer = daemon.request("GET", path, &[("Authorization", &bearer)], b"");
    assert_eq!(answer.status, 200, "{path}: {}", answer.text());
    answer.json()
}

/// Waits until `/stats/summary` reports `total` events processed and
/// `dlq` entries parked.
fn wait_for_summary(daemon: &Daemon, total: u64, dlq: u64) {
    common::eventually(Duration::from_secs(30), "the events processed", || {
        let s = daemon.get("/stats/summary").json();
        s["total_events"] == total && s["dlq_size"] == dlq
    });
}

/// What the page shows as a whole number ("1,234" → 1234).
fn number(browser: &Browser, selector: &str) -> Option<u64> {
    browser.text(selector)?.replace(',', "").trim().parse().ok()
}

fn rows(browser: &Browser, selector: &str) -> Value {
    browser.run(
        "return [...document.querySelectorAll(arguments[0])]
             .map(tr => [...tr.children].map(td => td.textContent));",
        &[json!(selector)],
    )
}

/// An operator whose sink is down opens the dashboard: it shows the totals,
/// DAU and top events that `/stats` gives, asks once for the admin token to
/// show the DLQ, follows new events without a reload, and once the sink is
/// back replays one entry, deletes another, and replays the rest, from the
/// page's buttons.
#[test]
fn the_dashboard_shows_what_stats_says_and_replays_the_dlq() {
    let sink_up = Arc::new(AtomicBool::new(false));
    let sink = {
        let up = sink_up.clone();
        SinkServer::start(Box::new(
            move |_| {
                if up.load(Ordering::SeqCst) { 200 } else { 500 }
            },
        ))
    };
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &format!(
            "admin_token = \"{TOKEN}\"\nmax_retries = 0\nbreaker_failures = 1000\n\
             [[windows]]\nname = \"refunds_10m\"\nminutes = 10\nevent_types = [\"refund\"]\n\
             group_by = \"user_id\"\n\
             [[sinks]]\nname = \"dashboard\"\ntype = \"http\"\nurl = \"{}\"\ntimeout_ms = 2000\n",
            sink.url()
        ),
    );
    let events = known_events();
    post_batch(&daemon, &events);
    wait_for_summary(&daemon, 12, 12);

    let Some(browser) = Browser::start(1280, 1900) else {
        return;
    };
    browser.open(&format!("http://{}/", daemon.addr));
    browser.wait_for(PAGE, "the page to show 12 events", |b| {
        number(b, "#total-events") == Some(12)
    });

    // The same figures as /stats, as the page shows them.
    let top = daemon.get("/stats/top-events?limit=10").json();
    let expected: Vec<Value> = top["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| json!([e["event_type"], e["count"].to_string()]))
        .collect();
    assert_eq!(expected.len(), 3, "{top}");
    assert_eq!(rows(&browser, "#top-events tr"), json!(expected));

    let dau = daemon.get("/stats/dau").json();
    let days = dau["days"].as_array().unwrap();
    assert_eq!(days.len(), 30, "{dau}");
    let bars = browser.run(
        "return [...document.querySelectorAll('#dau-chart rect title')].map(t => t.textContent);",
        &[],
    );
    let expected: Vec<String> = days
        .iter()
        .map(|d| format!("{}: {} users", d["date"].as_str().unwrap(), d["users"]))
        .collect();
    assert_eq!(bars, json!(expected));
    assert_eq!(days[29]["users"], 3, "ann, bob and cy today: {dau}");
    assert_eq!(number(&browser, "#dau-today"), Some(3));

    // The trends card: by day over the same 30 days, newest first; then
    // for one event type, chosen on the page.
    let trend_rows = |path: &str| -> Value {
        let t = daemon.get(path).json();
        let rows: Vec<Value> = t["series"]
            .as_array()
            .unwrap_or_else(|| panic!("{t}"))
            .iter()
            .rev()
            .map(|p| json!([p["period"], p["count"].to_string(), p["users"].to_string()]))
            .collect();
        json!(rows)
    };
    let by_day = trend_rows("/stats/trends?interval=day");
    assert_eq!(by_day.as_array().unwrap().len(), 30);
    browser.wait_for(PAGE, "the trends table as /stats/trends says", |b| {
        rows(b, "#trends tr") == by_day
    });
    browser.click("#trend-type option[value='purchase']");
    let purchases = trend_rows("/stats/trends?interval=day&event_type=purchase");
    assert_ne!(purchases, by_day);
    browser.wait_for(PAGE, "the trends of purchases", |b| {
        rows(b, "#trends tr") == purchases
    });

    let summary = daemon.get("/stats/summary").json();
    assert_eq!(number(&browser, "#dlq-size"), Some(12));
    assert_eq!(summary["sinks"][0]["state"], "retrying", "{summary}");
    assert_eq!(
        rows(&browser, "#sinks tr")[0][1],
        "retrying",
        "the sink's state, as /stats/summary gives it"
    );
    let windows = daemon.get("/stats/windows").json();
    assert_eq!(
        number(&browser, "#active-users"),
        windows["active_users_5m"].as_u64()
    );

    // The admin parts ask for the token, once; the DLQ then shows.
    assert!(browser.visible("#token-form"), "the page asks for a token");
    assert!(
        rows(&browser, "#dlq-table tr")
            .as_array()
            .unwrap()
            .is_empty()
    );
    browser.type_into("#token-input", TOKEN);
    browser.click("#token-save");
    browser.wait_for(PAGE, "the DLQ table to list 12 entries", |b| {
        rows(b, "#dlq-table tr").as_array().unwrap().len() == 12
    });
    assert!(!browser.visible("#token-form"), "the token was taken");
    let listed = admin_get(&daemon, "/admin/dlq?limit=50");
    let ids: Vec<Value> = listed["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| json!(e["id"].to_string()))
        .collect();
    let shown: Vec<Value> = rows(&browser, "#dlq-table tr")
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r[0].clone())
        .collect();
    assert_eq!(shown, ids);

    // More events arrive: the numbers move, the page is not reloaded.
    browser.run("window.inletdTestMark = 'no reload';", &[]);
    let more: Vec<Value> = (0..5)
        .map(|i| json!({"event_id": format!("more-{i}"), "event_type": "refund", "user_id": "eve"}))
        .collect();
    post_batch(&daemon, &more);
    wait_for_summary(&daemon, 17, 17);
    browser.wait_for(PAGE, "the page to show 17 events", |b| {
        number(b, "#total-events") == Some(17) && number(b, "#dlq-size") == Some(17)
    });
    browser.wait_for(PAGE, "refund among the top events", |b| {
        rows(b, "#top-events tr")
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r[0] == "refund" && r[1] == "5")
    });
    // The configured window shows them too, as /stats/windows/refunds_10m.
    browser.wait_for(PAGE, "eve's 5 refunds in the custom window", |b| {
        rows(b, "#custom-windows [data-window='refunds_10m'] tbody tr") == json!([["eve", "5"]])
    });
    let window = daemon.get("/stats/windows/refunds_10m").json();
    assert_eq!(
        window["groups"],
        json!([{"key": "eve", "count": 5, "sum": null}])
    );
    assert_eq!(
        browser.run("return window.inletdTestMark;", &[]),
        "no reload"
    );
    browser.screenshot(&target_dir().join("dashboard.png"));

    // The sink comes back; one entry is replayed from its row's button.
    sink_up.store(true, Ordering::SeqCst);
    let first_id = shown[0].as_str().unwrap().to_owned();
    browser.click(&format!(
        "#dlq-table tr[data-id='{first_id}'] button.replay"
    ));
    browser.wait_for(PAGE, "the DLQ count to drop to 16", |b| {
        number(b, "#dlq-size") == Some(16)
    });
    assert!(
        rows(&browser, "#dlq-table tr")
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r[0] != first_id.as_str()),
        "the replayed entry left the table"
    );
    common::eventually(
        Duration::from_secs(10),
        "the replayed event delivered",
        || sink.events().len() == 1,
    );

    // One entry is deleted instead: the page asks first.
    let doomed = shown[1].as_str().unwrap().to_owned();
    let doomed_key = rows(&browser, &format!("#dlq-table tr[data-id='{doomed}']"))[0][3]
        .as_str()
        .expect("the entry's key column")
        .to_owned();
    browser.click(&format!("#dlq-table tr[data-id='{doomed}'] button.delete"));
    let question = browser.accept_dialog();
    assert!(
        question.contains(&format!("Delete DLQ entry {doomed}")),
        "{question}"
    );
    browser.wait_for(PAGE, "the DLQ count to drop to 15", |b| {
        number(b, "#dlq-size") == Some(15)
    });

    // And the rest with "Replay all".
    browser.click("#dlq-replay-all");
    browser.wait_for(PAGE, "the DLQ to empty", |b| {
        number(b, "#dlq-size") == Some(0)
    });
    common::eventually(
        Duration::from_secs(10),
        "every kept event delivered",
        || sink.events().len() == 16,
    );
    let mut delivered: Vec<String> = sink
        .events()
        .iter()
        .map(|e| e["event_id"].as_str().unwrap_or_default().to_owned())
        .collect();
    delivered.sort();
    delivered.dedup();
    assert_eq!(
        delivered.len(),
        16,
        "each event delivered once: {delivered:?}"
    );
    assert!(
        !delivered.contains(&doomed_key),
        "the deleted entry's event is not delivered: {delivered:?}"
    );
    browser.wait_for(PAGE, "the sink shown as ok", |b| {
        rows(b, "#sinks tr")[0][1] == "ok"
    });
    // Replays are not counted again.
    assert_eq!(number(&browser, "#total-events"), Some(17));
}

/// On a phone-width window the page needs no sideways scrolling; when the
/// daemon stops it says so, and when it is back the page carries on by
/// itself.
#[test]
fn the_dashboard_fits_a_phone_and_reconnects_after_a_restart() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start(dir.path(), &format!("bind = \"127.0.0.1:{port}\""));
    post_batch(&daemon, &known_events());
    wait_for_summary(&daemon, 12, 0);

    let Some(browser) = Browser::phone(390, 844) else {
        return;
    };
    browser.open(&format!("http://{}/", daemon.addr));
    browser.wait_for(PAGE, "the page to show 12 events", |b| {
        number(b, "#total-events") == Some(12)
    });
    let widths = browser.run(
        "return [document.documentElement.scrollWidth, window.innerWidth];",
        &[],
    );
    assert_eq!(widths[1], 390, "a phone's width");
    assert!(
        widths[0].as_u64() <= widths[1].as_u64(),
        "the page is wider than the window: {widths}"
    );
    browser.screenshot(&target_dir().join("dashboard-phone.png"));

    // Loopback with no admin_token: the admin parts need no token.
    assert!(!browser.visible("#token-form"));
    assert_eq!(browser.text("#queue-age").as_deref(), Some("none"));

    let status = daemon.terminate(Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
    browser.wait_for(PAGE, "a banner saying inletd is not answering", |b| {
        b.visible("#banner")
            && b.text("#banner")
                .is_some_and(|t| t.contains("not answering"))
    });

    let daemon = Daemon::start_with(dir.path(), &daemon.config_path, &[]);
    post_batch(
        &daemon,
        &[json!({"event_id": "after-restart", "event_type": "login", "user_id": "ann"})],
    );
    browser.wait_for(PAGE, "the page back, with the new event", |b| {
        !b.visible("#banner")
            && b.text("#state").as_deref() == Some("ready")
            && number(b, "#total-events") == Some(13)
    });
}

/// With `stats_token` set, the page shows no figures until it is given the
/// token; given it, the figures appear and the token is kept for the tab.
#[test]
fn the_dashboard_asks_for_the_stats_token() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), "stats_token = \"figures-only\"");
    post_batch(&daemon, &known_events());
    common::eventually(Duration::from_secs(30), "the events processed", || {
        daemon
            .get("/metrics")
            .text()
            .contains("inletd_events_processed_total 12")
    });

    let Some(browser) = Browser::start(1280, 1000) else {
        return;
    };
    browser.open(&format!("http://{}/", daemon.addr));
    browser.wait_for(PAGE, "the page to ask for a token", |b| {
        b.visible("#token-form")
            && b.text("#token-label")
                .is_some_and(|t| t.contains("stats_token"))
    });
    assert_eq!(browser.text("#total-events").as_deref(), Some("–"));

    browser.type_into("#token-input", "wrong");
    browser.click("#token-save");
    browser.wait_for(PAGE, "the wrong token refused", |b| {
        b.text("#token-label")
            .is_some_and(|t| t.starts_with("That token was refused"))
    });
    assert_eq!(browser.text("#total-events").as_deref(), Some("–"));

    browser.type_into("#token-input", "figures-only");
    browser.click("#token-save");
    browser.wait_for(PAGE, "the figures shown", |b| {
        number(b, "#total-events") == Some(12)
    });
    assert!(
        !browser.visible("#token-form"),
        "loopback: admin needs no token"
    );
    assert_eq!(
        browser.run("return sessionStorage.getItem('inletd.token');", &[]),
        "figures-only"
    );
}

/// An operator of two instances sharing a Redis opens the dashboard of
/// one: the totals say they are the deployment's, the DAU, "right now",
/// top events and trends cards say they count every instance's, and a day
/// or a minute past `dau_exact_max` is shown as an estimate ("≈").
#[test]
fn the_dashboard_of_a_deployment_says_whose_figures_it_shows() {
    let Some(redis) = common::redis::RedisServer::start(Default::default()) else {
        return;
    };
    let config = |instance: &str| {
        format!(
            "[redis]\nurl = \"{}\"\ninstance = \"{instance}\"\npublish_interval_ms = 100\n\
             dau_exact_max = 2\n",
            redis.url()
        )
    };
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Daemon::start(dir_a.path(), &config("a"));
    let b = Daemon::start(dir_b.path(), &config("b"));
    // Yesterday ann came through both; today ann and bob through a, bob
    // and cy through b: 1 user yesterday, 3 today (past the cap of 2).
    let visit = |d: &Daemon, id: &str, user: &str, ago: i64| {
        json!({"event_id": format!("{id}-{}", d.addr), "event_type": "visit",
            "user_id": user, "timestamp": days_ago(ago)})
    };
    post_batch(
        &a,
        &[
            visit(&a, "1", "ann", 1),
            visit(&a, "2", "ann", 0),
            visit(&a, "3", "bob", 0),
        ],
    );
    post_batch(
        &b,
        &[
            visit(&b, "1", "ann", 1),
            visit(&b, "2", "bob", 0),
            visit(&b, "3", "cy", 0),
        ],
    );
    // Right now ann views a page through a, bob and cy through b: 3
    // active users, past the cap of 2; 3 page views.
    let view = |user: &str| {
        json!({"event_id": format!("view-{user}"), "event_type": "page_view",
            "user_id": user, "properties": {"page": "/pricing"}})
    };
    post_batch(&a, &[view("ann")]);
    post_batch(&b, &[view("bob"), view("cy")]);
    common::eventually(Duration::from_secs(30), "the deployment's DAU", || {
        let dau = a.get("/stats/dau").json();
        dau["days"][29]["users"] == 3 && dau["days"][28]["users"] == 1
    });
    common::eventually(Duration::from_secs(30), "the deployment's windows", || {
        a.get("/stats/windows").json()["page_views_15m"] == 3
    });

    let Some(browser) = Browser::start(1280, 1000) else {
        return;
    };
    browser.open(&format!("http://{}/", a.addr));
    browser.wait_for(PAGE, "the deployment's figures", |b| {
        b.text("#total-scope")
            .is_some_and(|t| t.contains("by 2 instances"))
            && b.text("#dau-today").as_deref() == Some("≈3")
    });
    assert_eq!(
        browser.text("#dau-scope").as_deref().map(str::trim),
        Some("(all instances)")
    );
    browser.wait_for(PAGE, "the deployment's windows", |b| {
        b.text("#page-views").as_deref() == Some("3")
            && b.text("#active-users").as_deref() == Some("≈3")
    });
    for heading in ["#now-scope", "#top-scope", "#trend-scope"] {
        assert_eq!(
            browser.text(heading).as_deref().map(str::trim),
            Some("(all instances)"),
            "{heading}"
        );
    }
    let bars = browser.run(
        "return [...document.querySelectorAll('#dau-chart rect title')].map(t => t.textContent);",
        &[],
    );
    let bars: Vec<&str> = bars
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(bars.len(), 30, "{bars:?}");
    assert!(
        bars[28].ends_with(": 1 users"),
        "yesterday, exact: {bars:?}"
    );
    assert!(
        bars[29].ends_with(": ≈3 users"),
        "today, estimated: {bars:?}"
    );
}
