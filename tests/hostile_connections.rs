//! Hostile connections against the real binary: slowloris heads, bodies
//! that trickle in or never come, a thousand idle connections, and more
//! connections than `max_connections`. Other clients must be served
//! meanwhile, and nothing from the hostile ones is stored.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::{Daemon, RawConnection, Response, good_event, health, serve_meanwhile};

/// The two timeouts these tests run into, plus `extra`.
fn config(extra: &str) -> String {
    format!("header_read_timeout_secs = 2\nrequest_timeout_secs = 2\n{extra}\n")
}

/// Slowloris: clients that send their headers one byte at a time are
/// disconnected after `header_read_timeout_secs` (2 s) however steadily the
/// bytes come, while other clients are served.
#[test]
fn slowloris_is_disconnected_while_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path(), &config(""));
    let busy = Arc::new(AtomicBool::new(true));
    let meanwhile = serve_meanwhile(d.addr, "loris-good", busy.clone());

    let head =
        b"POST /webhook/events HTTP/1.1\r\nHost: inletd\r\nContent-Type: application/json\r\n\
                 X-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\
                 Content-Length: 2\r\n\r\n{}";
    let lorises: Vec<_> = [Duration::from_secs(1), Duration::from_millis(100)]
        .into_iter()
        .map(|interval| {
            let addr = d.addr;
            thread::spawn(move || -> Result<Duration, String> {
                let mut c = RawConnection::open(addr).map_err(|e| e.to_string())?;
                let start = Instant::now();
                for byte in head {
                    if c.send_bytes(&[*byte]).is_err() || matches!(c.closed_by_daemon(), Ok(true)) {
                        return Ok(start.elapsed());
                    }
                    if start.elapsed() > Duration::from_secs(15) {
                        break;
                    }
                    thread::sleep(interval);
                }
                Err(format!(
                    "a loris sending a byte every {interval:?} was not disconnected in {:?}",
                    start.elapsed()
                ))
            })
        })
        .collect();
    for (i, l) in lorises.into_iter().enumerate() {
        let took = l.join().unwrap().unwrap();
        assert!(
            took >= Duration::from_millis(1500) && took <= Duration::from_secs(6),
            "loris {i} cut after {took:?} (header_read_timeout_secs = 2)"
        );
    }
    busy.store(false, Ordering::SeqCst);
    let good = meanwhile.join().unwrap().unwrap();
    assert!(good >= 5, "only {good} good events were served meanwhile");
    assert_eq!(d.stored(), good, "nothing from the lorises was stored");
    d.assert_alive();
}

/// A body that trickles in (or never comes) is answered 408 (or the
/// connection closed) after `request_timeout_secs` (2 s); others are served.
#[test]
fn slow_bodies_time_out_while_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path(), &config(""));
    let busy = Arc::new(AtomicBool::new(true));
    let meanwhile = serve_meanwhile(d.addr, "slow-good", busy.clone());

    let with_length = b"POST /webhook/events HTTP/1.1\r\nHost: inletd\r\n\
                        Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
        .to_vec();
    let chunked = b"POST /webhook/events HTTP/1.1\r\nHost: inletd\r\n\
                    Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{\r\n"
        .to_vec();
    // (head, what to drip, interval)
    let slow: Vec<(&str, Vec<u8>, &'static [u8], Duration)> = vec![
        (
            "trickle",
            with_length.clone(),
            b" ",
            Duration::from_millis(300),
        ),
        ("nothing", with_length, b"", Duration::from_millis(300)),
        (
            "chunked trickle",
            chunked,
            b"1\r\n \r\n",
            Duration::from_millis(300),
        ),
    ];
    let clients: Vec<_> = slow
        .into_iter()
        .map(|(name, head, drip, interval)| {
            let addr = d.addr;
            thread::spawn(move || -> Result<(Duration, Option<Response>), String> {
                let mut c = RawConnection::open(addr).map_err(|e| e.to_string())?;
                let start = Instant::now();
                c.send_bytes(&head).map_err(|e| e.to_string())?;
                while start.elapsed() < Duration::from_secs(10) {
                    if !drip.is_empty() {
                        let _ = c.send_bytes(drip);
                    }
                    // A whole answer, or a close without one, ends the wait.
                    let answer = c.answer_within(interval).map_err(|e| e.to_string())?;
                    if answer.is_some() || c.is_closed() {
                        return Ok((start.elapsed(), answer));
                    }
                }
                Err(format!("{name}: no answer and no close in 10 s"))
            })
        })
        .collect();
    for c in clients {
        let (took, answer) = c.join().unwrap().unwrap();
        assert!(
            took >= Duration::from_millis(1500) && took <= Duration::from_secs(6),
            "answered after {took:?} (request_timeout_secs = 2)"
        );
        if let Some(r) = answer {
            assert_eq!(r.status, 408, "{}", r.text());
            assert_eq!(r.json()["error"], "request_timeout");
        }
    }
    busy.store(false, Ordering::SeqCst);
    let good = meanwhile.join().unwrap().unwrap();
    assert!(good >= 5, "only {good} good events were served meanwhile");
    assert_eq!(d.stored(), good, "nothing from the slow bodies was stored");
    d.assert_alive();
}

/// The soft limit on open files of this process.
fn open_files_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// A thousand connections that never send a byte, all open at once (under
/// the default `max_connections` of 1024): `/health` answers fast and good
/// events are accepted meanwhile. Here `header_read_timeout_secs` is long
/// so that they really stay open for the whole test.
///
/// The test process and the daemon each need ~1,000 descriptors; with a
/// soft `ulimit -n` below ~1,100 the test uses as many as fit (and says so).
#[test]
fn a_thousand_idle_connections_do_not_starve_anyone() {
    let dir = tempfile::tempdir().unwrap();
    let extra = "header_read_timeout_secs = 30";
    let mut d = Daemon::start(
        dir.path(),
        &config("").replace("header_read_timeout_secs = 2", extra),
    );
    let limit = open_files_limit().unwrap_or(1024);
    let n = 1000.min(limit.saturating_sub(100));
    if n < 1000 {
        eprintln!("ulimit -n is {limit}: using {n} idle connections instead of 1,000");
    }
    let mut idle = Vec::with_capacity(n);
    let start = Instant::now();
    for i in 0..n {
        idle.push(RawConnection::open(d.addr).expect("connect an idle client"));
        // Let the accept loop keep up with the 128-deep listen backlog.
        if i % 64 == 63 {
            thread::sleep(Duration::from_millis(10));
        }
    }
    eprintln!("{n} idle connections opened in {:?}", start.elapsed());
    let mut slowest = Duration::ZERO;
    for i in 0..20 {
        slowest = slowest.max(health(d.addr).unwrap());
        good_event(d.addr, &format!("idle-good-{i}")).unwrap();
    }
    eprintln!("slowest /health with {n} idle connections: {slowest:?}");
    let still_open = idle
        .iter_mut()
        .map(|c| c.closed_by_daemon())
        .filter(|closed| matches!(closed, Ok(false)))
        .count();
    assert_eq!(
        still_open, n,
        "the idle connections were still open meanwhile"
    );
    drop(idle);
    health(d.addr).unwrap();
    assert_eq!(d.stored(), 20);
    d.assert_alive();
}

/// Past `max_connections`, connections wait in the backlog; idle ones are
/// dropped after `header_read_timeout_secs`, which lets the waiting ones in.
#[test]
fn past_max_connections_clients_wait_until_idle_ones_time_out() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path(), &config("max_connections = 20"));
    let idle: Vec<_> = (0..30)
        .map(|_| RawConnection::open(d.addr).unwrap())
        .collect();
    let start = Instant::now();
    let r = common::try_request(d.addr, "GET", "/health", &[], b"").unwrap();
    let waited = start.elapsed();
    eprintln!("/health waited {waited:?} behind 30 idle connections (max_connections = 20)");
    assert_eq!(r.status, 200);
    assert!(
        waited <= Duration::from_secs(8),
        "/health waited {waited:?} behind idle connections (header_read_timeout_secs = 2)"
    );
    good_event(d.addr, "after-idle").unwrap();
    drop(idle);
    assert_eq!(d.stored(), 1);
    d.assert_alive();
}

/// A client that shuts its sending side as soon as its request is out (as
/// `nc -N` and some scripted senders do) still gets its answer, and its
/// event is stored once: the daemon does not take that end of stream for a
/// client gone while the event waits for its group commit.
#[test]
fn a_client_that_half_closes_after_its_request_still_gets_its_answer() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &config(""));
    for (i, id) in ["half-1", "half-2", "half-1"].into_iter().enumerate() {
        let body = format!(r#"{{"event_id":"{id}","event_type":"signup"}}"#);
        let mut c = RawConnection::open(d.addr).unwrap();
        c.send_bytes(
            format!(
                "POST /webhook/events HTTP/1.1\r\nHost: inletd\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .unwrap();
        c.half_close().unwrap();
        let answer = c
            .read_response()
            .unwrap_or_else(|e| panic!("request {i} ({id}) got no answer: {e}"));
        let expected = if i == 2 { 200 } else { 202 };
        assert_eq!(answer.status, expected, "request {i}: {}", answer.text());
        assert_eq!(answer.json()["event_id"], id);
    }
    assert_eq!(d.stored(), 2, "two distinct events, each stored once");
}
