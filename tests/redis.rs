//! Several instances sharing one Redis: a real `redis-server` on a free
//! port, real daemons. Each test says what an operator did and what must
//! hold.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::redis::{RedisOptions, RedisServer};
use common::{Daemon, SinkServer, eventually};
use serde_json::{Value, json};

/// The config of one instance of a deployment sharing `redis`.
fn instance_config(redis: &RedisServer, instance: &str, extra: &str) -> String {
    format!(
        "{extra}\n[redis]\nurl = \"{}\"\ninstance = \"{instance}\"\nkey_prefix = \"test:\"\npublish_interval_ms = 100\n",
        redis.url()
    )
}

fn http_sink(url: &str) -> String {
    format!("[[sinks]]\nname = \"dashboard\"\ntype = \"http\"\nurl = \"{url}\"\n")
}

fn event(id: &str) -> Value {
    json!({"event_id": id, "event_type": "signup", "user_id": format!("u-{id}")})
}

fn start(dir: &Path, redis: &RedisServer, instance: &str, sinks: &str) -> Daemon {
    let config = instance_config(redis, instance, "");
    Daemon::start(dir, &format!("{config}{sinks}"))
}

fn summary(d: &Daemon) -> Value {
    let r = d.get("/stats/summary");
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

fn health(d: &Daemon) -> Value {
    d.get("/health").json()
}

/// Waits until `/stats/summary` on `d` reports `total` for the deployment.
fn wait_for_deployment_total(d: &Daemon, total: u64, limit: Duration) {
    let mut last = Value::Null;
    let start = Instant::now();
    while start.elapsed() < limit {
        last = summary(d);
        if last["scope"] == "deployment" && last["total_events"] == total {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "the deployment total never reached {total}; last summary: {last}\nlog:\n{}",
        d.log_text()
    );
}

#[test]
fn two_instances_take_each_event_once_and_answer_for_the_deployment() {
    let Some(redis) = RedisServer::start(RedisOptions::default()) else {
        return;
    };
    let sink = SinkServer::start(Box::new(|_| 200));
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start(dir_a.path(), &redis, "a", &http_sink(&sink.url()));
    let b = start(dir_b.path(), &redis, "b", &http_sink(&sink.url()));

    // A client behind a load balancer sends each of 400 events to both
    // instances: a retry that landed elsewhere.
    let mut accepted = HashMap::from([("a", 0), ("b", 0)]);
    let mut duplicates = 0;
    for i in 0..400 {
        let e = event(&format!("e{i}"));
        let order = if i % 2 == 0 {
            [("a", &a), ("b", &b)]
        } else {
            [("b", &b), ("a", &a)]
        };
        for (name, d) in order {
            let r = d.post_json("/webhook/events", &e);
            match r.status {
                202 => *accepted.get_mut(name).unwrap() += 1,
                200 => {
                    assert_eq!(r.json()["status"], "duplicate", "{}", r.text());
                    duplicates += 1;
                }
                other => panic!("event e{i} on {name}: {other} {}", r.text()),
            }
        }
    }
    assert_eq!(accepted["a"] + accepted["b"], 400, "{accepted:?}");
    assert_eq!(duplicates, 400);
    assert_eq!(accepted["a"], 200, "the first to see a key takes it");

    // The sink sees every event exactly once, from whichever took it.
    eventually(Duration::from_secs(20), "400 events delivered", || {
        sink.events().len() >= 400
    });
    std::thread::sleep(Duration::from_millis(300));
    let mut ids: Vec<String> = sink
        .events()
        .iter()
        .map(|e| e["event_id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 400);
    assert_eq!(sink.events().len(), 400, "an event was delivered twice");

    // Both answer for the deployment, and say what is their own.
    for d in [&a, &b] {
        wait_for_deployment_total(d, 400, Duration::from_secs(10));
        let s = summary(d);
        assert_eq!(s["by_type"]["signup"], 400, "{s}");
        assert_eq!(s["local"]["total_events"], 200, "{s}");
        let names: Vec<&str> = s["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["a", "b"], "{s}");
        assert_eq!(health(d)["redis"]["state"], "up");

        // Top events over recent days are the deployment's too; what the
        // instances do not share says it is this instance's.
        let top = d.get("/stats/top-events").json();
        assert_eq!(top["scope"], "deployment", "{top}");
        assert_eq!(
            top["events"],
            json!([{"event_type": "signup", "count": 400}])
        );
        let old = d
            .get("/stats/top-events?from=2020-01-01&to=2020-01-31")
            .json();
        assert_eq!(old["scope"], "instance", "{old}");
        let old = d.get("/stats/dau?from=2020-01-01&to=2020-01-31").json();
        assert_eq!(old["scope"], "instance", "{old}");
        // Each event had its own user: 400 users today in the deployment,
        // 200 on each instance.
        let today = |d: &Daemon| {
            let dau = d.get("/stats/dau").json();
            assert_eq!(dau["scope"], "deployment", "{dau}");
            dau["days"][29].clone()
        };
        eventually(Duration::from_secs(10), "400 users today", || {
            today(d)["users"] == 400
        });
        assert_eq!(today(d)["exact"], true);
    }
    let metrics = a.get("/metrics").text();
    assert!(metrics.contains("inletd_redis_up 1"), "{metrics}");
    assert!(
        metrics.contains("inletd_redis_duplicates_total 200"),
        "{metrics}"
    );
}

#[test]
fn a_key_another_instance_is_committing_is_answered_in_progress() {
    let Some(redis) = RedisServer::start(RedisOptions::default()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path(), &redis, "a", "");
    // Instance "b" holds one key mid-commit and has accepted another.
    let pending = redis.command(&["SET", "test:idem:default:busy", "p:1:b", "PX", "60000"]);
    assert_eq!(pending.as_text().as_deref(), Some("OK"));
    redis.command(&[
        "SET",
        "test:idem:default:taken",
        "c:1700000000000:b",
        "PX",
        "60000",
    ]);

    let r = d.post_json("/webhook/events", &event("busy"));
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(r.json()["error"], "in_progress");
    assert_eq!(r.header("retry-after"), Some("1"));
    let r = d.post_json("/webhook/events", &event("taken"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "duplicate");

    let batch = json!({"events": [event("busy"), event("taken"), event("new")]});
    let r = d.post_json("/webhook/batch", &batch);
    assert_eq!(r.status, 202, "{}", r.text());
    let body = r.json();
    assert_eq!(
        (&body["accepted"], &body["duplicates"], &body["in_progress"]),
        (&json!(1), &json!(1), &json!(1)),
        "{body}"
    );
    let statuses: Vec<&str> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["in_progress", "duplicate", "accepted"]);

    // The key it accepted becomes its own in Redis, for the whole window.
    eventually(Duration::from_secs(5), "the key confirmed", || {
        let held = redis.command(&["GET", "test:idem:default:new"]).as_text();
        held.is_some_and(|v| v.starts_with("c:") && v.ends_with(":a"))
    });
    let ttl = redis.command(&["PTTL", "test:idem:default:new"]).as_int();
    assert!(ttl.is_some_and(|ms| ms > 23 * 3_600_000), "{ttl:?}");

    // Once b's commit is over (here: its claim lapsed), the retry is taken.
    redis.command(&["DEL", "test:idem:default:busy"]);
    assert_eq!(d.post_json("/webhook/events", &event("busy")).status, 202);
}

#[test]
fn a_frozen_redis_costs_no_answer_and_the_totals_heal_after() {
    let Some(redis) = RedisServer::start(RedisOptions::default()) else {
        return;
    };
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start(dir_a.path(), &redis, "a", "");
    let b = start(dir_b.path(), &redis, "b", "");
    let mut sent = 0;
    let mut post = |d: &Daemon, id: String| {
        let r = d.post_json("/webhook/events", &event(&id));
        assert_eq!(r.status, 202, "{id}: {}", r.text());
        sent += 1;
    };
    for i in 0..50 {
        post(if i % 2 == 0 { &a } else { &b }, format!("before{i}"));
    }

    // Redis freezes (SIGSTOP) for 30 s while events keep coming.
    redis.pause();
    let frozen = Instant::now();
    let mut i = 0;
    while frozen.elapsed() < Duration::from_secs(30) {
        post(if i % 2 == 0 { &a } else { &b }, format!("during{i}"));
        i += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    for d in [&a, &b] {
        let h = health(d);
        assert_eq!(h["redis"]["state"], "down", "{h}");
        assert_eq!(
            d.get("/ready").status,
            200,
            "Redis is not needed to be ready"
        );
        let s = summary(d);
        assert_eq!(s["scope"], "instance", "{s}");
    }
    let metrics = a.get("/metrics").text();
    assert!(metrics.contains("inletd_redis_up 0"), "{metrics}");
    assert!(
        !metrics.contains("inletd_redis_fail_open_total 0"),
        "{metrics}"
    );

    // Redis thaws: no restart, and within 30 s everything is exact again.
    redis.resume();
    for d in [&a, &b] {
        wait_for_deployment_total(d, sent, Duration::from_secs(30));
        eventually(Duration::from_secs(30), "the key backlog written", || {
            let h = health(d);
            h["redis"]["state"] == "up" && h["redis"]["backlog"] == 0
        });
    }
    // Every heartbeat expired during the freeze; neither instance took
    // the other, alive, over.
    std::thread::sleep(Duration::from_secs(1));
    for d in [&a, &b] {
        let metrics = d.get("/metrics").text();
        assert!(
            metrics.contains("inletd_redis_takeovers_total 0\n"),
            "{metrics}"
        );
    }
    // A key accepted by a while Redis was frozen is known to b now.
    let r = b.post_json("/webhook/events", &event("during0"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "duplicate");
}

#[test]
fn a_redis_killed_and_restarted_or_flushed_is_healed_without_a_daemon_restart() {
    let Some(mut redis) = RedisServer::start(RedisOptions {
        appendonly: true,
        ..RedisOptions::default()
    }) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path(), &redis, "a", "");
    for i in 0..20 {
        assert_eq!(
            d.post_json("/webhook/events", &event(&format!("k{i}")))
                .status,
            202
        );
    }
    wait_for_deployment_total(&d, 20, Duration::from_secs(10));

    redis.kill9();
    for i in 20..40 {
        assert_eq!(
            d.post_json("/webhook/events", &event(&format!("k{i}")))
                .status,
            202
        );
    }
    redis.restart();
    wait_for_deployment_total(&d, 40, Duration::from_secs(30));
    // The keys taken while Redis was gone reached it once it was back.
    eventually(Duration::from_secs(10), "k39 in redis", || {
        redis
            .command(&["GET", "test:idem:default:k39"])
            .as_text()
            .is_some_and(|v| v.ends_with(":a"))
    });

    // Someone flushes Redis: the figures are written whole again, and the
    // local store still knows every key.
    redis.command(&["FLUSHALL"]);
    wait_for_deployment_total(&d, 40, Duration::from_secs(10));
    let r = d.post_json("/webhook/events", &event("k3"));
    assert_eq!(r.status, 200, "{}", r.text());
    eventually(
        Duration::from_secs(5),
        "a duplicate found locally is put back in redis",
        || {
            let held = redis.command(&["GET", "test:idem:default:k3"]).as_text();
            held.is_some_and(|v| v.ends_with(":a"))
        },
    );
}

/// One day's users in the deployment, as `/stats/dau` on `d` shows them:
/// (users, exact).
fn dau_of(d: &Daemon, day: &str) -> (Value, Value) {
    let dau = d.get(&format!("/stats/dau?from={day}&to={day}")).json();
    assert_eq!(dau["scope"], "deployment", "{dau}");
    (
        dau["days"][0]["users"].clone(),
        dau["days"][0]["exact"].clone(),
    )
}

#[test]
fn daily_active_users_count_a_user_of_two_instances_once_and_heal_after_a_flush() {
    let Some(redis) = RedisServer::start(RedisOptions::default()) else {
        return;
    };
    let config = |instance| {
        instance_config(&redis, instance, "").replace("[redis]\n", "[redis]\ndau_exact_max = 5\n")
    };
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Daemon::start(dir_a.path(), &config("a"));
    let b = Daemon::start(dir_b.path(), &config("b"));
    let now = time::OffsetDateTime::now_utc();
    let yesterday = now - time::Duration::days(1);
    let date = |t: time::OffsetDateTime| t.date().to_string();
    let at_noon = |t: time::OffsetDateTime| format!("{}T12:00:00Z", date(t));

    // Yesterday x1..x3 used the app through a, x2..x4 through b; today
    // y1..y5 through a and y4..y8 through b.
    let visits = [
        (&a, yesterday, 1..=3, "x"),
        (&b, yesterday, 2..=4, "x"),
        (&a, now, 1..=5, "y"),
        (&b, now, 4..=8, "y"),
    ];
    for (d, day, users, prefix) in visits {
        for u in users {
            let id = format!("{prefix}{u}-{}", d.addr);
            let e = json!({"event_id": id, "event_type": "visit",
                "user_id": format!("{prefix}{u}"), "timestamp": at_noon(day)});
            assert_eq!(d.post_json("/webhook/events", &e).status, 202);
        }
    }

    // Yesterday's 4 users are counted once each, exactly; today's 8 are
    // past dau_exact_max (5), so estimated and said so.
    for d in [&a, &b] {
        eventually(Duration::from_secs(10), "4 users yesterday", || {
            dau_of(d, &date(yesterday)) == (json!(4), json!(true))
        });
        eventually(Duration::from_secs(10), "about 8 users today", || {
            let (users, exact) = dau_of(d, &date(now));
            exact == false && users.as_u64().is_some_and(|n| (7..=9).contains(&n))
        });
    }
    // Someone flushes Redis: each instance notices its mark is gone and
    // adds all its recent users again.
    redis.command(&["FLUSHALL"]);
    assert_eq!(
        redis
            .command(&["EXISTS", &format!("test:dau:{}", date(yesterday))])
            .as_int(),
        Some(0)
    );
    for d in [&a, &b] {
        eventually(Duration::from_secs(10), "yesterday healed", || {
            dau_of(d, &date(yesterday)) == (json!(4), json!(true))
        });
        // Healed twice: at start, and after the flush.
        eventually(Duration::from_secs(10), "the second heal counted", || {
            let metrics = d.get("/metrics").text();
            metrics.contains("inletd_redis_dau_heals_total 2")
                && metrics.contains("inletd_redis_pending_members 0")
        });
    }
}

/// The cursor an instance publishes is where another instance starts
/// when it takes its queue over: the events up to it are not delivered or
/// counted again. So their users must already be in the deployment's day
/// set when the cursor lands, or an instance killed between the two
/// writes leaves them out of the DAU for good.
#[test]
fn a_published_cursor_never_runs_ahead_of_the_users_it_covers() {
    let Some(redis) = RedisServer::start(RedisOptions::default()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let a = start(dir.path(), &redis, "a", "");
    // Every event at noon of one day, so that a run across midnight reads
    // the same set.
    let now = time::OffsetDateTime::now_utc();
    let noon = format!("{}T12:00:00Z", now.date());
    // The day set's key names the day by its number since 1970-01-01.
    let day = now.unix_timestamp().div_euclid(86_400);
    let visit = |n: u64| {
        json!({"event_id": format!("e{n}"), "event_type": "visit",
        "user_id": format!("u{n}"), "timestamp": noon})
    };
    // The cursor and the day set, read in one step: a script runs alone.
    let read = |conn: &mut common::redis::Connection| {
        let reply = conn.command(&[
            "EVAL",
            "return {redis.call('HGET', KEYS[1], 'cursor') or '0', redis.call('SCARD', KEYS[2])}",
            "2",
            "test:figures:a",
            &format!("test:dau:{day}"),
        ]);
        let items = reply.as_array().expect("two answers").to_vec();
        let cursor: u64 = items[0].as_text().and_then(|c| c.parse().ok()).unwrap_or(0);
        (cursor, items[1].as_int().unwrap_or(-1))
    };

    // A user a request, one request after the other, for about 3 s: seq n
    // is user n, so the cursor n must find n users in the set. Meanwhile
    // the set and the cursor are read as often as Redis answers.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (sent, reads, ahead) = std::thread::scope(|scope| {
        let watcher = scope.spawn(|| {
            let mut conn = redis.connect();
            let (mut reads, mut ahead) = (0u64, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let (cursor, users) = read(&mut conn);
                reads += 1;
                if users < cursor as i64 && ahead.len() < 5 {
                    ahead.push((cursor, users));
                }
            }
            (reads, ahead)
        });
        let started = Instant::now();
        let mut sent = 0;
        while started.elapsed() < Duration::from_secs(3) {
            sent += 1;
            let r = a.post_json("/webhook/events", &visit(sent));
            assert_eq!(r.status, 202, "{}", r.text());
            std::thread::sleep(Duration::from_millis(2));
        }
        a.wait_processed(Duration::from_secs(10));
        let mut conn = redis.connect();
        eventually(Duration::from_secs(10), "the last cursor published", || {
            read(&mut conn).0 == sent
        });
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let (reads, ahead) = watcher.join().expect("watcher");
        (sent, reads, ahead)
    });
    eprintln!("{sent} events, {reads} reads of the cursor and the day set");
    assert!(reads > 100, "the cursor was read only {reads} times");
    assert!(
        ahead.is_empty(),
        "the cursor ran ahead of the day's users (cursor, users): {ahead:?}"
    );
    assert_eq!(
        read(&mut redis.connect()),
        (sent, sent as i64),
        "every user counted once"
    );
}

/// `/stats/windows` on `d`, once it answers for the deployment.
fn deployment_windows(d: &Daemon, path: &str) -> Value {
    let r = d.get(path);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

/// An operator watches the live figures of two instances behind a load
/// balancer. On either, the rolling windows are the deployment's: a user
/// or a session that reached both counts once, page views and a
/// configured window's groups add up. Someone flushes Redis: each
/// instance writes its windows again, and the same answer comes back.
#[test]
fn rolling_windows_answer_for_the_deployment_and_heal_after_a_flush() {
    let Some(redis) = RedisServer::start(RedisOptions::default()) else {
        return;
    };
    let plays = "[[windows]]\nname = \"plays\"\nminutes = 10\nevent_types = [\"play\"]\n\
                 group_by = \"properties.content_id\"\nsum = \"properties.seconds\"\n";
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Daemon::start(dir_a.path(), &instance_config(&redis, "a", plays));
    let b = Daemon::start(dir_b.path(), &instance_config(&redis, "b", plays));
    // No timestamps: the events happen now.
    let view = |id: &str, user: &str, session: &str, page: &str| {
        json!({"event_id": id, "event_type": "page_view", "user_id": user,
            "session_id": session, "properties": {"page": page}})
    };
    let play = |id: &str, user: &str, session: &str, content: &str, seconds: f64| {
        json!({"event_id": id, "event_type": "play", "user_id": user, "session_id": session,
            "properties": {"content_id": content, "seconds": seconds}})
    };
    let through_a = [
        view("a1", "ann", "s1", "/pricing"),
        view("a2", "bob", "s2", "/pricing"),
        view("a3", "ann", "s1", "/docs"),
        play("a4", "ann", "s1", "c1", 30.0),
    ];
    let through_b = [
        view("b1", "ann", "s1", "/pricing"),
        view("b2", "cy", "s3", "/docs"),
        play("b3", "cy", "s3", "c1", 12.5),
        play("b4", "cy", "s3", "c2", 5.0),
    ];
    for (d, events) in [(&a, &through_a), (&b, &through_b)] {
        let r = d.post_json("/webhook/batch", &json!({"events": events}));
        assert_eq!(r.status, 202, "{}", r.text());
    }
    // Each instance alone sees only its part: a has 2 users, b has 2.
    let expected = json!({
        "active_users_5m": 3, "active_sessions_5m": 3, "page_views_15m": 5,
        "top_pages_15m": [{"page": "/pricing", "views": 3}, {"page": "/docs", "views": 2}],
        "scope": "deployment", "exact": true, "custom": ["plays"],
    });
    let expected_plays = json!([
        {"key": "c1", "count": 2, "sum": 42.5},
        {"key": "c2", "count": 1, "sum": 5.0},
    ]);
    let both_answer = |when: &str| {
        for d in [&a, &b] {
            eventually(
                Duration::from_secs(10),
                &format!("the deployment's windows {when}"),
                || deployment_windows(d, "/stats/windows") == expected,
            );
            eventually(
                Duration::from_secs(10),
                &format!("the deployment's plays {when}"),
                || {
                    let w = deployment_windows(d, "/stats/windows/plays");
                    w["scope"] == "deployment" && w["groups"] == expected_plays
                },
            );
        }
    };
    both_answer("at first");

    // An instance that last published an hour ago holds nothing in the
    // windows: its hashes (planted here) are not read.
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let hour_ago_ms = ((now - 3600) * 1000).to_string();
    redis.command(&["SADD", "test:instances", "ghost"]);
    redis.command(&["HSET", "test:figures:ghost", "updated_ms", &hour_ago_ms]);
    redis.command(&[
        "HSET",
        &format!("test:winp:{}:ghost", now / 60),
        "/pricing",
        "100",
    ]);
    both_answer("beside a long-gone instance");

    redis.command(&["FLUSHALL"]);
    assert_eq!(
        redis
            .command(&["KEYS", "test:win*"])
            .as_array()
            .map(|k| k.len()),
        Some(0)
    );
    both_answer("after the flush");
    for d in [&a, &b] {
        // Healed twice: at start, and after the flush.
        eventually(Duration::from_secs(10), "the second heal counted", || {
            d.get("/metrics")
                .text()
                .contains("inletd_redis_window_heals_total 2")
        });
    }
}

/// Two instances take a shop's purchases behind a load balancer. On
/// either, trends and top events by revenue over recent days are the
/// deployment's: counts and sums add up, a buyer who reached both counts
/// once, of every type or of purchases only. Someone flushes Redis: the
/// same answers come back by themselves.
#[test]
fn trends_and_top_events_by_sum_answer_for_the_deployment() {
    let Some(redis) = RedisServer::start(RedisOptions::default()) else {
        return;
    };
    let extra = "sum_fields = [\"properties.amount\"]\n";
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Daemon::start(dir_a.path(), &instance_config(&redis, "a", extra));
    let b = Daemon::start(dir_b.path(), &instance_config(&redis, "b", extra));
    let now = time::OffsetDateTime::now_utc();
    let (today, yesterday) = (now.date(), (now - time::Duration::days(1)).date());
    let event = |id: &str, event_type: &str, user: &str, day: time::Date, amount: f64| {
        json!({"event_id": id, "event_type": event_type, "user_id": user,
            "timestamp": format!("{day}T12:00:00Z"), "properties": {"amount": amount}})
    };
    let through_a = [
        event("a1", "purchase", "ann", yesterday, 10.5),
        event("a2", "purchase", "bob", yesterday, 5.0),
        event("a3", "purchase", "ann", today, 1.0),
    ];
    let through_b = [
        event("b1", "purchase", "ann", yesterday, 2.0),
        event("b2", "purchase", "cy", yesterday, 3.0),
        event("b3", "purchase", "dee", today, 4.0),
        event("b4", "visit", "eve", today, 0.0),
    ];
    for (d, events) in [(&a, &through_a[..]), (&b, &through_b[..])] {
        let r = d.post_json("/webhook/batch", &json!({"events": events}));
        assert_eq!(r.status, 202, "{}", r.text());
    }
    let range = format!("from={yesterday}&to={today}");
    let purchases = json!([
        {"period": yesterday.to_string(), "count": 4, "users": 3, "sum": 20.5, "skipped": 0, "exact": true},
        {"period": today.to_string(), "count": 2, "users": 2, "sum": 5.0, "skipped": 0, "exact": true},
    ]);
    let everything = json!([
        {"period": yesterday.to_string(), "count": 4, "users": 3, "sum": null, "skipped": null, "exact": true},
        {"period": today.to_string(), "count": 3, "users": 3, "sum": null, "skipped": null, "exact": true},
    ]);
    let by_revenue = json!([
        {"event_type": "purchase", "count": 6, "sum": 25.5},
        {"event_type": "visit", "count": 1, "sum": 0.0},
    ]);
    let answered = |d: &Daemon, path: &str| {
        let r = d.get(path);
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        r.json()
    };
    let both_answer = |when: &str| {
        for d in [&a, &b] {
            eventually(
                Duration::from_secs(10),
                &format!("purchases' trend {when}"),
                || {
                    let t = answered(
                        d,
                        &format!(
                            "/stats/trends?interval=day&{range}&event_type=purchase&sum=properties.amount"
                        ),
                    );
                    t["scope"] == "deployment" && t["series"] == purchases && t["skipped"] == 0
                },
            );
            eventually(
                Duration::from_secs(10),
                &format!("the whole trend {when}"),
                || {
                    let t = answered(d, &format!("/stats/trends?interval=day&{range}"));
                    t["scope"] == "deployment" && t["series"] == everything
                },
            );
            eventually(
                Duration::from_secs(10),
                &format!("top events by revenue {when}"),
                || {
                    let t = answered(
                        d,
                        &format!("/stats/top-events?{range}&by=sum&sum=properties.amount"),
                    );
                    t["scope"] == "deployment" && t["events"] == by_revenue
                },
            );
        }
    };
    both_answer("at first");
    redis.command(&["FLUSHALL"]);
    both_answer("after the flush");
}

/// Users come back through whichever instance the load balancer picks.
/// On either instance, the cohorts of the days shared (`shared_days`) are
/// the deployment's: a
/// user's cohort is their first day anywhere, so one first seen long ago
/// through b is no newcomer when a sees them. Someone flushes Redis: the
/// same cohorts come back by themselves.
#[test]
fn retention_over_recent_days_answers_for_the_deployment() {
    let Some(redis) = RedisServer::start(RedisOptions::default()) else {
        return;
    };
    // Ten weeks shared, rather than the 31 days by default.
    let config = |instance| {
        instance_config(&redis, instance, "").replace("[redis]\n", "[redis]\nshared_days = 70\n")
    };
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Daemon::start(dir_a.path(), &config("a"));
    let b = Daemon::start(dir_b.path(), &config("b"));
    let day = |ago: i64| (time::OffsetDateTime::now_utc() - time::Duration::days(ago)).date();
    let visit = |id: &str, user: &str, ago: i64| {
        json!({"event_id": id, "event_type": "visit", "user_id": user,
            "timestamp": format!("{}T12:00:00Z", day(ago))})
    };
    // ann: first through a 3 days ago, back through b yesterday and a
    // today. bob: first through b 2 days ago, back yesterday. cy: first
    // through b 5 days ago, then through a 2 days ago (a's first of cy).
    // dee: first through a 60 days ago, back through b a week later.
    let through_a = [
        visit("a1", "ann", 3),
        visit("a2", "ann", 0),
        visit("a3", "cy", 2),
        visit("a4", "dee", 60),
    ];
    let through_b = [
        visit("b1", "ann", 1),
        visit("b2", "bob", 2),
        visit("b3", "bob", 1),
        visit("b4", "cy", 5),
        visit("b5", "dee", 53),
    ];
    for (d, events) in [(&a, &through_a[..]), (&b, &through_b[..])] {
        let r = d.post_json("/webhook/batch", &json!({"events": events}));
        assert_eq!(r.status, 202, "{}", r.text());
    }
    let path = format!(
        "/stats/retention?start_date={}&windows=4&window_type=daily",
        day(3)
    );
    let expected = json!([
        {"cohort": day(3).to_string(), "size": 1, "retained": [1, 0, 1, 1]},
        {"cohort": day(2).to_string(), "size": 1, "retained": [1, 1, 0]},
        {"cohort": day(1).to_string(), "size": 0, "retained": [0, 0]},
        {"cohort": day(0).to_string(), "size": 0, "retained": [0]},
    ]);
    let weekly = format!(
        "/stats/retention?start_date={}&windows=2&window_type=weekly",
        day(60)
    );
    let expected_weekly = json!([
        {"cohort": day(60).to_string(), "size": 1, "retained": [1, 1]},
        {"cohort": day(53).to_string(), "size": 0, "retained": [0]},
    ]);
    let both_answer = |when: &str| {
        for d in [&a, &b] {
            eventually(
                Duration::from_secs(10),
                &format!("the deployment's cohorts {when}"),
                || {
                    let r = d.get(&path).json();
                    r["scope"] == "deployment" && r["cohorts"] == expected
                },
            );
            eventually(
                Duration::from_secs(10),
                &format!("weeks of the deployment {when}"),
                || {
                    let r = d.get(&weekly).json();
                    r["scope"] == "deployment" && r["cohorts"] == expected_weekly
                },
            );
        }
    };
    both_answer("at first");
    redis.command(&["FLUSHALL"]);
    both_answer("after the flush");
    // Windows older than the days shared are this instance's, and say so.
    let old = a
        .get(&format!(
            "/stats/retention?start_date={}&windows=2&window_type=weekly",
            day(80)
        ))
        .json();
    assert_eq!(old["scope"], "instance", "{old}");
}

/// A sender names an event type `purchase:over`, the shape of the mark a
/// day's set gets past `dau_exact_max`. It is a type like any other: its
/// users are counted exactly and Redis is never taken for down.
#[test]
fn an_event_type_ending_in_over_is_a_type_like_any_other() {
    let Some(redis) = RedisServer::start(RedisOptions::default()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config =
        instance_config(&redis, "a", "").replace("[redis]\n", "[redis]\ndau_exact_max = 1\n");
    let a = Daemon::start(dir.path(), &config);
    let event = |id: &str, event_type: &str, user: &str| json!({"event_id": id, "event_type": event_type, "user_id": user});
    // Two buyers today: purchases are past the cap of 1, and marked so.
    let events = [
        event("p1", "purchase", "u1"),
        event("p2", "purchase", "u2"),
        event("o1", "purchase:over", "u3"),
    ];
    let r = a.post_json("/webhook/batch", &json!({"events": events}));
    assert_eq!(r.status, 202, "{}", r.text());
    let today = time::OffsetDateTime::now_utc().date();
    let users = |event_type: &str| {
        let t = a
            .get(&format!(
                "/stats/trends?interval=day&from={today}&to={today}&event_type={event_type}"
            ))
            .json();
        (
            t["scope"].clone(),
            t["series"][0]["users"].clone(),
            t["series"][0]["exact"].clone(),
        )
    };
    eventually(Duration::from_secs(10), "purchases estimated", || {
        users("purchase") == (json!("deployment"), json!(2), json!(false))
    });
    eventually(Duration::from_secs(10), "purchase:over exact", || {
        users("purchase%3Aover") == (json!("deployment"), json!(1), json!(true))
    });
    // A few more rounds: none failed.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(health(&a)["redis"]["state"], "up");
    assert!(
        a.get("/metrics")
            .text()
            .contains("inletd_redis_outages_total 0"),
        "{}",
        a.log_text()
    );
}

#[test]
fn a_password_and_a_key_prefix_are_used_and_a_wrong_password_is_reported() {
    let Some(redis) = RedisServer::start(RedisOptions {
        password: Some("s3cret".into()),
        ..RedisOptions::default()
    }) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path(), &redis, "a", "");
    assert_eq!(d.post_json("/webhook/events", &event("p1")).status, 202);
    let keys = redis.command(&["KEYS", "*"]);
    let mut keys: Vec<String> = keys
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_text().unwrap())
        .collect();
    keys.sort();
    assert!(keys.iter().all(|k| k.starts_with("test:")), "{keys:?}");
    assert!(
        keys.contains(&"test:idem:default:p1".to_owned()),
        "{keys:?}"
    );
    let h = health(&d);
    assert_eq!(h["redis"]["state"], "up", "{h}");
    assert!(
        !h.to_string().contains("s3cret"),
        "the password is never shown: {h}"
    );
    let checked = std::process::Command::new(env!("CARGO_BIN_EXE_inletd"))
        .args(["check-config", "--config"])
        .arg(&d.config_path)
        .output()
        .expect("run inletd check-config");
    let shown = String::from_utf8_lossy(&checked.stdout);
    assert!(checked.status.success(), "{shown}");
    assert!(
        shown.contains("[redis]") || shown.contains("redis"),
        "{shown}"
    );
    assert!(!shown.contains("s3cret"), "{shown}");

    // A wrong password: intake goes on alone, and /health says why.
    let dir = tempfile::tempdir().unwrap();
    let url = redis.url().replace("s3cret", "wrong");
    let wrong = Daemon::start(
        dir.path(),
        &format!("[redis]\nurl = \"{url}\"\ninstance = \"w\"\n"),
    );
    assert_eq!(wrong.post_json("/webhook/events", &event("w1")).status, 202);
    let h = health(&wrong);
    assert_eq!(h["redis"]["state"], "down", "{h}");
    let error = h["redis"]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_lowercase();
    assert!(
        error.contains("auth") || error.contains("password") || error.contains("pass"),
        "{h}"
    );
    assert_eq!(wrong.get("/ready").status, 200);
}

#[test]
fn the_redis_stream_sink_adds_every_processed_event() {
    let Some(redis) = RedisServer::start(RedisOptions::default()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let sinks = "[[sinks]]\nname = \"fanout\"\ntype = \"redis-stream\"\nstream = \"events:out\"\nmaxlen = 10000\n";
    let d = start(dir.path(), &redis, "a", sinks);
    let batch = json!({"events": (0..25).map(|i| event(&format!("s{i}"))).collect::<Vec<_>>()});
    assert_eq!(d.post_json("/webhook/batch", &batch).status, 202);
    eventually(Duration::from_secs(10), "25 stream entries", || {
        redis.command(&["XLEN", "events:out"]).as_int() == Some(25)
    });
    let entries = redis.command(&["XRANGE", "events:out", "-", "+", "COUNT", "1"]);
    let first = &entries.as_array().unwrap()[0].as_array().unwrap()[1];
    let fields: Vec<String> = first
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_text().unwrap())
        .collect();
    assert_eq!(fields[0], "event");
    let body: Value = serde_json::from_str(&fields[1]).unwrap();
    assert_eq!(body["event_id"], "s0");
    assert_eq!(
        &fields[2..],
        ["event_type", "signup", "source", "default", "key", "s0"]
    );
}

/// Two instances, a and b, of one deployment on a Redis that persists,
/// both delivering to a dashboard that takes 20 ms a request of
/// `batch_size` events; a's heartbeat lasts 1.5 s (`takeover_after_ms`).
struct SlowDeployment {
    redis: RedisServer,
    sink: SinkServer,
    dir_a: tempfile::TempDir,
    _dir_b: tempfile::TempDir,
    a: Daemon,
    b: Daemon,
}

impl SlowDeployment {
    /// `None` where redis-server cannot run (`RedisServer::start`).
    fn start(batch_size: usize) -> Option<SlowDeployment> {
        let redis = RedisServer::start(RedisOptions {
            appendonly: true,
            ..RedisOptions::default()
        })?;
        let sink = SinkServer::start(Box::new(|_| {
            std::thread::sleep(Duration::from_millis(20));
            200
        }));
        let sinks = format!("batch_size = {batch_size}\n{}", http_sink(&sink.url()));
        let config = |instance| {
            let mut c = instance_config(&redis, instance, &sinks);
            c.push_str("takeover_after_ms = 1500\n");
            c
        };
        let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = Daemon::start(dir_a.path(), &config("a"));
        let b = Daemon::start(dir_b.path(), &config("b"));
        Some(SlowDeployment {
            redis,
            sink,
            dir_a,
            _dir_b: dir_b,
            a,
            b,
        })
    }
}

/// The ids of the events `sink` was delivered, each once.
fn delivered_ids(sink: &SinkServer) -> std::collections::HashSet<String> {
    sink.events()
        .iter()
        .filter_map(|e| e["event_id"].as_str().map(str::to_owned))
        .collect()
}

/// Posts batches of 25 new events to `d` from 4 threads until `stop`;
/// answers every event id it holds a 202 for.
fn load_until(d: &Daemon, stop: &std::sync::atomic::AtomicBool, prefix: &str) -> Vec<String> {
    use std::sync::atomic::Ordering;
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..4)
            .map(|w| {
                scope.spawn(move || {
                    let mut acked = Vec::new();
                    let mut n = 0;
                    while !stop.load(Ordering::SeqCst) {
                        let ids: Vec<String> =
                            (0..25).map(|i| format!("{prefix}-{w}-{n}-{i}")).collect();
                        n += 1;
                        let events: Vec<Value> = ids.iter().map(|id| event(id)).collect();
                        let r = common::http::try_request(
                            d.addr,
                            "POST",
                            "/webhook/batch",
                            &[("Content-Type", "application/json")],
                            json!({ "events": events }).to_string().as_bytes(),
                        );
                        // A request cut by the kill was not acknowledged.
                        let Ok(r) = r else { break };
                        if r.status == 202 && r.json()["accepted"] == 25 {
                            acked.extend(ids);
                        }
                    }
                    acked
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("a load thread panicked"))
            .collect()
    })
}

#[test]
fn an_instance_killed_under_load_has_what_it_acknowledged_delivered_and_counted_by_another() {
    // A dashboard that takes 20 ms a request of 20 events: instance a
    // falls behind its intake, so it dies with a queue.
    let Some(SlowDeployment {
        redis,
        sink,
        dir_a,
        mut a,
        b,
        ..
    }) = SlowDeployment::start(20)
    else {
        return;
    };

    // Under load, a is killed -9 and not restarted.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let acked = std::thread::scope(|scope| {
        let load = scope.spawn(|| load_until(&a, &stop, "k"));
        // A queue of a few thousand: a few seconds of the slow dashboard,
        // so the 30 s bound holds on a busy CI machine too.
        std::thread::sleep(Duration::from_millis(400));
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        load.join().expect("load")
    });
    let queued = a.get("/admin/queue").json();
    assert!(
        queued["depth"].as_u64().unwrap_or(0) > 0,
        "a has processed everything already; the test needs a queue: {queued}"
    );
    a.kill9();
    let killed = Instant::now();
    assert!(
        acked.len() >= 100,
        "only {} events acknowledged",
        acked.len()
    );

    // b delivers every event a acknowledged, within the lease plus 30 s.
    eventually(
        Duration::from_secs(32),
        "every acknowledged event delivered",
        || {
            let seen = delivered_ids(&sink);
            acked.iter().all(|id| seen.contains(id))
        },
    );
    eprintln!(
        "{} acknowledged, {} queued at the kill; all delivered {:?} after it",
        acked.len(),
        queued["depth"],
        killed.elapsed()
    );

    // And counted once: the deployment's total is what a acknowledged,
    // whatever a had counted locally since its last publish.
    let total = acked.len() as u64;
    // 30 s, as for the delivery above: a busy 2-core CI machine is slow.
    wait_for_deployment_total(&b, total, Duration::from_secs(30));
    let s = summary(&b);
    assert_eq!(s["local"]["total_events"], 0, "{s}");
    assert_eq!(s["by_type"]["signup"], total, "{s}");
    let metrics = b.get("/metrics").text();
    let taken: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("inletd_redis_taken_events_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no taken-events metric: {metrics}"));
    assert!(taken > 0, "b took nothing over: {metrics}");
    eprintln!("b took {taken} events over");
    // Only a trims its own stream; taken over, it is left to expire with
    // the idempotency window (a that came back would keep it).
    eventually(Duration::from_secs(5), "a's stream set to expire", || {
        redis
            .command(&["PTTL", "test:wal:a"])
            .as_int()
            .is_some_and(|ms| ms > 0)
    });
    // Every user, also of the events a counted before it died: a shared
    // them before it published the cursor b started from. (When a
    // published first, a kill between the two writes once left this
    // short for good.)
    eventually(
        Duration::from_secs(30),
        "the users taken over count in the DAU",
        || {
            let dau = b.get("/stats/dau").json();
            dau["days"][29]["users"] == total
        },
    );

    // a comes back: it counts its queue but does not deliver again what b
    // delivered for it, and its own figures replace what b added for it,
    // counted once.
    let delivered_before = sink.events().len();
    let a = Daemon::start_with(dir_a.path(), &a.config_path, &[]);
    a.wait_processed(Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        sink.events().len(),
        delivered_before,
        "a delivered again what b had delivered for it"
    );
    assert!(
        a.log_text().contains("not delivered again"),
        "{}",
        a.log_text()
    );
    wait_for_deployment_total(&b, total, Duration::from_secs(10));
    wait_for_deployment_total(&a, total, Duration::from_secs(10));
    assert_eq!(summary(&a)["local"]["total_events"], total);
    let r = b.post_json("/webhook/events", &event(&acked[0]));
    assert_eq!(r.json()["status"], "duplicate", "{}", r.text());
}

#[test]
fn a_redis_flushed_under_load_loses_nothing_and_takes_over_no_live_instance() {
    // Redis without persistence: a FLUSHALL, like its restart, forgets the
    // streams, the figures and every heartbeat at once.
    let Some(redis) = RedisServer::start(RedisOptions::default()) else {
        return;
    };
    let sink = SinkServer::start(Box::new(|_| {
        std::thread::sleep(Duration::from_millis(5));
        200
    }));
    let sinks = format!("batch_size = 20\n{}", http_sink(&sink.url()));
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Daemon::start(dir_a.path(), &instance_config(&redis, "a", &sinks));
    let b = Daemon::start(dir_b.path(), &instance_config(&redis, "b", &sinks));

    // Someone flushes Redis twenty times while a takes events and works
    // through its queue.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let acked = std::thread::scope(|scope| {
        let load = scope.spawn(|| load_until(&a, &stop, "f"));
        for _ in 0..20 {
            std::thread::sleep(Duration::from_millis(150));
            redis.command(&["FLUSHALL"]);
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        load.join().expect("load")
    });

    // Processing stays with a: nothing acknowledged is lost, each event is
    // delivered once, and the deployment's total is exact again.
    a.wait_processed(Duration::from_secs(60));
    let distinct = delivered_ids(&sink);
    assert!(acked.iter().all(|id| distinct.contains(id)));
    assert_eq!(
        sink.events().len(),
        acked.len(),
        "an event was delivered twice"
    );
    wait_for_deployment_total(&b, acked.len() as u64, Duration::from_secs(10));
    // No live instance was taken for a stopped one.
    for d in [&a, &b] {
        let metrics = d.get("/metrics").text();
        assert!(
            metrics.contains("inletd_redis_takeovers_total 0\n"),
            "{metrics}"
        );
    }
}

/// The cursor a's figures in Redis count up to.
fn published_cursor(redis: &RedisServer, instance: &str) -> u64 {
    redis
        .command(&["HGET", &format!("test:figures:{instance}"), "cursor"])
        .as_text()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_takeover_slower_than_its_lock_and_an_instance_that_comes_back_and_dies_again_count_once() {
    // 20 ms a request of 10 events: a chunk of 1,000 takes about 2 s to
    // deliver, longer than the 1.5 s lock on the instance taken over.
    let Some(SlowDeployment {
        redis,
        sink,
        dir_a,
        mut a,
        b,
        ..
    }) = SlowDeployment::start(10)
    else {
        return;
    };

    // a takes 5 batches of 1,000 events, one group commit each, and dies.
    let mut acked: Vec<String> = Vec::new();
    for n in 0..5 {
        let ids: Vec<String> = (0..1000).map(|i| format!("big-{n}-{i}")).collect();
        let events: Vec<Value> = ids.iter().map(|id| event(id)).collect();
        let r = a.post_json("/webhook/batch", &json!({ "events": events }));
        assert_eq!(r.json()["accepted"], 1000, "{}", r.text());
        acked.extend(ids);
    }
    a.kill9();
    let published = published_cursor(&redis, "a");

    // b records at least one chunk although each outlasts its lock.
    eventually(Duration::from_secs(30), "b records a chunk", || {
        published_cursor(&redis, "a") >= published + 1000
    });
    let taken = published_cursor(&redis, "a");

    // a comes back, publishes its own (lower) cursor, and dies again
    // before it has caught up.
    let mut a = Daemon::start_with(dir_a.path(), &a.config_path, &[]);
    eventually(
        Duration::from_secs(10),
        "a publishes its own cursor",
        || published_cursor(&redis, "a") < taken,
    );
    a.kill9();

    // b takes over again from a's cursor: every event is delivered, and
    // the deployment counts each once.
    let total = acked.len() as u64;
    eventually(
        Duration::from_secs(60),
        "every acknowledged event delivered",
        || {
            let seen = delivered_ids(&sink);
            acked.iter().all(|id| seen.contains(id))
        },
    );
    wait_for_deployment_total(&b, total, Duration::from_secs(30));
    let s = summary(&b);
    assert_eq!(s["by_type"]["signup"], total, "{s}");
}

/// The event ids in `d`'s DLQ, every page.
fn dlq_ids(d: &Daemon) -> std::collections::HashSet<String> {
    let mut ids = std::collections::HashSet::new();
    let mut after = 0;
    loop {
        let page = d
            .get(&format!("/admin/dlq?after={after}&limit=1000"))
            .json();
        let entries = page["entries"].as_array().cloned().unwrap_or_default();
        if entries.is_empty() {
            return ids;
        }
        for e in &entries {
            ids.insert(e["record"]["key"].as_str().unwrap_or_default().to_owned());
        }
        after = page["next_after"].as_u64().expect("a page names the next");
    }
}

#[test]
fn what_a_taker_cannot_deliver_waits_in_its_own_dlq_and_counts_once() {
    let Some(redis) = RedisServer::start(RedisOptions {
        appendonly: true,
        ..RedisOptions::default()
    }) else {
        return;
    };
    // a's dashboard is slow, so a dies with a queue; b's is down.
    let slow = SinkServer::start(Box::new(|_| {
        std::thread::sleep(Duration::from_millis(20));
        200
    }));
    let down = SinkServer::start(Box::new(|_| 500));
    let config = |instance, sink: &SinkServer| {
        let extra = format!(
            "batch_size = 20\nmax_retries = 0\n{}",
            http_sink(&sink.url())
        );
        let mut c = instance_config(&redis, instance, &extra);
        c.push_str("takeover_after_ms = 1500\n");
        c
    };
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = Daemon::start(dir_a.path(), &config("a", &slow));
    let b = Daemon::start(dir_b.path(), &config("b", &down));
    let mut acked = Vec::new();
    for n in 0..8 {
        let ids: Vec<String> = (0..100).map(|i| format!("dl-{n}-{i}")).collect();
        let events: Vec<Value> = ids.iter().map(|id| event(id)).collect();
        let r = a.post_json("/webhook/batch", &json!({ "events": events }));
        assert_eq!(r.json()["accepted"], 100, "{}", r.text());
        acked.extend(ids);
    }
    let queued = a.get("/admin/queue").json()["depth"].as_u64().unwrap_or(0);
    assert!(queued > 0, "a has processed everything already");
    a.kill9();

    // Every event a acknowledged reached a's dashboard before the kill or
    // waits in b's DLQ, to be replayed there; the deployment counts each
    // once, as an instance counts what it parks.
    let total = acked.len() as u64;
    wait_for_deployment_total(&b, total, Duration::from_secs(30));
    let parked = dlq_ids(&b);
    assert!(!parked.is_empty(), "b parked nothing");
    let delivered = delivered_ids(&slow);
    let lost: Vec<&String> = acked
        .iter()
        .filter(|id| !delivered.contains(*id) && !parked.contains(*id))
        .collect();
    assert!(
        lost.is_empty(),
        "{} events neither delivered nor parked: {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    assert!(
        parked.len() as u64 >= queued,
        "{} parked, {queued} queued",
        parked.len()
    );
    let s = summary(&b);
    assert_eq!(s["local"]["total_events"], 0, "{s}");
    assert_eq!(s["dlq_size"], parked.len(), "{s}");
}
