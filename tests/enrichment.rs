//! Seed 004's engagement pipeline through the real binary: each play is
//! enriched from a content table, gains derived engagement fields, and
//! feeds a 10-minute "top engaging content" window; the table is read
//! again on SIGHUP, and a bad table is refused naming its line while the
//! old one stays in force.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Daemon, eventually, signal};
use serde_json::{Value, json};

const CONFIG: &str = r#"
[[enrichment]]
name = "content"
file = "CONTENT"
key_column = "id"
match = "properties.content_id"

[[derive]]
field = "derived.engagement_seconds"
divide = ["properties.duration_ms", 1000]

[[derive]]
field = "derived.engagement_pct"
divide = ["derived.engagement_seconds", "enriched.content.length_seconds"]

[[windows]]
name = "top_content_10m"
minutes = 10
event_types = ["play"]
group_by = "properties.content_id"
sum = "derived.engagement_seconds"

[[sinks]]
name = "archive"
type = "file"
path = "SINK"
"#;

fn play(id: &str, content: Option<&str>, duration_ms: Option<u64>) -> Value {
    let mut properties = json!({});
    if let Some(c) = content {
        properties["content_id"] = json!(c);
    }
    if let Some(ms) = duration_ms {
        properties["duration_ms"] = json!(ms);
    }
    json!({"event_id": id, "event_type": "play", "user_id": "u1", "properties": properties})
}

/// Every event the file sink was given, by event id.
fn delivered(path: &Path) -> std::collections::HashMap<String, Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|e| (e["event_id"].as_str().unwrap_or_default().to_owned(), e))
        .collect()
}

#[test]
fn plays_are_enriched_derived_and_ranked_and_the_table_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("content.csv");
    let sink = dir.path().join("processed.jsonl");
    std::fs::write(
        &content,
        "id,type,length_seconds\nc1,video,300\nc2,article,120\n",
    )
    .unwrap();
    let config = common::write_config(
        dir.path(),
        &CONFIG
            .replace("CONTENT", &content.display().to_string())
            .replace("SINK", &sink.display().to_string()),
    );
    let mut d = Daemon::start_with(dir.path(), &config, &[]);
    let events = vec![
        play("p1", Some("c1"), Some(90_000)),
        play("p2", Some("c2"), Some(60_000)),
        play("p3", Some("c1"), Some(30_000)),
        // Not in the table: derived, not enriched.
        play("p4", Some("c9"), Some(5_000)),
        // No duration: the derived fields are null.
        play("p5", Some("c2"), None),
    ];
    let r = d.post_json("/webhook/batch", &json!({ "events": events }));
    assert_eq!(r.json()["accepted"], 5, "{}", r.text());
    d.wait_processed(Duration::from_secs(10));

    let seen = delivered(&sink);
    assert_eq!(
        seen["p1"]["enriched"],
        json!({"content": {"type": "video", "length_seconds": 300}})
    );
    assert_eq!(
        seen["p1"]["derived"],
        json!({"engagement_seconds": 90, "engagement_pct": 0.3})
    );
    assert_eq!(
        seen["p1"]["properties"]["duration_ms"], 90_000,
        "kept as sent"
    );
    assert!(seen["p4"].get("enriched").is_none(), "{}", seen["p4"]);
    assert_eq!(
        seen["p4"]["derived"],
        json!({"engagement_seconds": 5, "engagement_pct": null})
    );
    assert_eq!(
        seen["p5"]["derived"],
        json!({"engagement_seconds": null, "engagement_pct": null})
    );

    let window = d.get("/stats/windows/top_content_10m").json();
    assert_eq!(
        window["groups"],
        json!([
            {"key": "c1", "count": 2, "sum": 120.0},
            {"key": "c2", "count": 2, "sum": 60.0},
            {"key": "c9", "count": 1, "sum": 5.0},
        ])
    );

    // The table changes; SIGHUP reads it again.
    std::fs::write(
        &content,
        "id,type,length_seconds\nc1,video,600\nc2,article,120\n",
    )
    .unwrap();
    signal(&d.child, "HUP");
    eventually(Duration::from_secs(10), "the reload logged", || {
        d.log_text().contains("configuration reloaded")
    });
    let r = d.post_json("/webhook/events", &play("p6", Some("c1"), Some(60_000)));
    assert_eq!(r.status, 202);
    d.wait_processed(Duration::from_secs(10));
    assert_eq!(
        delivered(&sink)["p6"]["derived"]["engagement_pct"],
        json!(0.1),
        "60 s of a 600 s video"
    );

    // A bad table is refused, naming its line; the one in force stays.
    std::fs::write(
        &content,
        "id,type,length_seconds\nc1,video,900\nc2,article\n",
    )
    .unwrap();
    signal(&d.child, "HUP");
    eventually(Duration::from_secs(10), "the refusal logged", || {
        d.log_text().contains("reload refused")
    });
    let refusal = d
        .log_text()
        .lines()
        .find(|l| l.contains("reload refused"))
        .unwrap_or_default()
        .to_owned();
    assert!(refusal.contains("line 3"), "{refusal}");
    let r = d.post_json("/webhook/events", &play("p7", Some("c1"), Some(60_000)));
    assert_eq!(r.status, 202);
    d.wait_processed(Duration::from_secs(10));
    assert_eq!(
        delivered(&sink)["p7"]["enriched"]["content"]["length_seconds"],
        600,
        "the table read before stays in force"
    );

    // And check-config names the line too.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_inletd"))
        .args(["--config", config.to_str().unwrap(), "check-config"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("enrichment[0].file") && err.contains("line 3"),
        "{err}"
    );
    let status = d.terminate(Duration::from_secs(30));
    assert!(status.success());
}
