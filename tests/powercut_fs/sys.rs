//! The two C library calls std has no wrapper for: `statvfs` (so `df` works
//! on the mount) and `umount2(MNT_DETACH)` (the fallback when a plain
//! unmount finds the mount busy). Declared here because this test target
//! may not add the `libc` crate as a dependency; std links the C library
//! anyway.

use std::ffi::{CString, c_char, c_int, c_ulong};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// `struct statvfs` as glibc and musl lay it out on 64-bit Linux.
#[repr(C)]
#[derive(Default)]
struct StatVfsRaw {
    /// Preferred block size.
    f_bsize: c_ulong,
    /// Fundamental block size (unit of the block counts).
    f_frsize: c_ulong,
    /// Total blocks.
    f_blocks: u64,
    /// Free blocks.
    f_bfree: u64,
    /// Free blocks for unprivileged users.
    f_bavail: u64,
    /// Total inodes.
    f_files: u64,
    /// Free inodes.
    f_ffree: u64,
    /// Free inodes for unprivileged users.
    f_favail: u64,
    /// Filesystem id (unused here, present for the layout).
    f_fsid: c_ulong,
    /// Mount flags (unused here, present for the layout).
    f_flag: c_ulong,
    /// Longest file name.
    f_namemax: c_ulong,
    /// The C struct's reserved tail, with room to spare so a larger libc
    /// struct can never write past this one.
    spare: [c_int; 16],
}

unsafe extern "C" {
    /// statvfs(3).
    fn statvfs(path: *const c_char, buf: *mut StatVfsRaw) -> c_int;
    /// umount2(2).
    fn umount2(target: *const c_char, flags: c_int) -> c_int;
}

/// `MNT_DETACH` from `<sys/mount.h>`: detach now, finish when unused.
const MNT_DETACH: c_int = 2;

/// What `statfs` replies with, in the order `ReplyStatfs::statfs` wants.
pub(super) struct FsStats {
    /// Total blocks of `frsize` bytes.
    pub(super) blocks: u64,
    /// Free blocks.
    pub(super) bfree: u64,
    /// Free blocks for unprivileged users.
    pub(super) bavail: u64,
    /// Total inodes.
    pub(super) files: u64,
    /// Free inodes.
    pub(super) ffree: u64,
    /// Preferred block size.
    pub(super) bsize: u32,
    /// Longest file name.
    pub(super) namelen: u32,
    /// Fundamental block size.
    pub(super) frsize: u32,
}

/// The C string of a path (paths with a NUL byte cannot exist).
fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// statvfs(3) of `path`.
#[cfg(all(target_os = "linux", target_pointer_width = "64"))]
pub(super) fn stat_fs(path: &Path) -> io::Result<FsStats> {
    let c_path = c_path(path)?;
    let mut raw = StatVfsRaw::default();
    // SAFETY: `c_path` is a valid NUL-terminated string and `raw` is a
    // writable struct at least as large as the C `struct statvfs`.
    let ret = unsafe { statvfs(c_path.as_ptr(), &mut raw) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    let narrow = |value: c_ulong| u32::try_from(value).unwrap_or(u32::MAX);
    Ok(FsStats {
        blocks: raw.f_blocks,
        bfree: raw.f_bfree,
        bavail: raw.f_bavail,
        files: raw.f_files,
        ffree: raw.f_ffree,
        bsize: narrow(raw.f_bsize),
        namelen: narrow(raw.f_namemax),
        frsize: narrow(raw.f_frsize),
    })
}

/// statvfs(3) is only declared for 64-bit Linux.
#[cfg(not(all(target_os = "linux", target_pointer_width = "64")))]
pub(super) fn stat_fs(_path: &Path) -> io::Result<FsStats> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

/// Lazily unmounts `path` (`umount -l`).
pub(super) fn detach_mount(path: &Path) -> io::Result<()> {
    let c_path = c_path(path)?;
    // SAFETY: `c_path` is a valid NUL-terminated string.
    let ret = unsafe { umount2(c_path.as_ptr(), MNT_DETACH) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
