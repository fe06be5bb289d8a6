//! Signed sources against the real binary: Standard Webhooks (secret from
//! a file), GitHub and Stripe. A forged, stale, truncated or missing
//! signature is a 401 that stores nothing; a good one is taken, and a
//! replay of it is a duplicate.

mod common;

use std::time::Duration;

use common::{Daemon, Response};
use inletd::signature::sign;
use serde_json::json;

const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn now() -> i64 {
    inletd::event::now_ms() / 1000
}

fn start(dir: &std::path::Path) -> Daemon {
    let secret_file = dir.join("svix.secret");
    std::fs::write(&secret_file, format!("{WHSEC}\n")).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let extra = format!(
        "[[sources]]\nname = \"svix\"\nverify = \"standard-webhooks\"\nsecret_file = \"{}\"\n\
         [[sources]]\nname = \"gh\"\nverify = \"github\"\nsecret = \"gh-secret\"\n\
         [[sources]]\nname = \"stripe\"\nverify = \"stripe\"\nsecret = \"whsec_stripe\"\n",
        secret_file.display()
    );
    Daemon::start(dir, &extra)
}

fn post(d: &Daemon, path: &str, headers: &[(&str, &str)], body: &str) -> Response {
    let mut all = vec![("Content-Type", "application/json")];
    all.extend_from_slice(headers);
    d.request("POST", path, &all, body.as_bytes())
}

fn assert_401(r: &Response, what: &str) {
    assert_eq!(r.status, 401, "{what}: {}", r.text());
    let b = r.json();
    assert_eq!(b["error"], "bad_signature", "{what}");
    assert!(
        b["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "{what}"
    );
}

/// A Standard Webhooks sender: signed requests are taken (the webhook-id is
/// the idempotency key, so a replay is a duplicate); every kind of bad
/// signature is refused and changes nothing.
#[test]
fn standard_webhooks_signatures_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path());
    let body = json!({"event_type": "invoice.paid", "user_id": "u1"}).to_string();
    let ts = now();
    let ts_text = ts.to_string();
    let good = sign::standard(WHSEC, "msg_1", ts, body.as_bytes()).unwrap();
    fn headers<'a>(ts: &'a str, sig: &'a str) -> Vec<(&'static str, &'a str)> {
        vec![
            ("webhook-id", "msg_1"),
            ("webhook-timestamp", ts),
            ("webhook-signature", sig),
        ]
    }

    // Key rotation: an unknown signature before the good one.
    let rotated = format!("v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA= {good}");

    let r = post(
        &d,
        "/webhook/svix/events",
        &headers(&ts_text, &rotated),
        &body,
    );
    assert_eq!(
        (r.status, r.json()["event_id"].clone()),
        (202, json!("msg_1")),
        "{}",
        r.text()
    );
    assert_eq!(
        post(&d, "/webhook/svix/events", &headers(&ts_text, &good), &body).status,
        200,
        "a replay is a duplicate"
    );

    let tampered = body.replace("u1", "u2");
    assert_401(
        &post(
            &d,
            "/webhook/svix/events",
            &headers(&ts_text, &good),
            &tampered,
        ),
        "tampered body",
    );
    for sig in ["v1,", "v1", "", "v2,abc", "v1,not-base64!"] {
        assert_401(
            &post(&d, "/webhook/svix/events", &headers(&ts_text, sig), &body),
            sig,
        );
    }
    // Just past the 300 s tolerance either way, from the clock read now: a
    // future stamp read before the earlier requests could come within it
    // by the time the daemon checks it on a slow machine.
    for skew in [-301, 330] {
        let t = now() + skew;
        let sig = sign::standard(WHSEC, "msg_2", t, body.as_bytes()).unwrap();
        let t = t.to_string();
        let h = [
            ("webhook-id", "msg_2"),
            ("webhook-timestamp", t.as_str()),
            ("webhook-signature", sig.as_str()),
        ];
        assert_401(
            &post(&d, "/webhook/svix/events", &h, &body),
            "skewed timestamp",
        );
    }
    assert_401(&post(&d, "/webhook/svix/events", &[], &body), "no headers");
    let batch = json!({"events": [{"event_id": "b1", "event_type": "t"}]}).to_string();
    assert_401(
        &post(&d, "/webhook/svix/batch", &[], &batch),
        "unsigned batch",
    );

    d.wait_processed(Duration::from_secs(10));
    assert_eq!(
        d.get("/stats/summary").json()["total_events"],
        1,
        "only the signed event was stored"
    );
    assert!(
        !d.log_text().contains("readable by other users"),
        "a 0600 secret file raises no warning"
    );
}

/// GitHub's and Stripe's presets.
#[test]
fn github_and_stripe_signatures_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path());
    let body = json!({"event_id": "push-1", "event_type": "push"}).to_string();
    let gh = sign::github("gh-secret", body.as_bytes()).unwrap();
    assert_eq!(
        post(
            &d,
            "/webhook/gh/events",
            &[("X-Hub-Signature-256", &gh)],
            &body
        )
        .status,
        202
    );
    let wrong = sign::github("other", body.as_bytes()).unwrap();
    assert_401(
        &post(
            &d,
            "/webhook/gh/events",
            &[("X-Hub-Signature-256", &wrong)],
            &body,
        ),
        "github wrong key",
    );
    assert_401(
        &post(
            &d,
            "/webhook/gh/events",
            &[("X-Hub-Signature-256", "sha256=")],
            &body,
        ),
        "github empty",
    );

    let body = json!({"event_id": "evt_1", "event_type": "charge.succeeded"}).to_string();
    let st = sign::stripe("whsec_stripe", now(), body.as_bytes()).unwrap();
    assert_eq!(
        post(
            &d,
            "/webhook/stripe/events",
            &[("Stripe-Signature", &st)],
            &body
        )
        .status,
        202
    );
    let old = sign::stripe("whsec_stripe", now() - 600, body.as_bytes()).unwrap();
    assert_401(
        &post(
            &d,
            "/webhook/stripe/events",
            &[("Stripe-Signature", &old)],
            &body,
        ),
        "stripe stale",
    );
    assert_401(
        &post(
            &d,
            "/webhook/stripe/events",
            &[("Stripe-Signature", "t=1,v1=")],
            &body,
        ),
        "stripe truncated",
    );
    // The unsigned default source is unaffected.
    assert_eq!(
        post(
            &d,
            "/webhook/events",
            &[],
            &json!({"event_id": "d", "event_type": "t"}).to_string()
        )
        .status,
        202
    );
}

/// A signed source needs its secret; a secret file readable by others is
/// warned about at start.
#[test]
fn signed_sources_need_a_secret_and_a_private_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::write_config(
        dir.path(),
        "[[sources]]\nname = \"s\"\nverify = \"github\"\n",
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_inletd"))
        .args(["--config", path.to_str().unwrap(), "check-config"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("sources[0].secret"));

    let secret = dir.path().join("open.secret");
    std::fs::write(&secret, "s3cret").unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let extra = format!(
        "[[sources]]\nname = \"s\"\nverify = \"github\"\nsecret_file = \"{}\"\n",
        secret.display()
    );
    let d = Daemon::start(dir.path(), &extra);
    common::eventually(
        Duration::from_secs(5),
        "a warning about the secret file",
        || d.log_text().contains("readable by other users"),
    );
}
