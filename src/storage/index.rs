//! The idempotency index of storage format 3: which group commit may hold a
//! key, in 8 bytes a slot.
//!
//! The durable truth is each group's packed key list in sled (`idem_expiry`);
//! this table is derived from it, rebuilt at start, and only says where to
//! look. A slot packs a 32-bit tag (the high half of the key's 64-bit
//! fingerprint) with a 32-bit group id; the low bits of the fingerprint pick
//! the home slot (open addressing, linear probing, backward-shift deletion,
//! so no tombstones). The same tag may sit in several slots: two keys whose
//! fingerprints collide, or one key accepted again after it expired. A
//! lookup returns every group whose tag matches, and the caller confirms the
//! exact key against that group's list (one sled read): a collision costs a
//! read, never a dropped event.
//!
//! Size: 8 bytes a slot, at most 7/8 full before it doubles, so 9–18 bytes
//! a key (12 on average over growth).

/// An unused slot. Group ids never reach `u32::MAX`, so no used slot is this.
const EMPTY: u64 = u64::MAX;

/// The fingerprint table.
#[derive(Debug, Clone)]
pub struct KeyIndex {
    /// `tag << 32 | group`, or [`EMPTY`]; the length is a power of two.
    slots: Vec<u64>,
    /// Used slots.
    len: usize,
}

impl Default for KeyIndex {
    fn default() -> Self {
        KeyIndex::with_capacity(0)
    }
}

impl KeyIndex {
    /// An empty table sized for `keys` entries.
    pub fn with_capacity(keys: usize) -> KeyIndex {
        let slots = (keys.saturating_mul(8) / 7 + 1).next_power_of_two().max(16);
        KeyIndex {
            slots: vec![EMPTY; slots],
            len: 0,
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

    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    /// The tag: the fingerprint's high half, kept in the slot.
    fn tag(fingerprint: u64) -> u64 {
        fingerprint >> 32
    }

    /// Where a tag's run starts: a hash's bits are uniform, so the tag's
    /// own low bits do.
    fn home(&self, tag: u64) -> usize {
        tag as usize & self.mask()
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
        let mask = self.mask();
        let mut i = self.home_of(entry);
        while self.slots[i] != EMPTY {
            i = (i + 1) & mask;
        }
        self.slots[i] = entry;
    }

    /// Every group recorded for a key with this fingerprint's tag: the
    /// candidates to confirm (written into `out`, cleared first).
    pub fn candidates(&self, fingerprint: u64, out: &mut Vec<u32>) {
        out.clear();
        let mask = self.mask();
        let tag = Self::tag(fingerprint);
        let mut i = self.home(tag);
        while self.slots[i] != EMPTY {
            let slot = self.slots[i];
            if slot >> 32 == tag {
                out.push(slot as u32);
            }
            i = (i + 1) & mask;
        }
    }

    /// Forgets one record of (`fingerprint`, `group`); false if there was none.
    pub fn remove(&mut self, fingerprint: u64, group: u32) -> bool {
        let mask = self.mask();
        let wanted = Self::entry(fingerprint, group);
        let mut i = self.home_of(wanted);
        loop {
            match self.slots[i] {
                EMPTY => return false,
                slot if slot == wanted => break,
                _ => i = (i + 1) & mask,
            }
        }
        // Backward-shift deletion: pull later entries of the run into the
        // hole when the hole lies between their home and where they sit, so
        // that a lookup never meets an empty slot before its entry.
        let mut hole = i;
        let mut j = (i + 1) & mask;
        while self.slots[j] != EMPTY {
            let home = self.home_of(self.slots[j]);
            if (j.wrapping_sub(home) & mask) >= (j.wrapping_sub(hole) & mask) {
                self.slots[hole] = self.slots[j];
                hole = j;
            }
            j = (j + 1) & mask;
        }
        self.slots[hole] = EMPTY;
        self.len -= 1;
        true
    }

    fn grow(&mut self) {
        let doubled = vec![EMPTY; self.slots.len() * 2];
        let old = std::mem::replace(&mut self.slots, doubled);
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

    #[test]
    fn a_million_keys_take_about_twelve_bytes_each() {
        let mut index = KeyIndex::default();
        let mut rng = fastrand::Rng::with_seed(1);
        for i in 0..1_000_000u32 {
            index.insert(rng.u64(..), i / 1000);
        }
        let per_key = index.bytes() as f64 / index.len() as f64;
        assert!((8.0..=18.0).contains(&per_key), "{per_key} bytes a key");
    }
}
