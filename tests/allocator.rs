//! The daemon's allocator, as the real binary runs it: jemalloc with the
//! settings `inletd::allocator` compiles in, which an operator's
//! `_RJEM_MALLOC_CONF` overrides.
//!
//! jemalloc reads those settings from an exported global before `main`; if
//! the global stopped being linked, or named another symbol, jemalloc would
//! run on its defaults and say nothing. The one setting visible from outside
//! is its background thread, which jemalloc names `jemalloc_bg_thd`.

mod common;

use std::time::Duration;

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

#[test]
fn the_daemon_runs_jemalloc_with_one_background_thread_unless_the_operator_says_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");

    // Started as the package starts it: inletd's own settings apply.
    let mut daemon = Daemon::start_with(dir.path(), &config, &[]);
    common::good_event(daemon.addr, "alloc-1").expect("an event is accepted");
    eventually(
        Duration::from_secs(10),
        "jemalloc's one background thread",
        || background_threads(&daemon) == 1,
    );
    daemon.terminate(Duration::from_secs(30));

    // An operator's drop-in turns it off: the environment wins.
    let mut daemon = Daemon::start_with(
        dir.path(),
        &config,
        &[("_RJEM_MALLOC_CONF", "background_thread:false")],
    );
    common::good_event(daemon.addr, "alloc-2").expect("an event is accepted");
    assert_eq!(
        background_threads(&daemon),
        0,
        "threads: {:?}",
        thread_names(daemon.child.id())
    );
    daemon.terminate(Duration::from_secs(30));
}
