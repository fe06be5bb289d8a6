//! The one setting inletd makes in glibc's allocator, before any thread
//! starts.
//!
//! glibc serves an allocation of 128 KiB or more with its own `mmap` and
//! unmaps it on free. But by default the first such free raises that
//! threshold to the freed size (up to 32 MiB), and from then on buffers of
//! that size (a batch's body, a group commit's WAL segments, the key
//! index's parts) come from the malloc arenas instead, one per busy thread,
//! where what they free stays resident as fragments. Under batch intake
//! that was a third of the daemon's peak RSS.
//!
//! Fixing the threshold keeps large buffers mapped, so freeing one gives its
//! memory back at once. Measured (BENCHMARKS.md, "Large buffers kept
//! mapped, and the key index in parts"): with the index's parts, batches of
//! 100 for 16 s peaked at 134–136 MiB against 199–206, at the same events/s
//! and CPU per event; single events 32–35 MiB against 40–43.
//!
//! An operator's own `MALLOC_MMAP_THRESHOLD_` wins: inletd then leaves the
//! setting alone. Other C libraries (musl) have no such threshold to set.

/// Allocations of at least this many bytes get their own mapping: glibc's
/// starting value, kept from rising.
pub const MMAP_THRESHOLD: usize = 128 * 1024;

/// The environment variable through which glibc reads the threshold.
const OPERATOR_SETTING: &str = "MALLOC_MMAP_THRESHOLD_";

/// Fixes glibc's mmap threshold at [`MMAP_THRESHOLD`], unless the operator
/// set one. Returns whether it set it. Call it before any thread starts
/// (`main` does, before the runtime): `mallopt` must not race other
/// threads' allocations.
pub fn keep_large_buffers_mapped() -> bool {
    if std::env::var_os(OPERATOR_SETTING).is_some() {
        return false;
    }
    set_mmap_threshold(MMAP_THRESHOLD)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_mmap_threshold(bytes: usize) -> bool {
    let Ok(bytes) = libc::c_int::try_from(bytes) else {
        return false;
    };
    // SAFETY: `mallopt` only changes a tunable of glibc's allocator; it is
    // called before the program starts other threads, and the value is in
    // the range glibc accepts (0 to 32 MiB). It returns 1 on success.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, bytes) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_mmap_threshold(_bytes: usize) -> bool {
    false
}
