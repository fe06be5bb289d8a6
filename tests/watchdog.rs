//! The systemd protocol against the real binary: a notify socket of our
//! own stands in for systemd, with the watchdog enabled.

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::{Daemon, write_config};

/// Under `Type=notify` with `WatchdogSec`, the daemon reports READY once it
/// accepts events, then keeps pinging the watchdog while its store answers
/// (the probe behind each ping is what lets systemd restart a hung store).
#[test]
fn the_watchdog_is_pinged_while_the_store_answers() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let config = write_config(dir.path(), "");
    let d = Daemon::start_with(
        dir.path(),
        &config,
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            // 400 ms: a ping every 200 ms.
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let mut seen = Vec::new();
    let until = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 256];
    while Instant::now() < until && seen.iter().filter(|m| *m == "WATCHDOG=1").count() < 3 {
        if let Ok(n) = socket.recv(&mut buf) {
            seen.push(String::from_utf8_lossy(&buf[..n]).trim().to_owned());
        }
    }
    assert!(seen.iter().any(|m| m.contains("READY=1")), "{seen:?}");
    assert!(
        seen.iter().filter(|m| *m == "WATCHDOG=1").count() >= 3,
        "{seen:?}"
    );
    // Pings come while requests are served, too.
    assert_eq!(
        d.post_json(
            "/webhook/events",
            &serde_json::json!({"event_id": "w1", "event_type": "t"})
        )
        .status,
        202
    );
}
