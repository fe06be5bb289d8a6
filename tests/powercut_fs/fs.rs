//! The FUSE side: the inode table, the open handles, the per-inode
//! overlays, and the `fuser::Filesystem` implementation that serves them.
//! See the parent module for the semantics.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, FileTimes, Metadata, OpenOptions, Permissions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{
    DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt, lchown,
};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use super::overlay::Overlay;
use super::sys;
use super::{Counters, PowerCutReport};

/// Attribute and entry cache time: zero, so the kernel asks again after
/// every cut instead of trusting a size or a name from before it.
const TTL: Duration = Duration::ZERO;

/// `O_EXCL` (same value on every Linux architecture).
const O_EXCL: i32 = 0o200;

/// `O_DSYNC`; `O_SYNC` includes this bit (asm-generic and x86 values).
const O_DSYNC: i32 = 0o10000;

/// `S_IFMT` and `S_IFREG` from `<sys/stat.h>`, for mknod.
const S_IFMT: u32 = 0o170000;
/// See [`S_IFMT`].
const S_IFREG: u32 = 0o100000;

/// A (device, inode) pair of the backing filesystem: what identifies a
/// file across renames.
type BackingKey = (u64, u64);

/// An inode the kernel knows about.
#[derive(Debug)]
struct Node {
    /// Where it lives in the backing directory (its last known name).
    path: PathBuf,
    /// Its backing (device, inode) pair, to drop the reverse map entry
    /// when the kernel forgets it.
    backing_key: BackingKey,
    /// Kernel lookups not yet forgotten; the node can go at zero.
    lookups: u64,
}

/// An open regular file.
#[derive(Debug)]
struct OpenFile {
    /// The inode it belongs to (overlays are per inode, not per handle).
    ino: u64,
    /// The backing file, opened with the same access mode but never with
    /// `O_APPEND` (the kernel already turned appends into offsets).
    file: File,
    /// Whether writes through this handle are allowed.
    writable: bool,
    /// Opened with `O_SYNC`/`O_DSYNC`: every write is persisted at once.
    sync_writes: bool,
}

/// One entry of a directory listing taken at opendir.
#[derive(Debug)]
struct DirEntrySnapshot {
    /// Inode number reported to `readdir` (the FUSE one when known, the
    /// backing one as a hint otherwise; the kernel looks names up anyway).
    ino: u64,
    /// File type for `d_type`.
    kind: FileType,
    /// The name.
    name: OsString,
}

/// Everything the session thread and the test thread share.
#[derive(Debug)]
pub(super) struct State {
    /// The backing directory ("the disk").
    root: PathBuf,
    /// Known inodes by FUSE inode number (1 is the root).
    nodes: HashMap<u64, Node>,
    /// FUSE inode number of each backing file, so a file looked up twice or
    /// renamed keeps one FUSE inode and so one overlay.
    by_backing: HashMap<BackingKey, u64>,
    /// Next FUSE inode number to hand out.
    next_ino: u64,
    /// Open regular files by file handle.
    files: HashMap<u64, OpenFile>,
    /// Open directories by file handle, each with its listing.
    dirs: HashMap<u64, Vec<DirEntrySnapshot>>,
    /// Next file handle to hand out (files and directories share it).
    next_fh: u64,
    /// Writes no fsync has made durable yet, per FUSE inode.
    overlays: HashMap<u64, Overlay>,
    /// Totals the tests read through `Mounted::counters`.
    pub(super) counters: Counters,
    /// Requests received per FUSE operation, for `Mounted::op_counts`.
    pub(super) op_counts: BTreeMap<&'static str, u64>,
}

/// The `io::Error` of a failed backing call as the errno FUSE replies with.
fn errno(error: io::Error) -> Errno {
    Errno::from(error)
}

/// A `SystemTime` from seconds and nanoseconds since the epoch.
fn system_time(seconds: i64, nanos: i64) -> SystemTime {
    let (Ok(seconds), Ok(nanos)) = (u64::try_from(seconds), u32::try_from(nanos)) else {
        return UNIX_EPOCH;
    };
    UNIX_EPOCH
        .checked_add(Duration::new(seconds, nanos.min(999_999_999)))
        .unwrap_or(UNIX_EPOCH)
}

impl State {
    /// State for a mount of `root`, which must be a directory.
    pub(super) fn new(root: &Path) -> io::Result<State> {
        let meta = fs::symlink_metadata(root)?;
        let root_key = (meta.dev(), meta.ino());
        let root_ino = INodeNo::ROOT.0;
        let mut nodes = HashMap::new();
        nodes.insert(
            root_ino,
            Node {
                path: root.to_path_buf(),
                backing_key: root_key,
                lookups: 1,
            },
        );
        Ok(State {
            root: root.to_path_buf(),
            nodes,
            by_backing: HashMap::from([(root_key, root_ino)]),
            next_ino: root_ino + 1,
            files: HashMap::new(),
            dirs: HashMap::new(),
            next_fh: 1,
            overlays: HashMap::new(),
            counters: Counters::default(),
            op_counts: BTreeMap::new(),
        })
    }

    /// Counts one request of `op`.
    fn count(&mut self, op: &'static str) {
        *self.op_counts.entry(op).or_default() += 1;
    }

    /// Bytes a power cut would lose now.
    pub(super) fn pending_bytes(&self) -> u64 {
        self.overlays.values().map(Overlay::pending_bytes).sum()
    }

    /// Drops every pending write of every inode.
    pub(super) fn power_cut(&mut self) -> PowerCutReport {
        let mut report = PowerCutReport::default();
        for (ino, overlay) in self.overlays.drain() {
            let bytes = overlay.pending_bytes();
            if bytes == 0 {
                continue;
            }
            report.files_affected += 1;
            report.bytes_dropped += bytes;
            if let Some(node) = self.nodes.get(&ino) {
                let relative = node.path.strip_prefix(&self.root).unwrap_or(&node.path);
                report.paths.push(relative.to_path_buf());
            }
        }
        report.paths.sort();
        self.counters.power_cuts += 1;
        self.counters.bytes_dropped += report.bytes_dropped;
        report
    }

    /// The backing path of a known inode.
    fn path_of(&self, ino: INodeNo) -> Result<PathBuf, Errno> {
        self.nodes
            .get(&ino.0)
            .map(|node| node.path.clone())
            .ok_or(Errno::ENOENT)
    }

    /// The backing path of `name` in directory `parent`.
    fn child_path(&self, parent: INodeNo, name: &OsStr) -> Result<PathBuf, Errno> {
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.contains(&b'/') || bytes == b"." || bytes == b".." {
            return Err(Errno::EINVAL);
        }
        Ok(self.path_of(parent)?.join(name))
    }

    /// The FUSE inode of a backing file, allocating one (with one lookup)
    /// or adding a lookup to the known one, whose path becomes `path`.
    fn remember(&mut self, path: PathBuf, meta: &Metadata) -> u64 {
        let key = (meta.dev(), meta.ino());
        if let Some(&ino) = self.by_backing.get(&key)
            && let Some(node) = self.nodes.get_mut(&ino)
        {
            node.path = path;
            node.lookups += 1;
            return ino;
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.nodes.insert(
            ino,
            Node {
                path,
                backing_key: key,
                lookups: 1,
            },
        );
        self.by_backing.insert(key, ino);
        ino
    }

    /// The attributes of inode `ino` whose backing metadata is `meta`, with
    /// the size the pending writes give it.
    fn attr(&self, ino: u64, meta: &Metadata) -> FileAttr {
        let kind = FileType::from_std(meta.file_type()).unwrap_or(FileType::RegularFile);
        let pending_end = self.overlays.get(&ino).map_or(0, Overlay::end);
        FileAttr {
            ino: INodeNo(ino),
            size: meta.size().max(pending_end),
            blocks: meta.blocks(),
            atime: meta.accessed().unwrap_or(UNIX_EPOCH),
            mtime: meta.modified().unwrap_or(UNIX_EPOCH),
            ctime: system_time(meta.ctime(), meta.ctime_nsec()),
            crtime: UNIX_EPOCH,
            kind,
            perm: (meta.mode() & 0o7777) as u16,
            nlink: u32::try_from(meta.nlink()).unwrap_or(u32::MAX),
            uid: meta.uid(),
            gid: meta.gid(),
            rdev: u32::try_from(meta.rdev()).unwrap_or(0),
            blksize: u32::try_from(meta.blksize()).unwrap_or(4096),
            flags: 0,
        }
    }

    /// Looks `path` up in the backing directory and returns the entry the
    /// kernel is told about (counting one lookup).
    fn entry(&mut self, path: PathBuf) -> Result<FileAttr, Errno> {
        let meta = fs::symlink_metadata(&path).map_err(errno)?;
        let ino = self.remember(path, &meta);
        Ok(self.attr(ino, &meta))
    }

    /// Called after the backing file `meta` lost a name: when that was its
    /// last one, its pending writes can never become durable, and its
    /// backing inode number may be reused by a new file, which must get a
    /// new FUSE inode.
    fn lost_a_name(&mut self, meta: &Metadata) {
        if !meta.is_dir() && meta.nlink() > 1 {
            return;
        }
        if let Some(ino) = self.by_backing.remove(&(meta.dev(), meta.ino())) {
            self.overlays.remove(&ino);
        }
    }

    /// Writes every pending write of `ino` to its backing file (fsync).
    fn persist(&mut self, ino: u64) -> Result<(), Errno> {
        let Some(overlay) = self.overlays.get_mut(&ino) else {
            return Ok(());
        };
        if overlay.is_empty() {
            return Ok(());
        }
        let extents = overlay.take_extents();

        // Any writable handle of the inode will do; if they are all closed,
        // open the file by name.
        let by_name;
        let writer = match self
            .files
            .values()
            .find(|open| open.ino == ino && open.writable)
        {
            Some(open) => &open.file,
            None => {
                let opened = self
                    .nodes
                    .get(&ino)
                    .ok_or(io::Error::from(io::ErrorKind::NotFound))
                    .and_then(|node| OpenOptions::new().write(true).open(&node.path));
                match opened {
                    Ok(file) => {
                        by_name = file;
                        &by_name
                    }
                    Err(error) => {
                        overlay.restore_extents(extents);
                        return Err(errno(error));
                    }
                }
            }
        };

        let mut remaining = extents;
        while let Some((start, bytes)) = remaining.pop_first() {
            if let Err(error) = writer.write_all_at(&bytes, start) {
                remaining.insert(start, bytes);
                overlay.restore_extents(remaining);
                return Err(errno(error));
            }
            self.counters.bytes_persisted += bytes.len() as u64;
        }
        Ok(())
    }

    /// The handle `fh`, which must be an open regular file.
    fn open_file(&self, fh: FileHandle) -> Result<&OpenFile, Errno> {
        self.files.get(&fh.0).ok_or(Errno::EBADF)
    }

    /// Reads `size` bytes at `offset` of the file open as `fh`: the backing
    /// bytes with the pending writes on top.
    fn read(&self, fh: FileHandle, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let open = self.open_file(fh)?;
        let backing_len = open.file.metadata().map_err(errno)?.len();
        let pending_end = self.overlays.get(&open.ino).map_or(0, Overlay::end);
        let file_len = backing_len.max(pending_end);
        if offset >= file_len {
            return Ok(Vec::new());
        }
        let len = u64::from(size).min(file_len - offset);
        let mut buf = vec![0; usize::try_from(len).map_err(|_| Errno::EINVAL)?];
        if offset < backing_len {
            let from_backing =
                usize::try_from((backing_len - offset).min(len)).map_err(|_| Errno::EINVAL)?;
            read_fully_at(&open.file, &mut buf[..from_backing], offset).map_err(errno)?;
        }
        if let Some(overlay) = self.overlays.get(&open.ino) {
            overlay.read_into(offset, &mut buf);
        }
        Ok(buf)
    }

    /// Holds a write in the overlay (or persists it for an `O_SYNC` handle).
    fn write(&mut self, fh: FileHandle, offset: u64, data: &[u8]) -> Result<u32, Errno> {
        let written = u32::try_from(data.len()).map_err(|_| Errno::EINVAL)?;
        let open = self.open_file(fh)?;
        if !open.writable {
            return Err(Errno::EBADF);
        }
        if offset.checked_add(data.len() as u64).is_none() {
            return Err(Errno::EFBIG);
        }
        let (ino, sync_writes) = (open.ino, open.sync_writes);
        self.overlays.entry(ino).or_default().write(offset, data);
        self.counters.writes += 1;
        self.counters.bytes_written += data.len() as u64;
        if sync_writes {
            self.persist(ino)?;
        }
        Ok(written)
    }

    /// Opens the backing file of `ino` and registers a handle for it.
    fn open(&mut self, ino: u64, flags: OpenFlags, file: File) -> u64 {
        let writable = !matches!(flags.acc_mode(), OpenAccMode::O_RDONLY);
        let fh = self.next_fh;
        self.next_fh += 1;
        self.files.insert(
            fh,
            OpenFile {
                ino,
                file,
                writable,
                sync_writes: flags.0 & O_DSYNC != 0,
            },
        );
        fh
    }

    /// Truncates (or extends) inode `ino` to `size`, through the handle
    /// `fh` when it is a writable one, and clips its pending writes.
    fn set_size(&mut self, ino: u64, fh: Option<FileHandle>, size: u64) -> Result<(), Errno> {
        let through_handle = fh
            .and_then(|fh| self.files.get(&fh.0))
            .filter(|open| open.writable);
        match through_handle {
            Some(open) => open.file.set_len(size).map_err(errno)?,
            None => {
                let path = self.path_of(INodeNo(ino))?;
                let file = OpenOptions::new().write(true).open(path).map_err(errno)?;
                file.set_len(size).map_err(errno)?;
            }
        }
        if let Some(overlay) = self.overlays.get_mut(&ino) {
            overlay.truncate(size);
        }
        Ok(())
    }

    /// Current attributes of `ino`, through the open handle when given (so
    /// an open but unlinked file still answers).
    fn getattr(&self, ino: INodeNo, fh: Option<FileHandle>) -> Result<FileAttr, Errno> {
        let meta = match fh.and_then(|fh| self.files.get(&fh.0)) {
            Some(open) => open.file.metadata(),
            None => fs::symlink_metadata(self.path_of(ino)?),
        }
        .map_err(errno)?;
        Ok(self.attr(ino.0, &meta))
    }

    /// The listing of directory `ino` for opendir.
    fn list_dir(&self, ino: INodeNo) -> Result<Vec<DirEntrySnapshot>, Errno> {
        let path = self.path_of(ino)?;
        let meta = fs::symlink_metadata(&path).map_err(errno)?;
        let parent_ino = path
            .parent()
            .filter(|_| ino != INodeNo::ROOT)
            .and_then(|parent| fs::symlink_metadata(parent).ok())
            .and_then(|parent| self.by_backing.get(&(parent.dev(), parent.ino())).copied())
            .unwrap_or(INodeNo::ROOT.0);
        let mut entries = vec![
            DirEntrySnapshot {
                ino: ino.0,
                kind: FileType::Directory,
                name: OsString::from("."),
            },
            DirEntrySnapshot {
                ino: parent_ino,
                kind: FileType::Directory,
                name: OsString::from(".."),
            },
        ];
        for entry in fs::read_dir(&path).map_err(errno)? {
            let entry = entry.map_err(errno)?;
            let kind = entry
                .file_type()
                .ok()
                .and_then(FileType::from_std)
                .unwrap_or(FileType::RegularFile);
            let backing_ino = std::os::unix::fs::DirEntryExt::ino(&entry);
            let ino = self
                .by_backing
                .get(&(meta.dev(), backing_ino))
                .copied()
                .unwrap_or(backing_ino);
            entries.push(DirEntrySnapshot {
                ino,
                kind,
                name: entry.file_name(),
            });
        }
        Ok(entries)
    }

    /// Renames `from` to `to` in the backing directory and moves the names
    /// of every inode at or below `from`.
    fn rename(&mut self, from: &Path, to: &Path, flags: RenameFlags) -> Result<(), Errno> {
        if flags.contains(RenameFlags::RENAME_EXCHANGE)
            || flags.contains(RenameFlags::RENAME_WHITEOUT)
        {
            return Err(Errno::EINVAL);
        }
        let source = fs::symlink_metadata(from).map_err(errno)?;
        let replaced = fs::symlink_metadata(to).ok();
        if replaced.is_some() && flags.contains(RenameFlags::RENAME_NOREPLACE) {
            return Err(Errno::EEXIST);
        }
        fs::rename(from, to).map_err(errno)?;
        if let Some(replaced) = replaced
            && (replaced.dev(), replaced.ino()) != (source.dev(), source.ino())
        {
            self.lost_a_name(&replaced);
        }
        for node in self.nodes.values_mut() {
            if let Ok(rest) = node.path.strip_prefix(from) {
                node.path = if rest.as_os_str().is_empty() {
                    to.to_path_buf()
                } else {
                    to.join(rest)
                };
            }
        }
        Ok(())
    }

    /// The kernel dropped `nlookup` references to `ino`; forget the node
    /// when none are left and nothing else needs it.
    fn forget(&mut self, ino: u64, nlookup: u64) {
        let Some(node) = self.nodes.get_mut(&ino) else {
            return;
        };
        node.lookups = node.lookups.saturating_sub(nlookup);
        let unused = node.lookups == 0
            && ino != INodeNo::ROOT.0
            && !self.files.values().any(|open| open.ino == ino)
            && self.overlays.get(&ino).is_none_or(Overlay::is_empty);
        if !unused {
            return;
        }
        let key = node.backing_key;
        self.nodes.remove(&ino);
        self.overlays.remove(&ino);
        if self.by_backing.get(&key) == Some(&ino) {
            self.by_backing.remove(&key);
        }
    }
}

/// `read_at` until `buf` is full or the file ends (the rest stays zero).
fn read_fully_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match file.read_at(buf, offset) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// The `OpenOptions` for a backing file opened with the kernel's `flags`
/// (access mode only: appends arrive as offsets, sync flags are ours).
fn open_options(flags: OpenFlags) -> OpenOptions {
    let mut options = OpenOptions::new();
    match flags.acc_mode() {
        OpenAccMode::O_RDONLY => options.read(true),
        OpenAccMode::O_WRONLY => options.write(true),
        OpenAccMode::O_RDWR => options.read(true).write(true),
    };
    options
}

/// Sets the exact permission bits (the kernel already applied the umask;
/// this process's own umask must not apply again).
fn set_mode(path: &Path, mode: u32) -> Result<(), Errno> {
    fs::set_permissions(path, Permissions::from_mode(mode & 0o7777)).map_err(errno)
}

/// The FUSE filesystem: a handle on the state it shares with `Mounted`.
#[derive(Debug)]
pub struct PowerCutFs {
    /// The inode table, handles and overlays, shared with the test thread.
    pub(super) state: Arc<Mutex<State>>,
}

impl PowerCutFs {
    /// Locks the state, counting one request of `op`. A panic elsewhere
    /// must not wedge the filesystem, so a poisoned lock is taken over.
    fn lock(&self, op: &'static str) -> MutexGuard<'_, State> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.count(op);
        state
    }

    /// Counts one request of `op` that needs nothing else from the state.
    fn count_only(&self, op: &'static str) {
        drop(self.lock(op));
    }
}

/// Replies to an entry-creating request.
fn reply_entry(reply: ReplyEntry, result: Result<FileAttr, Errno>) {
    match result {
        Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
        Err(error) => reply.error(error),
    }
}

/// Replies to a request that returns nothing.
fn reply_empty(reply: ReplyEmpty, result: Result<(), Errno>) {
    match result {
        Ok(()) => reply.ok(),
        Err(error) => reply.error(error),
    }
}

impl Filesystem for PowerCutFs {
    fn init(&mut self, _req: &Request, _config: &mut KernelConfig) -> io::Result<()> {
        self.count_only("init");
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let mut state = self.lock("lookup");
        let result = state
            .child_path(parent, name)
            .and_then(|path| state.entry(path));
        reply_entry(reply, result);
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.lock("forget").forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.lock("getattr").getattr(ino, fh) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(error) => reply.error(error),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut state = self.lock("setattr");
        let result = (|| {
            let path = state.path_of(ino)?;
            if let Some(size) = size {
                state.set_size(ino.0, fh, size)?;
            }
            if let Some(mode) = mode {
                set_mode(&path, mode)?;
            }
            if uid.is_some() || gid.is_some() {
                lchown(&path, uid, gid).map_err(errno)?;
            }
            if atime.is_some() || mtime.is_some() {
                let meta = fs::symlink_metadata(&path).map_err(errno)?;
                // Opening anything else (a FIFO) could block the session.
                if meta.is_file() || meta.is_dir() {
                    let resolve = |time: TimeOrNow| match time {
                        TimeOrNow::SpecificTime(time) => time,
                        TimeOrNow::Now => SystemTime::now(),
                    };
                    let mut times = FileTimes::new();
                    if let Some(atime) = atime {
                        times = times.set_accessed(resolve(atime));
                    }
                    if let Some(mtime) = mtime {
                        times = times.set_modified(resolve(mtime));
                    }
                    File::open(&path)
                        .and_then(|file| file.set_times(times))
                        .map_err(errno)?;
                }
            }
            state.getattr(ino, fh)
        })();
        match result {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(error) => reply.error(error),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let state = self.lock("readlink");
        match state
            .path_of(ino)
            .and_then(|path| fs::read_link(path).map_err(errno))
        {
            Ok(target) => reply.data(target.as_os_str().as_bytes()),
            Err(error) => reply.error(error),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        let mut state = self.lock("mknod");
        let result = (|| {
            // Only regular files: device nodes and FIFOs are not needed.
            if mode & S_IFMT != S_IFREG {
                return Err(Errno::EPERM);
            }
            let path = state.child_path(parent, name)?;
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode & 0o7777)
                .open(&path)
                .map_err(errno)?;
            set_mode(&path, mode)?;
            state.entry(path)
        })();
        reply_entry(reply, result);
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let mut state = self.lock("mkdir");
        let result = (|| {
            let path = state.child_path(parent, name)?;
            fs::DirBuilder::new()
                .mode(mode & 0o7777)
                .create(&path)
                .map_err(errno)?;
            set_mode(&path, mode)?;
            state.entry(path)
        })();
        reply_entry(reply, result);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut state = self.lock("unlink");
        let result = (|| {
            let path = state.child_path(parent, name)?;
            let meta = fs::symlink_metadata(&path).map_err(errno)?;
            fs::remove_file(&path).map_err(errno)?;
            state.lost_a_name(&meta);
            Ok(())
        })();
        reply_empty(reply, result);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut state = self.lock("rmdir");
        let result = (|| {
            let path = state.child_path(parent, name)?;
            let meta = fs::symlink_metadata(&path).map_err(errno)?;
            fs::remove_dir(&path).map_err(errno)?;
            state.lost_a_name(&meta);
            Ok(())
        })();
        reply_empty(reply, result);
    }

    fn symlink(
        &self,
        _req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let mut state = self.lock("symlink");
        let result = (|| {
            let path = state.child_path(parent, link_name)?;
            std::os::unix::fs::symlink(target, &path).map_err(errno)?;
            state.entry(path)
        })();
        reply_entry(reply, result);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mut state = self.lock("rename");
        let result = (|| {
            let from = state.child_path(parent, name)?;
            let to = state.child_path(newparent, newname)?;
            state.rename(&from, &to, flags)
        })();
        reply_empty(reply, result);
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let mut state = self.lock("link");
        let result = (|| {
            let from = state.path_of(ino)?;
            let to = state.child_path(newparent, newname)?;
            fs::hard_link(&from, &to).map_err(errno)?;
            state.entry(to)
        })();
        reply_entry(reply, result);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let mut state = self.lock("open");
        let result = state
            .path_of(ino)
            .and_then(|path| open_options(flags).open(path).map_err(errno))
            .map(|file| state.open(ino.0, flags, file));
        match result {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO),
            Err(error) => reply.error(error),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.lock("read").read(fh, offset, size) {
            Ok(data) => reply.data(&data),
            Err(error) => reply.error(error),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.lock("write").write(fh, offset, data) {
            Ok(written) => reply.written(written),
            Err(error) => reply.error(error),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) persists nothing.
        self.lock("flush").counters.flushes += 1;
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // Nor does the last close: the pending writes stay pending.
        self.lock("release").files.remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut state = self.lock(if datasync { "fdatasync" } else { "fsync" });
        if datasync {
            state.counters.fdatasyncs += 1;
        } else {
            state.counters.fsyncs += 1;
        }
        let result = state.persist(ino.0);
        reply_empty(reply, result);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let mut state = self.lock("opendir");
        match state.list_dir(ino) {
            Ok(entries) => {
                let fh = state.next_fh;
                state.next_fh += 1;
                state.dirs.insert(fh, entries);
                reply.opened(FileHandle(fh), FopenFlags::empty());
            }
            Err(error) => reply.error(error),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let state = self.lock("readdir");
        let Some(entries) = state.dirs.get(&fh.0) else {
            reply.error(Errno::EBADF);
            return;
        };
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (index, entry) in entries.iter().enumerate().skip(skip) {
            let next_offset = index as u64 + 1;
            if reply.add(INodeNo(entry.ino), next_offset, entry.kind, &entry.name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.lock("releasedir").dirs.remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Directory entries already passed through: nothing to persist.
        self.lock("fsyncdir").counters.fsyncdirs += 1;
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let state = self.lock("statfs");
        match sys::stat_fs(&state.root) {
            Ok(stats) => reply.statfs(
                stats.blocks,
                stats.bfree,
                stats.bavail,
                stats.files,
                stats.ffree,
                stats.bsize,
                stats.namelen,
                stats.frsize,
            ),
            Err(error) => reply.error(errno(error)),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Permission checks are the kernel's (`default_permissions`); this
        // only answers whether the inode still exists.
        let state = self.lock("access");
        let result = state
            .path_of(ino)
            .and_then(|path| fs::symlink_metadata(path).map(|_| ()).map_err(errno));
        reply_empty(reply, result);
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut state = self.lock("create");
        let flags = OpenFlags(flags);
        let result = (|| {
            let path = state.child_path(parent, name)?;
            let mut options = open_options(flags);
            // Creating needs write access even for O_RDONLY|O_CREAT.
            options.write(true).mode(mode & 0o7777);
            if flags.0 & O_EXCL != 0 {
                options.create_new(true);
            } else {
                options.create(true);
            }
            let file = options.open(&path).map_err(errno)?;
            set_mode(&path, mode)?;
            let attr = state.entry(path)?;
            let fh = state.open(attr.ino.0, flags, file);
            Ok((attr, fh))
        })();
        match result {
            Ok((attr, fh)) => reply.created(
                &TTL,
                &attr,
                Generation(0),
                FileHandle(fh),
                FopenFlags::FOPEN_DIRECT_IO,
            ),
            Err(error) => reply.error(error),
        }
    }

    // Below: operations this filesystem does not support. They are only
    // overridden to be counted (so a test can see what a program tried);
    // each answers ENOSYS, after which the kernel stops asking or falls
    // back to a generic implementation.

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        self.count_only("getxattr");
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        self.count_only("listxattr");
        reply.error(Errno::ENOSYS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        self.count_only("setxattr");
        reply.error(Errno::ENOSYS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        self.count_only("removexattr");
        reply.error(Errno::ENOSYS);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        self.count_only("fallocate");
        reply.error(Errno::ENOSYS);
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: i64,
        _whence: i32,
        reply: ReplyLseek,
    ) {
        self.count_only("lseek");
        reply.error(Errno::ENOSYS);
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        self.count_only("copy_file_range");
        reply.error(Errno::ENOSYS);
    }
}
