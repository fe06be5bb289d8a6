//! Sets every instance adds its processed users (or sessions) to: one per
//! day for the deployment's DAU (`dau.rs`), one per minute for its active
//! users and sessions (`windows.rs`). Each is a Redis set while it holds at
//! most `dau_exact_max` members, and always a HyperLogLog, so that a count
//! over them is exact until a set outgrows the cap, and an estimate after.
//!
//! Adding a member twice changes nothing, so no write needs fencing: a
//! batch processed twice, a round repeated, or a heal that re-adds what is
//! there leaves the same sets. What can go wrong is a member never added
//! (the process died with members noted, `pending` overflowed, Redis lost
//! its data): the heals of `dau.rs` and `windows.rs` re-add them from the
//! store.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P {name}` | set | the members, while at most `dau_exact_max` |
//! | `P over:{name}` | string | set once the set outgrew `dau_exact_max` (the set is then dropped) |
//! | `P {hll name}` | HyperLogLog | the members, always |
//!
//! with `{name}` / `{hll name}` `dau:{day}` / `dauh:{day}` (a day's
//! users), `daut:{day}:{event_type}` / `dauth:{day}:{event_type}` (a day's
//! users of one type, for trends), `winu:{minute}` / `winuh:{minute}`
//! (users) and `wins:{minute}` / `winsh:{minute}` (sessions).
//!
//! A count over several sets (a week's users, five minutes' sessions) is
//! the size of their union, in one script ([`UNION`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;

use super::{Mirror, MirrorError};
use crate::analytics::ACTIVE_WINDOW_MINUTES;
use crate::storage::BatchAck;

/// Members per script call: Lua's `unpack` has a stack limit.
const CHUNK: usize = 1000;

/// Script calls per pipeline: each pipeline must answer within `timeout_ms`.
const CALLS_PER_PIPELINE: usize = 10;

/// Adds members (`ARGV[3..]`) to a HyperLogLog (`KEYS[2]`) and, unless the
/// set is over `ARGV[1]` members (`KEYS[3]` set), to the set (`KEYS[1]`),
/// dropping the set once it grows past that; every key lives `ARGV[2]` ms.
const ADD_MEMBERS: &str = r"
redis.call('PFADD', KEYS[2], unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[2], ARGV[2])
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
redis.call('SADD', KEYS[1], unpack(ARGV, 3))
if redis.call('SCARD', KEYS[1]) > tonumber(ARGV[1]) then
  redis.call('DEL', KEYS[1])
  redis.call('SET', KEYS[3], '1', 'PX', ARGV[2])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// The size of the union of the sets `KEYS[2..n+1]` (`n` = (#KEYS − 1) / 3),
/// exact (`{count, 1}`), unless one of them is over its cap (`KEYS[2n+2..]`
/// set): then the union of their HyperLogLogs (`KEYS[n+2..2n+1]`),
/// `{estimate, 0}`. `KEYS[1]` is a scratch key, deleted before returning
/// (one set is counted without a copy).
const UNION: &str = r"
local n = (#KEYS - 1) / 3
for i = 2 * n + 2, 3 * n + 1 do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    return {redis.call('PFCOUNT', unpack(KEYS, n + 2, 2 * n + 1)), 0}
  end
end
if n == 1 then return {redis.call('SCARD', KEYS[2]), 1} end
local count = redis.call('SUNIONSTORE', KEYS[1], unpack(KEYS, 2, n + 1))
redis.call('UNLINK', KEYS[1])
return {count, 1}
";

/// One shared set.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum SharedSet {
    /// The users of a day (days since 1970-01-01).
    DayUsers(i32),
    /// The users with an event of a type on a day (trends of one type).
    DayTypeUsers(i32, String),
    /// The users of a minute (minutes since the epoch).
    MinuteUsers(i64),
    /// The sessions of a minute.
    MinuteSessions(i64),
}

/// A set's Redis keys: the set, its HyperLogLog, its "over" mark.
pub(super) struct SetKeys {
    pub set: String,
    pub hll: String,
    pub over: String,
}

impl SharedSet {
    /// Its keys under `prefix`.
    pub(super) fn keys(&self, prefix: &str) -> SetKeys {
        let (set, hll) = match self {
            SharedSet::DayUsers(day) => (format!("dau:{day}"), format!("dauh:{day}")),
            SharedSet::DayTypeUsers(day, t) => {
                (format!("daut:{day}:{t}"), format!("dauth:{day}:{t}"))
            }
            SharedSet::MinuteUsers(m) => (format!("winu:{m}"), format!("winuh:{m}")),
            SharedSet::MinuteSessions(m) => (format!("wins:{m}"), format!("winsh:{m}")),
        };
        SetKeys {
            // Its own prefix: a type may end in `:over`.
            over: format!("{prefix}over:{set}"),
            set: format!("{prefix}{set}"),
            hll: format!("{prefix}{hll}"),
        }
    }

    /// How long its keys live from a write at `now_ms`: a day's,
    /// `day_keep_ms` (as long as days are shared); a minute's, until no
    /// window reaches it.
    fn keep_ms(&self, now_ms: i64, day_keep_ms: i64) -> i64 {
        match self {
            SharedSet::DayUsers(_) | SharedSet::DayTypeUsers(..) => day_keep_ms,
            SharedSet::MinuteUsers(m) | SharedSet::MinuteSessions(m) => {
                ((m + ACTIVE_WINDOW_MINUTES + 1) * 60_000 - now_ms).max(60_000)
            }
        }
    }
}

/// Members noted since the last round, not yet in Redis.
#[derive(Debug, Default)]
pub(super) struct Pending {
    /// By set.
    sets: BTreeMap<SharedSet, BTreeSet<String>>,
    /// How many (set, member) pairs `sets` holds.
    len: usize,
}

impl Mirror {
    /// Members noted and not yet added to Redis.
    pub(super) fn pending_members(&self) -> usize {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).len
    }

    /// Notes members for the next round. Past `backlog_max_keys` the noted
    /// ones are forgotten and both heals are due: they re-add every member
    /// from the store, so nothing is lost by forgetting.
    /// `members` is a batch's, grouped by set: a member already noted
    /// costs a lookup, no copy (most events are of users seen this round).
    pub(super) fn note_members<'a, M>(&self, members: impl IntoIterator<Item = (SharedSet, M)>)
    where
        M: IntoIterator<Item = &'a str>,
    {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let pending = &mut *pending;
        for (set, of_set) in members {
            let noted = pending.sets.entry(set).or_default();
            for member in of_set {
                if !noted.contains(member) {
                    noted.insert(member.to_owned());
                    pending.len += 1;
                }
            }
        }
        if pending.len > self.backlog_max {
            *pending = Pending::default();
            self.heal_due.store(true, Ordering::Relaxed);
            self.windows_heal_due.store(true, Ordering::Relaxed);
        }
    }

    /// What a processed batch adds to the deployment's sets: its users by
    /// day, and by day and event type; its users and sessions by minute.
    fn members_of<'a>(&self, ack: &'a BatchAck) -> BTreeMap<SharedSet, BTreeSet<&'a str>> {
        let mut members = BTreeMap::new();
        self.day_members(ack, &mut members);
        Self::minute_members(ack, &mut members);
        members
    }

    /// Notes a batch's members for the next round. The Processor calls it
    /// before the batch's commit: a round that reads a cursor past the
    /// batch then shares them before it publishes that cursor
    /// ([`Mirror::maintain`]).
    pub fn note_members_of(&self, ack: &BatchAck) {
        self.note_members(self.members_of(ack));
    }

    /// Adds a batch's members to the deployment's sets now: a takeover's
    /// chunk, before it is recorded as delivered. Once it is, no other
    /// instance delivers (or counts the users of) those events again.
    pub async fn share_members_of(&self, ack: &BatchAck) -> Result<(), MirrorError> {
        self.add_members(&self.members_of(ack)).await
    }

    /// Notes what a committed batch changed in the store, which the next
    /// round reads from it: its users' first days, and the minutes whose
    /// page views or window groups changed.
    pub fn note_committed(&self, ack: &BatchAck) {
        self.note_first_days_of(ack);
        self.note_dirty_minutes(ack);
    }

    /// The round's part: adds the members noted since the last round.
    pub(super) async fn share_members(&self) -> Result<(), MirrorError> {
        let noted = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        if let Err(e) = self.add_members(&noted.sets).await {
            // Back for the next round (merged with what came meanwhile).
            self.note_members(
                noted
                    .sets
                    .iter()
                    .map(|(set, members)| (set.clone(), members.iter().map(String::as_str))),
            );
            return Err(e);
        }
        Ok(())
    }

    /// Adds to `pipe` the count of the union of `sets` (not empty): its
    /// answer is read by [`union_count`].
    pub(super) fn count_union(&self, pipe: &mut redis::Pipeline, sets: &[SharedSet]) {
        let keys: Vec<SetKeys> = sets.iter().map(|set| set.keys(&self.prefix)).collect();
        pipe.cmd("EVAL")
            .arg(UNION)
            .arg(1 + 3 * keys.len())
            .arg(format!("{}union:scratch:{}", self.prefix, self.instance))
            .arg(keys.iter().map(|k| &k.set).collect::<Vec<_>>())
            .arg(keys.iter().map(|k| &k.hll).collect::<Vec<_>>())
            .arg(keys.iter().map(|k| &k.over).collect::<Vec<_>>());
    }

    /// Adds `sets`' members, in one pipeline of scripts.
    pub(super) async fn add_members<M: AsRef<str>>(
        &self,
        sets: &BTreeMap<SharedSet, BTreeSet<M>>,
    ) -> Result<(), MirrorError> {
        let now = crate::event::now_ms();
        let mut pipe = redis::pipe();
        let mut calls = 0;
        for (set, members) in sets {
            let keys = set.keys(&self.prefix);
            let members: Vec<&str> = members.iter().map(AsRef::as_ref).collect();
            for chunk in members.chunks(CHUNK) {
                pipe.cmd("EVAL")
                    .arg(ADD_MEMBERS)
                    .arg(3)
                    .arg(&keys.set)
                    .arg(&keys.hll)
                    .arg(&keys.over)
                    .arg(self.dau_exact_max)
                    .arg(set.keep_ms(now, self.day_keep_ms()))
                    .arg(chunk)
                    .ignore();
                calls += 1;
                if calls == CALLS_PER_PIPELINE {
                    self.send(std::mem::take(&mut pipe)).await?;
                    calls = 0;
                }
            }
        }
        if calls > 0 {
            self.send(pipe).await?;
        }
        Ok(())
    }

    async fn send(&self, pipe: redis::Pipeline) -> Result<(), MirrorError> {
        let mut conn = self.conn.clone();
        self.call_bulk(pipe.query_async::<()>(&mut conn)).await
    }
}

/// The answer to a [`Mirror::count_union`]: the count, and whether it is
/// exact.
pub(super) fn union_count(answer: Option<redis::Value>) -> Result<(u64, bool), MirrorError> {
    let (count, exact): (u64, u8) = answer
        .and_then(|value| redis::from_redis_value(value).ok())
        .ok_or_else(|| MirrorError::Redis("unexpected answer to a union count".into()))?;
    Ok((count, exact == 1))
}
