//! `MemoryStorage`: the reference model. Plain BTreeMaps behind one mutex,
//! with the same semantics as `SledStorage` and nothing durable. Used by
//! unit tests and by the model test that checks sled against it.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use super::{
    AppendOutcome, BatchAck, Counted, DlqEntry, NewEvent, Quarantined, QueueInfo, Storage,
    StorageError, encode_record, scoped_key,
};
use crate::analytics::{self, KvRead, KvWrite};
use crate::event::{Queued, WalRecord};

/// In-memory store; see the module docs.
#[derive(Default)]
pub struct MemoryStorage {
    /// All state; one lock makes every operation atomic.
    inner: Mutex<Inner>,
}

#[derive(Default, Clone)]
struct Inner {
    wal: BTreeMap<u64, WalRecord>,
    /// scoped key → (first seen ms, seq)
    keys: BTreeMap<Vec<u8>, (i64, u64)>,
    cursor: u64,
    last_seq: u64,
    counts: BTreeMap<String, u64>,
    dlq: BTreeMap<u64, DlqEntry>,
    /// Last DLQ id handed out; ids are never reused.
    dlq_last: u64,
    /// The analytics key space.
    aggregates: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Encoded bytes of the records in `wal`, as sled counts them.
    queue_bytes: u64,
}

impl Inner {
    /// Adds a DLQ entry under the next id.
    fn park(&mut self, entry: DlqEntry) {
        self.dlq_last += 1;
        self.dlq.insert(self.dlq_last, entry);
    }
}

/// The aggregates map as a batch commit's target (also the analytics unit
/// tests' store).
pub(crate) struct MapTx<'a>(pub(crate) &'a mut BTreeMap<Vec<u8>, Vec<u8>>);

impl KvWrite for MapTx<'_> {
    type Error = std::convert::Infallible;
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, Self::Error> {
        Ok(self.0.get(key).cloned())
    }
    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), Self::Error> {
        self.0.insert(key.to_vec(), value.to_vec());
        Ok(())
    }
    fn remove(&mut self, key: &[u8]) -> Result<(), Self::Error> {
        self.0.remove(key);
        Ok(())
    }
}

/// The aggregates map, read under a lock already held.
pub(crate) struct MapRead<'a>(pub(crate) &'a BTreeMap<Vec<u8>, Vec<u8>>);

impl KvRead for MapRead<'_> {
    type Error = std::convert::Infallible;
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Self::Error> {
        Ok(self.0.get(key).cloned())
    }

    fn scan(
        &self,
        from: &[u8],
        to: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), Self::Error> {
        if from < to {
            for (k, v) in self.0.range(from.to_vec()..to.to_vec()) {
                if !f(k, v) {
                    break;
                }
            }
        }
        Ok(())
    }
}

impl KvRead for MemoryStorage {
    type Error = StorageError;
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.lock().aggregates.get(key).cloned())
    }

    fn scan(
        &self,
        from: &[u8],
        to: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StorageError> {
        let Ok(()) = MapRead(&self.lock().aggregates).scan(from, to, f);
        Ok(())
    }
}

impl MemoryStorage {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A poisoned lock only means another thread panicked mid-call; the
        // maps are still consistent because every call mutates a clone.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Storage for MemoryStorage {
    fn append(
        &self,
        events: &[NewEvent],
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<Vec<AppendOutcome>, StorageError> {
        let mut g = self.lock();
        let mut next = g.clone();
        let mut out = Vec::with_capacity(events.len());
        for e in events {
            let key = scoped_key(&e.record);
            match next.keys.get(&key) {
                Some(&(first_seen_ms, _)) if now_ms - first_seen_ms < ttl_ms => {
                    out.push(AppendOutcome::Duplicate { first_seen_ms });
                }
                _ => {
                    next.last_seq += 1;
                    let seq = next.last_seq;
                    next.keys.insert(key, (now_ms, seq));
                    next.queue_bytes += encode_record(&e.record).len() as u64;
                    next.wal.insert(seq, e.record.clone());
                    out.push(AppendOutcome::Accepted { seq });
                }
            }
        }
        *g = next;
        Ok(out)
    }

    fn flush(&self) -> Result<(), StorageError> {
        Ok(())
    }

    fn read_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<Queued>, Vec<Quarantined>), StorageError> {
        let g = self.lock();
        let records = g
            .wal
            .range(after.saturating_add(1)..)
            .take(limit)
            .map(|(&seq, record)| Queued {
                seq,
                record: record.clone(),
            })
            .collect();
        Ok((records, Vec::new()))
    }

    fn commit_batch(&self, ack: &BatchAck) -> Result<(), StorageError> {
        let mut g = self.lock();
        let cursor = g.cursor;
        let mut facts = Vec::new();
        for (seq, f) in &ack.processed {
            if *seq <= cursor {
                continue;
            }
            if let Some(old) = g.wal.remove(seq) {
                g.queue_bytes = g
                    .queue_bytes
                    .saturating_sub(encode_record(&old).len() as u64);
            }
            if let Some(f) = f {
                *g.counts.entry(f.event_type.clone()).or_default() += 1;
                facts.push(f);
            }
        }
        // The reference model reads every member: it knows nothing ahead.
        let Ok(_) = analytics::apply(
            &mut MapTx(&mut g.aggregates),
            &facts,
            ack.now_ms,
            ack.upto,
            &analytics::Known::default(),
        );
        for (seq, entry) in &ack.dead {
            if *seq <= cursor {
                continue;
            }
            g.park(entry.clone());
        }
        g.cursor = cursor.max(ack.upto);
        g.last_seq = g.last_seq.max(g.cursor);
        Ok(())
    }

    fn queue_info(&self) -> Result<QueueInfo, StorageError> {
        let g = self.lock();
        Ok(QueueInfo {
            bytes: g.queue_bytes,
            depth: g.last_seq - g.cursor,
            cursor: g.cursor,
            last_seq: g.last_seq,
            oldest_received_ms: g.wal.values().next().map(|r| r.received_at_ms),
        })
    }

    fn queue_bytes(&self) -> Result<u64, StorageError> {
        Ok(self.lock().queue_bytes)
    }

    fn counts(&self) -> Result<Vec<(String, u64)>, StorageError> {
        Ok(self
            .lock()
            .counts
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect())
    }

    fn counted(&self, from_day: i32, to_day: i32) -> Result<Counted, StorageError> {
        let g = self.lock();
        let Ok(days) = analytics::day_figures(&MapRead(&g.aggregates), from_day, to_day, true);
        Ok(Counted {
            cursor: g.cursor,
            by_type: g.counts.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            days,
        })
    }

    fn park(&self, entries: &[DlqEntry]) -> Result<(), StorageError> {
        let mut g = self.lock();
        for entry in entries {
            g.park(entry.clone());
        }
        Ok(())
    }

    fn merge_user_records(&self, from_day: i32, to_day: i32) -> Result<usize, StorageError> {
        let mut g = self.lock();
        let (from, to) = analytics::user_record_range(from_day, to_day);
        let keys: Vec<Vec<u8>> = g
            .aggregates
            .range(from..to)
            .map(|(k, _)| k.clone())
            .collect();
        let records: Vec<(Vec<u8>, Vec<u8>)> = analytics::user_record_groups(&keys)
            .into_iter()
            .flat_map(|group| keys[group].to_vec())
            .map(|k| {
                let value = g.aggregates.get(&k).cloned().unwrap_or_default();
                (k, value)
            })
            .collect();
        let mut removed = 0;
        for merge in analytics::merge_user_records(&records) {
            for k in &merge.remove {
                g.aggregates.remove(k);
            }
            removed += merge.remove.len();
            g.aggregates.insert(merge.key, merge.record);
        }
        Ok(removed)
    }

    fn prune_windows(&self, before_ms: i64) -> Result<usize, StorageError> {
        let mut g = self.lock();
        let mut removed = 0;
        for (from, to) in analytics::stale_window_ranges(before_ms) {
            let stale: Vec<Vec<u8>> = g
                .aggregates
                .range(from..to)
                .map(|(k, _)| k.clone())
                .collect();
            removed += stale.len();
            for k in stale {
                g.aggregates.remove(&k);
            }
        }
        Ok(removed)
    }

    fn sweep_keys(&self, before_ms: i64, limit: usize) -> Result<usize, StorageError> {
        let mut g = self.lock();
        let expired: Vec<Vec<u8>> = g
            .keys
            .iter()
            .filter(|(_, (seen, _))| *seen < before_ms)
            .map(|(k, _)| k.clone())
            .take(limit)
            .collect();
        for k in &expired {
            g.keys.remove(k);
        }
        Ok(expired.len())
    }

    fn dlq_list(&self, after: u64, limit: usize) -> Result<Vec<(u64, DlqEntry)>, StorageError> {
        let g = self.lock();
        Ok(g.dlq
            .range(after.saturating_add(1)..)
            .take(limit)
            .map(|(id, e)| (*id, e.clone()))
            .collect())
    }

    fn dlq_get(&self, id: u64) -> Result<Option<DlqEntry>, StorageError> {
        Ok(self.lock().dlq.get(&id).cloned())
    }

    fn dlq_remove(&self, ids: &[u64]) -> Result<usize, StorageError> {
        let mut g = self.lock();
        Ok(ids.iter().filter(|id| g.dlq.remove(id).is_some()).count())
    }

    fn dlq_len(&self) -> Result<u64, StorageError> {
        Ok(self.lock().dlq.len() as u64)
    }

    fn dlq_replay(&self, ids: &[u64]) -> Result<(Vec<u64>, u64), StorageError> {
        let mut g = self.lock();
        let mut moved = Vec::new();
        for id in ids {
            if let Some(entry) = g.dlq.remove(id) {
                let mut record = entry.record;
                record.only_sink = Some(entry.sink);
                g.last_seq += 1;
                let seq = g.last_seq;
                g.queue_bytes += encode_record(&record).len() as u64;
                g.wal.insert(seq, record);
                moved.push(*id);
            }
        }
        Ok((moved, g.last_seq))
    }
}
