//! The daemon's allocator, as the real binary runs it: jemalloc with the
//! settings `inletd::allocator` compiles in, which an operator's
//! `_RJEM_MALLOC_CONF` overrides.
//!
//! jemalloc reads those settings from an exported global before `main`; if
//! the global stopped being linked, or named another symbol, jemalloc would
//! run on its defaults and say nothing. The setting visible from outside is
//! its background thread, which jemalloc names `jemalloc_bg_thd`: inletd
//! asks for one (with jemalloc's default, four ran here, on 2 CPUs).

mod common;

use std::time::{Duration, Instant};

use common::{Daemon, eventually, write_config};

/// The names of a process's threads, from `/proc`.
fn thread_names(pid: u32) -> Vec<String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("read /proc/PID/task");
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_owned())
        .collect()
}

fn background_threads(daemon: &Daemon) -> usize {
    thread_names(daemon.child.id())
        .iter()
        .filter(|n| n.as_str() == "jemalloc_bg_thd")
        .count()
}

/// Good events from several connections at once, so that allocations come
/// from several threads and arenas.
fn events_from_four_senders(daemon: &Daemon, prefix: &str) {
    let addr = daemon.addr;
    let senders: Vec<_> = (0..4)
        .map(|s| {
            let prefix = prefix.to_owned();
            std::thread::spawn(move || {
                for i in 0..50 {
                    common::good_event(addr, &format!("{prefix}-{s}-{i}")).expect("accepted");
                }
            })
        })
        .collect();
    for s in senders {
        s.join().expect("a sender panicked");
    }
}

#[test]
fn the_packaged_daemon_runs_jemalloc_with_one_background_thread() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let mut daemon = Daemon::start_with(dir.path(), &config, &[]);

    events_from_four_senders(&daemon, "busy");
    eventually(
        Duration::from_secs(10),
        "jemalloc's background thread",
        || background_threads(&daemon) >= 1,
    );
    // And never a second, however long it runs: watched for a second more.
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        let threads = thread_names(daemon.child.id());
        let count = threads.iter().filter(|n| *n == "jemalloc_bg_thd").count();
        assert_eq!(count, 1, "threads: {threads:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(daemon.terminate(Duration::from_secs(30)).success());
}

#[test]
fn an_operators_malloc_conf_overrides_inletds_settings() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    // As a systemd drop-in's `Environment=` would set it.
    let mut daemon = Daemon::start_with(
        dir.path(),
        &config,
        &[("_RJEM_MALLOC_CONF", "background_thread:false")],
    );

    events_from_four_senders(&daemon, "told");
    assert_eq!(
        background_threads(&daemon),
        0,
        "threads: {:?}",
        thread_names(daemon.child.id())
    );
    assert!(daemon.terminate(Duration::from_secs(30)).success());
}
