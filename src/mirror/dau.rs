//! The deployment's daily active users: every instance adds the users of
//! the batches it processed to one set and one HyperLogLog per day, so
//! that `/stats/dau` counts a user who reached several instances once.
//!
//! Adding a user twice changes nothing, so no write needs fencing: a batch
//! processed twice, a round repeated, or a heal that re-adds a whole day
//! leaves the same sets. What can go wrong is a user never added: the
//! users noted since the last round when the process dies, a pending list
//! that outgrew `backlog_max_keys` while Redis was down, or a Redis that
//! lost its data. Each instance therefore *heals*: it re-adds every user
//! of the last [`PUBLISHED_DAYS`] days from its own store at start, when
//! its pending list overflowed, and when its heal mark is gone from Redis
//! (a FLUSHALL, a Redis restarted without persistence).
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P dau:{day}` | set | the day's users, while at most `dau_exact_max` |
//! | `P dau:{day}:over` | string | set once the day outgrew `dau_exact_max` (the set is then dropped) |
//! | `P dauh:{day}` | HyperLogLog | the day's users, always |
//! | `P dau:healed:{instance}` | string | this instance's users are all in |
//!
//! Every one of them expires [`PUBLISHED_DAYS`] + 1 days after its last
//! write.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;

use super::{Mirror, MirrorError, PUBLISHED_DAYS};
use crate::analytics::day_of;
use crate::event::now_ms;

/// How long the DAU keys live after their last write.
const KEEP_MS: i64 = (PUBLISHED_DAYS as i64 + 1) * 86_400_000;

/// Users per script call: Lua's `unpack` has a stack limit.
const CHUNK: usize = 1000;

/// Adds users (`ARGV[3..]`) to a day's HyperLogLog (`KEYS[2]`) and, unless
/// the day is over `ARGV[1]` users (`KEYS[3]` set), to its set (`KEYS[1]`),
/// dropping the set once it grows past that; every key lives `ARGV[2]` ms.
const ADD_USERS: &str = r"
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

/// Users processed since the last round, not yet in Redis.
#[derive(Debug, Default)]
pub(super) struct Pending {
    /// By day.
    days: BTreeMap<i32, BTreeSet<String>>,
    /// How many (day, user) pairs `days` holds.
    len: usize,
}

/// One day of the deployment's DAU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeploymentDay {
    /// Days since 1970-01-01.
    pub day: i32,
    /// Distinct users that day, over every instance.
    pub users: u64,
    /// False when the day outgrew `dau_exact_max` and `users` is the
    /// HyperLogLog's estimate.
    pub exact: bool,
}

impl Mirror {
    /// Users noted and not yet added to Redis.
    pub(super) fn pending_users(&self) -> usize {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).len
    }

    /// Notes the users of a processed batch, by the day of their event;
    /// the next round adds them to the deployment's DAU. Days older than
    /// [`PUBLISHED_DAYS`] are not shared.
    pub fn note_active<'a>(&self, users: impl IntoIterator<Item = (i32, &'a str)>) {
        let today = day_of(now_ms());
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        for (day, user) in users {
            if day > today - PUBLISHED_DAYS && day <= today + 1 {
                let added = pending.days.entry(day).or_default().insert(user.to_owned());
                pending.len += usize::from(added);
            }
        }
        if pending.len > self.backlog_max {
            // The heal re-adds every user from the store: nothing is lost
            // by forgetting these.
            *pending = Pending::default();
            self.heal_due.store(true, Ordering::Relaxed);
        }
    }

    /// The round's DAU part: adds the users noted since the last round.
    pub(super) async fn share_users(&self) -> Result<(), MirrorError> {
        let noted = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        if let Err(e) = self.add_users(&noted.days).await {
            // Back for the next round (merged with what came meanwhile).
            self.note_active(
                noted
                    .days
                    .iter()
                    .flat_map(|(day, users)| users.iter().map(move |u| (*day, u.as_str()))),
            );
            return Err(e);
        }
        Ok(())
    }

    /// Heals the deployment's DAU with every user this instance saw in the
    /// last [`PUBLISHED_DAYS`] days, read a day at a time by `users_of`
    /// (so that one day's users are in memory at once), then sets the mark,
    /// when a heal is due or the mark is gone (a Redis that lost it lost
    /// the users too). A heal that fails is due again. Called from its own
    /// task: one check and one heal at a time.
    pub async fn heal_dau<F, Fut, E>(&self, mut users_of: F)
    where
        F: FnMut(i32) -> Fut,
        Fut: std::future::Future<Output = Result<BTreeSet<String>, E>>,
        E: std::fmt::Display,
    {
        if !self.is_up() {
            return;
        }
        let mark = format!("{}dau:healed:{}", self.prefix, self.instance);
        let mut conn = self.conn.clone();
        if !self.heal_due.swap(false, Ordering::Relaxed) {
            // Not due, unless Redis lost this instance's users (the mark is
            // gone: a FLUSHALL, a restart without persistence).
            let there: Result<bool, _> = self
                .call(redis::cmd("EXISTS").arg(&mark).query_async(&mut conn))
                .await;
            if !matches!(there, Ok(false)) {
                return;
            }
        }
        let today = day_of(now_ms());
        for day in today - (PUBLISHED_DAYS - 1)..=today + 1 {
            let users = match users_of(day).await {
                Ok(users) => users,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the users to share with redis failed");
                    self.heal_due.store(true, Ordering::Relaxed);
                    return;
                }
            };
            if self
                .add_users(&BTreeMap::from([(day, users)]))
                .await
                .is_err()
            {
                self.heal_due.store(true, Ordering::Relaxed);
                return;
            }
        }
        let mut set = redis::cmd("SET");
        set.arg(&mark).arg(now_ms()).arg("PX").arg(KEEP_MS);
        if self.call(set.query_async::<()>(&mut conn)).await.is_err() {
            self.heal_due.store(true, Ordering::Relaxed);
            return;
        }
        self.counters.dau_heals.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            days = PUBLISHED_DAYS,
            "added this instance's recent users to the deployment's daily active users"
        );
    }

    /// Adds `days`' users, in one pipeline of scripts.
    async fn add_users(&self, days: &BTreeMap<i32, BTreeSet<String>>) -> Result<(), MirrorError> {
        let mut pipe = redis::pipe();
        let mut any = false;
        for (day, users) in days {
            let users: Vec<&String> = users.iter().collect();
            for chunk in users.chunks(CHUNK) {
                any = true;
                pipe.cmd("EVAL")
                    .arg(ADD_USERS)
                    .arg(3)
                    .arg(format!("{}dau:{day}", self.prefix))
                    .arg(format!("{}dauh:{day}", self.prefix))
                    .arg(format!("{}dau:{day}:over", self.prefix))
                    .arg(self.dau_exact_max)
                    .arg(KEEP_MS)
                    .arg(chunk)
                    .ignore();
            }
        }
        if !any {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        self.call(pipe.query_async::<()>(&mut conn)).await
    }

    /// The deployment's distinct users on each day of `from..=to` (a range
    /// within the last [`PUBLISHED_DAYS`] days).
    pub async fn deployment_dau(
        &self,
        from: i32,
        to: i32,
    ) -> Result<Vec<DeploymentDay>, MirrorError> {
        if !self.is_up() {
            return Err(MirrorError::Down);
        }
        let mut pipe = redis::pipe();
        for day in from..=to {
            pipe.cmd("EXISTS")
                .arg(format!("{}dau:{day}:over", self.prefix))
                .cmd("SCARD")
                .arg(format!("{}dau:{day}", self.prefix))
                .cmd("PFCOUNT")
                .arg(format!("{}dauh:{day}", self.prefix));
        }
        let mut conn = self.conn.clone();
        // Three integers a day: over (0 or 1), the set's size, the estimate.
        let answers: Vec<u64> = self.call(pipe.query_async(&mut conn)).await?;
        Ok((from..=to)
            .zip(answers.chunks_exact(3))
            .map(|(day, answer)| {
                let over = answer[0] == 1;
                DeploymentDay {
                    day,
                    users: if over { answer[2] } else { answer[1] },
                    exact: !over,
                }
            })
            .collect())
    }
}
