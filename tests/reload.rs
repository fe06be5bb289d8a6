//! SIGHUP against the real binary: a changed source secret takes effect
//! without a restart; a broken file is refused and the daemon keeps running
//! on the old configuration; restart-only keys say so.

mod common;

use std::time::Duration;

use common::{Daemon, RawConnection, eventually, signal};
use inletd::signature::sign;
use serde_json::json;

fn source(secret: &str) -> String {
    format!("[[sources]]\nname = \"gh\"\nverify = \"github\"\nsecret = \"{secret}\"\n")
}

fn post_signed(d: &Daemon, id: &str, secret: &str) -> u16 {
    let body = json!({"event_id": id, "event_type": "push"}).to_string();
    let sig = sign::github(secret, body.as_bytes()).unwrap();
    let headers = [
        ("Content-Type", "application/json"),
        ("X-Hub-Signature-256", sig.as_str()),
    ];
    d.request("POST", "/webhook/gh/events", &headers, body.as_bytes())
        .status
}

/// The operator rotates a source's secret and reloads: the new secret is
/// checked from then on, the old one refused, with no restart.
#[test]
fn a_changed_secret_takes_effect_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &source("old-secret"));
    let pid = d.child.id();
    assert_eq!(post_signed(&d, "a", "old-secret"), 202);
    assert_eq!(post_signed(&d, "b", "new-secret"), 401);

    common::write_config(
        dir.path(),
        &format!("batch_size = 7\n{}", source("new-secret")),
    );
    signal(&d.child, "HUP");
    eventually(Duration::from_secs(10), "the reload is logged", || {
        d.log_text().contains("configuration reloaded")
    });
    assert_eq!(post_signed(&d, "c", "new-secret"), 202);
    assert_eq!(post_signed(&d, "d", "old-secret"), 401);
    assert_eq!(d.child.id(), pid);
    assert_eq!(d.get("/health").status, 200);
}

/// A request whose headers came in before the secret was rotated, and its
/// body after, is judged whole by the configuration it came in under: the
/// sender signed it with the secret of that moment, and it is accepted.
/// The next request needs the new secret.
#[test]
fn a_request_in_flight_across_a_secret_rotation_is_checked_as_it_came_in() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &source("old-secret"));
    let body = json!({"event_id": "in-flight", "event_type": "push"}).to_string();
    let sig = sign::github("old-secret", body.as_bytes()).unwrap();
    let mut c = RawConnection::open(d.addr).unwrap();
    c.send_bytes(
        format!(
            "POST /webhook/gh/events HTTP/1.1\r\nHost: inletd\r\n\
             Content-Type: application/json\r\nX-Hub-Signature-256: {sig}\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .unwrap();

    common::write_config(dir.path(), &source("new-secret"));
    signal(&d.child, "HUP");
    eventually(Duration::from_secs(10), "the reload is logged", || {
        d.log_text().contains("configuration reloaded")
    });
    c.send_bytes(body.as_bytes()).unwrap();
    let answer = c.read_response().unwrap();
    assert_eq!(answer.status, 202, "{}", answer.text());
    assert_eq!(post_signed(&d, "after", "old-secret"), 401);
    assert_eq!(post_signed(&d, "after", "new-secret"), 202);
}

/// A broken file is refused: the daemon logs why and keeps the old config;
/// a key that needs a restart is named and keeps its old value.
#[test]
fn a_broken_config_is_refused_and_the_old_one_kept() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &source("s1"));
    std::fs::write(&d.config_path, "batch_size = \"many\"\n[[sources]\n").unwrap();
    signal(&d.child, "HUP");
    eventually(Duration::from_secs(10), "the refusal is logged", || {
        d.log_text().contains("reload refused")
    });
    assert_eq!(
        post_signed(&d, "a", "s1"),
        202,
        "the old secret still works"
    );
    assert_eq!(d.get("/ready").status, 200);

    let moved = format!("bind = \"127.0.0.1:1\"\n{}", source("s1"));
    common::write_config(dir.path(), &moved);
    signal(&d.child, "HUP");
    eventually(
        Duration::from_secs(10),
        "the restart-only key is named",
        || {
            d.log_text().contains("only takes effect after a restart")
                && d.log_text().contains("\"bind\"")
        },
    );
    assert_eq!(
        post_signed(&d, "b", "s1"),
        202,
        "still listening where it was"
    );
}
