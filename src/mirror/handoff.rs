//! Handoff: the events an instance acknowledged are not stranded when it
//! dies. Its queue is mirrored to Redis, and a live instance delivers
//! and counts what it left.
//!
//! # Design
//!
//! Each instance still processes its own WAL: sled stays the truth of
//! what it accepted, and the Redis stream is a copy for the day it does
//! not come back. That keeps Redis off the processing path, and keeps
//! every analytics figure exact in each instance's own store.
//!
//! - **Mirror.** A group commit's accepted events go to the instance's
//!   stream as one entry, in the pipeline that confirms the group's keys:
//!   before any request of the group is answered, and without another
//!   round trip. The entry's id is `{last seq}-1`, so ids grow with the
//!   seqs and `MINID` trims by seq. A group that could not be mirrored
//!   (Redis down, or a stream whose top is above the seq: a data directory
//!   started afresh under the same `instance`) is counted and left out.
//! - **Heartbeat and trim.** Every publish round writes, in one
//!   transaction, the instance's counts with the cursor they count up to
//!   ([`crate::storage::Storage::counted`]), its `alive:` key (expiring
//!   after `takeover_after_ms`), and trims its stream below that cursor.
//! - **Takeover.** An instance whose `alive:` key is gone and whose stream
//!   holds entries after its published cursor is an orphan, once a live instance has also seen it so
//!   for three of its own rounds: a Redis that lost its data (FLUSHALL, a
//!   restart without persistence) or was frozen past the lease has lost
//!   every heartbeat at once, and the live instances beat again within a
//!   round. A live instance locks it (`owner:`,
//!   refreshed with each chunk) and, chunk by chunk from the orphan's
//!   published cursor: delivers the events through its own sinks (what
//!   fails goes to its own DLQ), then in one script, only while it still
//!   holds the lock, the orphan is still not alive and the cursor is the
//!   one it read, adds the chunk's counts to the orphan's published
//!   figures and moves the cursor. The users go to the deployment's DAU.
//!   Only an instance trims its own stream, to its own published cursor:
//!   if it comes back, publishes a cursor below the taker's and stops
//!   again, the next takeover still finds what lies after it. A takeover
//!   that finds nothing more leaves the stream to expire after the
//!   idempotency window (an instance that beats again keeps it).
//!
//! # Why the counts stay exact
//!
//! The deployment's figures are the sum of every instance's published
//! record. An orphan's record counted exactly the seqs up to its cursor;
//! the takeover adds exactly the seqs after it, each chunk once (the
//! script compares the cursor), so the sum stays exact whatever the
//! orphan counted locally after its last publish. If the orphan comes
//! back, its first round makes it alive again, which fences the taker's
//! next chunk out, and replaces the record with its own exact counts; it
//! then processes its queue as usual, counting every event but delivering
//! none of those the taker recorded (`taken_from` to `cursor` in the
//! figures, for the same store: they carry the store's id). Events
//! between its durable cursor and `taken_from`, and a chunk delivered but
//! not yet recorded, are delivered twice: sinks are at-least-once, and
//! they get each event's idempotency key.
//!
//! # Keys (`P` is `key_prefix`)
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P wal:{instance}` | stream | one entry per group commit: field `e`, the group's `(seq, record)` list as a record envelope (a group over 8 MiB is not mirrored) |
//! | `P alive:{instance}` | string | the instance is alive (ms of its last round); expires after its `takeover_after_ms` |
//! | `P owner:{instance}` | string | the instance taking this orphan over; expires after the taker's `takeover_after_ms` |
//! | `P figures:{instance}` | hash | also `cursor`, the last seq its counts include; `store`, the id of the store they count; `taken_from`, where a takeover began |
//!
//! # What is not handed over
//!
//! Events accepted while Redis was unreachable, and DLQ replays (written
//! to the WAL, not received), wait for their instance to start again.
//! Per-instance figures (retention, trends, windows) of the events taken
//! over are the orphan's; they are counted when it comes back.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use super::{Mirror, MirrorError};
use crate::analytics::day_of;
use crate::event::{Queued, WalRecord, now_ms};
use crate::storage::{BatchAck, decode_record, encode_record};

/// Appends a group's entry (`ARGV[2]`) at id `ARGV[1]` to the stream
/// (`KEYS[1]`) and names the instance (`ARGV[3]`) in the set of instances
/// (`KEYS[2]`); answers 0, writing nothing, when the stream's top id is not
/// below `ARGV[1]`.
const APPEND: &str = r"
local added = redis.pcall('XADD', KEYS[1], ARGV[1], 'e', ARGV[2])
if type(added) == 'table' and added.err then
  if string.find(added.err, 'equal or smaller', 1, true) then return 0 end
  return redis.error_reply(added.err)
end
redis.call('SADD', KEYS[2], ARGV[3])
return 1
";

/// Locks an orphan for `ARGV[1]` for `ARGV[2]` ms: answers 1 when its
/// `alive:` key (`KEYS[1]`) is gone and its `owner:` key (`KEYS[2]`) is free
/// or already `ARGV[1]`'s.
const LOCK: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local owner = redis.call('GET', KEYS[2])
if owner and owner ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return 1
";

/// Records a chunk taken over. `KEYS`: alive, owner, figures, days.
/// `ARGV`: the taker, the cursor read, the new cursor, the lock's lease,
/// now, the number of type pairs, then `type:{t}` / count pairs, then
/// `{day}:{t}` / count pairs. Answers 0, writing nothing, when the orphan
/// is alive again, another instance holds the lock, or the cursor moved.
/// The first chunk also notes where the takeover began (`taken_from`).
/// A lock that expired while the chunk was delivered is taken again: the
/// cursor alone keeps the counts exact.
const RECORD: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local owner = redis.call('GET', KEYS[2])
if owner and owner ~= ARGV[1] then return 0 end
if (redis.call('HGET', KEYS[3], 'cursor') or '0') ~= ARGV[2] then return 0 end
local i = 7
for _ = 1, tonumber(ARGV[6]) do
  redis.call('HINCRBY', KEYS[3], ARGV[i], ARGV[i + 1])
  i = i + 2
end
while i <= #ARGV do
  redis.call('HINCRBY', KEYS[4], ARGV[i], ARGV[i + 1])
  i = i + 2
end
redis.call('HSETNX', KEYS[3], 'taken_from', ARGV[2])
redis.call('HSET', KEYS[3], 'cursor', ARGV[3], 'updated_ms', ARGV[5])
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[4])
return 1
";

/// Stream entries read at a time (each is one group commit, at most
/// 1,000 events).
const ENTRIES_PER_READ: usize = 8;

/// A chunk stops taking entries once it holds this many events (it takes
/// at least one entry): a chunk is delivered in about the time of a
/// batch of the instance's own.
const CHUNK_EVENTS: usize = 1000;

/// A group whose entry would be larger is not mirrored (counted): one
/// call must not hold Redis, or the group's answers, for long.
const MAX_ENTRY_BYTES: usize = 8 << 20;

/// An orphan this instance holds the lock of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orphan {
    /// Its instance name.
    pub name: String,
}

/// Events taken over from an orphan, to deliver and then [`record`].
///
/// [`record`]: Mirror::record_taken
#[derive(Debug)]
pub struct Taken {
    /// The orphan's cursor before this chunk.
    pub from: u64,
    /// Its cursor after it: the last seq of the last entry read.
    pub to: u64,
    /// The events after `from`, in seq order.
    pub events: Vec<Queued>,
}

/// What a chunk adds to its orphan's figures.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TakenCounts {
    /// Per event type.
    pub by_type: Vec<(String, u64)>,
    /// Per day (days since 1970-01-01) and event type.
    pub by_day: Vec<(i32, String, u64)>,
}

impl TakenCounts {
    /// What `ack` counts, as the local counters would: per type, and per
    /// day of each event and type.
    pub fn of(ack: &BatchAck) -> TakenCounts {
        let mut by_type: BTreeMap<&str, u64> = BTreeMap::new();
        let mut by_day: BTreeMap<(i32, &str), u64> = BTreeMap::new();
        for facts in ack.processed.iter().filter_map(|(_, f)| f.as_ref()) {
            let t = facts.event_type.as_str();
            *by_type.entry(t).or_default() += 1;
            *by_day.entry((day_of(facts.occurred_at_ms), t)).or_default() += 1;
        }
        TakenCounts {
            by_type: by_type
                .into_iter()
                .map(|(t, n)| (t.to_owned(), n))
                .collect(),
            by_day: by_day
                .into_iter()
                .map(|((day, t), n)| (day, t.to_owned(), n))
                .collect(),
        }
    }
}

/// A stream id below every entry whose last seq is at or above `seq`.
fn id_from(seq: u64) -> String {
    format!("{seq}-0")
}

impl Mirror {
    /// The key of `instance`'s `what` (`wal`, `alive`, `owner`).
    pub(super) fn handoff_key(&self, what: &str, instance: &str) -> String {
        format!("{}{what}:{instance}", self.prefix)
    }

    /// Adds a group's accepted events to `pipe`, as this instance's stream
    /// entry (the confirm's pipeline); nothing when there are none.
    /// Answers whether it did: not for an empty group, nor for one past
    /// [`MAX_ENTRY_BYTES`] (counted).
    pub(super) fn append_group(
        &self,
        pipe: &mut redis::Pipeline,
        group: &[(u64, &WalRecord)],
    ) -> bool {
        let Some(last) = group.iter().map(|(seq, _)| *seq).max() else {
            return false;
        };
        let entry = encode_record(&group);
        if entry.len() > MAX_ENTRY_BYTES {
            self.counters.unmirrored.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                bytes = entry.len(),
                "a group too large to mirror for takeover"
            );
            return false;
        }
        pipe.cmd("EVAL")
            .arg(APPEND)
            .arg(2)
            .arg(self.handoff_key("wal", &self.instance))
            .arg(format!("{}instances", self.prefix))
            .arg(format!("{last}-1"))
            .arg(entry)
            .arg(&self.instance);
        true
    }

    /// Reads the answer of [`append_group`]'s script: 0 means the stream's
    /// top was above the group (counted, and logged once).
    ///
    /// [`append_group`]: Mirror::append_group
    pub(super) fn appended(&self, added: i64) {
        if added != 0 {
            return;
        }
        self.counters.unmirrored.fetch_add(1, Ordering::Relaxed);
        if self.counters.stream_ahead.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::warn!(
                stream = %self.handoff_key("wal", &self.instance),
                "this instance's stream in redis is ahead of its store: a new data directory \
                 under the same instance name, or acknowledged events this store lost \
                 (durability = \"interval\" and a crash). Groups are mirrored for takeover \
                 again once their seqs pass the stream's; a new data directory should take \
                 another `instance` name"
            );
        }
    }

    /// Adds the heartbeat and the trim to the publish transaction: alive
    /// for `takeover_after_ms`, the stream cut below `cursor`, and kept
    /// (a takeover that ended left it to expire).
    pub(super) fn beat(&self, pipe: &mut redis::Pipeline, cursor: u64) {
        self.alive(pipe);
        pipe.cmd("XTRIM")
            .arg(self.handoff_key("wal", &self.instance))
            .arg("MINID")
            .arg(id_from(cursor.saturating_add(1)))
            .ignore();
    }

    /// Adds the heartbeat alone: alive for `takeover_after_ms`, and the
    /// stream kept (a takeover that ended left it to expire).
    fn alive(&self, pipe: &mut redis::Pipeline) {
        pipe.cmd("PERSIST")
            .arg(self.handoff_key("wal", &self.instance))
            .ignore()
            .cmd("SET")
            .arg(self.handoff_key("alive", &self.instance))
            .arg(now_ms())
            .arg("PX")
            .arg(self.takeover_after_ms)
            .ignore();
    }

    /// Beats, without publishing anything: the round's first call, so
    /// that the backlog and the members it shares before it publishes
    /// never hold the heartbeat back.
    pub(super) async fn heartbeat(&self) -> Result<(), MirrorError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        self.alive(&mut pipe);
        let mut conn = self.conn.clone();
        self.call(pipe.query_async::<()>(&mut conn)).await
    }

    /// The other instances that are not beating (their `alive:` key is
    /// gone) and whose stream holds entries.
    pub async fn silent_with_events(&self) -> Result<Vec<String>, MirrorError> {
        let others = self.others().await?;
        if others.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for name in &others {
            pipe.cmd("EXISTS")
                .arg(self.handoff_key("alive", name))
                .cmd("HGET")
                .arg(self.handoff_key("figures", name))
                .arg("cursor");
        }
        let mut conn = self.conn.clone();
        let found: Vec<(u64, Option<u64>)> = self.call(pipe.query_async(&mut conn)).await?;
        let silent: Vec<(String, u64)> = others
            .into_iter()
            .zip(found)
            .filter(|(_, (alive, _))| *alive == 0)
            .map(|(name, (_, cursor))| (name, cursor.unwrap_or(0)))
            .collect();
        if silent.is_empty() {
            return Ok(Vec::new());
        }
        // Entries at or below the cursor were counted (and delivered): only
        // one after it makes an orphan.
        let mut pipe = redis::pipe();
        for (name, cursor) in &silent {
            pipe.cmd("XRANGE")
                .arg(self.handoff_key("wal", name))
                .arg(id_from(cursor.saturating_add(1)))
                .arg("+")
                .arg("COUNT")
                .arg(1);
        }
        let after: Vec<redis::streams::StreamRangeReply> =
            self.call(pipe.query_async(&mut conn)).await?;
        Ok(silent
            .into_iter()
            .zip(after)
            .filter(|(_, after)| !after.ids.is_empty())
            .map(|((name, _), _)| name)
            .collect())
    }

    /// Locks `name` for this instance; `None` when it beats again or
    /// another instance holds it.
    pub async fn lock_orphan(&self, name: &str) -> Result<Option<Orphan>, MirrorError> {
        let mut conn = self.conn.clone();
        let locked: i64 = self
            .call(
                redis::cmd("EVAL")
                    .arg(LOCK)
                    .arg(2)
                    .arg(self.handoff_key("alive", name))
                    .arg(self.handoff_key("owner", name))
                    .arg(&self.instance)
                    .arg(self.takeover_after_ms)
                    .query_async(&mut conn),
            )
            .await?;
        Ok((locked == 1).then(|| Orphan {
            name: name.to_owned(),
        }))
    }

    /// The orphan's next chunk of events after its published cursor;
    /// `None` once its stream holds nothing after it.
    pub async fn take(&self, orphan: &Orphan) -> Result<Option<Taken>, MirrorError> {
        let mut conn = self.conn.clone();
        let cursor: Option<u64> = self
            .call(
                redis::cmd("HGET")
                    .arg(self.handoff_key("figures", &orphan.name))
                    .arg("cursor")
                    .query_async(&mut conn),
            )
            .await?;
        let from = cursor.unwrap_or(0);
        let entries: redis::streams::StreamRangeReply = self
            .call(
                redis::cmd("XRANGE")
                    .arg(self.handoff_key("wal", &orphan.name))
                    .arg(id_from(from.saturating_add(1)))
                    .arg("+")
                    .arg("COUNT")
                    .arg(ENTRIES_PER_READ)
                    .query_async(&mut conn),
            )
            .await?;
        let entries = entries.ids;
        let mut to = from;
        let mut events = Vec::new();
        for entry in &entries {
            if events.len() >= CHUNK_EVENTS {
                break;
            }
            let last: u64 = entry
                .id
                .split('-')
                .next()
                .and_then(|ms| ms.parse().ok())
                .unwrap_or(0);
            to = to.max(last);
            let group: Option<Vec<(u64, WalRecord)>> = entry
                .get::<Vec<u8>>("e")
                .and_then(|bytes| decode_record(&bytes).ok());
            let Some(group) = group else {
                // Not written by inletd, or damaged: nothing to deliver.
                self.counters.undecodable.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(orphan = %orphan.name, id = %entry.id,
                    "a stream entry taken over does not decode; skipped");
                continue;
            };
            events.extend(
                group
                    .into_iter()
                    .filter(|(seq, _)| *seq > from)
                    .map(|(seq, record)| Queued { seq, record }),
            );
        }
        if entries.is_empty() {
            return Ok(None);
        }
        Ok(Some(Taken { from, to, events }))
    }

    /// Records a chunk delivered: adds its counts to the orphan's figures
    /// and moves its cursor, only while no other instance holds the lock,
    /// the orphan is not alive again, and the cursor is still `taken.from`.
    /// Answers whether it did (false: the takeover is over). The stream is
    /// not trimmed here: only its own instance trims it, to what its own
    /// counts include, so that if it comes back, publishes a lower cursor
    /// and stops again, the next takeover still finds those events.
    pub async fn record_taken(
        &self,
        orphan: &Orphan,
        taken: &Taken,
        counts: &TakenCounts,
    ) -> Result<bool, MirrorError> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(RECORD)
            .arg(4)
            .arg(self.handoff_key("alive", &orphan.name))
            .arg(self.handoff_key("owner", &orphan.name))
            .arg(self.handoff_key("figures", &orphan.name))
            .arg(self.handoff_key("days", &orphan.name))
            .arg(&self.instance)
            .arg(taken.from)
            .arg(taken.to)
            .arg(self.takeover_after_ms)
            .arg(now_ms())
            .arg(counts.by_type.len());
        for (event_type, n) in &counts.by_type {
            cmd.arg(format!("type:{event_type}")).arg(n);
        }
        for (day, event_type, n) in &counts.by_day {
            cmd.arg(format!("{day}:{event_type}")).arg(n);
        }
        let mut conn = self.conn.clone();
        let recorded: i64 = self.call(cmd.query_async(&mut conn)).await?;
        if recorded == 1 {
            self.counters.taken_events.fetch_add(
                counts.by_type.iter().map(|(_, n)| n).sum(),
                Ordering::Relaxed,
            );
        }
        Ok(recorded == 1)
    }

    /// Ends a takeover that found nothing more after the cursor: the
    /// orphan's stream expires after `keep_ms` unless its instance beats
    /// again (which keeps it).
    pub async fn finish(&self, orphan: &Orphan, keep_ms: i64) -> Result<(), MirrorError> {
        let mut conn = self.conn.clone();
        let _: i64 = self
            .call(
                redis::cmd("PEXPIRE")
                    .arg(self.handoff_key("wal", &orphan.name))
                    .arg(keep_ms.max(1))
                    .query_async(&mut conn),
            )
            .await?;
        Ok(())
    }

    /// At start, before the first publish: names this instance's store, and
    /// answers the seqs `(from, upto]` that another instance took over and
    /// recorded while it was stopped: from the cursor of this store's last
    /// publish to the taker's. `None` when there was no takeover, Redis
    /// does not answer, or the figures are another store's (a new data
    /// directory under the same name).
    pub async fn taken_while_stopped(&self, store_id: u64) -> Option<(u64, u64)> {
        self.store_id.store(store_id, Ordering::Relaxed);
        let mut conn = self.conn.clone();
        let (from, upto, store): (Option<u64>, Option<u64>, Option<u64>) = self
            .call(
                redis::cmd("HMGET")
                    .arg(self.handoff_key("figures", &self.instance))
                    .arg("taken_from")
                    .arg("cursor")
                    .arg("store")
                    .query_async(&mut conn),
            )
            .await
            .ok()?;
        (store_id != 0 && store == Some(store_id)).then_some((from?, upto?))
    }

    /// Counts an orphan whose takeover began.
    pub fn took_over(&self, orphan: &Orphan) {
        self.counters.takeovers.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(orphan = %orphan.name,
            "an instance stopped beating with events queued; delivering them here");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analytics::Wanted;

    fn queued(seq: u64, event_type: &str, day: i64, only_sink: Option<&str>) -> Queued {
        Queued {
            seq,
            record: WalRecord {
                source: "default".into(),
                key: format!("k{seq}"),
                event_type: event_type.into(),
                received_at_ms: day * 86_400_000,
                occurred_at_ms: day * 86_400_000 + 1,
                only_sink: only_sink.map(Into::into),
                body: "{}".into(),
            },
        }
    }

    #[test]
    fn a_chunk_counts_per_type_and_per_day_as_the_local_counters_do() {
        let records = [
            queued(1, "signup", 20_000, None),
            queued(2, "signup", 20_001, None),
            queued(3, "click", 20_001, None),
            // A DLQ replay was counted the first time: not again.
            queued(4, "click", 20_001, Some("dashboard")),
        ];
        let ack = BatchAck::of(&records, 0, 1, Wanted::default(), []);
        let counts = TakenCounts::of(&ack);
        assert_eq!(
            counts.by_type,
            [("click".to_owned(), 1), ("signup".to_owned(), 2)]
        );
        assert_eq!(
            counts.by_day,
            [
                (20_000, "signup".to_owned(), 1),
                (20_001, "click".to_owned(), 1),
                (20_001, "signup".to_owned(), 1)
            ]
        );
    }
}
