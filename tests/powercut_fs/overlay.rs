//! The writes of one file that no fsync has made durable yet: a sparse map
//! of non-overlapping byte ranges, coalesced as they are written so that a
//! run of appends is one growing buffer and rewriting a range costs no
//! extra memory.

use std::collections::BTreeMap;
use std::ops::Bound::{Excluded, Included, Unbounded};

/// Pending bytes of one inode, by file offset.
///
/// Extents never overlap and never touch (touching ones are merged), so the
/// map holds exactly the bytes the file would lose in a power cut, and
/// writing them out in any order gives the same file as replaying the
/// original writes in the order they were made (the latest write of a byte
/// is the one kept).
#[derive(Debug, Default)]
pub(super) struct Overlay {
    /// Start offset -> bytes from there on; see the invariant above.
    extents: BTreeMap<u64, Vec<u8>>,
}

impl Overlay {
    /// Records a write of `data` at `offset`; later writes win over earlier
    /// ones. The caller has checked that `offset + data.len()` fits in u64.
    pub(super) fn write(&mut self, offset: u64, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let end = offset + data.len() as u64;

        // Extents starting inside (offset, end] are swallowed by this
        // write; only the last one can reach past `end`, and that tail is
        // kept after the new bytes.
        let swallowed: Vec<u64> = self
            .extents
            .range((Excluded(offset), Included(end)))
            .map(|(&start, _)| start)
            .collect();
        let mut tail = Vec::new();
        for start in swallowed {
            if let Some(bytes) = self.extents.remove(&start) {
                let covered = usize::try_from(end - start).unwrap_or(usize::MAX);
                if bytes.len() > covered {
                    tail = bytes[covered..].to_vec();
                }
            }
        }

        // Extend the extent that starts at or before `offset` and reaches
        // it, or start a new one.
        let start = match self.extents.range(..=offset).next_back() {
            Some((&start, bytes)) if start + bytes.len() as u64 >= offset => start,
            _ => offset,
        };
        let buffer = self.extents.entry(start).or_default();
        let relative = usize::try_from(offset - start).unwrap_or(usize::MAX);
        let needed = relative + data.len();
        if buffer.len() < needed {
            buffer.resize(needed, 0);
        }
        buffer[relative..needed].copy_from_slice(data);
        buffer.extend_from_slice(&tail);
    }

    /// Copies the pending bytes that fall inside `[offset, offset +
    /// buf.len())` over `buf` (which holds the backing file's bytes).
    pub(super) fn read_into(&self, offset: u64, buf: &mut [u8]) {
        let end = offset.saturating_add(buf.len() as u64);
        let first = self
            .extents
            .range(..=offset)
            .next_back()
            .map_or(offset, |(&start, _)| start);
        for (&start, bytes) in self.extents.range((Included(first), Excluded(end))) {
            let extent_end = start + bytes.len() as u64;
            let from = start.max(offset);
            let to = extent_end.min(end);
            if from >= to {
                continue;
            }
            let (Ok(src_from), Ok(src_to), Ok(dst_from), Ok(dst_to)) = (
                usize::try_from(from - start),
                usize::try_from(to - start),
                usize::try_from(from - offset),
                usize::try_from(to - offset),
            ) else {
                continue;
            };
            buf[dst_from..dst_to].copy_from_slice(&bytes[src_from..src_to]);
        }
    }

    /// Drops every pending byte at or past `size` (the file was truncated).
    pub(super) fn truncate(&mut self, size: u64) {
        let beyond: Vec<u64> = self
            .extents
            .range((Included(size), Unbounded))
            .map(|(&start, _)| start)
            .collect();
        for start in beyond {
            self.extents.remove(&start);
        }
        if let Some((&start, bytes)) = self.extents.range_mut(..size).next_back() {
            let keep = usize::try_from(size - start).unwrap_or(usize::MAX);
            bytes.truncate(keep);
        }
    }

    /// One past the last pending byte (0 when nothing is pending).
    pub(super) fn end(&self) -> u64 {
        self.extents
            .last_key_value()
            .map_or(0, |(&start, bytes)| start + bytes.len() as u64)
    }

    /// How many bytes a power cut would lose.
    pub(super) fn pending_bytes(&self) -> u64 {
        self.extents.values().map(|bytes| bytes.len() as u64).sum()
    }

    /// Whether nothing is pending.
    pub(super) fn is_empty(&self) -> bool {
        self.extents.is_empty()
    }

    /// Takes the extents out in offset order, leaving the overlay empty.
    pub(super) fn take_extents(&mut self) -> BTreeMap<u64, Vec<u8>> {
        std::mem::take(&mut self.extents)
    }

    /// Puts back extents that could not be written out (they are disjoint
    /// from anything pending, since the overlay was empty when taken).
    pub(super) fn restore_extents(&mut self, extents: BTreeMap<u64, Vec<u8>>) {
        for (start, bytes) in extents {
            self.write(start, &bytes);
        }
    }
}
