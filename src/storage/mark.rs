//! The store's mark: a small file beside sled's, `inletd.mark`, that says
//! what the store held, so that a store which comes back with less is
//! reported instead of served as if nothing had happened.
//!
//! sled recovers a damaged log by stopping at the first record that fails
//! its checksum and carrying on from there: a flipped bit or a torn page in
//! `db` silently takes every later write with it, and a deleted `db` opens
//! as a new, empty store. Nothing inside sled can tell. The mark lives
//! outside it:
//!
//! - **While the daemon runs**, a thread rewrites it (at most once a
//!   second, when it changed) as `running` with the highest seq that a
//!   flush had made durable. A later start must find at least that seq.
//! - **At a clean close**, after the last flush, it is rewritten as
//!   `clean` with a summary of the store: last seq, cursor, queued bytes,
//!   idempotency groups, DLQ entries. The next start must find exactly that.
//! - **At open**, after the check, it is rewritten as `running` before the
//!   store is used, so a crash later never compares with a stale summary.
//!
//! A mark is one line of text with a CRC-32, written to a temporary file,
//! synced, renamed over the old one, and the directory synced: it is
//! either the old mark or the new one after a power cut. A missing mark
//! (a store from an older inletd, or a deleted file) is not checked; an
//! unreadable one is reported and not checked. The mark is a witness, not
//! the truth: it never changes what the store holds.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The mark's file name inside the data directory.
pub const FILE: &str = "inletd.mark";

/// What the store held when it was closed cleanly. Every field is read
/// from the store itself (not from counters in memory), so that a start
/// reads the same figures from an undamaged store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Summary {
    /// The highest seq: the last WAL segment's key, or the cursor past it.
    pub last_seq: u64,
    /// The ack cursor.
    pub cursor: u64,
    /// Encoded bytes waiting in the WAL.
    pub queue_bytes: u64,
    /// Idempotency groups (`idem_expiry` entries).
    pub groups: u64,
    /// Entries in the dead-letter queue.
    pub dlq: u64,
}

/// One mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// Written at a clean close: the store must hold exactly this.
    Clean(Summary),
    /// Written while running: at least this seq was durable.
    Running { last_seq: u64 },
}

/// Why a mark file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum MarkError {
    #[error("cannot read {path}: {reason}")]
    Io { path: String, reason: String },
    #[error("{path} is damaged: {reason}")]
    Damaged { path: String, reason: String },
}

/// The path of the mark in `dir`.
pub fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

impl Summary {
    /// The fields as (name, value), in the file's order.
    fn fields(&self) -> [(&'static str, u64); 5] {
        [
            ("last_seq", self.last_seq),
            ("cursor", self.cursor),
            ("queue_bytes", self.queue_bytes),
            ("groups", self.groups),
            ("dlq", self.dlq),
        ]
    }

    /// Each field that differs from `now`, as `name was → now`.
    pub fn differences(&self, now: &Summary) -> Vec<String> {
        self.fields()
            .iter()
            .zip(now.fields())
            .filter(|((_, was), (_, is))| was != is)
            .map(|((name, was), (_, is))| format!("{name} {was} → {is}"))
            .collect()
    }
}

impl Mark {
    /// The mark as one line: `inletd-mark 1 KIND name=value … crc32=HEX`.
    pub fn encode(&self) -> String {
        let mut line = String::from("inletd-mark 1");
        match self {
            Mark::Clean(s) => {
                line.push_str(" clean");
                for (name, value) in s.fields() {
                    line.push_str(&format!(" {name}={value}"));
                }
            }
            Mark::Running { last_seq } => line.push_str(&format!(" running last_seq={last_seq}")),
        }
        let crc = crc32fast::hash(line.as_bytes());
        format!("{line} crc32={crc:08x}\n")
    }

    /// Reads a line written by [`Mark::encode`].
    pub fn decode(text: &str) -> Result<Mark, String> {
        let line = text.strip_suffix('\n').ok_or("no end of line")?;
        let (body, crc) = line.rsplit_once(" crc32=").ok_or("no checksum")?;
        let crc = u32::from_str_radix(crc, 16).map_err(|_| "checksum is not hex")?;
        if crc32fast::hash(body.as_bytes()) != crc {
            return Err("checksum mismatch".into());
        }
        let mut words = body.split(' ');
        if words.next() != Some("inletd-mark") || words.next() != Some("1") {
            return Err("not a version-1 mark".into());
        }
        let kind = words.next().ok_or("no kind")?;
        let mut value = |name: &str| -> Result<u64, String> {
            let word = words.next().ok_or_else(|| format!("no {name}"))?;
            word.strip_prefix(name)
                .and_then(|w| w.strip_prefix('='))
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("bad {name}: {word:?}"))
        };
        let mark = match kind {
            "clean" => Mark::Clean(Summary {
                last_seq: value("last_seq")?,
                cursor: value("cursor")?,
                queue_bytes: value("queue_bytes")?,
                groups: value("groups")?,
                dlq: value("dlq")?,
            }),
            "running" => Mark::Running {
                last_seq: value("last_seq")?,
            },
            other => return Err(format!("unknown kind {other:?}")),
        };
        match words.next() {
            None => Ok(mark),
            Some(extra) => Err(format!("unexpected {extra:?}")),
        }
    }
}

/// Reads the mark in `dir`; `None` when there is none.
pub fn read(dir: &Path) -> Result<Option<Mark>, MarkError> {
    let path = path(dir);
    let shown = || path.display().to_string();
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(MarkError::Io {
                path: shown(),
                reason: e.to_string(),
            });
        }
    };
    let text = String::from_utf8(bytes).map_err(|_| MarkError::Damaged {
        path: shown(),
        reason: "not text".into(),
    })?;
    Mark::decode(&text)
        .map(Some)
        .map_err(|reason| MarkError::Damaged {
            path: shown(),
            reason,
        })
}

/// Replaces the mark in `dir` durably: a temporary file, synced, renamed
/// over the mark, then the directory synced.
pub fn write(dir: &Path, mark: &Mark) -> std::io::Result<()> {
    let tmp = dir.join(format!("{FILE}.tmp"));
    let mut file = File::create(&tmp)?;
    file.write_all(mark.encode().as_bytes())?;
    file.sync_data()?;
    drop(file);
    std::fs::rename(&tmp, path(dir))?;
    File::open(dir)?.sync_all()
}

/// Removes the mark (when a new one cannot be written, no mark is better
/// than a stale one).
pub fn remove(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path(dir)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary() -> Summary {
        Summary {
            last_seq: 20_000,
            cursor: 100,
            queue_bytes: 5_000_000,
            groups: 21,
            dlq: 3,
        }
    }

    #[test]
    fn marks_round_trip() {
        for mark in [
            Mark::Clean(summary()),
            Mark::Running { last_seq: 7 },
            Mark::Clean(Summary::default()),
        ] {
            assert_eq!(Mark::decode(&mark.encode()), Ok(mark));
        }
    }

    #[test]
    fn a_damaged_mark_is_refused() {
        let text = Mark::Clean(summary()).encode();
        // Every single-byte change and every truncation is caught.
        for i in 0..text.len() {
            let mut bytes = text.clone().into_bytes();
            bytes[i] ^= 0x01;
            if let Ok(s) = String::from_utf8(bytes) {
                assert!(Mark::decode(&s).is_err(), "byte {i} flipped: {s:?}");
            }
            assert!(Mark::decode(&text[..i]).is_err(), "cut at {i}");
        }
    }

    #[test]
    fn differences_name_each_field_that_moved() {
        let was = summary();
        assert!(was.differences(&was).is_empty());
        let now = Summary {
            last_seq: 15_000,
            groups: 16,
            ..was
        };
        assert_eq!(
            was.differences(&now),
            vec!["last_seq 20000 → 15000", "groups 21 → 16"]
        );
    }

    #[test]
    fn a_mark_is_written_read_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read(dir.path()).unwrap().is_none());
        write(dir.path(), &Mark::Running { last_seq: 9 }).unwrap();
        write(dir.path(), &Mark::Clean(summary())).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Some(Mark::Clean(summary())));
        assert!(!dir.path().join(format!("{FILE}.tmp")).exists());
        std::fs::write(path(dir.path()), "inletd-mark 1 running last_seq=9\n").unwrap();
        assert!(matches!(read(dir.path()), Err(MarkError::Damaged { .. })));
        remove(dir.path()).unwrap();
        remove(dir.path()).unwrap();
        assert!(read(dir.path()).unwrap().is_none());
    }
}
