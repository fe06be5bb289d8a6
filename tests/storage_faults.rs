//! Storage faults against the real binary: a full disk, a damaged record,
//! a store another process holds. The answer is always a clear error and
//! nothing lost — never a crash, never a 202 that was not stored.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Daemon, eventually};
use inletd::event::WalRecord;
use inletd::storage::sled::{SledOptions, SledStorage};
use inletd::storage::{NewEvent, Storage};
use serde_json::json;

/// Mounts a tmpfs of `size` at `dir`; false when this user may not mount.
fn mount_tmpfs(dir: &Path, size: &str) -> bool {
    Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .status()
        .is_ok_and(|s| s.success())
}

/// Unmounts on drop, after the daemon is gone.
struct Mounted<'a>(&'a Path);

impl Drop for Mounted<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0).status();
    }
}

/// The disk fills up under intake: requests answer 503 (never a 202 that
/// was not stored), `/ready` says so, `/health` still answers; once space
/// is freed the daemon takes events again without a restart, and every
/// event it acknowledged is processed.
#[test]
fn a_full_disk_answers_503_and_recovers_when_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    std::fs::create_dir(&disk).unwrap();
    if !mount_tmpfs(&disk, "4m") {
        // CI runs as root; elsewhere the test fails saying why, unless skipped on purpose.
        common::cannot_run_here("mounting a 4 MiB tmpfs (as the full disk) needs root");
        return;
    }
    let _mounted = Mounted(&disk);
    let filler = disk.join("filler");
    std::fs::write(&filler, vec![0u8; 2 * 1024 * 1024]).unwrap();
    let sink = dir.path().join("out.jsonl");
    let extra = format!(
        "data_dir = \"{}\"\nbatch_size = 1000\nbatch_timeout_ms = 60000\n[[sinks]]\nname = \"file\"\ntype = \"file\"\npath = \"{}\"\n",
        disk.join("data").display(),
        sink.display()
    );
    let mut d = Daemon::start(dir.path(), &extra);
    let pad = "x".repeat(1500);
    let mut accepted = Vec::new();
    let mut refused = None;
    for i in 0..5000 {
        let id = format!("e{i}");
        let r = d.post_json(
            "/webhook/events",
            &json!({"event_id": id, "event_type": "t", "metadata": {"pad": pad}}),
        );
        match r.status {
            202 => accepted.push(id),
            503 => {
                refused = Some(r);
                break;
            }
            other => panic!("unexpected {other}: {}", r.text()),
        }
    }
    let refused = refused.expect("the disk never filled up");
    assert_eq!(
        refused.json()["error"],
        "storage_unavailable",
        "{}",
        refused.text()
    );
    assert!(refused.header("retry-after").is_some());
    assert!(
        refused.text().contains("No space left"),
        "{}",
        refused.text()
    );
    assert_eq!(d.get("/ready").status, 503);
    assert_eq!(d.get("/health").status, 200);

    std::fs::remove_file(&filler).unwrap();
    eventually(Duration::from_secs(20), "intake works again", || {
        d.post_json(
            "/webhook/events",
            &json!({"event_id": "after", "event_type": "t"}),
        )
        .status
            == 202
    });
    accepted.push("after".into());
    assert_eq!(d.get("/ready").status, 200);

    // Drain on SIGTERM processes everything acknowledged.
    assert!(d.terminate(Duration::from_secs(30)).success());
    let text = std::fs::read_to_string(&sink).unwrap();
    let mut missing: Vec<&String> = accepted
        .iter()
        .filter(|id| !text.contains(&format!("\"{id}\"")))
        .collect();
    missing.truncate(5);
    assert!(
        missing.is_empty(),
        "acknowledged but not processed: {missing:?}"
    );
}

fn record(key: &str) -> NewEvent {
    NewEvent {
        record: WalRecord {
            source: "default".into(),
            key: key.into(),
            event_type: "t".into(),
            received_at_ms: inletd::event::now_ms(),
            occurred_at_ms: inletd::event::now_ms(),
            only_sink: None,
            body: json!({"event_id": key, "event_type": "t"}).to_string(),
        },
    }
}

/// A record in the queue is damaged on disk: the daemon starts anyway,
/// moves it to quarantine, reports it by position, and processes the others.
#[test]
fn a_damaged_record_is_quarantined_and_reported_by_position() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    {
        let store = SledStorage::open(&data, &SledOptions::default()).unwrap();
        // Three requests, three group commits: each event is a segment of
        // its own, keyed by its seq.
        for key in ["a", "b", "c"] {
            store
                .append(&[record(key)], inletd::event::now_ms(), 86_400_000)
                .unwrap();
        }
        // seq 2 ("b"): a flipped byte breaks its checksum.
        store
            .put_raw("wal", &2u64.to_be_bytes(), b"\x01\x00\x00\x00\x00garbage")
            .unwrap();
        store.flush().unwrap();
    }
    let sink = dir.path().join("out.jsonl");
    let d = Daemon::start(
        dir.path(),
        &format!(
            "[[sinks]]\nname = \"file\"\ntype = \"file\"\npath = \"{}\"\n",
            sink.display()
        ),
    );
    d.wait_processed(Duration::from_secs(10));
    let text = std::fs::read_to_string(&sink).unwrap();
    assert!(
        text.contains("\"a\"") && text.contains("\"c\"") && !text.contains("\"b\""),
        "{text}"
    );
    let log = d.log_text();
    assert!(
        log.contains("damaged record moved to quarantine")
            && log.contains("wal segment ending at seq 2"),
        "{log}"
    );
    assert!(
        d.get("/metrics")
            .text()
            .contains("inletd_quarantined_total 1")
    );
    assert_eq!(
        d.post_json(
            "/webhook/events",
            &json!({"event_id": "d", "event_type": "t"})
        )
        .status,
        202
    );
}

/// A second daemon on the same data directory exits non-zero, naming the
/// path and what to check, while the first keeps running.
#[test]
fn a_store_in_use_is_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let first = Daemon::start(dir.path(), "");
    let config = common::write_config(dir.path(), "");
    let out = Command::new(env!("CARGO_BIN_EXE_inletd"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&first.data_dir.display().to_string()), "{err}");
    assert!(err.contains("another inletd"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(first.get("/health").status, 200);
}

/// What the start-up check reports when the store holds less than its
/// mark says (`src/storage/mark.rs`).
const MISSING: &str = "acknowledged events are missing";

/// Posts events `from..to` as single events, each answered 202.
fn post_events(d: &Daemon, ids: std::ops::Range<usize>) {
    for i in ids {
        let body = json!({"event_id": format!("e{i}"), "event_type": "t", "user_id": "u"});
        assert_eq!(d.post_json("/webhook/events", &body).status, 202);
    }
}

/// The operator restarted inletd after a kill -9 and after a clean stop:
/// neither start reports missing events (the mark is a lower bound while
/// running, an exact summary after a clean stop).
#[test]
fn restarts_after_kill_9_and_a_clean_stop_report_nothing_missing() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path(), "");
    post_events(&d, 0..50);
    d.kill9();

    let config = dir.path().join("inletd.toml");
    let mut d = Daemon::start_with(dir.path(), &config, &[]);
    d.wait_processed(Duration::from_secs(10));
    assert!(
        !d.log_text().contains(MISSING),
        "after kill -9:\n{}",
        d.log_text()
    );
    post_events(&d, 50..100);
    d.wait_processed(Duration::from_secs(10));
    assert!(d.terminate(Duration::from_secs(10)).success());
    let mark = std::fs::read_to_string(d.data_dir.join("inletd.mark")).unwrap();
    assert!(
        mark.starts_with("inletd-mark 1 clean last_seq=100 cursor=100 "),
        "{mark}"
    );

    let mut d = Daemon::start_with(dir.path(), &config, &[]);
    assert!(
        !d.log_text().contains(MISSING),
        "clean restart:\n{}",
        d.log_text()
    );
    assert!(
        d.get("/metrics")
            .text()
            .contains("inletd_store_missing_reports_total 0")
    );
    assert!(d.terminate(Duration::from_secs(10)).success());
}

/// The disk lost the second half of the store's log while inletd was
/// stopped; sled then recovers an older state and carries on as if the
/// lost writes had never happened. inletd starts with what is left, but
/// says that acknowledged events are missing, with the figures its mark
/// recorded at the clean stop, and goes on taking events.
#[test]
fn a_store_that_lost_the_end_of_its_log_says_acknowledged_events_are_missing() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path(), "");
    post_events(&d, 0..50);
    assert!(d.terminate(Duration::from_secs(10)).success());

    let log = d.data_dir.join("db");
    let size = std::fs::metadata(&log).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&log)
        .unwrap()
        .set_len(size / 2)
        .unwrap();
    let config = dir.path().join("inletd.toml");
    let d = Daemon::start_with(dir.path(), &config, &[]);
    let text = d.log_text();
    let line = text
        .lines()
        .find(|l| l.contains(MISSING))
        .unwrap_or_else(|| panic!("no report of the loss:\n{text}"));
    assert!(line.contains("last_seq 50 → "), "{line}");
    assert!(line.contains("inletd.mark"), "{line}");
    assert!(!text.contains("panicked"), "{text}");
    // An alert can watch it.
    let metrics = d.get("/metrics").text();
    assert!(
        metrics.contains("inletd_store_missing_reports_total 1"),
        "{metrics}"
    );
    post_events(&d, 1000..1001);
}
