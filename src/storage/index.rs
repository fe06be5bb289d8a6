//! The idempotency index of storage format 3: which group commit may hold a
//! key, in 8 bytes a slot.
//!
//! The durable truth is each group's packed key list in sled (`idem_expiry`);
//! this table is derived from it, rebuilt at start, and only says where to
//! look. A slot packs a 32-bit tag (the high half of the key's 64-bit
//! fingerprint) with a 32-bit group id; the tag, scaled to the table's
//! length (`tag × len >> 32`), picks the home slot (open addressing, linear
//! probing, backward-shift deletion, so no tombstones). The same tag may sit in several slots: two keys whose
//! fingerprints collide, or one key accepted again after it expired. A
//! lookup returns every group whose tag matches, and the caller confirms the
//! exact key against that group's list (one sled read): a collision costs a
//! read, never a dropped event.
//!
//! Size: 8 bytes a slot, at most 7/8 full before it grows by a quarter (any
//! length works, not only powers of two), so 9.1–11.4 bytes a key. Doubling
//! would cost up to 18, and 24 while both tables exist during the move: at
//! 7 M keys the step from 64 to 128 MiB, with 192 MiB held for the move.

/// An unused slot. Group ids never reach `u32::MAX`, so no used slot is this.
const EMPTY: u64 = u64::MAX;

/// The fingerprint table.
#[derive(Debug, Clone)]
pub struct KeyIndex {
    /// `tag << 32 | group`, or [`EMPTY`].
    slots: Vec<u64>,
    /// Used slots.
    len: usize,
    /// Grow by doubling (while a rebuild fills it: fewer moves), else by a
    /// quarter (less memory held).
    doubling: bool,
}

impl Default for KeyIndex {
    fn default() -> Self {
        KeyIndex::with_capacity(0)
    }
}

impl KeyIndex {
    /// An empty table sized for `keys` entries.
    pub fn with_capacity(keys: usize) -> KeyIndex {
        let slots = (keys.saturating_mul(8) / 7 + 1).max(16);
        KeyIndex {
            slots: vec![EMPTY; slots],
            len: 0,
            doubling: false,
        }
    }

    /// An empty table for a rebuild: it grows by doubling, which moves each
    /// entry about twice in all (growing by a quarter moves it about five
    /// times) until [`KeyIndex::rebuilt`].
    pub fn for_rebuild() -> KeyIndex {
        KeyIndex {
            doubling: true,
            ..KeyIndex::default()
        }
    }

    /// Ends a rebuild: the table is cut to its entries plus a tenth (one
    /// more move of each), and grows by a quarter from now on.
    pub fn rebuilt(&mut self) {
        self.doubling = false;
        let fitted = (self.len.saturating_mul(8) / 7 + self.len / 10).max(16);
        if fitted < self.slots.len() {
            self.resize(fitted);
        }
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Bytes the table takes.
    pub fn bytes(&self) -> usize {
        self.slots.len() * std::mem::size_of::<u64>()
    }

    /// The slot after `i`, wrapping at the end.
    fn next(&self, i: usize) -> usize {
        if i + 1 == self.slots.len() { 0 } else { i + 1 }
    }

    /// How many steps forward, wrapping, from slot `from` to slot `to`.
    fn distance(&self, from: usize, to: usize) -> usize {
        if to >= from {
            to - from
        } else {
            to + self.slots.len() - from
        }
    }

    /// The tag: the fingerprint's high half, kept in the slot.
    fn tag(fingerprint: u64) -> u64 {
        fingerprint >> 32
    }

    /// Where a tag's run starts: the tag (uniform over 32 bits) scaled to
    /// the table's length.
    fn home(&self, tag: u64) -> usize {
        ((tag * self.slots.len() as u64) >> 32) as usize
    }

    /// The home of the entry in a slot.
    fn home_of(&self, slot: u64) -> usize {
        self.home(slot >> 32)
    }

    fn entry(fingerprint: u64, group: u32) -> u64 {
        debug_assert!(group != u32::MAX, "group id u32::MAX is reserved");
        Self::tag(fingerprint) << 32 | u64::from(group)
    }

    /// Records that `group` holds a key with this fingerprint.
    pub fn insert(&mut self, fingerprint: u64, group: u32) {
        if (self.len + 1) * 8 > self.slots.len() * 7 {
            self.grow();
        }
        self.place(Self::entry(fingerprint, group));
        self.len += 1;
    }

    /// Puts an entry in the first free slot of its run.
    fn place(&mut self, entry: u64) {
        let mut i = self.home_of(entry);
        while self.slots[i] != EMPTY {
            i = self.next(i);
        }
        self.slots[i] = entry;
    }

    /// Every group recorded for a key with this fingerprint's tag: the
    /// candidates to confirm (written into `out`, cleared first).
    pub fn candidates(&self, fingerprint: u64, out: &mut Vec<u32>) {
        out.clear();
        let tag = Self::tag(fingerprint);
        let mut i = self.home(tag);
        while self.slots[i] != EMPTY {
            let slot = self.slots[i];
            if slot >> 32 == tag {
                out.push(slot as u32);
            }
            i = self.next(i);
        }
    }

    /// Forgets one record of (`fingerprint`, `group`); false if there was none.
    pub fn remove(&mut self, fingerprint: u64, group: u32) -> bool {
        let wanted = Self::entry(fingerprint, group);
        let mut i = self.home_of(wanted);
        loop {
            match self.slots[i] {
                EMPTY => return false,
                slot if slot == wanted => break,
                _ => i = self.next(i),
            }
        }
        // Backward-shift deletion: pull later entries of the run into the
        // hole when the hole lies between their home and where they sit, so
        // that a lookup never meets an empty slot before its entry.
        let mut hole = i;
        let mut j = self.next(i);
        while self.slots[j] != EMPTY {
            let home = self.home_of(self.slots[j]);
            if self.distance(home, j) >= self.distance(hole, j) {
                self.slots[hole] = self.slots[j];
                hole = j;
            }
            j = self.next(j);
        }
        self.slots[hole] = EMPTY;
        self.len -= 1;
        true
    }

    fn grow(&mut self) {
        let len = self.slots.len();
        self.resize(if self.doubling {
            len * 2
        } else {
            len + len / 4
        });
    }

    /// Moves every entry into a table of `slots` slots.
    fn resize(&mut self, slots: usize) {
        let old = std::mem::replace(&mut self.slots, vec![EMPTY; slots]);
        for slot in old.into_iter().filter(|s| *s != EMPTY) {
            self.place(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Random inserts, removals and lookups against a multiset model; tiny
    /// tags (few distinct fingerprints) make runs long and collisions
    /// common, so deletion's shifting is exercised.
    #[test]
    fn behaves_like_a_multiset_of_fingerprint_and_group() {
        for seed in 0..40u64 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut index = KeyIndex::with_capacity(0);
            let mut model: HashMap<(u64, u32), usize> = HashMap::new();
            let tags = [1u64, 2, 3, 17, 33, 1 << 20, u32::MAX as u64];
            let mut out = Vec::new();
            for _ in 0..3000 {
                let fp = tags[rng.usize(..tags.len())] << 32 | rng.u64(..1 << 32);
                let group = rng.u32(..8);
                let tag = fp >> 32;
                match rng.u8(..3) {
                    0 | 1 => {
                        index.insert(fp, group);
                        *model.entry((tag, group)).or_default() += 1;
                    }
                    _ => {
                        let had = model.get(&(tag, group)).copied().unwrap_or(0) > 0;
                        assert_eq!(index.remove(fp, group), had, "seed {seed}");
                        if had {
                            *model.get_mut(&(tag, group)).unwrap() -= 1;
                        }
                    }
                }
                index.candidates(fp, &mut out);
                out.sort_unstable();
                let mut expected: Vec<u32> = model
                    .iter()
                    .filter(|((t, _), n)| *t == tag && **n > 0)
                    .flat_map(|((_, g), n)| std::iter::repeat_n(*g, *n))
                    .collect();
                expected.sort_unstable();
                assert_eq!(out, expected, "seed {seed}");
                assert_eq!(index.len(), model.values().sum::<usize>());
            }
        }
    }

    /// A rebuild doubles while it fills, then is cut to size and finds
    /// every key.
    #[test]
    fn a_rebuilt_table_is_cut_to_size_and_finds_every_key() {
        let mut index = KeyIndex::for_rebuild();
        let mut rng = fastrand::Rng::with_seed(7);
        let fps: Vec<u64> = (0..300_000).map(|_| rng.u64(..)).collect();
        for (i, fp) in fps.iter().enumerate() {
            index.insert(*fp, i as u32 / 100);
        }
        index.rebuilt();
        let per_key = index.bytes() as f64 / index.len() as f64;
        assert!((9.0..=10.0).contains(&per_key), "{per_key} bytes a key");
        let mut out = Vec::new();
        for (i, fp) in fps.iter().enumerate() {
            index.candidates(*fp, &mut out);
            assert!(out.contains(&(i as u32 / 100)), "key {i} found");
        }
        // Then it grows by a quarter again.
        for i in 0..100_000u32 {
            index.insert(rng.u64(..), 10_000 + i);
        }
        let per_key = index.bytes() as f64 / index.len() as f64;
        assert!((9.0..=11.5).contains(&per_key), "{per_key} bytes a key");
    }

    #[test]
    fn keys_take_nine_to_twelve_bytes_each_at_any_count() {
        let mut index = KeyIndex::default();
        let mut rng = fastrand::Rng::with_seed(1);
        let mut out = Vec::new();
        for i in 0..1_000_000u32 {
            let fp = rng.u64(..);
            index.insert(fp, i / 1000);
            if i % 9_973 == 0 {
                index.candidates(fp, &mut out);
                assert!(out.contains(&(i / 1000)), "key {i} found");
            }
            if i >= 10_000 && i % 1000 == 0 {
                let per_key = index.bytes() as f64 / index.len() as f64;
                assert!(
                    (9.0..=11.5).contains(&per_key),
                    "{per_key} bytes a key at {i}"
                );
            }
        }
    }
}
