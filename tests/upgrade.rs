//! Upgrading: a store written by the previous storage format opens under
//! this one, converted on first start, with every queued event and every
//! idempotency key. The store is `tests/fixtures/format2` (its README says
//! what it holds).

mod common;

use std::path::Path;
use std::time::Duration;

use common::Daemon;
use common::books::{file_sink, read_sink, summary};
use serde_json::json;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else if entry.file_name() != "README.md" {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// The operator upgraded inletd over a format-2 store that had 17 events
/// processed and 10 still queued. The new daemon delivers the 10 queued
/// events, keeps the counts, and answers every one of the 27 ids as a
/// duplicate; a new id is accepted.
#[test]
fn a_format_2_store_keeps_its_queue_and_keys() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format2");
    // The keys were first seen at 2026-12-03 07:05 UTC.
    let first_seen = std::time::UNIX_EPOCH + Duration::from_secs(1796281500);
    let age = std::time::SystemTime::now()
        .duration_since(first_seen)
        .unwrap_or_default();
    assert!(
        age < Duration::from_secs(364 * 86_400),
        "the fixture's keys were first seen on 2026-12-03; past a year they expire: \
         make the fixture again (tests/fixtures/format2/README.md)"
    );
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture, &dir.path().join("data"));
    let sink = dir.path().join("processed.jsonl");
    let d = Daemon::start(
        dir.path(),
        &format!("idempotency_ttl_hours = 8760\n{}", file_sink(&sink)),
    );
    d.wait_processed(Duration::from_secs(30));

    let delivered = read_sink(&sink);
    let queued: Vec<String> = (1..=10).map(|i| format!("queued-{i}")).collect();
    let ids: Vec<&String> = delivered.events.keys().collect();
    assert_eq!(ids.len(), 10, "the queued events, delivered: {ids:?}");
    for id in &queued {
        assert_eq!(delivered.events[id]["event_type"], "page_view", "{id}");
    }
    let (total, by_type) = summary(&d);
    assert_eq!(total, 27);
    assert_eq!(
        by_type.into_iter().collect::<Vec<_>>(),
        vec![
            ("page_view".to_owned(), 10),
            ("purchase".to_owned(), 2),
            ("signup".to_owned(), 15)
        ]
    );

    let done = (1..=15)
        .map(|i| format!("done-{i}"))
        .chain(["done-b1".to_owned(), "done-b2".to_owned()]);
    for id in done.chain(queued) {
        let r = d.post_json(
            "/webhook/events",
            &json!({"event_id": id, "event_type": "signup"}),
        );
        assert_eq!(r.status, 200, "{id} is a known key: {}", r.text());
        assert_eq!(r.json()["status"], "duplicate");
    }
    let r = d.post_json(
        "/webhook/events",
        &json!({"event_id": "new-1", "event_type": "signup"}),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let log = d.log_text();
    assert!(
        log.contains("store converted to this build's format"),
        "{log}"
    );
    let converted = format!(r#""from":2,"to":{}"#, inletd::storage::FORMAT_VERSION);
    assert!(log.contains(&converted), "{log}");
}
