//! The idempotency index of storage format 3: which group (a key list
//! entry a group commit wrote) may hold a key, in 8 bytes a slot.
//!
//! The durable truth is each group's packed key list in sled (`idem_expiry`);
//! this table is derived from it, rebuilt at start, and only says where to
//! look. A slot packs a 32-bit tag with a 32-bit group id. The same tag
//! may sit in several slots: two keys whose fingerprints agree in the bits
//! the table keeps, or one key accepted again after it expired. A lookup
//! returns every group whose tag matches, and the caller confirms the exact
//! key against that group's list (one sled read): a collision costs a read,
//! never a dropped event.
//!
//! ## Layout
//!
//! The table is [`PARTS`] parts, each its own vector. Of the key's 64-bit
//! fingerprint, the top 6 bits pick the part, and the next 26, scaled to
//! the part's length (`home bits × len >> 26`), the home slot in it (open
//! addressing, linear probing, backward-shift deletion, so no tombstones).
//! The tag is those 26 bits and 6 bits from the fingerprint's low end: the
//! part says its 6 bits already, so a tag that repeated them would waste
//! them. A lookup thus compares 38 bits, and a key new to a table of `n`
//! keys costs a confirming read with odds `n / 2^38`: one in 55,000 at
//! 5 M keys (with a 32-bit tag, one in 860, which under batch intake of
//! random ids pulled a whole key list from disk several times a group).
//!
//! Each part grows alone, by a quarter, when it is 7/8 full (any length
//! works, not only powers of two), so a key takes 9.1–11.4 bytes. A part
//! that grows holds its old and its new vector while entries move; with one
//! whole table that moment held 2.25 times the table (at 5.7 M keys a
//! 59 MiB step to 216 MiB of RSS, measured), with parts it holds 1/64 more.
//! A rebuild at start grows parts by doubling (fewer moves), then cuts each
//! to size.

/// How many parts the table is split into: the fingerprint's top
/// [`PART_BITS`] bits.
const PART_BITS: u32 = 6;
/// Parts in a table.
const PARTS: usize = 1 << PART_BITS;
/// How many of the tag's bits place a key within its part (the
/// fingerprint's bits below the part's); the tag's other bits are the
/// fingerprint's lowest.
const LOW_BITS: u32 = 32 - PART_BITS;
/// The tag's bits that place a key within its part.
const HOME_MASK: u64 = (1 << LOW_BITS) - 1;
/// Fewest slots a part has.
const MIN_SLOTS: usize = 16;

/// An unused slot. Group ids never reach `u32::MAX`, so no used slot is this.
const EMPTY: u64 = u64::MAX;

/// The fingerprint table.
#[derive(Debug, Clone)]
pub struct KeyIndex {
    /// The parts, picked by a fingerprint's top bits.
    parts: Vec<Part>,
    /// Grow by doubling (while a rebuild fills it: fewer moves), else by a
    /// quarter (less memory held).
    doubling: bool,
}

/// One part: an open-addressed table of the keys whose fingerprints' top
/// bits chose it.
#[derive(Debug, Clone)]
struct Part {
    /// `tag << 32 | group`, or [`EMPTY`].
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
        let per_part = keys / PARTS;
        KeyIndex {
            parts: (0..PARTS)
                .map(|_| Part::new(per_part.saturating_mul(8) / 7 + 1))
                .collect(),
            doubling: false,
        }
    }

    /// An empty table for a rebuild: parts grow by doubling, which moves
    /// each entry about twice in all (growing by a quarter moves it about
    /// five times) until [`KeyIndex::rebuilt`].
    pub fn for_rebuild() -> KeyIndex {
        KeyIndex {
            doubling: true,
            ..KeyIndex::default()
        }
    }

    /// Ends a rebuild: each part is cut to its entries plus a tenth (one
    /// more move of each), and grows by a quarter from now on.
    pub fn rebuilt(&mut self) {
        self.doubling = false;
        for part in &mut self.parts {
            let fitted = part.len.saturating_mul(8) / 7 + part.len / 10;
            if fitted.max(MIN_SLOTS) < part.slots.len() {
                part.resize(fitted);
            }
        }
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.parts.iter().map(|p| p.len).sum()
    }

    /// Bytes the table takes.
    pub fn bytes(&self) -> usize {
        self.parts.iter().map(|p| p.slots.len()).sum::<usize>() * std::mem::size_of::<u64>()
    }

    /// The tag kept in the slot: the fingerprint's home bits (below the
    /// part's), and above them its lowest [`PART_BITS`] bits.
    fn tag(fingerprint: u64) -> u64 {
        (fingerprint >> 32) & HOME_MASK | (fingerprint & (PARTS as u64 - 1)) << LOW_BITS
    }

    /// The part that holds a fingerprint: its top bits.
    fn part(&self, fingerprint: u64) -> &Part {
        &self.parts[(fingerprint >> (64 - PART_BITS)) as usize]
    }

    fn part_mut(&mut self, fingerprint: u64) -> &mut Part {
        &mut self.parts[(fingerprint >> (64 - PART_BITS)) as usize]
    }

    fn entry(fingerprint: u64, group: u32) -> u64 {
        debug_assert!(group != u32::MAX, "group id u32::MAX is reserved");
        Self::tag(fingerprint) << 32 | u64::from(group)
    }

    /// Records that `group` holds a key with this fingerprint.
    pub fn insert(&mut self, fingerprint: u64, group: u32) {
        let doubling = self.doubling;
        let part = self.part_mut(fingerprint);
        if (part.len + 1) * 8 > part.slots.len() * 7 {
            let len = part.slots.len();
            part.resize(if doubling { len * 2 } else { len + len / 4 });
        }
        part.place(Self::entry(fingerprint, group));
        part.len += 1;
    }

    /// Every group recorded for a key with this fingerprint's tag: the
    /// candidates to confirm (written into `out`, cleared first).
    pub fn candidates(&self, fingerprint: u64, out: &mut Vec<u32>) {
        out.clear();
        let tag = Self::tag(fingerprint);
        let part = self.part(fingerprint);
        let mut i = part.home(tag);
        while part.slots[i] != EMPTY {
            let slot = part.slots[i];
            if slot >> 32 == tag {
                out.push(slot as u32);
            }
            i = part.next(i);
        }
    }

    /// Reads the home slot of each fingerprint, so that the lookups that
    /// follow find them in the cache. A table of millions of keys is far
    /// larger than the cache: a group commit's lookups one by one waited on
    /// one miss after another, where these independent reads overlap (in a
    /// profile of batches of 100, the lookups were 7.9 % of the CPU).
    pub fn prefetch(&self, fingerprints: &[u64]) {
        for &fingerprint in fingerprints {
            let part = self.part(fingerprint);
            std::hint::black_box(part.slots[part.home(Self::tag(fingerprint))]);
        }
    }

    /// Forgets one record of (`fingerprint`, `group`); false if there was none.
    pub fn remove(&mut self, fingerprint: u64, group: u32) -> bool {
        let wanted = Self::entry(fingerprint, group);
        self.part_mut(fingerprint).remove(wanted)
    }
}

impl Part {
    /// An empty part of at least `slots` slots.
    fn new(slots: usize) -> Part {
        Part {
            slots: vec![EMPTY; slots.max(MIN_SLOTS)],
            len: 0,
        }
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

    /// Where a tag's run starts: its home bits (uniform over [`LOW_BITS`]
    /// bits) scaled to the part's length.
    fn home(&self, tag: u64) -> usize {
        (((tag & HOME_MASK) * self.slots.len() as u64) >> LOW_BITS) as usize
    }

    /// The home of the entry in a slot.
    fn home_of(&self, slot: u64) -> usize {
        self.home(slot >> 32)
    }

    /// Puts an entry in the first free slot of its run.
    fn place(&mut self, entry: u64) {
        let mut i = self.home_of(entry);
        while self.slots[i] != EMPTY {
            i = self.next(i);
        }
        self.slots[i] = entry;
    }

    /// Forgets one slot holding `wanted`; false if none does.
    fn remove(&mut self, wanted: u64) -> bool {
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

    /// Moves every entry into a vector of `slots` slots (at least
    /// [`MIN_SLOTS`]); the old one is freed when this returns.
    fn resize(&mut self, slots: usize) {
        let old = std::mem::replace(&mut self.slots, vec![EMPTY; slots.max(MIN_SLOTS)]);
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
            let mut model: HashMap<((u64, u64), u32), usize> = HashMap::new();
            // Tags in one part's first slots, at its end (its runs wrap),
            // and on both sides of the edges between parts.
            let tags = [
                1u64,
                2,
                3,
                17,
                33,
                1 << 20,
                (1 << LOW_BITS) - 1,
                1 << LOW_BITS,
                (1 << LOW_BITS) + 1,
                (PARTS as u64 - 1) << LOW_BITS,
                u32::MAX as u64,
            ];
            let mut out = Vec::new();
            for _ in 0..3000 {
                // Low ends that agree or differ in the 6 bits the table
                // keeps (65 and 1, 1 << 31 and 0 agree).
                let lows = [0u64, 1, 63, 65, 1 << 31];
                let fp = tags[rng.usize(..tags.len())] << 32 | lows[rng.usize(..lows.len())];
                let group = rng.u32(..8);
                let tag = (fp >> 32, fp & 63);
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

    /// A lookup compares 38 of the fingerprint's bits: keys that share
    /// the high 32 but differ in the lowest 6 are told apart, and fresh
    /// random keys rarely need a confirming read.
    #[test]
    fn a_lookup_compares_38_bits_of_the_fingerprint() {
        let mut index = KeyIndex::default();
        let high = 0x9e37_79b9u64 << 32;
        index.insert(high | 5, 1);
        let mut out = Vec::new();
        index.candidates(high | 5, &mut out);
        assert_eq!(out, [1]);
        index.candidates(high | 6, &mut out);
        assert!(out.is_empty(), "the low 6 bits differ: {out:?}");
        index.candidates(high | 5 | 1 << 20, &mut out);
        assert_eq!(out, [1], "bits the table does not keep do not count");

        let mut rng = fastrand::Rng::with_seed(11);
        for i in 0..1_000_000u32 {
            index.insert(rng.u64(..), i / 1000);
        }
        let confirming = (0..1_000_000)
            .filter(|_| {
                index.candidates(rng.u64(..), &mut out);
                !out.is_empty()
            })
            .count();
        // Expected 10^12 / 2^38, about 3.6; a 32-bit tag gives about 233.
        assert!(confirming < 30, "{confirming} of a million fresh keys");
    }

    /// Growth moves one part at a time: the table never grows by more than
    /// a small share of itself at once, so the old and new vectors held
    /// while entries move are a part's, not the whole table's.
    #[test]
    fn the_table_grows_a_part_at_a_time() {
        let mut index = KeyIndex::default();
        let mut rng = fastrand::Rng::with_seed(3);
        let mut steps = 0;
        for i in 0..1_000_000u32 {
            let before = index.bytes();
            index.insert(rng.u64(..), i / 1000);
            let step = index.bytes() - before;
            if step > 0 {
                steps += 1;
                assert!(
                    step * 64 <= before.max(PARTS * MIN_SLOTS * 8),
                    "a step of {step} bytes on a table of {before} at key {i}"
                );
            }
        }
        // Each part grew on its own: many small steps.
        assert!(steps > PARTS * 20, "{steps} steps");
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
