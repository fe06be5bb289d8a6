//! The deployment's cohort retention over recent days: `/stats/retention`
//! over every instance, exact.
//!
//! A user's cohort is the day of their first event anywhere in the
//! deployment: the earliest of the first days each instance saw. After
//! each round's users are shared (`sets.rs`), the instance reads each of
//! them's first day in its own store and offers it to Redis; a script
//! keeps the earliest offered per user, and the user in that day's cohort
//! set (moving it when an earlier day is offered). Offering a day twice,
//! or a later one, changes nothing, so no write needs fencing, and a
//! user's cohort is right once every instance that saw them has offered.
//! A query then intersects cohort sets with the day sets of `dau.rs`, in
//! one script: exact while every day set involved is (none outgrew
//! `dau_exact_max`); otherwise the answer stays this instance's.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P first` | hash | user → first day (days since 1970-01-01) over the deployment, of every user active since Redis was on |
//! | `P cohort:{day}` | set | the users whose first day that is, for the days shared (`shared_days`) |
//!
//! Cohort sets expire with the day sets; the `first` hash does not (one
//! field per user). **Heal**: at start, and when its mark
//! `cohort:healed:{instance}` is gone from Redis, an instance offers the
//! first day of every user its store has seen, a page at a time: a user
//! first seen long ago on one instance and today on another is then not
//! taken for a new one.

use std::sync::atomic::Ordering;

use super::{Mirror, MirrorError};
use crate::analytics::{Cohort, format_day};

/// Users offered per script call.
const CHUNK: usize = 500;

/// Users read from the store per page of a heal.
const HEAL_PAGE: usize = 10_000;

/// Offers first days: `ARGV[4..]` are user, day pairs. Keeps the earliest
/// per user in the hash `KEYS[1]`, and the user in the cohort set
/// `ARGV[1] .. day` when that day is at least `ARGV[3]` (the set lives
/// `ARGV[2]` ms), moving it out of the set of the day it replaces.
const OFFER: &str = r"
for i = 4, #ARGV, 2 do
  local user, day = ARGV[i], tonumber(ARGV[i + 1])
  local old = redis.call('HGET', KEYS[1], user)
  if not old or day < tonumber(old) then
    redis.call('HSET', KEYS[1], user, day)
    if old then redis.call('SREM', ARGV[1] .. old, user) end
    if day >= tonumber(ARGV[3]) then
      redis.call('SADD', ARGV[1] .. day, user)
      redis.call('PEXPIRE', ARGV[1] .. day, ARGV[2])
    end
  end
end
return 0
";

/// The cohort table: `ARGV[1]` windows of `ARGV[2]` days from day
/// `ARGV[3]`; cohort sets are `ARGV[4] .. day`, day sets `ARGV[5] .. day`
/// and their over marks `ARGV[6] .. day`; `KEYS[1]` names the scratch
/// keys (`KEYS[1] .. ':c' .. i` and `':a' .. i`, deleted before
/// returning). Answers one array per cohort, `{size, retained 1, …}`, or
/// `-1` when a day set involved outgrew its cap, or when the day sets
/// hold more than `ARGV[7]` members in all (the answer would block Redis
/// too long). Each window's union is built once; a window of one day is
/// its set.
const COHORTS: &str = r"
local windows, days, start = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local members = 0
for d = start, start + windows * days - 1 do
  if redis.call('EXISTS', ARGV[6] .. d) == 1 then return -1 end
  members = members + redis.call('SCARD', ARGV[5] .. d)
end
if members > tonumber(ARGV[7]) then return -1 end
local scratch = {}
local function window(prefix, tag, i)
  local from = start + i * days
  if days == 1 then return prefix .. from end
  local keys = {}
  for d = from, from + days - 1 do keys[#keys + 1] = prefix .. d end
  local dest = KEYS[1] .. tag .. i
  redis.call('SUNIONSTORE', dest, unpack(keys))
  scratch[#scratch + 1] = dest
  return dest
end
local active = {}
for i = 1, windows - 1 do active[i] = window(ARGV[5], ':a', i) end
local out = {}
for i = 0, windows - 1 do
  local cohort = window(ARGV[4], ':c', i)
  local row = {redis.call('SCARD', cohort)}
  for k = 1, windows - i - 1 do
    row[#row + 1] = redis.call('SINTERCARD', 2, cohort, active[i + k])
  end
  out[#out + 1] = row
end
if #scratch > 0 then redis.call('UNLINK', unpack(scratch)) end
return out
";

/// Most members the day sets of one cohort table may hold in all: the
/// script copies and intersects them while Redis waits.
const COHORT_MEMBERS_MAX: u64 = 2_000_000;

impl Mirror {
    /// Notes users whose first day the next round offers; how many are
    /// noted now.
    pub(super) fn note_first_days<'a>(&self, users: impl IntoIterator<Item = &'a str>) -> usize {
        let mut due = self.first_due.lock().unwrap_or_else(|p| p.into_inner());
        for user in users {
            if !due.contains(user) {
                due.insert(user.to_owned());
            }
        }
        due.len()
    }

    /// Forgets the users noted: a heal offers them all again.
    pub(super) fn forget_first_days(&self) {
        self.first_due
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// The round's cohort part: offers the first day (read by `first_of`
    /// from the store) of every user noted since the last round. Users
    /// not offered wait for the next round.
    pub async fn share_first_days<F, Fut, E>(&self, mut first_of: F)
    where
        F: FnMut(Vec<String>) -> Fut,
        Fut: std::future::Future<Output = Result<Vec<(String, i32)>, E>>,
        E: std::fmt::Display,
    {
        if !self.is_up() {
            return;
        }
        let due: Vec<String> =
            std::mem::take(&mut *self.first_due.lock().unwrap_or_else(|p| p.into_inner()))
                .into_iter()
                .collect();
        let horizon = self.first_shared_day();
        for (i, users) in due.chunks(CHUNK).enumerate() {
            let offered = match first_of(users.to_vec()).await {
                Ok(days) => self.offer(&days, horizon).await,
                Err(e) => {
                    tracing::warn!(error = %e, "reading first days to share with redis failed");
                    Err(MirrorError::Down)
                }
            };
            if offered.is_err() {
                self.note_first_days(due[i * CHUNK..].iter().map(String::as_str));
                return;
            }
        }
    }

    /// Offers the first day of every user of this store (pages of at most
    /// the given size read by `page_after`), then sets the mark, when a heal is due or the mark
    /// is gone. A heal that fails is due again.
    pub async fn heal_cohorts<F, Fut, E>(&self, mut page_after: F)
    where
        F: FnMut(Option<String>, usize) -> Fut,
        Fut: std::future::Future<Output = Result<Vec<(String, i32)>, E>>,
        E: std::fmt::Display,
    {
        if !self.heal_wanted(&self.cohorts_heal_due, "cohort").await {
            return;
        }
        let horizon = self.first_shared_day();
        let mut after = None;
        loop {
            let page = match page_after(after.take(), HEAL_PAGE).await {
                Ok(page) => page,
                Err(e) => {
                    tracing::warn!(error = %e, "reading first days to share with redis failed");
                    self.cohorts_heal_due.store(true, Ordering::Relaxed);
                    return;
                }
            };
            for chunk in page.chunks(CHUNK) {
                if self.offer(chunk, horizon).await.is_err() {
                    self.cohorts_heal_due.store(true, Ordering::Relaxed);
                    return;
                }
            }
            match page.last() {
                Some((user, _)) if page.len() == HEAL_PAGE => after = Some(user.clone()),
                _ => break,
            }
        }
        if !self
            .healed(&self.cohorts_heal_due, "cohort", self.day_keep_ms())
            .await
        {
            return;
        }
        tracing::info!(
            "offered the first day of every user of this store to the deployment's cohorts"
        );
    }

    async fn offer(&self, days: &[(String, i32)], horizon: i32) -> Result<(), MirrorError> {
        if days.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(OFFER)
            .arg(1)
            .arg(format!("{}first", self.prefix))
            .arg(format!("{}cohort:", self.prefix))
            .arg(self.day_keep_ms())
            .arg(horizon);
        for (user, day) in days {
            cmd.arg(user).arg(day);
        }
        let mut conn = self.conn.clone();
        self.call(cmd.query_async::<i64>(&mut conn))
            .await
            .map(|_| ())
    }

    /// The deployment's cohorts: `windows` windows of `window_days` from
    /// `start` (all within the days shared). `None` when a day involved
    /// has more users than `dau_exact_max` (the sets are then gone, and
    /// only this instance's answer is exact), or the days hold more than
    /// `COHORT_MEMBERS_MAX` (2,000,000) users in all.
    pub async fn deployment_retention(
        &self,
        start: i32,
        windows: u32,
        window_days: i32,
    ) -> Result<Option<Vec<Cohort>>, MirrorError> {
        if !self.is_up() {
            return Err(MirrorError::Down);
        }
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(COHORTS)
            .arg(1)
            .arg(format!("{}cohorts:scratch:{}", self.prefix, self.instance))
            .arg(windows)
            .arg(window_days)
            .arg(start)
            .arg(format!("{}cohort:", self.prefix))
            .arg(format!("{}dau:", self.prefix))
            .arg(format!("{}over:dau:", self.prefix))
            .arg(COHORT_MEMBERS_MAX);
        let mut conn = self.conn.clone();
        let answer: redis::Value = self.read(cmd.query_async(&mut conn)).await?;
        if matches!(answer, redis::Value::Int(-1)) {
            return Ok(None);
        }
        let rows: Vec<Vec<u64>> = redis::from_redis_value(answer)
            .map_err(|_| MirrorError::Redis("unexpected answer to the cohort script".into()))?;
        Ok(Some(
            rows.into_iter()
                .enumerate()
                .map(|(i, retained)| Cohort {
                    cohort: format_day(start + i as i32 * window_days),
                    size: retained.first().copied().unwrap_or(0),
                    retained,
                })
                .collect(),
        ))
    }
}
