//! The deployment's rolling windows: `/stats/windows` and
//! `/stats/windows/{name}` over every instance.
//!
//! Two kinds of figures, shared two ways:
//!
//! - **Active users and sessions do not add up** (a user may reach two
//!   instances in one minute): every instance adds the users and sessions
//!   of its processed batches to one set per minute (`sets.rs`), and the
//!   5-minute figure is the size of the union of the last five (exact
//!   while each set is at most `dau_exact_max`, else the HyperLogLogs'
//!   estimate, `"exact": false`).
//! - **Page views and `[[windows]]` groups add up.** Each instance writes
//!   its own cells of a minute, read from its store, whole (absolute, not
//!   deltas) into its own hashes; a query adds every instance's hashes of
//!   the minutes it spans. A minute is written again whenever a batch adds
//!   to it, so a write lost or repeated changes nothing once the next one
//!   lands.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P winu:{minute}`, `P wins:{minute}`, … | set, HyperLogLog | the minute's users, sessions (`sets.rs`) |
//! | `P winp:{minute}:{instance}` | hash | page → the instance's views of it in that minute |
//! | `P winw:{window}:{minute}:{instance}` | hash | group → `{count}:{sum}`, the sum in millionths |
//! | `P win:healed:{instance}` | string | this instance's windows are all in |
//!
//! `{minute}` is minutes since the epoch, of the event's own time. Every key
//! expires once no window reaches its minute.
//!
//! **Heal.** What a round did not write (the process died with minutes
//! noted, Redis was down or lost its data) is written again from the
//! store: at start, when the members noted overflowed, and when the heal
//! mark is gone from Redis. A heal reads the active minutes' users and
//! sessions (11 minutes) and notes every minute a window reaches (up to
//! 1,445 with a day-long `[[windows]]`) for the next rounds.
//!
//! **Freshness.** An answer is as of each instance's last round
//! (`publish_interval_ms`), this instance's too.
//!
//! All instances of a deployment are meant to share `[[windows]]`; a
//! window one instance does not define has none of its events.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;

use redis::Value;

use super::sets::{SharedSet, union_count};
use super::{Mirror, MirrorError};
use crate::analytics::{
    self, ACTIVE_WINDOW_MINUTES, GroupTotals, MAX_CLOCK_SKEW_MS, MinuteCells, PAGE_WINDOW_MINUTES,
    WindowGroup, Windows,
};
use crate::config::WindowConfig;
use crate::event::now_ms;
use crate::storage::BatchAck;

const MS_PER_MINUTE: i64 = 60_000;

/// Minutes after now an event may fall in and still count (a sender's
/// clock ahead).
const SKEW_MINUTES: i64 = MAX_CLOCK_SKEW_MS / MS_PER_MINUTE;

/// How long the heal mark lives: a day, so that a heal also comes back by
/// itself now and then.
const MARK_KEEP_MS: i64 = 86_400_000;

/// Minutes read from the store and written per pipeline.
const MINUTES_PER_WRITE: usize = 16;

/// The deployment's `/stats/windows`.
#[derive(Debug, Clone, PartialEq)]
pub struct DeploymentWindows {
    /// Every instance's windows, merged.
    pub windows: Windows,
    /// False when a minute's users or sessions outgrew `dau_exact_max` and
    /// the 5-minute figures are estimates.
    pub exact: bool,
}

impl Mirror {
    /// Adds to `members` the users and sessions of a processed batch by
    /// the minute of their event, for the minutes a window still reaches.
    pub(super) fn minute_members<'a>(
        ack: &'a BatchAck,
        members: &mut BTreeMap<SharedSet, BTreeSet<&'a str>>,
    ) {
        let now_minute = ack.now_ms.div_euclid(MS_PER_MINUTE);
        let active = now_minute - (ACTIVE_WINDOW_MINUTES - 1)..=now_minute + SKEW_MINUTES;
        for f in ack.processed.iter().filter_map(|(_, f)| f.as_ref()) {
            let minute = f.occurred_at_ms.div_euclid(MS_PER_MINUTE);
            if !active.contains(&minute) {
                continue;
            }
            if let Some(user) = &f.user_id {
                let set = SharedSet::MinuteUsers(minute);
                members.entry(set).or_default().insert(user.as_str());
            }
            if let Some(session) = &f.session_id {
                let set = SharedSet::MinuteSessions(minute);
                members.entry(set).or_default().insert(session.as_str());
            }
        }
    }

    /// Notes the minutes whose page views or window groups a committed
    /// batch changed: the next round reads their cells from the store.
    pub(super) fn note_dirty_minutes(&self, ack: &BatchAck) {
        let now_minute = ack.now_ms.div_euclid(MS_PER_MINUTE);
        let paged = now_minute - (PAGE_WINDOW_MINUTES - 1)..=now_minute + SKEW_MINUTES;
        let dirty: BTreeSet<i64> = ack
            .processed
            .iter()
            .filter_map(|(_, f)| f.as_ref())
            // Windows' facts are only there for events inside their window.
            .filter(|f| {
                let minute = f.occurred_at_ms.div_euclid(MS_PER_MINUTE);
                (f.page.is_some() && paged.contains(&minute)) || !f.windows.is_empty()
            })
            .map(|f| f.occurred_at_ms.div_euclid(MS_PER_MINUTE))
            .collect();
        if !dirty.is_empty() {
            self.dirty_minutes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(dirty);
        }
    }

    /// The round's windows part: writes this instance's cells of every
    /// minute noted since the last round, read by `cells_of` from the
    /// store. Minutes that could not be written wait for the next round.
    pub async fn share_windows<F, Fut, E>(&self, windows: &[WindowConfig], mut cells_of: F)
    where
        F: FnMut(i64) -> Fut,
        Fut: std::future::Future<Output = Result<MinuteCells, E>>,
        E: std::fmt::Display,
    {
        if !self.is_up() {
            return;
        }
        let now_minute = now_ms().div_euclid(MS_PER_MINUTE);
        let oldest = now_minute - longest(windows) + 1;
        let noted: Vec<i64> = {
            let mut dirty = self.dirty_minutes.lock().unwrap_or_else(|p| p.into_inner());
            // Minutes no window reaches any more are not written at all.
            let reached = dirty.split_off(&oldest);
            std::mem::take(&mut *dirty);
            reached.into_iter().collect()
        };
        for (i, minutes) in noted.chunks(MINUTES_PER_WRITE).enumerate() {
            let mut cells = Vec::with_capacity(minutes.len());
            for &minute in minutes {
                match cells_of(minute).await {
                    Ok(c) => cells.push((minute, c)),
                    Err(e) => {
                        tracing::warn!(error = %e, "reading the rolling windows to share with redis failed");
                        self.renote(&noted[i * MINUTES_PER_WRITE..]);
                        return;
                    }
                }
            }
            if self.write_cells(windows, &cells).await.is_err() {
                self.renote(&noted[i * MINUTES_PER_WRITE..]);
                return;
            }
        }
    }

    /// Minutes back for the next round.
    fn renote(&self, minutes: &[i64]) {
        self.dirty_minutes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(minutes.iter().copied());
    }

    /// Replaces this instance's hashes of each minute with `cells`, in one
    /// transaction.
    async fn write_cells(
        &self,
        windows: &[WindowConfig],
        cells: &[(i64, MinuteCells)],
    ) -> Result<(), MirrorError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        for (minute, cells) in cells {
            let gone_after = |minutes: i64| (minute + minutes + 1) * MS_PER_MINUTE;
            let key = format!("{}winp:{minute}:{}", self.prefix, self.instance);
            pipe.cmd("DEL").arg(&key).ignore();
            if !cells.pages.is_empty() {
                pipe.cmd("HSET").arg(&key).arg(&cells.pages).ignore();
                pipe.cmd("PEXPIREAT")
                    .arg(&key)
                    .arg(gone_after(PAGE_WINDOW_MINUTES))
                    .ignore();
            }
            for window in windows {
                let key = format!(
                    "{}winw:{}:{minute}:{}",
                    self.prefix, window.name, self.instance
                );
                pipe.cmd("DEL").arg(&key).ignore();
                let Some(groups) = cells.groups.get(&window.name) else {
                    continue;
                };
                let fields: Vec<(&String, String)> = groups
                    .iter()
                    .map(|(group, (sum, count))| (group, format!("{count}:{sum}")))
                    .collect();
                if !fields.is_empty() {
                    pipe.cmd("HSET").arg(&key).arg(fields).ignore();
                    pipe.cmd("PEXPIREAT")
                        .arg(&key)
                        .arg(gone_after(i64::from(window.minutes)))
                        .ignore();
                }
            }
        }
        let mut conn = self.conn.clone();
        self.call(pipe.query_async::<()>(&mut conn)).await
    }

    /// Heals the deployment's windows from this instance's store when a
    /// heal is due or its mark is gone: re-adds the users and sessions of
    /// the active minutes (`members_of`), and notes every minute a window
    /// reaches for the next round. A heal that fails is due again.
    pub async fn heal_windows<F, Fut, E>(&self, windows: &[WindowConfig], mut members_of: F)
    where
        F: FnMut(i64) -> Fut,
        Fut: std::future::Future<Output = Result<(BTreeSet<String>, BTreeSet<String>), E>>,
        E: std::fmt::Display,
    {
        if !self.heal_wanted(&self.windows_heal_due, "win").await {
            return;
        }
        let now_minute = now_ms().div_euclid(MS_PER_MINUTE);
        let mut sets = BTreeMap::new();
        for minute in now_minute - (ACTIVE_WINDOW_MINUTES - 1)..=now_minute + SKEW_MINUTES {
            match members_of(minute).await {
                Ok((users, sessions)) => {
                    sets.insert(SharedSet::MinuteUsers(minute), users);
                    sets.insert(SharedSet::MinuteSessions(minute), sessions);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading the active users to share with redis failed");
                    self.windows_heal_due.store(true, Ordering::Relaxed);
                    return;
                }
            }
        }
        if self.add_members(&sets).await.is_err() {
            self.windows_heal_due.store(true, Ordering::Relaxed);
            return;
        }
        let reached: Vec<i64> =
            (now_minute - longest(windows) + 1..=now_minute + SKEW_MINUTES).collect();
        self.renote(&reached);
        if !self
            .healed(&self.windows_heal_due, "win", MARK_KEEP_MS)
            .await
        {
            return;
        }
        self.counters.window_heals.fetch_add(1, Ordering::Relaxed);
        tracing::info!("wrote this instance's rolling windows to the deployment's");
    }

    /// The instances that published since `since_ms`: only they can have
    /// written minutes from then on (an instance gone for longer than a
    /// window holds nothing in it, and is not read).
    async fn instances_since(&self, since_ms: i64) -> Result<Vec<String>, MirrorError> {
        let mut conn = self.conn.clone();
        let all: Vec<String> = self.read(self.instances().query_async(&mut conn)).await?;
        if all.is_empty() {
            return Ok(all);
        }
        let mut pipe = redis::pipe();
        for name in &all {
            pipe.cmd("HGET")
                .arg(format!("{}figures:{name}", self.prefix))
                .arg("updated_ms");
        }
        let updated: Vec<Option<i64>> = self.read(pipe.query_async(&mut conn)).await?;
        Ok(all
            .into_iter()
            .zip(updated)
            .filter(|(_, at)| at.is_some_and(|at| at >= since_ms))
            .map(|(name, _)| name)
            .collect())
    }

    /// The deployment's built-in windows ending at `now_ms`.
    pub async fn deployment_windows(&self, now_ms: i64) -> Result<DeploymentWindows, MirrorError> {
        if !self.is_up() {
            return Err(MirrorError::Down);
        }
        let now_minute = now_ms.div_euclid(MS_PER_MINUTE);
        let instances = self
            .instances_since(written_since(now_minute, PAGE_WINDOW_MINUTES))
            .await?;
        let active: Vec<i64> = (now_minute - (ACTIVE_WINDOW_MINUTES - 1)..=now_minute).collect();
        let mut pipe = redis::pipe();
        for set in [SharedSet::MinuteUsers, SharedSet::MinuteSessions] {
            let sets: Vec<SharedSet> = active.iter().map(|m| set(*m)).collect();
            self.count_union(&mut pipe, &sets);
        }
        for minute in now_minute - (PAGE_WINDOW_MINUTES - 1)..=now_minute {
            for instance in &instances {
                pipe.cmd("HGETALL")
                    .arg(format!("{}winp:{minute}:{instance}", self.prefix));
            }
        }
        let mut conn = self.conn.clone();
        let answers: Vec<Value> = self.read(pipe.query_async(&mut conn)).await?;
        let mut answers = answers.into_iter();
        let (users, users_exact) = union_count(answers.next())?;
        let (sessions, sessions_exact) = union_count(answers.next())?;
        let mut pages: BTreeMap<String, u64> = BTreeMap::new();
        for value in answers {
            let hash: BTreeMap<String, u64> = redis::from_redis_value(value)
                .map_err(|_| MirrorError::Redis("unexpected answer to HGETALL winp".into()))?;
            for (page, views) in hash {
                *pages.entry(page).or_default() += views;
            }
        }
        Ok(DeploymentWindows {
            windows: Windows::of(users, sessions, pages),
            exact: users_exact && sessions_exact,
        })
    }

    /// The deployment's groups of `window` ending at `now_ms`, ranked as
    /// [`analytics::custom_window`] ranks one instance's.
    pub async fn deployment_window(
        &self,
        window: &WindowConfig,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<WindowGroup>, MirrorError> {
        if !self.is_up() {
            return Err(MirrorError::Down);
        }
        let now_minute = now_ms.div_euclid(MS_PER_MINUTE);
        let instances = self
            .instances_since(written_since(now_minute, i64::from(window.minutes)))
            .await?;
        let mut pipe = redis::pipe();
        for minute in now_minute - i64::from(window.minutes) + 1..=now_minute {
            for instance in &instances {
                pipe.cmd("HGETALL").arg(format!(
                    "{}winw:{}:{minute}:{instance}",
                    self.prefix, window.name
                ));
            }
        }
        let mut conn = self.conn.clone();
        let hashes: Vec<BTreeMap<String, String>> = self.read(pipe.query_async(&mut conn)).await?;
        let mut groups = GroupTotals::new();
        for (group, cell) in hashes.into_iter().flatten() {
            let (count, sum) = cell
                .split_once(':')
                .and_then(|(c, s)| Some((c.parse::<u64>().ok()?, s.parse::<i128>().ok()?)))
                .ok_or_else(|| MirrorError::Redis(format!("malformed window cell `{cell}`")))?;
            analytics::add_group(&mut groups, group, sum, count);
        }
        Ok(analytics::rank_groups(groups, window.sum.is_some(), limit))
    }
}

/// Since when an instance must have published to hold minutes of a window
/// of `minutes` ending with `now_minute`: a minute before it starts, less
/// the clock skew an event may have (an instance writes minutes up to
/// that far ahead of its own time).
fn written_since(now_minute: i64, minutes: i64) -> i64 {
    (now_minute - minutes - SKEW_MINUTES - 1) * MS_PER_MINUTE
}

/// How many minutes back (this one included) the longest window reaches.
fn longest(windows: &[WindowConfig]) -> i64 {
    windows
        .iter()
        .map(|w| i64::from(w.minutes))
        .chain([PAGE_WINDOW_MINUTES])
        .max()
        .unwrap_or(PAGE_WINDOW_MINUTES)
}
