//! A batch commit's redo record: every write of one
//! [`Storage::commit_batch`](super::Storage::commit_batch), in the order
//! they are made, with the values they leave (not the increments).
//!
//! sled makes a transaction atomic by writing its log buffer out twice more
//! (`pin_log`), each with a `sync_file_range` that waits for the device: the
//! largest share of a batch commit's cost. A batch commit is plain writes
//! instead, made atomic by this record:
//!
//! 1. the record is written first, numbered one past the last commit that
//!    finished, in parts of under 128 KiB (sled's blob threshold), each a
//!    value of the `redo` tree under its index;
//! 2. then its writes, as plain inserts and removes (WAL segments after
//!    the cursor, so that no reader finds them gone below it);
//! 3. last of them, the commit's number (`meta`, `batch_commits`);
//! 4. then the record is cleared: no copy of a parked event's body stays
//!    after the DLQ lets it go.
//!
//! sled recovers a prefix of its log, so after a crash either the record
//! is not whole and none of its writes was made, or the record is whole
//! with some of them. An open that finds a whole record numbered above
//! `batch_commits` makes its writes again. Each sets a key to the value it
//! had after the commit (or removes it), so writing one twice changes
//! nothing: the counters move once, with the cursor (invariant 3). A
//! record left after step 3 (a crash, or a clear that failed while the
//! store went on) is numbered as finished and never made again. The open
//! then clears the record, whatever it found, as a finished commit does.
//!
//! Every other writer takes the store's write lock, as the commit does, and
//! so do the reads that must not see half a commit (a takeover's counts,
//! the clean mark); queries do not, and may.

use super::{ENVELOPE_HEADER, RecordError, get_varint, open_envelope, put_varint, seal};

/// The trees a batch commit writes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tree {
    /// The cursor, the byte gauge, the DLQ's ids and length, the commit number.
    Meta = 0,
    /// Counts per event type.
    Counts = 1,
    /// Failures parked by the batch.
    Dlq = 2,
    /// The analytics aggregates.
    Aggregates = 3,
    /// WAL segments the cursor has passed (removed).
    Wal = 4,
}

impl Tree {
    fn of(tag: u8) -> Option<Tree> {
        Some(match tag {
            0 => Tree::Meta,
            1 => Tree::Counts,
            2 => Tree::Dlq,
            3 => Tree::Aggregates,
            4 => Tree::Wal,
            _ => return None,
        })
    }
}

/// The tag bit that marks a removal.
const REMOVE: u8 = 0x80;

/// One write of a batch commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    /// The tree written.
    pub tree: Tree,
    /// The key.
    pub key: Vec<u8>,
    /// The value the key holds afterwards; `None` removes it.
    pub value: Option<Vec<u8>>,
}

/// The writes of one batch commit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Redo {
    /// One past the number of the last batch commit that finished.
    pub number: u64,
    /// The writes, in the order they are made; the commit's number last.
    pub writes: Vec<Write>,
}

impl Redo {
    /// Adds a write that sets `key` to `value`.
    pub fn put(&mut self, tree: Tree, key: &[u8], value: &[u8]) {
        self.writes.push(Write {
            tree,
            key: key.to_vec(),
            value: Some(value.to_vec()),
        });
    }

    /// Adds a write that removes `key`.
    pub fn remove(&mut self, tree: Tree, key: &[u8]) {
        self.writes.push(Write {
            tree,
            key: key.to_vec(),
            value: None,
        });
    }

    /// The record as stored: parts of about `part_bytes` at most (a sled
    /// value past 128 KiB would be a blob file, with a file create and two
    /// more syncs per flush; one write larger than that gets a part of its
    /// own). Each part is an envelope: the number (u64 BE), the part's
    /// index and the number of parts (u32 BE each), then its writes, each
    /// as a tag (the tree, the high bit set for a removal), the key and,
    /// unless removed, the value, each after its length (LEB128).
    pub fn encode(&self, part_bytes: usize) -> Vec<Vec<u8>> {
        const HEADER: usize = ENVELOPE_HEADER + 16;
        let mut bodies: Vec<Vec<u8>> = vec![Vec::new()];
        for w in &self.writes {
            let mut one =
                Vec::with_capacity(11 + w.key.len() + w.value.as_ref().map_or(0, Vec::len));
            let removed = if w.value.is_none() { REMOVE } else { 0 };
            one.push(w.tree as u8 | removed);
            put_varint(&mut one, w.key.len());
            one.extend_from_slice(&w.key);
            if let Some(value) = &w.value {
                put_varint(&mut one, value.len());
                one.extend_from_slice(value);
            }
            let last = bodies.len() - 1;
            if !bodies[last].is_empty() && HEADER + bodies[last].len() + one.len() > part_bytes {
                bodies.push(one);
            } else {
                bodies[last].extend_from_slice(&one);
            }
        }
        let count = bodies.len() as u32;
        bodies
            .into_iter()
            .enumerate()
            .map(|(index, body)| {
                let mut out = Vec::with_capacity(HEADER + body.len());
                out.resize(ENVELOPE_HEADER, 0);
                out.extend_from_slice(&self.number.to_be_bytes());
                out.extend_from_slice(&(index as u32).to_be_bytes());
                out.extend_from_slice(&count.to_be_bytes());
                out.extend_from_slice(&body);
                seal(out)
            })
            .collect()
    }

    /// Reads a record from the parts stored at indexes 0, 1, ... (more may
    /// follow: older records' parts past this one's count are ignored).
    /// `None` when the record is not whole: its first part names more
    /// parts, or another number, than follow it. sled keeps a prefix of
    /// its log, so such a record's writes were never made.
    pub fn decode(parts: &[&[u8]]) -> Result<Option<Redo>, RecordError> {
        let Some(first) = parts.first() else {
            return Ok(None);
        };
        let (number, _, count) = Self::header(first)?;
        if parts.len() < count as usize {
            return Ok(None);
        }
        let mut writes = Vec::new();
        for (index, part) in parts[..count as usize].iter().enumerate() {
            let (n, i, c) = Self::header(part)?;
            if (n, i, c) != (number, index as u32, count) {
                return Ok(None);
            }
            Self::read_writes(&open_envelope(part)?.1[16..], &mut writes)?;
        }
        Ok(Some(Redo { number, writes }))
    }

    /// A part's number, index and count of parts.
    fn header(part: &[u8]) -> Result<(u64, u32, u32), RecordError> {
        let (_, body) = open_envelope(part)?;
        let cut = || RecordError::Body("redo record part is cut short".into());
        let number = body.get(..8).ok_or_else(cut)?;
        let index = body.get(8..12).ok_or_else(cut)?;
        let count = body.get(12..16).ok_or_else(cut)?;
        let (Ok(number), Ok(index), Ok(count)) = (
            <[u8; 8]>::try_from(number),
            <[u8; 4]>::try_from(index),
            <[u8; 4]>::try_from(count),
        ) else {
            return Err(cut());
        };
        Ok((
            u64::from_be_bytes(number),
            u32::from_be_bytes(index),
            u32::from_be_bytes(count),
        ))
    }

    /// Appends the writes encoded in `body` to `writes`.
    fn read_writes(body: &[u8], writes: &mut Vec<Write>) -> Result<(), RecordError> {
        let cut = || RecordError::Body("redo record is cut short".into());
        let bytes_at = |at: &mut usize| -> Result<Vec<u8>, RecordError> {
            let len = get_varint(body, at).ok_or_else(cut)?;
            let b = body.get(*at..at.saturating_add(len)).ok_or_else(cut)?;
            *at += len;
            Ok(b.to_vec())
        };
        let mut at = 0;
        while at < body.len() {
            let tag = body[at];
            at += 1;
            let tree = Tree::of(tag & !REMOVE)
                .ok_or_else(|| RecordError::Body(format!("redo write to unknown tree {tag}")))?;
            let key = bytes_at(&mut at)?;
            let value = if tag & REMOVE == 0 {
                Some(bytes_at(&mut at)?)
            } else {
                None
            };
            writes.push(Write { tree, key, value });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Redo {
        let mut redo = Redo {
            number: 7,
            ..Redo::default()
        };
        redo.remove(Tree::Wal, &5u64.to_be_bytes());
        redo.put(Tree::Aggregates, b"T\0day\0signup", &3u64.to_be_bytes());
        redo.put(Tree::Counts, b"signup", &[]);
        redo.put(Tree::Dlq, &1u64.to_be_bytes(), &vec![9u8; 300]);
        redo.put(Tree::Meta, b"cursor", &12u64.to_be_bytes());
        redo
    }

    fn decode(parts: &[Vec<u8>]) -> Result<Option<Redo>, RecordError> {
        Redo::decode(&parts.iter().map(Vec::as_slice).collect::<Vec<_>>())
    }

    #[test]
    fn a_redo_record_reads_back_as_written_in_one_part_or_many() {
        let redo = sample();
        let whole = redo.encode(128 * 1024);
        assert_eq!(whole.len(), 1);
        assert_eq!(decode(&whole).unwrap(), Some(redo.clone()));
        // Parts of 100 bytes: the DLQ write (300 bytes) takes one of its own.
        let parts = redo.encode(100);
        assert!(parts.len() >= 3, "{} parts", parts.len());
        assert!(parts.iter().filter(|p| p.len() > 100).count() == 1);
        assert_eq!(decode(&parts).unwrap(), Some(redo.clone()));
        let empty = Redo::default();
        assert_eq!(decode(&empty.encode(100)).unwrap(), Some(empty));
    }

    /// A crash while the parts were written leaves the new first part
    /// before an older record's parts: that record is not whole, and its
    /// writes were never made. An older record's parts past the new
    /// record's count are not read.
    #[test]
    fn a_record_whose_parts_are_not_all_there_is_none() {
        let older = Redo {
            number: 6,
            ..sample()
        };
        let newer = sample();
        let (old, new) = (older.encode(100), newer.encode(100));
        assert_eq!(decode(&[]).unwrap(), None);
        assert_eq!(decode(&new[..new.len() - 1]).unwrap(), None);
        let mixed = [&new[..1], &old[1..]].concat();
        assert_eq!(decode(&mixed).unwrap(), None);
        let one_part = Redo {
            number: 8,
            ..Redo::default()
        };
        let over_old = [one_part.encode(100), old[1..].to_vec()].concat();
        assert_eq!(decode(&over_old).unwrap(), Some(one_part));
    }

    #[test]
    fn a_damaged_or_cut_redo_record_is_an_error() {
        let bytes = sample().encode(128 * 1024).remove(0);
        for cut in [
            0,
            3,
            ENVELOPE_HEADER + 4,
            ENVELOPE_HEADER + 15,
            bytes.len() - 1,
        ] {
            assert!(decode(&[bytes[..cut].to_vec()]).is_err(), "cut at {cut}");
        }
        let mut flipped = bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(matches!(decode(&[flipped]), Err(RecordError::Checksum)));
        // A tree this build does not know, under a valid checksum.
        let mut body = bytes[ENVELOPE_HEADER..].to_vec();
        body[16] = 9;
        let mut unknown = vec![0; ENVELOPE_HEADER];
        unknown.extend_from_slice(&body);
        assert!(matches!(
            decode(&[seal(unknown)]),
            Err(RecordError::Body(_))
        ));
    }
}
