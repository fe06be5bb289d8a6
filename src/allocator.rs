//! inletd's allocator: jemalloc, with large allocations in an arena of
//! their own that gives their memory back soon after they are freed.
//!
//! glibc's malloc was about 14 % of a single event's CPU: every request, group
//! commit and micro-batch allocates and frees across threads (a request is
//! read on one worker, written by the writer thread, answered on another),
//! and glibc's per-thread cache holds only small chunks, so much of that
//! went through an arena's locked slow path (`malloc_consolidate`,
//! `unlink_chunk`). jemalloc's thread caches and its arenas (four per CPU,
//! each thread bound to one) serve the same pattern for less: about 3.5 %.
//! Measured against glibc, builds interleaved (BENCHMARKS.md, "jemalloc for
//! glibc's malloc"): CPU per single event −16 %, per event in batches of
//! 100 −28 %, events/s +13 % and +28 % (medians of the per-round ratios);
//! the bare warp server's CPU per request did not change.
//!
//! The settings, compiled in ([`SETTINGS`]):
//! - `oversize_threshold:1048576`: allocations of 1 MiB or more (the key
//!   index's parts, a large batch's body) get an arena whose freed pages are
//!   returned at once. Without it, 40 s of batches with random ids peaked
//!   at 0.97 times the RSS budget (64 MiB + 16 B a key), against 0.78 with
//!   it: a part outgrown by the index stayed resident for jemalloc's 10 s
//!   decay.
//! - `background_thread:true`: one thread returns freed pages on jemalloc's
//!   decay schedule, so an idle daemon gives back what a burst left (about
//!   74 MiB 30 s after 8 s of batches, against 84 MiB without it and 73 with
//!   glibc), instead of only when it next allocates. One such thread
//!   (`max_background_threads:1`; jemalloc would start four here) is enough
//!   for a daemon whose arenas are few and mostly quiet.
//!
//! An operator's `_RJEM_MALLOC_CONF` (a systemd drop-in's `Environment=`)
//! is read after these and wins.
//!
//! Under the packaged unit (`ProcSubset=pid`) jemalloc cannot read
//! `/proc/sys/vm/overcommit_memory`, so it assumes the kernel does not
//! overcommit and commits and decommits pages with `mmap`. Measured with
//! `/proc` mounted as the unit mounts it: the same CPU per event and RSS
//! (BENCHMARKS.md).
//!
//! `src/main.rs` installs the allocator and the settings, and
//! `examples/bare_warp.rs` the same; the library's test binaries and the
//! criterion benchmarks (`benches/`) keep the system allocator.

use std::ffi::{CStr, c_char};

/// The allocator that `src/main.rs` installs as the global one.
pub use tikv_jemallocator::Jemalloc;

/// jemalloc's options for inletd, in its `malloc_conf` syntax.
pub const SETTINGS: &CStr =
    c"oversize_threshold:1048576,background_thread:true,max_background_threads:1";

/// [`SETTINGS`] as jemalloc reads them at its start: the value of its
/// `malloc_conf` global, which `src/main.rs` exports.
pub const MALLOC_CONF: Option<&c_char> = {
    // SAFETY: a C string literal's pointer is valid, aligned and 'static.
    Some(unsafe { &*SETTINGS.as_ptr() })
};
