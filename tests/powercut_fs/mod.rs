//! A power-cut filesystem for tests, in the spirit of LazyFS (the FUSE
//! filesystem Jepsen uses): a passthrough of a backing directory that keeps
//! every write no fsync has made durable in memory, and drops all of them
//! when the test calls [`Mounted::power_cut`]. The backing directory plays
//! the disk: what reached it is durable, what is only in memory is what a
//! power cut loses.
//!
//! # What is held in memory
//!
//! Data written to regular files (`write`, `pwrite`, appends). Each inode
//! has an overlay of pending byte ranges; the backing file is not touched.
//! Reads merge the backing file with the overlay (the latest write of a
//! byte wins), and the size reported is the larger of the backing size and
//! the end of the furthest pending write. So before a cut the program sees
//! exactly what it wrote; after it, only what was made durable.
//!
//! A pending write becomes durable only through `fsync` or `fdatasync` (the
//! kernel sends both as FUSE fsync, with a datasync flag) on **any** open
//! handle of the inode: that writes all of the inode's pending bytes to the
//! backing file. POSIX makes fsync persist the file, not the descriptor,
//! and a size-extending write becomes durable only then (as fdatasync
//! persists the size a write needs). Writes through a handle opened with
//! `O_SYNC` or `O_DSYNC` are persisted before the write returns.
//!
//! What does **not** persist: `close` (FUSE flush and release),
//! `sync_file_range` (it never reaches FUSE: there is no page cache to
//! write back, which is the point: on a real disk it does not persist the
//! metadata a write needs either), and `sync`/`syncfs` (the kernel does not
//! forward them to a FUSE filesystem). sled's `Db::flush` relies on
//! `sync_file_range`, so its data is still pending afterwards.
//!
//! # What passes straight through
//!
//! Metadata: create, mkdir, unlink, rmdir, rename, link, symlink, chmod,
//! chown, utimes and truncate (`setattr` with a size) are applied to the
//! backing directory at once. A real power cut can also lose a directory
//! entry nobody fsync'd the directory for (a new file, a rename); this
//! filesystem does not model that. `fsyncdir` is accepted, counted and
//! does nothing. Alongside, the overlays follow the metadata:
//!
//! - truncate drops or clips the pending writes past the new size;
//! - unlinking a file's last name drops its pending writes;
//! - rename keeps them with the file: overlays are keyed by inode, and the
//!   inode table's paths are updated on rename (a file that an open handle
//!   keeps alive after its last unlink still reads its backing file).
//!
//! # Kernel caches
//!
//! Every open is answered with `FOPEN_DIRECT_IO`, so the page cache never
//! holds file data (it could otherwise serve bytes a cut dropped), and
//! attribute and entry TTLs are zero, so sizes and names are asked again
//! after a cut. (A side effect: shared `mmap` is refused; private `mmap`
//! works.) Locks are not implemented, so the kernel keeps `flock` and POSIX
//! locks locally; sled's exclusive `flock` on its `db` file works as on a
//! local disk.
//!
//! # Limits
//!
//! Do not change the backing directory behind the mount's back while it is
//! mounted (the inode table maps inodes to backing paths). Hard links work,
//! but the table keeps one name per inode, the last one looked up. `xattr`,
//! `fallocate`, `lseek` (`SEEK_DATA`) and `copy_file_range` answer ENOSYS,
//! and the kernel falls back to generic code where it has one.
//!
//! Call `power_cut` once the program under test is dead or has closed its
//! files: a real power cut stops the program too, and a descriptor kept
//! across the cut still works but its `O_APPEND` position may use the
//! size from before the cut until something stats the file.
//!
//! Mounting needs `/dev/fuse` and root (fuser calls `mount(2)` itself, so
//! no `fusermount3` is needed). The FUSE session runs in a background
//! thread of the test process; [`Mounted`] unmounts when dropped.
#![allow(dead_code)]

mod fs;
mod overlay;
mod sys;

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use fuser::{BackgroundSession, Config, MountOption, SessionACL};

pub use fs::PowerCutFs;
use fs::State;

/// What a power cut dropped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PowerCutReport {
    /// Files that had pending writes.
    pub files_affected: usize,
    /// Pending bytes dropped (a byte rewritten several times counts once).
    pub bytes_dropped: u64,
    /// The affected files, relative to the mount, sorted (their current
    /// names: a renamed file shows its new name).
    pub paths: Vec<PathBuf>,
}

/// Totals since the mount, for asserting on what a program did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// `write` requests held in memory.
    pub writes: u64,
    /// Bytes those writes carried.
    pub bytes_written: u64,
    /// fsync requests without the datasync flag (`fsync`, `sync_all`).
    pub fsyncs: u64,
    /// fsync requests with the datasync flag (`fdatasync`, `sync_data`).
    pub fdatasyncs: u64,
    /// fsyncdir requests (accepted, nothing to do).
    pub fsyncdirs: u64,
    /// Bytes written to the backing files by fsync (or `O_SYNC` writes).
    pub bytes_persisted: u64,
    /// flush requests (one per `close` of a descriptor), which persist
    /// nothing.
    pub flushes: u64,
    /// Calls of `power_cut`.
    pub power_cuts: u64,
    /// Bytes all power cuts dropped.
    pub bytes_dropped: u64,
}

/// A mounted power-cut filesystem. Unmounts on drop.
#[derive(Debug)]
pub struct Mounted {
    /// The FUSE session thread; `None` once unmounted.
    session: Option<BackgroundSession>,
    /// The state the session serves from, shared to cut power and count.
    state: Arc<Mutex<State>>,
    /// Where the filesystem is mounted (canonical).
    mountpoint: PathBuf,
    /// The directory it passes through to (canonical).
    backing: PathBuf,
}

// The test thread uses `Mounted` while the session thread serves requests.
const _: fn() = || {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Mounted>();
};

impl PowerCutFs {
    /// Mounts a power-cut passthrough of the directory `backing` at the
    /// directory `mountpoint`, served from a background thread. The error
    /// says what is missing (no `/dev/fuse`, not root, ...) and how to get
    /// it: callers are expected to panic with it, never to skip.
    pub fn mount(backing: &Path, mountpoint: &Path) -> Result<Mounted, String> {
        let backing = existing_dir(backing, "backing directory")?;
        let mountpoint = existing_dir(mountpoint, "mountpoint")?;
        if backing.starts_with(&mountpoint) || mountpoint.starts_with(&backing) {
            return Err(format!(
                "power-cut fs: the backing directory {} and the mountpoint {} must not \
                 contain each other (the filesystem would serve requests about itself)",
                backing.display(),
                mountpoint.display()
            ));
        }
        check_fuse_device()?;

        let state = State::new(&backing).map_err(|error| {
            format!(
                "power-cut fs: cannot stat the backing directory {}: {error}",
                backing.display()
            )
        })?;
        let state = Arc::new(Mutex::new(state));
        let filesystem = PowerCutFs {
            state: Arc::clone(&state),
        };

        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("powercut".to_owned()),
            MountOption::Subtype("powercut".to_owned()),
            // The kernel checks permissions from the (fresh) attributes.
            MountOption::DefaultPermissions,
        ];
        // Any user may use the mount (a daemon under test may drop root).
        config.acl = SessionACL::All;

        let session = fuser::spawn_mount(filesystem, &mountpoint, &config)
            .map_err(|error| explain_mount_error(&error, &mountpoint))?;
        Ok(Mounted {
            session: Some(session),
            state,
            mountpoint,
            backing,
        })
    }
}

impl Mounted {
    /// Where the filesystem is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The backing directory ("the disk": only durable data is there).
    pub fn backing(&self) -> &Path {
        &self.backing
    }

    /// Drops every pending write of every file, as a power cut would.
    pub fn power_cut(&self) -> PowerCutReport {
        self.state().power_cut()
    }

    /// Bytes a power cut would drop now.
    pub fn pending_bytes(&self) -> u64 {
        self.state().pending_bytes()
    }

    /// Totals since the mount.
    pub fn counters(&self) -> Counters {
        self.state().counters
    }

    /// How many requests of each FUSE operation arrived since the mount
    /// (`"write"`, `"fsync"`, `"fdatasync"`, `"rename"`, ...).
    pub fn op_counts(&self) -> BTreeMap<&'static str, u64> {
        self.state().op_counts.clone()
    }

    /// Unmounts and waits for the session thread. If files are still open
    /// on the mount it is detached lazily (gone from the namespace now,
    /// served until the last file closes) and the error says so.
    pub fn unmount(mut self) -> Result<(), String> {
        self.unmount_now()
    }

    /// The shared state, even if a panic poisoned the lock.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Unmounts once; later calls do nothing.
    fn unmount_now(&mut self) -> Result<(), String> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        let Err(error) = session.umount_and_join() else {
            return Ok(());
        };
        // Either umount(2) failed (busy) and the session thread still runs,
        // or the thread ended with an error after a clean unmount.
        match sys::detach_mount(&self.mountpoint) {
            Ok(()) => Err(format!(
                "power-cut fs: unmounting {} failed ({error}), probably because a file \
                 is still open on it; detached it lazily instead",
                self.mountpoint.display()
            )),
            Err(_) => Err(format!(
                "power-cut fs: the session of {} ended with an error: {error}",
                self.mountpoint.display()
            )),
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(error) = self.unmount_now() {
            eprintln!("{error}");
        }
    }
}

/// `path` made canonical, if it is an existing directory.
fn existing_dir(path: &Path, what: &str) -> Result<PathBuf, String> {
    let canonical = path.canonicalize().map_err(|error| {
        format!(
            "power-cut fs: the {what} {} is not usable: {error}",
            path.display()
        )
    })?;
    if !canonical.is_dir() {
        return Err(format!(
            "power-cut fs: the {what} {} is not a directory",
            path.display()
        ));
    }
    Ok(canonical)
}

/// Checks that `/dev/fuse` exists and this process may open it.
fn check_fuse_device() -> Result<(), String> {
    let device = Path::new("/dev/fuse");
    if !device.exists() {
        return Err(
            "power-cut fs: /dev/fuse does not exist. Load the FUSE kernel module \
                    (`modprobe fuse`); in a container, start it with `--device /dev/fuse \
                    --cap-add SYS_ADMIN`."
                .to_owned(),
        );
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(device)
        .map(drop)
        .map_err(|error| {
            format!(
                "power-cut fs: cannot open /dev/fuse for reading and writing: {error}. \
                 Run the tests as root (mounting calls mount(2) directly), or give this \
                 user access to /dev/fuse and install fuse3 (`apt-get install fuse3`) \
                 for the fusermount3 helper."
            )
        })
}

/// The mount error, with what to do about it.
fn explain_mount_error(error: &io::Error, mountpoint: &Path) -> String {
    let advice = match error.kind() {
        io::ErrorKind::PermissionDenied => {
            "Mounting needs root (CAP_SYS_ADMIN); without it fuser runs the setuid \
             fusermount3 helper, from `apt-get install fuse3`."
        }
        io::ErrorKind::NotFound => {
            "mount(2) was refused (not root?) and the fallback helper fusermount3 / \
             fusermount is not installed: run the tests as root, or `apt-get install fuse3`."
        }
        _ => {
            "Check that the FUSE module is loaded (`modprobe fuse`), that /dev/fuse is \
             usable here (containers need `--device /dev/fuse --cap-add SYS_ADMIN`), and \
             that the tests run as root."
        }
    };
    format!(
        "power-cut fs: mounting FUSE at {} failed: {error}. {advice}",
        mountpoint.display()
    )
}
