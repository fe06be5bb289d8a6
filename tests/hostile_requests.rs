//! Hostile single requests the table cannot express, against the real
//! binary: a head over 64 KiB sent in one piece, a signed request replayed
//! under a new `Idempotency-Key`, and bad queries on an admin GET.

mod common;

use std::time::Duration;

use common::{Daemon, RawConnection, request_bytes};
use inletd::signature::sign;
use serde_json::{Value, json};

const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const GH_SECRET: &str = "gh-secret";
/// Longest the oversized head may take to be answered.
const CASE_TIMEOUT: Duration = Duration::from_secs(10);

/// One signed source per scheme the replay test uses.
fn config() -> String {
    format!(
        "[[sources]]\nname = \"svix\"\nverify = \"standard-webhooks\"\nsecret = \"{WHSEC}\"\n\
         [[sources]]\nname = \"gh\"\nverify = \"github\"\nsecret = \"{GH_SECRET}\"\n"
    )
}

fn now() -> i64 {
    inletd::event::now_ms() / 1000
}

fn body(v: &Value) -> Vec<u8> {
    v.to_string().into_bytes()
}

fn event(id: &str) -> Value {
    json!({"event_id": id, "event_type": "hostile", "user_id": "u-hostile"})
}

/// The contract says the head (request line + headers) is at most 64 KiB,
/// 431 above. hyper's `max_buf_size` is only checked before a read, so a
/// head of up to ~112 KiB that arrives in one go is taken.
#[test]
fn a_70_kib_header_is_refused_with_431() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &config());
    let big = "a".repeat(70 * 1024);
    let mut c = RawConnection::open(d.addr).unwrap();
    c.set_read_timeout(CASE_TIMEOUT).unwrap();
    let r = c
        .send_and_read_answer(
            request_bytes(
                d.addr,
                "POST",
                "/webhook/events",
                &[("Content-Type", "application/json"), ("X-Big", &big)],
                &body(&event("h70")),
            ),
            false,
        )
        .unwrap();
    assert_eq!(r.map(|r| r.status), Some(431));
    assert_eq!(d.stored(), 0);
}

/// A captured signed request replayed with a new `Idempotency-Key` header
/// (which no signature covers) must not become a new event: for signed
/// sources the key must come from signed data (`webhook-id`, the body).
#[test]
fn a_signed_request_replayed_with_a_new_idempotency_key_is_not_a_new_event() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &config());
    let ts = now();
    let b = body(&json!({"event_type": "invoice.paid"}));
    let sig = sign::standard(WHSEC, "msg_1", ts, &b).unwrap();
    let tss = ts.to_string();
    let std_headers = [
        ("Content-Type", "application/json"),
        ("webhook-id", "msg_1"),
        ("webhook-timestamp", tss.as_str()),
        ("webhook-signature", sig.as_str()),
    ];
    assert_eq!(
        d.request("POST", "/webhook/svix/events", &std_headers, &b)
            .status,
        202
    );
    let mut replay = std_headers.to_vec();
    replay.push(("Idempotency-Key", "replay-1"));
    let r = d.request("POST", "/webhook/svix/events", &replay, &b);
    assert_ne!(r.status, 202, "svix replay stored again: {}", r.text());

    let gb = body(&event("push-1"));
    let gh = sign::github(GH_SECRET, &gb).unwrap();
    let gh_headers = [
        ("Content-Type", "application/json"),
        ("X-Hub-Signature-256", gh.as_str()),
    ];
    assert_eq!(
        d.request("POST", "/webhook/gh/events", &gh_headers, &gb)
            .status,
        202
    );
    let mut replay = gh_headers.to_vec();
    replay.push(("Idempotency-Key", "replay-2"));
    let r = d.request("POST", "/webhook/gh/events", &replay, &gb);
    assert_ne!(r.status, 202, "github replay stored again: {}", r.text());
    assert_eq!(d.stored(), 2);
}

/// A GET on an admin route with a bad query is a bad request, not a wrong
/// method: `recover()` looks for `MethodNotAllowed` (left by the POST and
/// DELETE routes of the same path) before `InvalidQuery`.
#[test]
fn a_bad_admin_query_is_400_not_405() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &config());
    for q in [
        "/admin/dlq?limit=abc",
        "/admin/dlq?limit=-1",
        "/admin/dlq?after=x",
    ] {
        let r = d.get(q);
        assert_eq!(r.status, 400, "{q}: {}", r.text());
        assert_eq!(r.json()["error"], "invalid_query", "{q}");
    }
}
