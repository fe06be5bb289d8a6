//! `SledStorage`: the production store. The only file that imports sled.
//! Layout and invariants are in the module docs of `storage`.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs::File;
use std::hash::{BuildHasher, RandomState};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use inotify::{Inotify, WatchMask};
use parking_lot::{FairMutex, FairMutexGuard};
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
use sled::{Db, IVec, Tree};

use super::index::KeyIndex;
use super::mark::{self, Mark, Summary};
use super::redo::{self, Redo};
use super::{
    AppendOutcome, BatchAck, Counted, DlqEntry, FORMAT_VERSION, NewEvent, Quarantined, QueueInfo,
    Storage, StorageError, decode_key_list, decode_record, decode_segment, encode_key_list,
    encode_record, encode_segment, scoped_key, visit_key_list,
};
use crate::analytics::{self, KvRead, KvWrite};
use crate::event::{Queued, WalRecord};

const CURSOR: &[u8] = b"cursor";
const FORMAT: &[u8] = b"format_version";
const STORE_ID: &[u8] = b"store_id";
const DLQ_LAST: &[u8] = b"dlq_last";
const QUEUE_BYTES: &[u8] = b"queue_bytes";
const DLQ_LEN: &[u8] = b"dlq_len";
/// `meta`: the number of the last batch commit that finished (see [`Redo`]).
const BATCH_COMMITS: &[u8] = b"batch_commits";
/// A batch commit's redo record is written in parts of at most this many
/// bytes: under sled's blob threshold, like a WAL segment.
const REDO_PART_BYTES: usize = SEGMENT_BYTES;

/// How the store is opened.
#[derive(Debug, Clone)]
pub struct SledOptions {
    /// sled's page cache; its own default (1 GiB) is far too much for a VM daemon.
    pub cache_bytes: u64,
    /// `Some(ms)`: a background thread flushes and syncs this often
    /// (`durability = "interval"`). `None`: only explicit `flush()` calls
    /// make writes durable (`"fsync"`).
    pub background_flush_ms: Option<u64>,
}

impl Default for SledOptions {
    fn default() -> Self {
        SledOptions {
            cache_bytes: 64 * 1024 * 1024,
            background_flush_ms: None,
        }
    }
}

/// One open sled database and its trees.
struct Store {
    /// The data directory: where the mark is kept.
    dir: PathBuf,
    /// The database; kept to flush it.
    db: Db,
    /// last seq of a group → the group's segment.
    wal: Tree,
    /// first seen ‖ last seq of a group → the group's keys, to sweep expired
    /// keys in time order.
    expiry: Tree,
    /// cursor, format version, last DLQ id.
    meta: Tree,
    /// event type → count (the built-in counter).
    counts: Tree,
    /// DLQ id → DlqEntry envelope.
    dlq: Tree,
    /// Records that did not decode, kept for inspection.
    quarantine: Tree,
    /// The analytics key space (see `crate::analytics`).
    aggregates: Tree,
    /// The writes of the batch commit being made ([`Redo`]): part index
    /// (u32 BE) → part; empty between commits.
    redo: Tree,
    /// The last seq handed out (invariant 4); only changed under `write_lock`.
    last_seq: AtomicU64,
    /// The highest seq that a write of this store committed (or that it
    /// recovered at open); unlike `last_seq`, a reopen never raises it.
    committed: AtomicU64,
    /// The highest seq that a flush made durable: the mark's lower bound.
    durable: AtomicU64,
    /// The store opened and was checked against its mark: only then does
    /// closing it write a clean mark.
    checked: bool,
    /// The mark on disk is clean: the first write after it must replace
    /// it (read on every `lock()`, so an atomic beside `marking`).
    clean: AtomicBool,
    /// A group or batch commit failed part-way: sled may hold some of its
    /// writes, so nothing may be written after it until the store is
    /// reopened (whose open finishes that commit).
    unfinished: AtomicBool,
    /// What the mark on disk says; held while one is written.
    marking: parking_lot::Mutex<Marking>,
    /// Reports of missing events (the mark's check, WAL gaps).
    missing_reports: AtomicU64,
    /// sled's forward walk of the WAL ended early once (reported once).
    short_walk: AtomicBool,
    /// Serialises the writers: seqs (append, DLQ replay), the byte gauge
    /// (ack, quarantine) and keys (sweep) each have one writer at a time.
    /// Fair, so that acks get their turn between group commits under
    /// sustained intake instead of starving (the queue would grow without
    /// bound while the Deduper re-took an unfair lock).
    write_lock: FairMutex<()>,
    /// Encoded bytes of the records in the WAL (kept in `meta` too).
    queue_bytes: AtomicU64,
    /// Entries in the DLQ (kept in `meta` too): sled's `len` walks the tree.
    dlq_len: AtomicU64,
    /// Which group may hold a key (format 3): derived from `expiry`,
    /// rebuilt at open; changed only under `write_lock`.
    idempotency: parking_lot::Mutex<Idempotency>,
    /// Syncs the files that sled's flush leaves in the page cache.
    disk: DiskSync,
    /// Set members of `aggregates` known to be there, so that a batch
    /// commit does not read them again (see [`analytics::Known`]): learnt
    /// only after a commit succeeds, under `write_lock`.
    known: parking_lot::Mutex<analytics::Known>,
}

/// The mark on disk, as this store last wrote it.
#[derive(Default)]
struct Marking {
    /// The last seq of the running mark (meaningless while clean).
    written: u64,
    /// The last write of a mark failed (reported once until one works).
    failing: bool,
}

/// One `read_after` in progress: what it took and where it is.
struct Reading {
    /// The records taken, in seq order.
    records: Vec<Queued>,
    /// Segments moved to quarantine and seqs found missing on the way.
    damaged: Vec<Quarantined>,
    /// The cursor when the read began: the bytes of a segment set aside
    /// count from it.
    cursor: u64,
    /// Records at or below this are not wanted (done, or read before).
    after: u64,
    /// The seq the next segment should start at: seqs above the cursor
    /// are contiguous in the WAL.
    expect: u64,
    /// How many records are wanted.
    limit: usize,
}

impl Reading {
    fn full(&self) -> bool {
        self.records.len() >= self.limit
    }
}

/// The in-memory idempotency index and the groups it points at.
struct Idempotency {
    /// Key fingerprint → candidate group ids.
    index: KeyIndex,
    /// Group id → the group's `idem_expiry` entry.
    groups: HashMap<u32, Group>,
    /// A group's last seq → its id (the sweep meets groups by their entry).
    ids: HashMap<u64, u32>,
    /// The next id to try; ids wrap, skipping `u32::MAX` and ids in use.
    next_id: u32,
    /// Per-process random keys: clients cannot choose keys that collide.
    hasher: RandomState,
    /// The fingerprint function; tests swap in one that collides.
    fingerprint: fn(&RandomState, &[u8]) -> u64,
}

/// Where a group's keys are: its `idem_expiry` entry.
#[derive(Debug, Clone, Copy)]
struct Group {
    /// When its keys were first seen: the TTL runs from here.
    first_seen_ms: i64,
    /// Its last seq: the rest of the entry's key.
    last_seq: u64,
}

impl Group {
    fn entry_key(&self) -> [u8; 16] {
        let mut k = [0u8; 16];
        k[..8].copy_from_slice(&ordered_ms(self.first_seen_ms));
        k[8..].copy_from_slice(&self.last_seq.to_be_bytes());
        k
    }

    /// Reads a format-3 entry key; `None` for any other shape.
    fn from_entry_key(key: &[u8]) -> Option<Group> {
        let key: [u8; 16] = key.try_into().ok()?;
        Some(Group {
            first_seen_ms: (u64::from_be_bytes(key[..8].try_into().ok()?) ^ SIGN) as i64,
            last_seq: u64::from_be_bytes(key[8..].try_into().ok()?),
        })
    }
}

/// The fingerprint of a scoped key (SipHash with the process's keys).
fn siphash(hasher: &RandomState, key: &[u8]) -> u64 {
    hasher.hash_one(key)
}

impl Idempotency {
    fn new() -> Idempotency {
        Idempotency {
            index: KeyIndex::default(),
            groups: HashMap::new(),
            ids: HashMap::new(),
            next_id: 0,
            hasher: RandomState::new(),
            fingerprint: siphash,
        }
    }

    fn fingerprint(&self, key: &[u8]) -> u64 {
        (self.fingerprint)(&self.hasher, key)
    }

    /// Registers a group and its keys' fingerprints.
    fn add(&mut self, group: Group, fingerprints: impl IntoIterator<Item = u64>) {
        while self.next_id == u32::MAX || self.groups.contains_key(&self.next_id) {
            self.next_id = self.next_id.wrapping_add(1);
        }
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.groups.insert(id, group);
        self.ids.insert(group.last_seq, id);
        for fp in fingerprints {
            self.index.insert(fp, id);
        }
    }
}

/// Group id → its stored keys, decoded once per call that needs them.
type KeyLists = HashMap<u32, HashSet<Box<[u8]>>>;

/// What the index and the stored key lists say of one key.
enum Seen {
    /// Never (or swept).
    No,
    /// In a group inside the TTL, first seen then.
    Live(i64),
    /// Only in expired groups not yet swept: these index entries.
    Expired(Vec<u32>),
}

/// What makes a sled flush power-safe.
///
/// sled 0.34's `flush` writes its buffers and ends in `sync_file_range`,
/// which persists neither the file's size nor the drive's write cache; it
/// writes `conf` and values larger than `segment_size / 4` (blob files,
/// one per value) without any sync, and never syncs a directory.
/// [`DiskSync::flush`] therefore wraps sled's flush:
///
/// 1. it lists the blob files, then runs sled's flush, then lists them again
///    (unless nothing was created, removed or renamed in either directory
///    since the last listing, and no blob was left unfinished then: see
///    [`DirChanges`]);
/// 2. it `fdatasync`s every blob file of the second listing that no earlier
///    flush settled, then the `blobs` directory if a file in it is new: a
///    log entry made durable in step 3 may point at any of them;
/// 3. it `fdatasync`s the log file `db`;
/// 4. it `fsync`s the data directory when its listing changed (sled writes
///    a snapshot to a new file and renames it).
///
/// Why a blob is synced at most twice, never statted: sled names a blob by
/// its reservation's log sequence number, raises its `max_reserved_lsn`
/// past that number before it creates the file, writes the whole file
/// before the reservation completes, and never writes the file again. Its
/// flush waits for every reservation up to the `max_reserved_lsn` it read
/// at the start. So a blob in the first listing was finished when the flush
/// returned: synced once then, it is settled for good. A blob that appeared
/// during the flush may still have been written then: it is synced now (if
/// the flush made a log entry pointing at it durable, it was finished) and
/// once more after the next flush, when it is in that flush's first
/// listing. The cost of a flush is two directory listings and the new
/// blobs, not a `stat` of every blob in the store (hundreds of them once
/// millions of keys are in the window). Most flushes create no file at all:
/// an inotify watch on both directories then tells that the listings would
/// be the last ones again, and such a flush skips them (one `read` of the
/// watch instead of three directory listings).
///
/// Opening the store syncs `conf`, `db`, both directories and the data
/// directory's parent (which may have just created it), then flushes once,
/// which syncs every blob.
struct DiskSync {
    /// The data directory (sled's root).
    dir: PathBuf,
    /// Its `blobs/`, where sled writes large values (joined once, not per flush).
    blobs: PathBuf,
    /// sled's log file, kept open to be synced.
    log: File,
    /// What was synced; held through a flush so that flushes do not interleave.
    state: Mutex<SyncedFiles>,
}

/// Tells whether a file was created, removed or renamed in the data
/// directory or in `blobs/` since it was last asked, through an inotify
/// watch on both (writes to a file do not count). The kernel queues an
/// event before the call that made the change returns, so a quiet watch
/// means that a listing now would find what the last one found. An
/// overflowed queue is an event too; without inotify (no instance or watch
/// left under the user's limits) every question is answered yes and every
/// flush lists, as it did before.
struct DirChanges {
    /// The watch; `None` when it could not be set up.
    inotify: Option<Inotify>,
}

impl DirChanges {
    fn watch(dir: &Path) -> DirChanges {
        let mask = WatchMask::CREATE
            | WatchMask::DELETE
            | WatchMask::MOVED_FROM
            | WatchMask::MOVED_TO
            | WatchMask::DELETE_SELF
            | WatchMask::MOVE_SELF;
        let inotify = Inotify::init().and_then(|inotify| {
            inotify.watches().add(dir, mask)?;
            inotify.watches().add(dir.join("blobs"), mask)?;
            Ok(inotify)
        });
        match inotify {
            Ok(inotify) => DirChanges {
                inotify: Some(inotify),
            },
            Err(error) => {
                tracing::warn!(
                    %error,
                    "no inotify watch on the data directory: every flush lists its files"
                );
                DirChanges { inotify: None }
            }
        }
    }

    /// Whether anything changed since the last call (yes when the watch
    /// cannot tell); takes the news.
    fn since_last_asked(&mut self) -> bool {
        let Some(inotify) = &mut self.inotify else {
            return true;
        };
        let mut buffer = [0u8; 4096];
        let mut changed = false;
        loop {
            match inotify.read_events(&mut buffer) {
                Ok(_) => changed = true,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return changed,
                Err(_) => return true,
            }
        }
    }
}

/// The files as the last [`DiskSync::flush`] left them.
struct SyncedFiles {
    /// The data directory's entries.
    entries: Vec<OsString>,
    /// Blob files synced after sled had finished them: never synced again.
    settled: HashSet<OsString>,
    /// Blob files that appeared during the last flush and may have been
    /// unfinished when they were synced: synced again after the next one.
    fresh: HashSet<OsString>,
    /// The last flush's listings were made and their files synced (a flush
    /// that failed half-way leaves this false: the next one lists again).
    listed: bool,
    /// Whether a listing now could differ from the last.
    changes: DirChanges,
}

impl DiskSync {
    /// Syncs what sled wrote in `dir` before this start, once.
    fn open(dir: &Path, db: &Db) -> std::io::Result<DiskSync> {
        let log = File::open(dir.join("db"))?;
        File::open(dir.join("conf"))?.sync_all()?;
        log.sync_all()?;
        sync_dir(&dir.join("blobs"))?;
        // The data directory may be new: its entry in its parent too.
        match dir.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent)?,
            _ => sync_dir(Path::new("."))?,
        }
        let disk = DiskSync {
            dir: dir.to_owned(),
            blobs: dir.join("blobs"),
            log,
            state: Mutex::new(SyncedFiles {
                entries: Vec::new(),
                settled: HashSet::new(),
                fresh: HashSet::new(),
                listed: false,
                changes: DirChanges::watch(dir),
            }),
        };
        // Nothing is settled yet: this syncs every blob and the directory.
        disk.flush(db)?;
        Ok(disk)
    }

    /// Runs sled's flush and makes what it wrote durable (see the type's docs).
    fn flush(&self, db: &Db) -> std::io::Result<()> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let blobs_dir = &self.blobs;
        // Quiet since the last listing, which left every blob settled: the
        // blobs now are the settled ones, and a listing would say so.
        let quiet = !state.changes.since_last_asked() && state.listed && state.fresh.is_empty();
        let finished = if quiet {
            None
        } else {
            Some(blob_names(blobs_dir)?)
        };
        db.flush().map_err(std::io::Error::other)?;
        if quiet && !state.changes.since_last_asked() {
            // No file came or went in either directory through the flush.
            return self.log.sync_data();
        }
        let finished = finished.unwrap_or_else(|| state.settled.clone());
        // Until these listings are done and their files synced.
        state.listed = false;
        let mut settled = HashSet::with_capacity(state.settled.len() + 4);
        let mut fresh = HashSet::new();
        let mut new_blob = false;
        for name in blob_names(blobs_dir)? {
            if state.settled.contains(&name) {
                settled.insert(name);
                continue;
            }
            match File::open(blobs_dir.join(&name)) {
                Ok(f) => f.sync_data()?,
                Err(e) if e.kind() == ErrorKind::NotFound => continue, // collected by sled
                Err(e) => return Err(e),
            }
            new_blob |= !state.fresh.contains(&name);
            if finished.contains(&name) {
                settled.insert(name);
            } else {
                fresh.insert(name);
            }
        }
        state.settled = settled;
        state.fresh = fresh;
        if new_blob {
            sync_dir(blobs_dir)?;
        }
        self.log.sync_data()?;
        let mut entries = std::fs::read_dir(&self.dir)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<Vec<_>>>()?;
        entries.sort_unstable();
        if entries != state.entries {
            sync_dir(&self.dir)?;
            state.entries = entries;
        }
        state.listed = true;
        Ok(())
    }
}

/// The names in sled's blob directory.
fn blob_names(dir: &Path) -> std::io::Result<HashSet<OsString>> {
    std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect()
}

/// fsyncs a directory: its entries (a new or renamed file) become durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// How a note in `quarantine` for seqs set aside on purpose starts.
const SET_ASIDE: &str = "seqs ";

/// The first seq of a set-aside note ([`Store::set_aside`]); `None` for a
/// damaged record kept as found.
fn set_aside_start(note: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(note).ok()?.strip_prefix(SET_ASIDE)?;
    text.split("..=").next()?.parse().ok()
}

/// A WAL segment's target size: under sled's blob threshold
/// (`segment_size / 4` = 128 KiB) with room for the envelope and table.
const SEGMENT_BYTES: usize = 96 * 1024;

/// Most bytes of a key list entry. sled splits a leaf past 16 entries and
/// writes a page over 128 KiB as a blob file: lists this small keep the
/// leaves of `idem_expiry` under that, so its pages stay in the log,
/// where sled's cache weighs them by their size. Larger lists made every
/// leaf a blob that lived as long as its keys, and each flush that saw a
/// blob come or go listed them all.
const KEY_LIST_BYTES: usize = 7 * 1024;

/// One `idem_expiry` entry a group commit writes.
struct KeyListEntry {
    /// Its keys' group: the commit's time, and the seq of its last key.
    group: Group,
    /// Its keys, as positions among the commit's accepted ones.
    keys: std::ops::Range<usize>,
    /// The encoded list (taken when written).
    list: Vec<u8>,
}

/// The key list entries of a group commit whose accepted `keys` take the
/// seqs after `start`, in order: runs of consecutive keys, each encoded in
/// at most [`KEY_LIST_BYTES`] (a single key past it gets an entry of its
/// own), each named by its own last seq. To the index and the sweep each
/// entry is a group of its own; the crash repair (`finish_last_group`)
/// keys every seq after the last entry written.
fn key_list_entries(start: u64, now_ms: i64, keys: &[&[u8]]) -> Vec<KeyListEntry> {
    let entry = |run: std::ops::Range<usize>, list| KeyListEntry {
        group: Group {
            first_seen_ms: now_ms,
            last_seq: start + run.end as u64,
        },
        keys: run,
        list,
    };
    let whole = encode_key_list(keys);
    if whole.len() <= KEY_LIST_BYTES {
        return vec![entry(0..keys.len(), whole)];
    }
    // Even runs sized from the whole list, each halved while too large.
    let runs = whole.len().div_ceil(KEY_LIST_BYTES * 3 / 4);
    let per = keys.len().div_ceil(runs).max(1);
    let mut entries = Vec::with_capacity(runs + 1);
    let mut pending: Vec<std::ops::Range<usize>> = Vec::new();
    for from in (0..keys.len()).step_by(per).rev() {
        pending.push(from..(from + per).min(keys.len()));
    }
    while let Some(run) = pending.pop() {
        let list = encode_key_list(&keys[run.clone()]);
        if list.len() > KEY_LIST_BYTES && run.len() > 1 {
            let mid = run.start + run.len() / 2;
            pending.push(mid..run.end);
            pending.push(run.start..mid);
            continue;
        }
        entries.push(entry(run, list));
    }
    entries
}

/// About the bytes a record takes in a segment.
fn record_estimate(r: &WalRecord) -> usize {
    r.body.len() + r.source.len() + r.key.len() + r.event_type.len() + 40
}

/// Flips the sign bit so that big-endian bytes sort like the i64 they hold
/// (negative times before positive ones).
const SIGN: u64 = 1 << 63;

fn ordered_ms(ms: i64) -> [u8; 8] {
    ((ms as u64) ^ SIGN).to_be_bytes()
}

/// Opens sled (`open`: the database or a tree), turning a panic inside it
/// into an error; see [`without_panic`].
fn open_without_panic<T>(
    dir: &Path,
    open: impl FnOnce() -> sled::Result<T>,
) -> Result<T, StorageError> {
    let path = || dir.display().to_string();
    without_panic(dir, || {
        open().map_err(|e| match e {
            // sled's settings file (`conf`) damaged reads as settings it
            // does not support ("cannot change the io buffer size…").
            sled::Error::Corruption { .. } | sled::Error::Unsupported(_) => StorageError::Damaged {
                path: path(),
                reason: e.to_string(),
            },
            e => StorageError::Open {
                path: path(),
                reason: e.to_string(),
            },
        })
    })
}

/// How much of sled's panic message a damaged-store error quotes.
const MAX_PANIC_CHARS: usize = 160;

/// Runs `read`, a step of opening the store that reads what sled
/// recovered, turning a panic inside sled into [`StorageError::Damaged`].
/// sled 0.34 panics on some damaged stores, while it opens the database
/// (an empty `conf` after a power cut: "tried to serialize Uninitialized")
/// or on the first read of a recovered page ("cannot find pid … in
/// view_for_key"); the operator gets one line naming the store and the
/// cause instead of a backtrace.
fn without_panic<T>(
    dir: &Path,
    read: impl FnOnce() -> Result<T, StorageError>,
) -> Result<T, StorageError> {
    thread_local! {
        /// Set while this thread opens sled: its panic is reported as an error.
        static OPENING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    static QUIET_HOOK: std::sync::Once = std::sync::Once::new();
    QUIET_HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !OPENING.with(|o| o.get()) {
                default(info);
            }
        }));
    });
    let was = OPENING.with(|o| o.replace(true));
    let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(read));
    OPENING.with(|o| o.set(was));
    match read {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            // sled's messages can carry a whole key: one line stays short.
            let message = match message.char_indices().nth(MAX_PANIC_CHARS) {
                Some((cut, _)) => format!("{}…", &message[..cut]),
                None => message,
            };
            Err(StorageError::Damaged {
                path: dir.display().to_string(),
                reason: format!("sled panicked opening it: {message}"),
            })
        }
    }
}

impl Drop for Store {
    /// Closes the store cleanly if nobody did (see [`Store::close`]).
    /// Nothing is marked if the flush fails: the running mark stays, a
    /// lower bound that still holds.
    fn drop(&mut self) {
        if !self.checked || self.clean.load(Ordering::SeqCst) {
            return;
        }
        if let Err(e) = self.close() {
            tracing::warn!(error = %e, "the store was closed without a clean mark");
        }
    }
}

/// Runs `tick` with the store on a thread named `name` every `every`,
/// until the store is dropped (at shutdown, or when it is reopened);
/// `without_it` says what a thread that cannot start costs.
fn spawn_every(
    store: &Arc<Store>,
    name: &str,
    every: Duration,
    without_it: &'static str,
    mut tick: impl FnMut(&Store) + Send + 'static,
) {
    let store: Weak<Store> = Arc::downgrade(store);
    let spawned = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            loop {
                std::thread::sleep(every);
                let Some(store) = store.upgrade() else { return };
                tick(&store);
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, thread = name, "cannot start a thread of the store; {without_it}");
    }
}

/// Rewrites the running mark once a second when a flush made more seqs
/// durable.
fn spawn_marker(store: &Arc<Store>) {
    spawn_every(
        store,
        "inletd-mark",
        Duration::from_secs(1),
        "the store is checked only after a clean stop",
        |store| store.update_mark(true),
    );
}

/// How often the collector thread wakes ([`spawn_collector`]).
const COLLECT_EVERY: Duration = Duration::from_millis(100);

/// The most the collector works each time it wakes: 2 % of a core. A
/// fill of random ids in batches at full speed (about 350,000 events/s)
/// kept 58–66 B an event on disk with it, against 138–147 without, for
/// about 1 % more CPU an event; 5 ms kept 51 B for 4 % (BENCHMARKS.md,
/// "sled's garbage collector"). Slower writes need less than the budget.
const COLLECT_BUDGET: Duration = Duration::from_millis(2);

/// Moves live pages out of sled's log segments that are mostly dead, so
/// that the segments are reused. sled does this on its periodic
/// flusher's thread, which this store turns off (it syncs on its own
/// terms, [`Store::open`]); without it only a page rewrite moved one page
/// now and then, and the log file grew to about four times the live data.
fn spawn_collector(store: &Arc<Store>) {
    let mut failing = false;
    spawn_every(
        store,
        "inletd-gc",
        COLLECT_EVERY,
        "the store's file may grow",
        move |store| {
            // A panic inside sled is an error here too, and is said once,
            // not every tick: the writes that fail the same way say it as
            // well.
            let collected = without_panic(&store.dir, || {
                collect(&store.db, COLLECT_BUDGET).map_err(io)
            });
            match collected {
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "moving pages out of old log segments failed; the store's file may grow");
                }
                Err(_) => {}
                Ok(()) => failing = false,
            }
        },
    );
}

/// Moves pages out of segments marked for cleaning until none waits or
/// `budget` has passed.
fn collect(db: &Db, budget: Duration) -> sled::Result<()> {
    let start = Instant::now();
    while db.collect_garbage()? && start.elapsed() < budget {}
    Ok(())
}

/// Runs `durability = "interval"`: flushes and syncs the store every
/// `every`.
fn spawn_flusher(store: &Arc<Store>, every: Duration) {
    spawn_every(
        store,
        "inletd-flusher",
        every,
        "writes are synced at shutdown only",
        |store| {
            if let Err(e) = store.flush() {
                tracing::warn!(error = %e, "background flush failed");
            }
        },
    );
}

fn io(e: impl std::fmt::Display) -> StorageError {
    StorageError::Io(e.to_string())
}

fn tx_err(e: TransactionError<StorageError>) -> StorageError {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => io(e),
    }
}

/// The byte gauge as `meta` holds it under `queue_bytes`: the bytes
/// waiting (invariant 6), then the last seq of the group commit that wrote
/// it. A group commit writes its segments, its key list and then the gauge
/// as plain inserts (see [`Storage::append`] below), so after a crash the
/// segments past `upto` may lack the rest, which [`Store::finish_last_group`]
/// writes at open. An 8-byte value (format 3, whose group commits were
/// transactions) or none (a new store) holds for the whole WAL; `load`
/// makes it name the last seq before any group commit runs.
#[derive(Debug, Clone, Copy)]
struct Gauge {
    /// Bytes waiting in the WAL (invariant 6).
    bytes: u64,
    /// The last seq whose group commit is counted; `None` for an old value.
    upto: Option<u64>,
}

impl Gauge {
    fn of(v: Option<IVec>) -> Gauge {
        match v.as_deref().map(<[u8; 16]>::try_from) {
            Some(Ok(b)) => {
                let both = u128::from_be_bytes(b);
                Gauge {
                    bytes: (both >> 64) as u64,
                    upto: Some(both as u64),
                }
            }
            _ => Gauge {
                bytes: u64_of(v),
                upto: None,
            },
        }
    }

    /// The same gauge with `freed` bytes less (an ack, a quarantined segment).
    fn less(self, freed: u64) -> Gauge {
        Gauge {
            bytes: self.bytes.saturating_sub(freed),
            ..self
        }
    }

    /// The gauge as `meta` holds it: `bytes` waiting, counted up to `upto`.
    fn value(bytes: u64, upto: u64) -> [u8; 16] {
        ((u128::from(bytes) << 64) | u128::from(upto)).to_be_bytes()
    }

    /// This gauge as `meta` holds it; an old one (none after `load`) is
    /// taken to count up to `last_seq`.
    fn stored(&self, last_seq: u64) -> [u8; 16] {
        Gauge::value(self.bytes, self.upto.unwrap_or(last_seq))
    }
}

fn u64_of(v: Option<IVec>) -> u64 {
    v.and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map_or(0, u64::from_be_bytes)
}

impl Store {
    /// Opens (or creates) the store in `dir`.
    fn open(dir: &Path, options: &SledOptions) -> Result<Self, StorageError> {
        let open_err = |reason: String| StorageError::Open {
            path: dir.display().to_string(),
            reason,
        };
        // sled's own periodic flusher syncs only `db`: `durability =
        // "interval"` runs `flush()` from a thread of ours instead, and
        // `spawn_collector` does the flusher's other work.
        let config = sled::Config::new()
            .path(dir)
            .cache_capacity(options.cache_bytes)
            .flush_every_ms(None);
        let db = open_without_panic(dir, || config.open())?;
        let disk = without_panic(dir, || {
            DiskSync::open(dir, &db).map_err(|e| open_err(format!("syncing it: {e}")))
        })?;
        // sled reads its recovered pages on first use: it can panic here too.
        let tree = |name: &str| open_without_panic(dir, || db.open_tree(name));
        let mut store = Store {
            dir: dir.to_owned(),
            disk,
            wal: tree("wal")?,
            expiry: tree("idem_expiry")?,
            meta: tree("meta")?,
            counts: tree("counts")?,
            dlq: tree("dlq")?,
            quarantine: tree("quarantine")?,
            aggregates: tree("aggregates")?,
            redo: tree("redo")?,
            db,
            last_seq: AtomicU64::new(0),
            committed: AtomicU64::new(0),
            durable: AtomicU64::new(0),
            checked: false,
            clean: AtomicBool::new(false),
            unfinished: AtomicBool::new(false),
            marking: parking_lot::Mutex::new(Marking::default()),
            missing_reports: AtomicU64::new(0),
            short_walk: AtomicBool::new(false),
            write_lock: FairMutex::new(()),
            queue_bytes: AtomicU64::new(0),
            dlq_len: AtomicU64::new(0),
            idempotency: parking_lot::Mutex::new(Idempotency::new()),
            known: parking_lot::Mutex::new(analytics::Known::default()),
        };
        without_panic(dir, || store.load())?;
        without_panic(dir, || store.check_mark())?;
        store.checked = true;
        Ok(store)
    }

    /// The highest seq the store holds (invariant 4): the last WAL
    /// segment's key, or `cursor` once the queue is empty.
    fn highest_seq(&self, cursor: u64) -> Result<u64, StorageError> {
        let last_wal = self
            .wal
            .last()
            .map_err(io)?
            .and_then(|(k, _)| <[u8; 8]>::try_from(k.as_ref()).ok())
            .map_or(0, u64::from_be_bytes);
        Ok(last_wal.max(cursor))
    }

    /// What the store holds, read from sled, for the mark.
    fn summary(&self) -> Result<Summary, StorageError> {
        let cursor = self.cursor()?;
        Ok(Summary {
            last_seq: self.highest_seq(cursor)?,
            cursor,
            queue_bytes: Gauge::of(self.meta.get(QUEUE_BYTES).map_err(io)?).bytes,
            groups: self.idempotency.lock().groups.len() as u64,
            dlq: u64_of(self.meta.get(DLQ_LEN).map_err(io)?),
        })
    }

    /// Compares the store with its mark (see `storage::mark`), reports what
    /// is missing, then marks it running: from here on a crash must leave
    /// at least what is durable now.
    fn check_mark(&self) -> Result<(), StorageError> {
        let now = self.summary()?;
        let path = mark::path(&self.dir);
        let missing = match mark::read(&self.dir) {
            Ok(None) => Vec::new(),
            Ok(Some(Mark::Clean(was))) => was.differences(&now),
            Ok(Some(Mark::Running { last_seq })) if now.last_seq < last_seq => {
                vec![format!("last_seq {last_seq} → {}", now.last_seq)]
            }
            Ok(Some(Mark::Running { .. })) => Vec::new(),
            Err(e) => {
                tracing::warn!(error = %e, "the store's mark is unreadable; what the store holds is not checked this time");
                Vec::new()
            }
        };
        if !missing.is_empty() {
            self.missing_reports.fetch_add(1, Ordering::SeqCst);
            tracing::error!(
                mark = %path.display(),
                store = %self.dir.join("db").display(),
                differences = %missing.join(", "),
                "acknowledged events are missing: the store holds less than its mark says it held \
                 (sled dropped a damaged part of its log); see \"A damaged store\" in the README"
            );
        }
        if let Err(e) = mark::write(
            &self.dir,
            &Mark::Running {
                last_seq: now.last_seq,
            },
        ) {
            // A stale clean mark would report a later crash as damage.
            mark::remove(&self.dir).map_err(|r| StorageError::Open {
                path: path.display().to_string(),
                reason: format!("cannot write ({e}) or remove ({r}) the store's mark"),
            })?;
            tracing::warn!(error = %e, "cannot write the store's mark; the next start checks nothing");
        }
        self.marking.lock().written = now.last_seq;
        Ok(())
    }

    /// Rewrites the running mark with the highest durable seq when it grew
    /// (`keep_clean`: leave a clean mark as it is; otherwise replace it).
    fn update_mark(&self, keep_clean: bool) {
        let mut marking = self.marking.lock();
        let clean = self.clean.load(Ordering::SeqCst);
        let durable = self.durable.load(Ordering::SeqCst);
        if (clean && keep_clean) || (!clean && durable <= marking.written) {
            return;
        }
        let written = mark::write(&self.dir, &Mark::Running { last_seq: durable });
        let result = match written {
            Ok(()) => Ok(()),
            // No mark is better than a clean one that no longer holds.
            Err(e) if clean => {
                mark::remove(&self.dir).map_err(|r| format!("{e}; removing it: {r}"))
            }
            Err(e) => Err(e.to_string()),
        };
        match result {
            Ok(()) => {
                marking.written = durable;
                marking.failing = false;
                self.clean.store(false, Ordering::SeqCst);
            }
            Err(e) if !marking.failing => {
                marking.failing = true;
                tracing::warn!(error = %e, "cannot update the store's mark");
            }
            Err(_) => {}
        }
    }

    /// Reads what the store holds at open: checks the format (converting
    /// an older one), recovers the last seq and the byte gauge, rebuilds
    /// the idempotency index.
    fn load(&self) -> Result<(), StorageError> {
        match self.meta.get(FORMAT).map_err(io)? {
            None => {
                self.meta
                    .insert(FORMAT, &u64::from(FORMAT_VERSION).to_be_bytes())
                    .map_err(io)?;
            }
            Some(v) => {
                let found = u64_of(Some(v));
                if found > u64::from(FORMAT_VERSION) {
                    return Err(StorageError::NewerFormat {
                        found,
                        supported: FORMAT_VERSION,
                    });
                }
                if found < u64::from(FORMAT_VERSION) {
                    self.convert_from(found)?;
                }
            }
        }
        // Before anything reads the cursor, the gauge or the DLQ's length.
        self.finish_last_commit()?;
        if self.meta.get(STORE_ID).map_err(io)?.is_none() {
            // Durable with the next flush; one lost to a crash is drawn
            // again, and only makes this store a stranger once more.
            self.meta
                .insert(STORE_ID, &fastrand::u64(1..).to_be_bytes())
                .map_err(io)?;
        }
        let gauge = Gauge::of(self.meta.get(QUEUE_BYTES).map_err(io)?);
        // Seqs only grow (invariant 4), past the gauge's too: its group's
        // last segment may have been quarantined since.
        let last_seq = self
            .highest_seq(self.cursor()?)?
            .max(gauge.upto.unwrap_or(0));
        self.last_seq.store(last_seq, Ordering::SeqCst);
        self.committed.store(last_seq, Ordering::SeqCst);
        self.durable.store(last_seq, Ordering::SeqCst);
        self.queue_bytes.store(gauge.bytes, Ordering::SeqCst);
        let dlq_len = match self.meta.get(DLQ_LEN).map_err(io)? {
            Some(v) => u64_of(Some(v)),
            // Stores from before the count: walked once, then kept.
            None => {
                let n = self.dlq.len() as u64;
                self.meta.insert(DLQ_LEN, &n.to_be_bytes()).map_err(io)?;
                n
            }
        };
        self.dlq_len.store(dlq_len, Ordering::SeqCst);
        self.rebuild_index()?;
        match gauge.upto {
            Some(upto) => self.finish_last_group(gauge.bytes, upto, last_seq),
            // A new store, or format 3's gauge, which holds for its whole
            // WAL: it names its seq before any group commit runs, so that
            // a crash inside the first one is finished too.
            None => self
                .meta
                .insert(QUEUE_BYTES, &Gauge::value(gauge.bytes, last_seq))
                .map(drop)
                .map_err(io),
        }
    }

    /// Writes what a crash left unwritten of the last group commit (see
    /// [`Gauge`]): the segments after `upto`, the last seq the gauge counts,
    /// are added to it, and those after the last key list too get one, so
    /// that a client's retry of those events (never answered 202) is a
    /// duplicate, not a second copy. sled recovers a prefix of its log, so
    /// only the last group can be unfinished. Written in the order an
    /// append writes, so a crash here is finished at the next open.
    fn finish_last_group(&self, bytes: u64, upto: u64, last_seq: u64) -> Result<(), StorageError> {
        if last_seq <= upto {
            return Ok(());
        }
        let keyed = {
            let idem = self.idempotency.lock();
            idem.ids.keys().copied().max().unwrap_or(0).max(upto)
        };
        let mut added = 0u64;
        let mut keys: Vec<Vec<u8>> = Vec::new();
        for item in self.wal.range((upto + 1).to_be_bytes()..) {
            let (k, v) = item.map_err(io)?;
            let Some(last) = <[u8; 8]>::try_from(k.as_ref()).ok().map(u64::from_be_bytes) else {
                continue;
            };
            // A damaged segment is set aside when it is read.
            let Ok(segment) = decode_segment(last, &v) else {
                continue;
            };
            for seq in segment.first()..=last {
                added += segment.size_of(seq);
                if seq > keyed
                    && let Ok(record) = segment.record(seq)
                {
                    keys.push(scoped_key(&record));
                }
            }
        }
        if !keys.is_empty() {
            let group = Group {
                first_seen_ms: crate::event::now_ms(),
                last_seq,
            };
            let list: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
            self.expiry
                .insert(group.entry_key(), encode_key_list(&list))
                .map_err(io)?;
            let mut idem = self.idempotency.lock();
            let fps: Vec<u64> = keys.iter().map(|k| idem.fingerprint(k)).collect();
            idem.add(group, fps);
        }
        self.meta
            .insert(QUEUE_BYTES, &Gauge::value(bytes + added, last_seq))
            .map_err(io)?;
        self.queue_bytes.store(bytes + added, Ordering::SeqCst);
        // Seqs set aside by a reopen and acknowledged since can put the
        // cursor past `upto` with nothing to finish: then say nothing.
        if added > 0 {
            tracing::info!(
                from = upto + 1,
                to = last_seq,
                bytes = added,
                keyed = keys.len(),
                "finished the last group commit before the crash"
            );
        }
        Ok(())
    }

    /// Converts a store of format `found` to this build's. Format 1 or 2:
    /// the per-key `idempotency` tree goes,
    /// its keys already being in the groups' `idem_expiry` lists, but for
    /// format 1's entries of one key each (empty value, the key inside the
    /// entry's own key), which become lists of one keyed by the key's seq.
    /// Each step can run again after a crash; the version is written last.
    /// WAL values (format 1 records, format 2 segments) are read as they
    /// are. Format 3 needs nothing but the version (see [`Gauge`]).
    fn convert_from(&self, found: u64) -> Result<(), StorageError> {
        let had_keys = self
            .db
            .tree_names()
            .iter()
            .any(|n| n.as_ref() == b"idempotency");
        if had_keys {
            let keys = self.db.open_tree("idempotency").map_err(io)?;
            let mut converted = 0usize;
            for item in self.expiry.iter() {
                let (k, v) = item.map_err(io)?;
                if !v.is_empty() {
                    continue;
                }
                let (seen, key) = k.split_at(8.min(k.len()));
                // The key's current value: first seen ‖ seq. Not current
                // (accepted again later, or swept): the entry is dropped.
                let current = keys.get(key).map_err(io)?.filter(|v| {
                    <[u8; 8]>::try_from(&v[..8.min(v.len())])
                        .is_ok_and(|t| v.len() == 16 && ordered_ms(i64::from_be_bytes(t)) == seen)
                });
                if let Some(value) = current {
                    let mut entry = seen.to_vec();
                    entry.extend_from_slice(&value[8..16]);
                    self.expiry
                        .insert(entry, encode_key_list(&[key]))
                        .map_err(io)?;
                    converted += 1;
                }
                self.expiry.remove(&k).map_err(io)?;
            }
            self.flush()?;
            self.db.drop_tree("idempotency").map_err(io)?;
            tracing::info!(
                format_1_entries = converted,
                "idempotency keys now live in memory"
            );
        }
        self.meta
            .insert(FORMAT, &u64::from(FORMAT_VERSION).to_be_bytes())
            .map_err(io)?;
        self.flush()?;
        tracing::info!(
            from = found,
            to = FORMAT_VERSION,
            "store converted to this build's format"
        );
        Ok(())
    }

    /// Builds the in-memory idempotency index from every group's key list
    /// (expired groups too: the sweeper drops them).
    fn rebuild_index(&self) -> Result<(), StorageError> {
        let started = Instant::now();
        let mut idem = self.idempotency.lock();
        // Same fingerprints as before (a test's colliding function too).
        *idem = Idempotency {
            index: KeyIndex::for_rebuild(),
            hasher: idem.hasher.clone(),
            fingerprint: idem.fingerprint,
            ..Idempotency::new()
        };
        for item in self.expiry.iter() {
            let (k, v) = item.map_err(io)?;
            let Some(group) = Group::from_entry_key(&k) else {
                tracing::error!(key = ?k, "expiry entry of an unknown shape dropped");
                self.expiry.remove(&k).map_err(io)?;
                continue;
            };
            let mut fps = Vec::new();
            match visit_key_list(&v, |key| fps.push(idem.fingerprint(key))) {
                Ok(_) => idem.add(group, fps),
                Err(e) => {
                    tracing::error!(error = %e, last_seq = group.last_seq,
                        "damaged expiry entry dropped; its keys are forgotten");
                    self.expiry.remove(&k).map_err(io)?;
                }
            }
        }
        idem.index.rebuilt();
        tracing::info!(
            keys = idem.index.len(),
            groups = idem.groups.len(),
            index_bytes = idem.index.bytes(),
            took_ms = started.elapsed().as_millis() as u64,
            "idempotency index rebuilt"
        );
        Ok(())
    }

    /// Whether group `id`'s stored key list holds `key`. `lists` keeps each
    /// list read, decoded, for the rest of the call: a burst of re-sent
    /// duplicates from one group reads and checks its list once, not once
    /// a key. A missing or damaged list holds nothing.
    fn holds(
        &self,
        id: u32,
        group: Group,
        key: &[u8],
        lists: &mut KeyLists,
    ) -> Result<bool, StorageError> {
        let keys = match lists.entry(id) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let stored = self.expiry.get(group.entry_key()).map_err(io)?;
                e.insert(
                    stored
                        .as_deref()
                        .and_then(|bytes| decode_key_list(bytes).ok())
                        .map(|keys| keys.into_iter().map(Box::from).collect())
                        .unwrap_or_default(),
                )
            }
        };
        Ok(keys.contains(key))
    }

    /// What the stored lists say of `key`: read for each candidate group
    /// (`lists` caches them for one call).
    fn seen(
        &self,
        idem: &Idempotency,
        fingerprint: u64,
        key: &[u8],
        now_ms: i64,
        ttl_ms: i64,
        lists: &mut KeyLists,
    ) -> Result<Seen, StorageError> {
        let mut candidates = Vec::new();
        idem.index.candidates(fingerprint, &mut candidates);
        let mut expired = Vec::new();
        let mut live: Option<i64> = None;
        for id in candidates {
            let Some(group) = idem.groups.get(&id).copied() else {
                continue;
            };
            if !self.holds(id, group, key, lists)? {
                continue; // a fingerprint collision
            }
            if now_ms.saturating_sub(group.first_seen_ms) < ttl_ms {
                live = Some(live.map_or(group.first_seen_ms, |t| t.max(group.first_seen_ms)));
            } else {
                expired.push(id);
            }
        }
        Ok(match live {
            Some(first_seen) => Seen::Live(first_seen),
            None if expired.is_empty() => Seen::No,
            None => Seen::Expired(expired),
        })
    }

    /// Takes the write lock to write; the first write after a clean close
    /// replaces the clean mark, which would no longer hold.
    fn lock(&self) -> Result<FairMutexGuard<'_, ()>, StorageError> {
        let guard = self.settled_lock()?;
        if self.clean.load(Ordering::SeqCst) {
            self.update_mark(false);
        }
        Ok(guard)
    }

    /// Takes the write lock over a store that holds no commit made in
    /// part: refused once one failed part-way (see `unfinished`), whose
    /// writes only the reopen finishes.
    fn settled_lock(&self) -> Result<FairMutexGuard<'_, ()>, StorageError> {
        let guard = self.write_lock.lock();
        if self.unfinished.load(Ordering::SeqCst) {
            return Err(StorageError::Io(
                "an earlier commit failed part-way; the store must be reopened".into(),
            ));
        }
        Ok(guard)
    }

    /// Moves a value that does not decode to `quarantine`, taking it out of
    /// its tree (a WAL segment's waiting records also leave the byte gauge:
    /// `waiting_bytes`).
    fn quarantine(
        &self,
        tree: &str,
        key: &[u8],
        value: &[u8],
        waiting_bytes: u64,
        reason: String,
    ) -> Quarantined {
        let mut qkey = tree.as_bytes().to_vec();
        qkey.push(0);
        qkey.extend_from_slice(key);
        let position = match <[u8; 8]>::try_from(key) {
            Ok(b) if tree == "wal" => {
                format!("wal segment ending at seq {}", u64::from_be_bytes(b))
            }
            Ok(b) => format!("{tree} id {}", u64::from_be_bytes(b)),
            Err(_) => format!("{tree} key {:?}", String::from_utf8_lossy(key)),
        };
        tracing::error!(%position, %reason, "damaged record moved to quarantine");
        // Best effort: if moving aside fails, the record is still skipped and reported.
        let Ok(_guard) = self.lock() else {
            tracing::error!(%position, "could not move damaged record aside");
            return Quarantined { position, reason };
        };
        let moved = (&self.quarantine, &self.wal, &self.dlq, &self.meta).transaction(
            |(q, wal, dlq, meta)| {
                q.insert(qkey.as_slice(), value)?;
                match tree {
                    "wal" => {
                        let gauge = Gauge::of(meta.get(QUEUE_BYTES)?).less(waiting_bytes);
                        wal.remove(key)?;
                        let last_seq = self.last_seq.load(Ordering::SeqCst);
                        meta.insert(QUEUE_BYTES, &gauge.stored(last_seq))?;
                        Ok(gauge.bytes)
                    }
                    _ => {
                        let mut n = u64_of(meta.get(DLQ_LEN)?);
                        if dlq.remove(key)?.is_some() {
                            n = n.saturating_sub(1);
                            meta.insert(DLQ_LEN, &n.to_be_bytes())?;
                        }
                        Ok::<_, ConflictableTransactionError<()>>(n)
                    }
                }
            },
        );
        match moved {
            Ok(bytes) if tree == "wal" => self.queue_bytes.store(bytes, Ordering::SeqCst),
            Ok(dlq_len) => self.dlq_len.store(dlq_len, Ordering::SeqCst),
            Err(_) => tracing::error!(%position, "could not move damaged record aside"),
        }
        Quarantined { position, reason }
    }

    /// Takes the records of the segment `k` → `v` that `read` still wants:
    /// those above its `after`, up to its limit. Reports the seqs between
    /// the one expected and the segment's first as missing, and moves a
    /// segment that does not decode to quarantine.
    fn take_segment(&self, read: &mut Reading, k: &[u8], v: &IVec) -> Result<(), StorageError> {
        let Ok(key) = <[u8; 8]>::try_from(k).map(u64::from_be_bytes) else {
            let damaged = self.quarantine("wal", k, v, 0, "key is not a seq".into());
            read.damaged.push(damaged);
            return Ok(());
        };
        let segment = match decode_segment(key, v) {
            Ok(segment) => segment,
            Err(e) => {
                // Its sizes cannot be trusted: take what the envelope weighs.
                let waiting = v.len() as u64;
                let damaged = self.quarantine("wal", k, v, waiting, e.to_string());
                read.damaged.push(damaged);
                read.expect = key + 1;
                return Ok(());
            }
        };
        if segment.first() > read.expect {
            let mut missing = self.missing(read.expect, segment.first() - 1)?;
            read.damaged.append(&mut missing);
        }
        read.expect = segment.last() + 1;
        let from = segment.first().max(read.after + 1);
        let take = (read.limit - read.records.len()) as u64;
        let mut taken = Vec::new();
        for seq in from..=segment.last().min(from + take - 1) {
            match segment.record(seq) {
                Ok(record) => taken.push(Queued { seq, record }),
                Err(e) => {
                    // A checksummed segment whose record does not decode: a
                    // writer bug. Set the whole segment aside, as found.
                    let waiting = (read.cursor + 1..=segment.last())
                        .map(|s| segment.size_of(s))
                        .sum();
                    let damaged = self.quarantine("wal", k, v, waiting, e.to_string());
                    read.damaged.push(damaged);
                    return Ok(());
                }
            }
        }
        read.records.append(&mut taken);
        Ok(())
    }

    /// Says once per open store that sled's forward walk of the WAL ended
    /// at `at` although seqs up to `committed` were written: its tree is
    /// damaged, though what it holds may all still be read.
    fn report_short_walk(&self, at: u64, committed: u64) {
        if !self.short_walk.swap(true, Ordering::SeqCst) {
            tracing::warn!(
                seq = at,
                committed,
                store = %self.dir.join("db").display(),
                "the store is damaged: sled's walk of the queue ended before the last seq it \
                 holds; reading on from the other end (each seq it cannot find is reported as \
                 missing); see \"A damaged store\" in the README"
            );
        }
    }

    /// Seqs `from..=to` are not in the WAL, though seqs after them are: sled
    /// dropped the part of its log that held them (a blob file deleted or
    /// damaged loses a page without an error). Reports each part of the
    /// range that was not set aside in `quarantine` already (and reported
    /// then): a damaged segment there covers the seqs up to its key, a
    /// reopen's note ([`Store::set_aside`]) the range it names.
    fn missing(&self, from: u64, to: u64) -> Result<Vec<Quarantined>, StorageError> {
        let key = |seq: u64| [b"wal\0".as_slice(), &seq.to_be_bytes()].concat();
        let mut gaps = Vec::new();
        let mut next = from;
        for item in self.quarantine.range(key(from)..=key(to)) {
            let (k, v) = item.map_err(io)?;
            let Some(end) = k.get(4..).and_then(|b| <[u8; 8]>::try_from(b).ok()) else {
                continue;
            };
            let end = u64::from_be_bytes(end);
            if let Some(start) = set_aside_start(&v)
                && start > next
            {
                gaps.push((next, start - 1));
            }
            next = next.max(end + 1);
        }
        if next <= to {
            gaps.push((next, to));
        }
        let reason = "not in the store: sled dropped the part of its log that held them";
        Ok(gaps
            .into_iter()
            .map(|(from, to)| {
                self.missing_reports.fetch_add(1, Ordering::SeqCst);
                let position = format!("wal seqs {from}..={to}");
                tracing::error!(%position, count = to - from + 1, store = %self.dir.display(),
                    "acknowledged events are missing: {reason}");
                Quarantined {
                    position,
                    reason: reason.into(),
                }
            })
            .collect())
    }

    /// Records seqs `from..=to` as set aside: a reopen after a failed write
    /// found them committed in memory but not on disk, and seqs go on after
    /// them, so the gap they leave in the WAL is known, not damage.
    fn set_aside(&self, from: u64, to: u64) -> Result<(), StorageError> {
        let key = [b"wal\0".as_slice(), &to.to_be_bytes()].concat();
        let note = format!("{SET_ASIDE}{from}..={to} were not durable when the store failed");
        self.quarantine.insert(key, note.as_bytes()).map_err(io)?;
        Ok(())
    }

    /// The number of the last batch commit that finished (see [`Redo`]).
    fn batch_commits(&self) -> Result<u64, StorageError> {
        Ok(u64_of(self.meta.get(BATCH_COMMITS).map_err(io)?))
    }

    /// What a batch commit writes, read under the write lock: its redo
    /// record, and what it leaves in memory once written. Writes nothing.
    fn plan_batch_commit(
        &self,
        ack: &BatchAck,
        known: &analytics::Known,
    ) -> Result<BatchCommit, StorageError> {
        let last_seq = self.last_seq.load(Ordering::SeqCst);
        let cursor = self.cursor()?;
        let new_cursor = cursor.max(ack.upto);
        let mut redo = Redo {
            number: self.batch_commits()? + 1,
            writes: Vec::new(),
        };
        // The sizes of the processed records, from their segments' headers:
        // each segment is opened (and its checksum checked) once.
        let mut freed = 0u64;
        let mut seqs: Vec<u64> = ack
            .processed
            .iter()
            .map(|(seq, _)| *seq)
            .filter(|seq| *seq > cursor)
            .collect();
        seqs.sort_unstable();
        let mut rest = seqs.as_slice();
        while let Some(&seq) = rest.first() {
            let Some((last, v)) = self
                .wal
                .range(seq.to_be_bytes()..)
                .next()
                .transpose()
                .map_err(io)?
                .and_then(|(k, v)| Some((u64::from_be_bytes(k.as_ref().try_into().ok()?), v)))
            else {
                break;
            };
            let in_segment = rest.iter().take_while(|s| **s <= last).count();
            if let Ok(segment) = decode_segment(last, &v) {
                freed += rest[..in_segment]
                    .iter()
                    .map(|s| segment.size_of(*s))
                    .sum::<u64>();
            }
            rest = &rest[in_segment..];
        }
        // Segments that the cursor has passed entirely: removed after the
        // cursor moves, so that no reader finds them gone below it.
        let done = self
            .wal
            .range(..=new_cursor.to_be_bytes())
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(io)?;
        let mut added: std::collections::BTreeMap<&str, u64> = Default::default();
        let mut facts = Vec::with_capacity(ack.processed.len());
        for (seq, f) in &ack.processed {
            if *seq > cursor
                && let Some(f) = f
            {
                *added.entry(f.event_type.as_str()).or_default() += 1;
                facts.push(f);
            }
        }
        let mut aggregates = StagedKv {
            tree: &self.aggregates,
            writes: Default::default(),
        };
        let learned = analytics::apply(&mut aggregates, &facts, ack.now_ms, ack.upto, known)?;
        redo.writes.extend(
            aggregates
                .writes
                .into_iter()
                .map(|(key, value)| redo::Write {
                    tree: redo::Tree::Aggregates,
                    key,
                    value,
                }),
        );
        for (t, n) in &added {
            let now = u64_of(self.counts.get(t.as_bytes()).map_err(io)?);
            redo.put(redo::Tree::Counts, t.as_bytes(), &(now + n).to_be_bytes());
        }
        let dead: Vec<Vec<u8>> = ack
            .dead
            .iter()
            .filter(|(seq, _)| *seq > cursor)
            .map(|(_, e)| encode_record(e))
            .collect();
        let mut dlq_len = self.dlq_len.load(Ordering::SeqCst);
        if !dead.is_empty() {
            let dlq_last = u64_of(self.meta.get(DLQ_LAST).map_err(io)?);
            dlq_len = Self::put_dlq(dlq_last, dlq_len, &dead, |tree, k, v| {
                redo.put(tree, k, v);
                Ok::<_, StorageError>(())
            })?;
        }
        let mut gauge = Gauge::of(self.meta.get(QUEUE_BYTES).map_err(io)?).less(freed);
        if new_cursor >= last_seq {
            // Nothing waits, so nothing counts: this heals the gauge after
            // damage (seqs reported missing, segments a damaged tree's walk
            // did not find), whose sizes no segment gave.
            gauge.bytes = 0;
        }
        redo.put(redo::Tree::Meta, CURSOR, &new_cursor.to_be_bytes());
        redo.put(redo::Tree::Meta, QUEUE_BYTES, &gauge.stored(last_seq));
        for key in &done {
            redo.remove(redo::Tree::Wal, key);
        }
        // Last: the commit has finished once this is written.
        redo.put(redo::Tree::Meta, BATCH_COMMITS, &redo.number.to_be_bytes());
        Ok(BatchCommit {
            redo,
            new_cursor,
            queue_bytes: gauge.bytes,
            dlq_len,
            learned,
        })
    }

    /// Makes a batch commit's writes, in order, as plain inserts and
    /// removes (see [`Redo`]).
    fn make_writes(&self, writes: &[redo::Write]) -> Result<(), StorageError> {
        for write in writes {
            let tree = match write.tree {
                redo::Tree::Meta => &self.meta,
                redo::Tree::Counts => &self.counts,
                redo::Tree::Dlq => &self.dlq,
                redo::Tree::Aggregates => &self.aggregates,
                redo::Tree::Wal => &self.wal,
            };
            match &write.value {
                Some(value) => tree
                    .insert(write.key.as_slice(), value.as_slice())
                    .map(drop),
                None => tree.remove(write.key.as_slice()).map(drop),
            }
            .map_err(io)?;
        }
        Ok(())
    }

    /// Writes a batch commit's redo record, part by part.
    fn write_redo(&self, redo: &Redo) -> Result<(), StorageError> {
        for (index, part) in redo.encode(REDO_PART_BYTES).into_iter().enumerate() {
            self.redo
                .insert((index as u32).to_be_bytes(), part)
                .map_err(io)?;
        }
        Ok(())
    }

    /// Makes again the writes of the batch commit a crash interrupted (its
    /// redo record is whole, its number is above the last that finished),
    /// then clears the record, as a commit does once finished.
    fn finish_last_commit(&self) -> Result<(), StorageError> {
        let mut parts: Vec<IVec> = Vec::new();
        for item in self.redo.iter() {
            let (k, v) = item.map_err(io)?;
            if k.as_ref() != (parts.len() as u32).to_be_bytes() {
                break;
            }
            parts.push(v);
        }
        if parts.is_empty() {
            return Ok(());
        }
        let finished = self.batch_commits()?;
        match Redo::decode(&parts.iter().map(|p| p.as_ref()).collect::<Vec<_>>()) {
            Ok(Some(redo)) if redo.number > finished => {
                tracing::info!(
                    commit = redo.number,
                    writes = redo.writes.len(),
                    "finishing the batch commit that a crash interrupted"
                );
                self.make_writes(&redo.writes)?;
            }
            // Finished before the crash, or never whole (none of its
            // writes was made).
            Ok(_) => {}
            Err(e) => {
                // sled recovers whole values: this is damage, not a crash.
                tracing::error!(
                    error = %e,
                    "the last batch commit's redo record is damaged and moved to quarantine; \
                     if a crash interrupted that commit, some of its events may be counted twice"
                );
                for (index, part) in parts.into_iter().enumerate() {
                    let mut qkey = b"redo\0".to_vec();
                    qkey.extend_from_slice(&(index as u32).to_be_bytes());
                    self.quarantine.insert(qkey, part).map_err(io)?;
                }
            }
        }
        self.redo.clear().map_err(io)
    }

    fn cursor(&self) -> Result<u64, StorageError> {
        Ok(u64_of(self.meta.get(CURSOR).map_err(io)?))
    }

    /// Parks encoded DLQ entries under the ids after `dlq_last`, through
    /// `put(tree, key, value)`: each entry, then `DLQ_LAST` and `DLQ_LEN`
    /// (kept in `meta`, invariant 6; `dlq_len` entries before these).
    /// Returns the DLQ's new length. Shared by `park` (a transaction) and
    /// the batch commit (its redo record).
    fn put_dlq<E>(
        dlq_last: u64,
        dlq_len: u64,
        entries: &[Vec<u8>],
        mut put: impl FnMut(redo::Tree, &[u8], &[u8]) -> Result<(), E>,
    ) -> Result<u64, E> {
        let mut id = dlq_last;
        for entry in entries {
            id += 1;
            put(redo::Tree::Dlq, &id.to_be_bytes(), entry)?;
        }
        let dlq_len = dlq_len + entries.len() as u64;
        put(redo::Tree::Meta, DLQ_LAST, &id.to_be_bytes())?;
        put(redo::Tree::Meta, DLQ_LEN, &dlq_len.to_be_bytes())?;
        Ok(dlq_len)
    }

    /// Writes `records` after the last seq `after` as segments of at most
    /// about [`SEGMENT_BYTES`] each (a sled value past 128 KiB would become
    /// a blob file, with a file create and two more syncs per flush), each
    /// through `put(key, segment)`; returns the new last seq and the bytes
    /// the records add to the gauge.
    fn put_segments<E>(
        after: u64,
        records: &[&WalRecord],
        mut put: impl FnMut([u8; 8], Vec<u8>) -> Result<(), E>,
    ) -> Result<(u64, u64), E> {
        let mut bytes = 0;
        let mut last = after;
        let mut rest = records;
        while !rest.is_empty() {
            let mut size = 0;
            let n = rest
                .iter()
                .take_while(|r| {
                    size += record_estimate(r);
                    size <= SEGMENT_BYTES
                })
                .count()
                .max(1);
            let (chunk, tail) = rest.split_at(n);
            let (segment, sizes) = encode_segment(last + 1, chunk);
            last += chunk.len() as u64;
            put(last.to_be_bytes(), segment)?;
            bytes += sizes.iter().sum::<u64>();
            rest = tail;
        }
        Ok((last, bytes))
    }
}

impl Storage for Store {
    fn append(
        &self,
        events: &[NewEvent],
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<Vec<AppendOutcome>, StorageError> {
        let _guard = self.lock()?;
        let start = self.last_seq.load(Ordering::SeqCst);
        let keys_of: Vec<Vec<u8>> = events.iter().map(|e| scoped_key(&e.record)).collect();
        let mut idem = self.idempotency.lock();
        let fingerprints_of: Vec<u64> = keys_of.iter().map(|k| idem.fingerprint(k)).collect();
        idem.index.prefetch(&fingerprints_of);
        // Invariant 1: the check reads the index and the stored
        // key lists, all under the write lock; the group is then written
        // and only then added to the index.
        let mut outcomes = Vec::with_capacity(events.len());
        let mut accepted: Vec<usize> = Vec::with_capacity(events.len());
        let mut fingerprints = Vec::with_capacity(events.len());
        let mut in_group: HashSet<&[u8]> = HashSet::with_capacity(events.len());
        let mut renewed: Vec<(u64, u32)> = Vec::new();
        let mut lists = HashMap::new();
        let mut seq = start;
        for (i, key) in keys_of.iter().enumerate() {
            if in_group.contains(key.as_slice()) {
                outcomes.push(AppendOutcome::Duplicate {
                    first_seen_ms: now_ms,
                });
                continue;
            }
            let fp = fingerprints_of[i];
            match self.seen(&idem, fp, key, now_ms, ttl_ms, &mut lists)? {
                Seen::Live(first_seen_ms) => {
                    outcomes.push(AppendOutcome::Duplicate { first_seen_ms });
                    continue;
                }
                // Accepted again: the old groups no longer answer for it.
                Seen::Expired(ids) => renewed.extend(ids.into_iter().map(|id| (fp, id))),
                Seen::No => {}
            }
            seq += 1;
            in_group.insert(key);
            accepted.push(i);
            fingerprints.push(fp);
            outcomes.push(AppendOutcome::Accepted { seq });
        }
        if accepted.is_empty() {
            return Ok(outcomes);
        }
        let records: Vec<&WalRecord> = accepted.iter().map(|&i| &events[i].record).collect();
        let mut entries = {
            let keys: Vec<&[u8]> = accepted.iter().map(|&i| keys_of[i].as_slice()).collect();
            key_list_entries(start, now_ms, &keys)
        };
        // Plain inserts, not a transaction: each sled transaction writes
        // its log buffer out twice more (`pin_log`), waking sled's I/O
        // threads each time, and cost a quarter of the CPU of a group
        // commit. The order makes a crash between them harmless (invariant
        // 1): segments, then the key lists in seq order, then the gauge
        // naming this group's last seq; `finish_last_group` writes what is
        // missing. A write that fails leaves the store `unfinished` until
        // reopened.
        let written = Self::put_segments(start, &records, |k, v| self.wal.insert(k, v).map(drop))
            .and_then(|(last, added)| {
                for entry in &mut entries {
                    self.expiry
                        .insert(entry.group.entry_key(), std::mem::take(&mut entry.list))?;
                }
                let bytes = self.queue_bytes.load(Ordering::SeqCst) + added;
                self.meta.insert(QUEUE_BYTES, &Gauge::value(bytes, last))?;
                Ok((last, bytes))
            });
        let (last, bytes) = written.map_err(|e| {
            self.unfinished.store(true, Ordering::SeqCst);
            io(e)
        })?;
        for (fp, id) in renewed {
            idem.index.remove(fp, id);
        }
        for entry in entries {
            idem.add(entry.group, fingerprints[entry.keys].iter().copied());
        }
        self.last_seq.store(last, Ordering::SeqCst);
        self.committed.fetch_max(last, Ordering::SeqCst);
        self.queue_bytes.store(bytes, Ordering::SeqCst);
        Ok(outcomes)
    }

    fn flush(&self) -> Result<(), StorageError> {
        // Read first: everything committed up to here is in this flush.
        let upto = self.committed.load(Ordering::SeqCst);
        self.disk.flush(&self.db).map_err(io)?;
        self.durable.fetch_max(upto, Ordering::SeqCst);
        Ok(())
    }

    /// Flushes, then writes the clean mark with what the store holds,
    /// under the write lock so that no write slips between.
    fn close(&self) -> Result<(), StorageError> {
        let _guard = self.settled_lock()?;
        self.flush()?;
        let summary = self.summary()?;
        let _marking = self.marking.lock();
        mark::write(&self.dir, &Mark::Clean(summary)).map_err(io)?;
        self.clean.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn read_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<Queued>, Vec<Quarantined>), StorageError> {
        // Records at or below the cursor are done, even inside a segment
        // that is still there.
        let cursor = self.cursor()?;
        let after = after.max(cursor);
        // Every seq up to here was written before the walk starts: it is in
        // the WAL, or was set aside in `quarantine`.
        let committed = self.committed.load(Ordering::SeqCst);
        let mut read = Reading {
            records: Vec::new(),
            damaged: Vec::new(),
            cursor,
            after,
            expect: after + 1,
            limit,
        };
        for item in self.wal.range(after.saturating_add(1).to_be_bytes()..) {
            if read.full() {
                break;
            }
            let (k, v) = item.map_err(io)?;
            self.take_segment(&mut read, &k, &v)?;
        }
        if !read.full() && read.expect <= committed {
            // sled's forward walk ended before seqs it holds: a damaged log
            // can leave an older copy of a node that was split since, whose
            // walk stops where the node used to end. The walk from the top
            // down still finds what follows; read on from its end.
            self.report_short_walk(read.expect, committed);
            let (low, high) = (read.expect.to_be_bytes(), committed.to_be_bytes());
            let rest = self
                .wal
                .range(low..=high)
                .rev()
                .collect::<Result<Vec<_>, _>>()
                .map_err(io)?;
            // Lowest first; and a damaged tree's walk may stray past its bounds.
            for (k, v) in rest.into_iter().rev() {
                if read.full() {
                    break;
                }
                if low.as_slice() <= k.as_ref() && k.as_ref() <= high.as_slice() {
                    self.take_segment(&mut read, &k, &v)?;
                }
            }
            if !read.full() && read.expect <= committed {
                let mut missing = self.missing(read.expect, committed)?;
                read.damaged.append(&mut missing);
            }
        }
        Ok((read.records, read.damaged))
    }

    fn commit_batch(&self, ack: &BatchAck) -> Result<(), StorageError> {
        // Writers take turns: under the lock nobody else moves the cursor,
        // the gauge or the DLQ's ids, or removes segments, so what the plan
        // read holds while its writes are made.
        let _guard = self.lock()?;
        let mut known = self.known.lock();
        let commit = self.plan_batch_commit(ack, &known)?;
        // Invariant 3 without a sled transaction: the redo record first,
        // then its writes, the commit's number last (see `redo`). A write
        // that fails leaves the store `unfinished` until reopened, whose
        // open makes the writes again.
        self.write_redo(&commit.redo)
            .and_then(|_| self.make_writes(&commit.redo.writes))
            .inspect_err(|_| self.unfinished.store(true, Ordering::SeqCst))?;
        self.queue_bytes.store(commit.queue_bytes, Ordering::SeqCst);
        self.dlq_len.store(commit.dlq_len, Ordering::SeqCst);
        known.learn(commit.learned);
        self.last_seq.fetch_max(ack.upto, Ordering::SeqCst);
        self.committed
            .fetch_max(commit.new_cursor, Ordering::SeqCst);
        // Finished: the record goes, so that no copy of a parked event's
        // body outlives its removal from the DLQ. (A crash, or a failure,
        // first leaves it numbered as finished: never made again.)
        self.redo.clear().map_err(io)
    }

    fn queue_info(&self) -> Result<QueueInfo, StorageError> {
        let cursor = self.cursor()?;
        let last_seq = self.last_seq.load(Ordering::SeqCst);
        let oldest_received_ms = self
            .wal
            .range((cursor + 1).to_be_bytes()..)
            .next()
            .transpose()
            .map_err(io)?
            .and_then(|(k, v)| {
                let segment =
                    decode_segment(u64::from_be_bytes(k.as_ref().try_into().ok()?), &v).ok()?;
                segment.record(segment.first().max(cursor + 1)).ok()
            })
            .map(|r| r.received_at_ms);
        Ok(QueueInfo {
            bytes: self.queue_bytes.load(Ordering::SeqCst),
            depth: last_seq.saturating_sub(cursor),
            cursor,
            last_seq,
            oldest_received_ms,
        })
    }

    fn queue_bytes(&self) -> Result<u64, StorageError> {
        Ok(self.queue_bytes.load(Ordering::SeqCst))
    }

    fn counts(&self) -> Result<Vec<(String, u64)>, StorageError> {
        self.counts
            .iter()
            .map(|item| {
                let (k, v) = item.map_err(io)?;
                Ok((String::from_utf8_lossy(&k).into_owned(), u64_of(Some(v))))
            })
            .collect()
    }

    fn store_id(&self) -> Result<u64, StorageError> {
        Ok(u64_of(self.meta.get(STORE_ID).map_err(io)?))
    }

    fn counted(&self, from_day: i32, to_day: i32) -> Result<Counted, StorageError> {
        // Batch commits take this lock: none lands between the reads. Not
        // `lock()`: a read does not withdraw the clean mark.
        let mut counted = {
            let _guard = self.settled_lock()?;
            Counted {
                cursor: self.cursor()?,
                by_type: self.counts()?,
                days: analytics::day_figures(self, from_day, to_day, false)?,
            }
        };
        // Sums need not match the cursor (a takeover adds none): read
        // without holding commits back.
        counted.days.sums = analytics::day_type_sums(self, from_day, to_day)?;
        Ok(counted)
    }

    fn park(&self, entries: &[DlqEntry]) -> Result<(), StorageError> {
        if entries.is_empty() {
            return Ok(());
        }
        let _guard = self.lock()?;
        let encoded: Vec<Vec<u8>> = entries.iter().map(encode_record).collect();
        let dlq_len = (&self.dlq, &self.meta)
            .transaction(|(dlq, meta)| {
                let dlq_last = u64_of(meta.get(DLQ_LAST)?);
                let dlq_len = u64_of(meta.get(DLQ_LEN)?);
                let dlq_len = Self::put_dlq(dlq_last, dlq_len, &encoded, |tree, k, v| {
                    // `put_dlq` writes to these two trees only.
                    match tree {
                        redo::Tree::Dlq => dlq.insert(k, v),
                        _ => meta.insert(k, v),
                    }
                    .map(drop)
                })?;
                Ok::<_, ConflictableTransactionError<StorageError>>(dlq_len)
            })
            .map_err(tx_err)?;
        self.dlq_len.store(dlq_len, Ordering::SeqCst);
        Ok(())
    }

    fn merge_user_records(&self, from_day: i32, to_day: i32) -> Result<usize, StorageError> {
        let (from, to) = analytics::user_record_range(from_day, to_day);
        // Keys first: once merged, a day has one record per type, and its
        // (large) value is not read again every minute.
        let keys = self
            .aggregates
            .range(from..to)
            .keys()
            .map(|k| k.map(|k| k.to_vec()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(io)?;
        let mut records = Vec::new();
        for group in analytics::user_record_groups(&keys) {
            for k in &keys[group] {
                let value = self.aggregates.get(k).map_err(io)?.unwrap_or_default();
                records.push((k.clone(), value.to_vec()));
            }
        }
        let mut removed = 0;
        for merge in analytics::merge_user_records(&records) {
            // Under the lock: a batch commit that a crash interrupts writes
            // its own record again at the next open, which must not bring
            // back one merged away meanwhile.
            let _guard = self.lock()?;
            self.aggregates
                .transaction(|tx| {
                    for k in &merge.remove {
                        tx.remove(k.as_slice())?;
                    }
                    tx.insert(merge.key.as_slice(), merge.record.as_slice())?;
                    Ok::<_, ConflictableTransactionError<StorageError>>(())
                })
                .map_err(tx_err)?;
            removed += merge.remove.len();
        }
        Ok(removed)
    }

    fn prune_windows(&self, before_ms: i64) -> Result<usize, StorageError> {
        let mut removed = 0;
        for (from, to) in analytics::stale_window_ranges(before_ms) {
            let keys = self
                .aggregates
                .range(from..to)
                .keys()
                .collect::<Result<Vec<_>, _>>()
                .map_err(io)?;
            // Under the lock, a few at a time: a batch commit's plan reads
            // aggregates that its writes then set, and a removal between the
            // two would be undone; intake waits for no long removal.
            for chunk in keys.chunks(256) {
                let _guard = self.lock()?;
                for k in chunk {
                    self.aggregates.remove(k).map_err(io)?;
                }
                removed += chunk.len();
            }
        }
        // Some minutes' members are gone: none may be taken as there. (A
        // batch that committed meanwhile may teach one back: its minute is
        // older than the window, and no later batch writes to it.)
        if removed > 0 {
            self.known.lock().forget_minutes();
        }
        Ok(removed)
    }

    fn sweep_keys(&self, before_ms: i64, limit: usize) -> Result<usize, StorageError> {
        let mut removed = 0;
        let end = ordered_ms(before_ms);
        while removed < limit {
            // One group at a time under the lock: an append must not find a
            // key in a group this sweep is taking apart.
            let _guard = self.lock()?;
            let Some((entry, value)) = self
                .expiry
                .range(..end.as_slice())
                .next()
                .transpose()
                .map_err(io)?
            else {
                break;
            };
            let mut idem = self.idempotency.lock();
            let id = Group::from_entry_key(&entry).and_then(|g| idem.ids.get(&g.last_seq).copied());
            let keys = decode_key_list(&value).unwrap_or_else(|e| {
                tracing::error!(error = %e, "damaged expiry entry dropped; its keys are forgotten");
                Vec::new()
            });
            // A key counts as removed when this group was its latest: one
            // accepted again since lives on in its newer group.
            let taken = keys.len().min(limit - removed);
            let mut lists = HashMap::new();
            let mut candidates = Vec::new();
            for key in &keys[..taken] {
                let fp = idem.fingerprint(key);
                let Some(id) = id.filter(|id| idem.index.remove(fp, *id)) else {
                    continue;
                };
                let last_seq = idem.groups.get(&id).map_or(0, |g| g.last_seq);
                idem.index.candidates(fp, &mut candidates);
                let mut renewed = false;
                for &other in &candidates {
                    if let Some(g) = idem.groups.get(&other).copied()
                        && g.last_seq > last_seq
                        && self.holds(other, g, key, &mut lists)?
                    {
                        renewed = true;
                        break;
                    }
                }
                if !renewed {
                    removed += 1;
                }
            }
            if taken < keys.len() {
                self.expiry
                    .insert(&entry, {
                        let rest: Vec<&[u8]> = keys[taken..].iter().map(Vec::as_slice).collect();
                        encode_key_list(&rest)
                    })
                    .map_err(io)?;
            } else {
                self.expiry.remove(&entry).map_err(io)?;
                if let Some(id) = id
                    && let Some(group) = idem.groups.remove(&id)
                {
                    idem.ids.remove(&group.last_seq);
                }
            }
        }
        Ok(removed)
    }

    fn dlq_list(&self, after: u64, limit: usize) -> Result<Vec<(u64, DlqEntry)>, StorageError> {
        let mut out = Vec::new();
        for item in self.dlq.range(after.saturating_add(1).to_be_bytes()..) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(io)?;
            let id = u64_of(Some(k.clone()));
            match decode_record::<DlqEntry>(&v) {
                Ok(e) => out.push((id, e)),
                Err(e) => {
                    self.quarantine("dlq", &k, &v, 0, e.to_string());
                }
            }
        }
        Ok(out)
    }

    fn dlq_get(&self, id: u64) -> Result<Option<DlqEntry>, StorageError> {
        let key = id.to_be_bytes();
        match self.dlq.get(key).map_err(io)? {
            None => Ok(None),
            Some(v) => match decode_record::<DlqEntry>(&v) {
                Ok(e) => Ok(Some(e)),
                Err(e) => {
                    self.quarantine("dlq", &key, &v, 0, e.to_string());
                    Ok(None)
                }
            },
        }
    }

    fn dlq_remove(&self, ids: &[u64]) -> Result<usize, StorageError> {
        let _guard = self.lock()?;
        let (removed, dlq_len) = (&self.dlq, &self.meta)
            .transaction(|(dlq, meta)| {
                let mut removed = 0;
                for id in ids {
                    if dlq.remove(&id.to_be_bytes())?.is_some() {
                        removed += 1;
                    }
                }
                let dlq_len = u64_of(meta.get(DLQ_LEN)?).saturating_sub(removed as u64);
                meta.insert(DLQ_LEN, &dlq_len.to_be_bytes())?;
                Ok::<_, ConflictableTransactionError<StorageError>>((removed, dlq_len))
            })
            .map_err(tx_err)?;
        self.dlq_len.store(dlq_len, Ordering::SeqCst);
        Ok(removed)
    }

    fn dlq_len(&self) -> Result<u64, StorageError> {
        Ok(self.dlq_len.load(Ordering::SeqCst))
    }

    fn dlq_replay(&self, ids: &[u64]) -> Result<(Vec<u64>, u64), StorageError> {
        let _guard = self.lock()?;
        let start = self.last_seq.load(Ordering::SeqCst);
        let (moved, last, bytes, dlq_len) = (&self.dlq, &self.wal, &self.meta)
            .transaction(|(dlq, wal, meta)| {
                let mut moved = Vec::new();
                let mut records = Vec::new();
                for id in ids {
                    let Some(v) = dlq.remove(&id.to_be_bytes())? else {
                        continue;
                    };
                    // Damaged entries stay out of the WAL; dlq_list quarantines them.
                    let Ok(entry) = decode_record::<DlqEntry>(&v) else {
                        dlq.insert(&id.to_be_bytes(), v)?;
                        continue;
                    };
                    let mut record = entry.record;
                    record.only_sink = Some(entry.sink);
                    records.push(record);
                    moved.push(*id);
                }
                let refs: Vec<&WalRecord> = records.iter().collect();
                let (last, added) =
                    Self::put_segments(start, &refs, |k, v| wal.insert(&k, v).map(drop))?;
                let gauge = Gauge::of(meta.get(QUEUE_BYTES)?);
                let bytes = gauge.bytes + added;
                meta.insert(QUEUE_BYTES, &Gauge::value(bytes, last))?;
                let dlq_len = u64_of(meta.get(DLQ_LEN)?).saturating_sub(moved.len() as u64);
                meta.insert(DLQ_LEN, &dlq_len.to_be_bytes())?;
                Ok::<_, ConflictableTransactionError<StorageError>>((moved, last, bytes, dlq_len))
            })
            .map_err(tx_err)?;
        self.last_seq.store(last, Ordering::SeqCst);
        self.committed.fetch_max(last, Ordering::SeqCst);
        self.queue_bytes.store(bytes, Ordering::SeqCst);
        self.dlq_len.store(dlq_len, Ordering::SeqCst);
        Ok((moved, last))
    }
}

/// What a batch commit writes, and what it leaves in memory once written.
struct BatchCommit {
    /// Its writes, the redo record written before them.
    redo: Redo,
    /// The cursor afterwards.
    new_cursor: u64,
    /// The byte gauge afterwards.
    queue_bytes: u64,
    /// The DLQ's length afterwards.
    dlq_len: u64,
    /// Set members the batch found or wrote, for `known`.
    learned: analytics::Learned,
}

/// The aggregates as a batch commit sees them: its own writes, gathered for
/// its redo record, over the tree.
struct StagedKv<'a> {
    /// The aggregates tree, read where the batch wrote nothing.
    tree: &'a Tree,
    /// Key → the value the batch leaves (`None`: removed), in key order.
    writes: std::collections::BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl KvWrite for StagedKv<'_> {
    type Error = StorageError;
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, Self::Error> {
        match self.writes.get(key) {
            Some(staged) => Ok(staged.clone()),
            None => Ok(self.tree.get(key).map_err(io)?.map(|v| v.to_vec())),
        }
    }
    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), Self::Error> {
        self.writes.insert(key.to_vec(), Some(value.to_vec()));
        Ok(())
    }
    fn remove(&mut self, key: &[u8]) -> Result<(), Self::Error> {
        self.writes.insert(key.to_vec(), None);
        Ok(())
    }
}

impl KvRead for Store {
    type Error = StorageError;
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.aggregates.get(key).map_err(io)?.map(|v| v.to_vec()))
    }

    fn scan(
        &self,
        from: &[u8],
        to: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StorageError> {
        if from >= to {
            return Ok(());
        }
        for item in self.aggregates.range(from..to) {
            let (k, v) = item.map_err(io)?;
            if !f(&k, &v) {
                break;
            }
        }
        Ok(())
    }
}

/// The sled-backed store. sled stops working after a failed write (a
/// full disk makes every later call fail, even once space returns), so
/// after an I/O error this wrapper closes the database and opens it again,
/// at most once a second: what was flushed is still there, and the daemon
/// goes on without a restart when the disk has room again.
pub struct SledStorage {
    /// Where the database lives.
    dir: PathBuf,
    /// How it is opened.
    options: SledOptions,
    /// The open database; `None` while it is being reopened.
    store: RwLock<Option<Arc<Store>>>,
    /// When the last reopen was tried.
    last_reopen: Mutex<Option<Instant>>,
}

impl SledStorage {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path, options: &SledOptions) -> Result<Self, StorageError> {
        let store = Self::start(Store::open(dir, options)?, options);
        Ok(SledStorage {
            dir: dir.to_owned(),
            options: options.clone(),
            store: RwLock::new(Some(store)),
            last_reopen: Mutex::new(None),
        })
    }

    /// Shares an opened store, with its mark and log collector threads and
    /// its background flusher if it has one.
    fn start(store: Store, options: &SledOptions) -> Arc<Store> {
        let store = Arc::new(store);
        spawn_marker(&store);
        spawn_collector(&store);
        if let Some(ms) = options.background_flush_ms {
            spawn_flusher(&store, Duration::from_millis(ms.max(1)));
        }
        store
    }

    /// Runs `f` on the open store; an I/O error triggers a reopen.
    fn with<T>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, StorageError>,
    ) -> Result<T, StorageError> {
        let store = self.store.read().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(store) = store else {
            self.reopen();
            return Err(StorageError::Io(
                "the store is being reopened after an I/O error".into(),
            ));
        };
        let result = f(&store);
        drop(store);
        if let Err(StorageError::Io(e)) = &result {
            tracing::warn!(error = %e, "storage I/O failed; reopening the store");
            self.reopen();
        }
        result
    }

    /// Closes and reopens the database (at most once a second).
    fn reopen(&self) {
        {
            let mut last = self.last_reopen.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                return;
            }
            *last = Some(Instant::now());
        }
        let mut slot = self.store.write().unwrap_or_else(|p| p.into_inner());
        let last_seq = slot
            .as_ref()
            .map_or(0, |s| s.last_seq.load(Ordering::SeqCst));
        let reports = slot
            .as_ref()
            .map_or(0, |s| s.missing_reports.load(Ordering::SeqCst));
        // Wait for calls still holding the old database, then close it.
        if let Some(old) = slot.take() {
            for _ in 0..100 {
                if Arc::strong_count(&old) == 1 {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            drop(old);
        }
        for attempt in 0..20 {
            match Store::open(&self.dir, &self.options) {
                Ok(store) => {
                    store.missing_reports.fetch_add(reports, Ordering::SeqCst);
                    let recovered = store.last_seq.fetch_max(last_seq, Ordering::SeqCst);
                    if recovered < last_seq {
                        // With durability = "fsync" their requests were
                        // answered 503; with "interval", 202.
                        tracing::error!(
                            from = recovered + 1,
                            to = last_seq,
                            "events written before the store failed were not durable and are lost"
                        );
                        if let Err(e) = store.set_aside(recovered + 1, last_seq) {
                            tracing::warn!(error = %e, "cannot record the lost seqs");
                        }
                    }
                    *slot = Some(Self::start(store, &self.options));
                    tracing::info!("store reopened");
                    return;
                }
                Err(e) if attempt == 19 => {
                    tracing::error!(error = %e, "reopening the store failed; will retry")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

impl SledStorage {
    /// Writes raw bytes into a tree, bypassing every check: for tests that
    /// need a damaged record, or one in an older format, on disk.
    #[doc(hidden)]
    pub fn put_raw(&self, tree: &str, key: &[u8], value: &[u8]) -> Result<(), StorageError> {
        self.with(|s| {
            let t = match tree {
                "wal" => &s.wal,
                "dlq" => &s.dlq,
                "meta" => &s.meta,
                "idem_expiry" => &s.expiry,
                _ => return Err(StorageError::Io(format!("no tree {tree}"))),
            };
            t.insert(key, value).map_err(io)?;
            s.flush()
        })
    }
}

impl Storage for SledStorage {
    fn append(
        &self,
        events: &[NewEvent],
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<Vec<AppendOutcome>, StorageError> {
        self.with(|s| s.append(events, now_ms, ttl_ms))
    }
    fn flush(&self) -> Result<(), StorageError> {
        self.with(|s| s.flush())
    }
    fn close(&self) -> Result<(), StorageError> {
        self.with(|s| s.close())
    }
    fn read_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<Queued>, Vec<Quarantined>), StorageError> {
        self.with(|s| s.read_after(after, limit))
    }
    fn commit_batch(&self, ack: &BatchAck) -> Result<(), StorageError> {
        self.with(|s| s.commit_batch(ack))
    }
    fn queue_info(&self) -> Result<QueueInfo, StorageError> {
        self.with(|s| s.queue_info())
    }
    fn queue_bytes(&self) -> Result<u64, StorageError> {
        // On the request path: never waits on a reopen (`with` may run one).
        let store = self.store.read().unwrap_or_else(|p| p.into_inner());
        match store.as_ref() {
            Some(store) => store.queue_bytes(),
            None => Err(StorageError::Io(
                "the store is being reopened after an I/O error".into(),
            )),
        }
    }
    fn counts(&self) -> Result<Vec<(String, u64)>, StorageError> {
        self.with(|s| s.counts())
    }
    fn counted(&self, from_day: i32, to_day: i32) -> Result<Counted, StorageError> {
        self.with(|s| s.counted(from_day, to_day))
    }
    fn store_id(&self) -> Result<u64, StorageError> {
        self.with(|s| s.store_id())
    }
    fn park(&self, entries: &[DlqEntry]) -> Result<(), StorageError> {
        self.with(|s| s.park(entries))
    }
    fn prune_windows(&self, before_ms: i64) -> Result<usize, StorageError> {
        self.with(|s| s.prune_windows(before_ms))
    }
    fn merge_user_records(&self, from_day: i32, to_day: i32) -> Result<usize, StorageError> {
        self.with(|s| s.merge_user_records(from_day, to_day))
    }
    fn sweep_keys(&self, before_ms: i64, limit: usize) -> Result<usize, StorageError> {
        self.with(|s| s.sweep_keys(before_ms, limit))
    }
    fn dlq_list(&self, after: u64, limit: usize) -> Result<Vec<(u64, DlqEntry)>, StorageError> {
        self.with(|s| s.dlq_list(after, limit))
    }
    fn dlq_get(&self, id: u64) -> Result<Option<DlqEntry>, StorageError> {
        self.with(|s| s.dlq_get(id))
    }
    fn dlq_remove(&self, ids: &[u64]) -> Result<usize, StorageError> {
        self.with(|s| s.dlq_remove(ids))
    }
    fn dlq_len(&self) -> Result<u64, StorageError> {
        self.with(|s| s.dlq_len())
    }
    fn missing_reports(&self) -> u64 {
        let store = self.store.read().unwrap_or_else(|p| p.into_inner());
        store
            .as_ref()
            .map_or(0, |s| s.missing_reports.load(Ordering::SeqCst))
    }
    fn dlq_replay(&self, ids: &[u64]) -> Result<(Vec<u64>, u64), StorageError> {
        self.with(|s| s.dlq_replay(ids))
    }
}

impl KvRead for SledStorage {
    type Error = StorageError;
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.with(|s| KvRead::get(s, key))
    }
    fn scan(
        &self,
        from: &[u8],
        to: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StorageError> {
        self.with(|s| s.scan(from, to, f))
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    /// Keys that share their bytes fit one entry; keys that share none
    /// (random ids) are cut into runs, each under the blob threshold,
    /// covering every key once, in order, each named by its last seq.
    #[test]
    fn a_key_list_past_the_blob_threshold_is_cut_into_runs_of_seqs() {
        let counting: Vec<Vec<u8>> = (0..1_000)
            .map(|i| format!("default\0evt-{i:08}").into_bytes())
            .collect();
        let keys: Vec<&[u8]> = counting.iter().map(Vec::as_slice).collect();
        let one = key_list_entries(100, 7, &keys);
        assert_eq!(
            one.len(),
            1,
            "front-coded, 1,000 counting ids fit one entry"
        );
        assert_eq!(
            (one[0].keys.clone(), one[0].group.last_seq),
            (0..1_000, 1_100)
        );

        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let random: Vec<Vec<u8>> = (0..6_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                format!("default\0{x:016x}{:016x}", x.rotate_left(29)).into_bytes()
            })
            .collect();
        let keys: Vec<&[u8]> = random.iter().map(Vec::as_slice).collect();
        assert!(encode_key_list(&keys).len() > KEY_LIST_BYTES);
        let runs = key_list_entries(100, 7, &keys);
        assert!(runs.len() > 1);
        let mut next = 0;
        for run in &runs {
            assert_eq!(run.keys.start, next, "runs follow each other");
            assert!(run.list.len() <= KEY_LIST_BYTES, "{} bytes", run.list.len());
            assert_eq!(run.group.last_seq, 100 + run.keys.end as u64);
            assert_eq!(run.group.first_seen_ms, 7);
            let mut listed = decode_key_list(&run.list).unwrap();
            listed.sort();
            let mut wanted: Vec<Vec<u8>> = random[run.keys.clone()].to_vec();
            wanted.sort();
            assert_eq!(listed, wanted);
            next = run.keys.end;
        }
        assert_eq!(next, 6_000);
    }

    /// sled panics inside `open` on some stores; no store inletd writes
    /// reproduces it on demand, but a cache of 0 bytes panics on the same
    /// path (sled asserts at least 256). The panic comes back as an error
    /// naming the store and sled's own words, and the thread goes on.
    #[test]
    fn a_panic_inside_sled_open_is_an_error_naming_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let config = sled::Config::new().path(dir.path()).cache_capacity(0);
        let err = open_without_panic(dir.path(), || config.open())
            .map(|_| ())
            .expect_err("sled refuses a cache of 0 bytes");
        let text = err.to_string();
        assert!(matches!(err, StorageError::Damaged { .. }), "{text}");
        assert!(text.contains(&dir.path().display().to_string()), "{text}");
        assert!(text.contains("cache capacity"), "{text}");
        // The same thread opens a good store afterwards: nothing was left poisoned.
        let good = sled::Config::new().path(dir.path().join("good"));
        assert!(open_without_panic(dir.path(), || good.open()).is_ok());
    }

    fn event(key: &str) -> NewEvent {
        NewEvent {
            record: WalRecord {
                source: "default".into(),
                key: key.into(),
                event_type: "t".into(),
                received_at_ms: 0,
                occurred_at_ms: 0,
                only_sink: None,
                body: "{}".into(),
            },
        }
    }

    /// Opens the store in `dir` again; sled's threads let go of the file
    /// lock a moment after the drop.
    fn open_again(dir: &Path) -> Store {
        (0..100)
            .find_map(|_| {
                let opened = Store::open(dir, &SledOptions::default()).ok();
                if opened.is_none() {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                opened
            })
            .expect("the store opens again once sled has let go of it")
    }

    /// The watch that lets a flush skip its listings answers yes for a file
    /// created, renamed or removed in either directory, and only once; a
    /// write into a file is not a change (a flush writes `db` every time).
    #[test]
    fn the_directory_watch_sees_files_come_and_go_but_not_writes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("blobs")).unwrap();
        std::fs::write(dir.path().join("db"), b"log").unwrap();
        let mut changes = DirChanges::watch(dir.path());
        assert!(
            changes.inotify.is_some(),
            "inotify is needed here: a flush without it lists every time"
        );
        assert!(!changes.since_last_asked(), "nothing happened yet");
        std::fs::write(dir.path().join("blobs/17"), b"blob").unwrap();
        assert!(changes.since_last_asked(), "a new blob");
        assert!(!changes.since_last_asked(), "the news was taken");
        let mut log = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("db"))
            .unwrap();
        std::io::Write::write_all(&mut log, b" grows").unwrap();
        log.sync_data().unwrap();
        assert!(!changes.since_last_asked(), "a write is not a change");
        std::fs::write(dir.path().join("snap.tmp"), b"snapshot").unwrap();
        std::fs::rename(dir.path().join("snap.tmp"), dir.path().join("snap.1")).unwrap();
        assert!(changes.since_last_asked(), "a snapshot written and renamed");
        std::fs::remove_file(dir.path().join("blobs/17")).unwrap();
        assert!(changes.since_last_asked(), "a blob collected");
        assert!(!changes.since_last_asked());
    }

    /// A blob file that appears between two flushes of a store whose
    /// flushes had found nothing new is listed and synced by the next one:
    /// the quiet flushes did not blind it.
    #[test]
    fn a_flush_after_quiet_ones_still_finds_a_new_blob() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &SledOptions::default()).unwrap();
        let ttl = 1_000_000;
        for (i, key) in ["a", "b", "c"].into_iter().enumerate() {
            store.append(&[event(key)], i as i64, ttl).unwrap();
            store.flush().unwrap();
        }
        let blob = OsString::from("999999999");
        let settled_or_fresh = |store: &Store| {
            let state = store.disk.state.lock().unwrap();
            state.settled.contains(&blob) || state.fresh.contains(&blob)
        };
        assert!(!settled_or_fresh(&store));
        std::fs::write(dir.path().join("blobs").join(&blob), b"a value").unwrap();
        store.append(&[event("d")], 4, ttl).unwrap();
        store.flush().unwrap();
        assert!(
            settled_or_fresh(&store),
            "the next flush listed the new blob"
        );
        // sled did not write that file: take it out before sled sees it.
        std::fs::remove_file(dir.path().join("blobs").join(&blob)).unwrap();
        store.flush().unwrap();
        assert!(!settled_or_fresh(&store), "and the one after saw it go");
    }

    /// Every key gets the same fingerprint: each lookup finds every group
    /// as a candidate, and only the stored key lists can tell the keys
    /// apart. No new key is taken for a duplicate, no duplicate for a new
    /// key, before and after a restart (which rebuilds the index).
    #[test]
    fn colliding_fingerprints_never_drop_an_event() {
        let dir = tempfile::tempdir().unwrap();
        let collide = |store: &Store| {
            store.idempotency.lock().fingerprint = |_, _| 0x4242_4242_0000_0001;
            store.rebuild_index().unwrap();
        };
        let ttl = 1_000_000;
        let store = Store::open(dir.path(), &SledOptions::default()).unwrap();
        collide(&store);
        let first: Vec<NewEvent> = (0..5).map(|i| event(&format!("a{i}"))).collect();
        let out = store.append(&first, 10, ttl).unwrap();
        assert!(
            out.iter()
                .all(|o| matches!(o, AppendOutcome::Accepted { .. }))
        );
        // New keys in a second group, mixed with repeats of the first.
        let second: Vec<NewEvent> = ["b0", "a3", "b1", "a0", "b0"].map(event).to_vec();
        let out = store.append(&second, 20, ttl).unwrap();
        assert_eq!(
            out,
            vec![
                AppendOutcome::Accepted { seq: 6 },
                AppendOutcome::Duplicate { first_seen_ms: 10 },
                AppendOutcome::Accepted { seq: 7 },
                AppendOutcome::Duplicate { first_seen_ms: 10 },
                AppendOutcome::Duplicate { first_seen_ms: 20 },
            ]
        );
        drop(store);

        let store = open_again(dir.path());
        collide(&store);
        // The rebuild kept the colliding function: all 7 keys share a slot tag.
        let mut out = Vec::new();
        store
            .idempotency
            .lock()
            .index
            .candidates(0x4242_4242_0000_0001, &mut out);
        assert_eq!(out.len(), 7, "{out:?}");
        let again: Vec<NewEvent> = ["a4", "b1", "c0"].map(event).to_vec();
        assert_eq!(
            store.append(&again, 30, ttl).unwrap(),
            vec![
                AppendOutcome::Duplicate { first_seen_ms: 10 },
                AppendOutcome::Duplicate { first_seen_ms: 20 },
                AppendOutcome::Accepted { seq: 8 },
            ]
        );
        // Expiry drops whole groups: the first group's keys are new again,
        // the later ones are still known.
        assert_eq!(store.sweep_keys(15, usize::MAX).unwrap(), 5);
        let after: Vec<NewEvent> = ["a1", "b0"].map(event).to_vec();
        assert_eq!(
            store.append(&after, 40, ttl).unwrap(),
            vec![
                AppendOutcome::Accepted { seq: 9 },
                AppendOutcome::Duplicate { first_seen_ms: 20 },
            ]
        );
    }

    /// sled lost the page holding the middle group's segment (as when a
    /// blob file is deleted: no error, the key is simply gone). Reading the
    /// queue returns the groups around it and reports the seqs in between
    /// as missing; seqs set aside on purpose (a damaged segment moved to
    /// quarantine, or a reopen's unsynced tail) are not reported again.
    #[test]
    fn a_gap_in_the_wal_is_reported_as_missing_events() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &SledOptions::default()).unwrap();
        for group in [["a", "b"], ["c", "d"], ["e", "f"], ["g", "h"]] {
            store.append(&group.map(event), 0, 1_000_000).unwrap();
        }
        store.wal.remove(4u64.to_be_bytes()).unwrap(); // seqs 3..=4
        store.wal.remove(8u64.to_be_bytes()).unwrap(); // seqs 7..=8: the tail
        store.set_aside(5, 6).unwrap();
        store.wal.remove(6u64.to_be_bytes()).unwrap(); // seqs 5..=6, known
        let (records, damaged) = store.read_after(0, 100).unwrap();
        let seqs: Vec<u64> = records.iter().map(|q| q.seq).collect();
        assert_eq!(seqs, vec![1, 2]);
        // The tail (7..=8) too: this store wrote up to seq 8, so a walk that
        // ends at 6 ended early.
        let positions: Vec<&str> = damaged.iter().map(|d| d.position.as_str()).collect();
        assert_eq!(positions, vec!["wal seqs 3..=4", "wal seqs 7..=8"]);

        store.append(&["i"].map(event), 0, 1_000_000).unwrap(); // seq 9
        let (records, damaged) = store.read_after(0, 100).unwrap();
        let seqs: Vec<u64> = records.iter().map(|q| q.seq).collect();
        assert_eq!(seqs, vec![1, 2, 9]);
        let positions: Vec<&str> = damaged.iter().map(|d| d.position.as_str()).collect();
        assert_eq!(positions, vec!["wal seqs 3..=4", "wal seqs 7..=8"]);
        // From past the first gap, only the second one.
        let (_, damaged) = store.read_after(4, 100).unwrap();
        assert_eq!(damaged.len(), 1, "{damaged:?}");
        assert_eq!(store.missing_reports.load(Ordering::SeqCst), 5);
    }

    /// A group commit is three plain writes: segments, key list, gauge. A
    /// crash after the segments (sled keeps a prefix of its log) leaves the
    /// group without its keys or bytes; the next open writes them. The
    /// events were never answered 202, so the client sends them again:
    /// that retry must be a duplicate of the queued copy, not a second one.
    #[test]
    fn a_crash_inside_a_group_commit_is_finished_at_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let ttl = 1_000_000;
        let store = Store::open(dir.path(), &SledOptions::default()).unwrap();
        let new_store = Gauge::of(store.meta.get(QUEUE_BYTES).unwrap());
        assert_eq!((new_store.bytes, new_store.upto), (0, Some(0)));
        store.append(&["a", "b"].map(event), 10, ttl).unwrap();
        let gauge_after_a = store.meta.get(QUEUE_BYTES).unwrap().unwrap();
        let bytes_after_a = store.queue_info().unwrap().bytes;
        store.append(&["c", "d", "e"].map(event), 20, ttl).unwrap();
        let bytes_after_b = store.queue_info().unwrap().bytes;
        assert!(bytes_after_b > bytes_after_a);
        // The crash: B's segment is written, its key list and gauge are not.
        let b_list = Group {
            first_seen_ms: 20,
            last_seq: 5,
        }
        .entry_key();
        assert!(store.expiry.remove(b_list).unwrap().is_some());
        store
            .meta
            .insert(QUEUE_BYTES, gauge_after_a.clone())
            .unwrap();
        store.flush().unwrap();
        drop(store);

        let store = open_again(dir.path());
        assert_eq!(store.queue_info().unwrap().bytes, bytes_after_b);
        let retry: Vec<NewEvent> = ["c", "e", "x"].map(event).to_vec();
        let out = store.append(&retry, 30, ttl).unwrap();
        assert!(
            matches!(
                out[..],
                [
                    AppendOutcome::Duplicate { .. },
                    AppendOutcome::Duplicate { .. },
                    AppendOutcome::Accepted { seq: 6 }
                ]
            ),
            "{out:?}"
        );
        let (records, damaged) = store.read_after(0, 100).unwrap();
        let seqs: Vec<u64> = records.iter().map(|q| q.seq).collect();
        assert_eq!(seqs, vec![1, 2, 3, 4, 5, 6]);
        assert!(damaged.is_empty(), "{damaged:?}");
        let bytes_after_x = store.queue_info().unwrap().bytes;

        // A crash after the key list, before the gauge: the bytes are
        // added, the keys are not listed twice.
        let gauge_after_x = store.meta.get(QUEUE_BYTES).unwrap().unwrap();
        store.append(&["y"].map(event), 40, ttl).unwrap();
        let bytes_after_y = store.queue_info().unwrap().bytes;
        store.meta.insert(QUEUE_BYTES, gauge_after_x).unwrap();
        store.flush().unwrap();
        drop(store);

        let store = open_again(dir.path());
        assert!(bytes_after_y > bytes_after_x);
        assert_eq!(store.queue_info().unwrap().bytes, bytes_after_y);
        let lists = store.expiry.iter().count();
        assert_eq!(lists, 4, "groups a, the finished b, x, y");
        assert!(matches!(
            store.append(&["y"].map(event), 50, ttl).unwrap()[..],
            [AppendOutcome::Duplicate { first_seen_ms: 40 }]
        ));
        // A clean restart finds nothing to finish.
        drop(store);
        let store = open_again(dir.path());
        assert_eq!(store.queue_info().unwrap().bytes, bytes_after_y);
        assert_eq!(store.expiry.iter().count(), 4);
    }

    /// What a batch commit leaves, as the queries and the next batch see
    /// it: the cursor, the byte gauge, the counters, every aggregate and
    /// the DLQ.
    type Committed = (
        u64,
        u64,
        Vec<(String, u64)>,
        Vec<(IVec, IVec)>,
        Vec<(u64, DlqEntry)>,
        u64,
    );

    fn committed(store: &Store) -> Committed {
        (
            store.cursor().unwrap(),
            store.queue_info().unwrap().bytes,
            store.counts().unwrap(),
            store.aggregates.iter().collect::<Result<_, _>>().unwrap(),
            store.dlq_list(0, 100).unwrap(),
            store.dlq_len().unwrap(),
        )
    }

    /// Six events of two types from three users, one minute apart.
    fn batch_of_users() -> Vec<NewEvent> {
        (0..6)
            .map(|i| NewEvent {
                record: WalRecord {
                    source: "default".into(),
                    key: format!("evt-{i}"),
                    event_type: ["signup", "page_view"][i % 2].into(),
                    received_at_ms: NOW_MS - 1_000,
                    occurred_at_ms: NOW_MS - 60_000 * i as i64,
                    only_sink: None,
                    body: format!(r#"{{"user_id":"u{}","session_id":"s{i}"}}"#, i % 3),
                },
            })
            .collect()
    }

    const NOW_MS: i64 = 1_700_000_000_000;

    /// The Processor's acknowledgement of everything after the cursor, one
    /// event of it failed by a sink.
    fn ack_after_cursor(store: &Store) -> Option<BatchAck> {
        let (records, _) = store.read_after(store.cursor().unwrap(), 100).unwrap();
        let last = records.last()?.seq;
        let failure = crate::storage::SinkFailure {
            sink: "dashboard".into(),
            error: "dashboard answered 503".into(),
            attempts: 3,
            first_failed_ms: NOW_MS - 500,
            last_failed_ms: NOW_MS,
        };
        let dead = [(&records[1], failure)];
        Some(BatchAck::of(
            &records,
            last,
            NOW_MS,
            analytics::Wanted::default(),
            dead,
        ))
    }

    /// A store in `dir` holding the six events, and the Processor's
    /// acknowledgement of them.
    fn store_with_batch(dir: &Path) -> (Store, BatchAck) {
        let store = Store::open(dir, &SledOptions::default()).unwrap();
        store
            .append(&batch_of_users(), NOW_MS - 1_000, 1_000_000)
            .unwrap();
        let ack = ack_after_cursor(&store).unwrap();
        (store, ack)
    }

    /// The writes committing `ack` would make, planned as the commit plans
    /// them.
    fn plan(store: &Store, ack: &BatchAck) -> Redo {
        let _guard = store.lock().unwrap();
        let known = store.known.lock();
        store.plan_batch_commit(ack, &known).unwrap().redo
    }

    /// A batch commit is its redo record, then plain writes, the commit's
    /// number last. A crash after any prefix of them (sled keeps a prefix
    /// of its log) is finished at the next open, so the Processor, which
    /// starts again from the cursor, finds the batch committed: nothing is
    /// counted twice or lost, whatever the cut. A record that a crash left
    /// after its commit finished is never made again.
    #[test]
    fn a_crash_inside_a_batch_commit_is_finished_at_the_next_open() {
        let reference = tempfile::tempdir().unwrap();
        let (store, ack) = store_with_batch(reference.path());
        let writes = plan(&store, &ack).writes.len();
        store.commit_batch(&ack).unwrap();
        assert!(store.redo.is_empty(), "a finished commit leaves no record");
        let whole = committed(&store);
        assert_eq!(whole.0, 6, "the cursor passed the batch");
        assert_eq!(whole.5, 1, "one failure parked");
        assert!(writes > 10, "{writes} writes");
        drop(store);

        for cut in 0..=writes {
            let dir = tempfile::tempdir().unwrap();
            let (store, ack) = store_with_batch(dir.path());
            // The crash: the record and the first `cut` writes only.
            let redo = plan(&store, &ack);
            store.write_redo(&redo).unwrap();
            store.make_writes(&redo.writes[..cut]).unwrap();
            if cut == writes {
                // All its writes made, the record not yet cleared (a crash,
                // or a clear that failed): a DLQ change after it survives
                // the restart, as its values are not written again.
                store.park(&[whole.4[0].1.clone()]).unwrap();
            }
            store.flush().unwrap();
            drop(store);

            let store = open_again(dir.path());
            assert!(store.redo.is_empty(), "the open clears the record");
            if cut == writes {
                assert_eq!(store.dlq_len().unwrap(), 2);
                assert_eq!(store.dlq_list(0, 100).unwrap().len(), 2);
                continue;
            }
            // Without the redo at open, the cursor has not moved and the
            // batch comes again, on top of what was written of it.
            if let Some(again) = ack_after_cursor(&store) {
                store.commit_batch(&again).unwrap();
            }
            assert_eq!(
                committed(&store),
                whole,
                "a crash after {cut} of {writes} writes"
            );
            // The Processor, restarted, acknowledges the batch once more.
            store.commit_batch(&ack).unwrap();
            assert_eq!(committed(&store), whole, "the batch acknowledged twice");
        }

        // A crash while the record's parts were written: it is not whole,
        // so none of its writes was made, and none is made at the open.
        let dir = tempfile::tempdir().unwrap();
        let (store, ack) = store_with_batch(dir.path());
        let parts = plan(&store, &ack).encode(200);
        assert!(parts.len() > 2, "{} parts", parts.len());
        for (index, part) in parts.into_iter().enumerate().take(2) {
            store
                .redo
                .insert((index as u32).to_be_bytes(), part)
                .unwrap();
        }
        store.flush().unwrap();
        drop(store);
        let store = open_again(dir.path());
        assert_eq!(store.cursor().unwrap(), 0);
        assert!(store.counts().unwrap().is_empty());
        store
            .commit_batch(&ack_after_cursor(&store).unwrap())
            .unwrap();
        assert_eq!(committed(&store), whole);
    }

    /// A format 3 store kept its byte gauge in 8 bytes, for the whole WAL
    /// (its group commits were transactions). Opened now it keeps its bytes,
    /// finishes nothing, and is this build's format from then on; an older
    /// build refuses it then rather than misread the gauge.
    #[test]
    fn a_format_3_store_keeps_its_gauge_and_becomes_this_format() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &SledOptions::default()).unwrap();
        store.append(&["a", "b"].map(event), 10, 1_000_000).unwrap();
        let bytes = store.queue_info().unwrap().bytes;
        store.meta.insert(FORMAT, &3u64.to_be_bytes()).unwrap();
        store
            .meta
            .insert(QUEUE_BYTES, &bytes.to_be_bytes())
            .unwrap();
        store.flush().unwrap();
        drop(store);

        let store = open_again(dir.path());
        assert_eq!(
            u64_of(store.meta.get(FORMAT).unwrap()),
            u64::from(FORMAT_VERSION)
        );
        // It names its seq before any group commit: a crash inside the
        // first one is finished like any other.
        assert_eq!(
            Gauge::of(store.meta.get(QUEUE_BYTES).unwrap()).upto,
            Some(2)
        );
        assert_eq!(store.queue_info().unwrap().bytes, bytes);
        assert_eq!(store.expiry.iter().count(), 1, "nothing to finish");
        store.append(&["c"].map(event), 20, 1_000_000).unwrap();
        let gauge = Gauge::of(store.meta.get(QUEUE_BYTES).unwrap());
        assert_eq!(gauge.upto, Some(3));
        assert_eq!(gauge.bytes, store.queue_info().unwrap().bytes);
        assert!(gauge.bytes > bytes);
    }
}
