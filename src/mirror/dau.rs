//! The deployment's daily active users: every instance adds the users of
//! the batches it processed to one set and one HyperLogLog per day, so
//! that `/stats/dau` counts a user who reached several instances once.
//!
//! The sets are `sets.rs`'s `dau:{day}` and `dauh:{day}`. A round shares
//! the users it noted before it publishes the cursor that covers their
//! events (`Mirror::maintain`), so an instance that dies leaves unshared
//! only users of events after its published cursor: the instance that
//! takes its queue over shares those before it records them delivered.
//! Users never added (a pending list that outgrew `backlog_max_keys` while
//! Redis was down, or a Redis that lost its data) are covered by a
//! *heal*: each instance re-adds
//! every user of the last `shared_days` days from its own store at
//! start, when its pending list overflowed, and when its heal mark is gone
//! from Redis (a FLUSHALL, a Redis restarted without persistence).
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P dau:{day}`, `P over:dau:{day}`, `P dauh:{day}` | set, string, HyperLogLog | the day's users (`sets.rs`) |
//! | `P dau:healed:{instance}` | string | this instance's users are all in |
//!
//! Every one of them expires `shared_days` + 1 days after its last
//! write.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;

use super::sets::{SharedSet, union_count};
use super::{Mirror, MirrorError};
use crate::analytics::day_of;
use crate::event::now_ms;
use crate::storage::BatchAck;

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
    /// Adds to `members` the users of a processed batch by the day of
    /// their event, and by that day and the event's type (trends of one
    /// type). Days older than `shared_days` are not shared.
    pub(super) fn day_members<'a>(
        &self,
        ack: &'a BatchAck,
        members: &mut BTreeMap<SharedSet, BTreeSet<&'a str>>,
    ) {
        let today = day_of(now_ms());
        // Keyed by the type's text first: a set's key owns its type, made
        // once per set, not once per event.
        let mut day_types: BTreeMap<(i32, &str), BTreeSet<&str>> = BTreeMap::new();
        for facts in ack.processed.iter().filter_map(|(_, f)| f.as_ref()) {
            let Some(user) = facts.user_id.as_deref() else {
                continue;
            };
            let day = day_of(facts.occurred_at_ms);
            if day > today - self.shared_days && day <= today + 1 {
                members
                    .entry(SharedSet::DayUsers(day))
                    .or_default()
                    .insert(user);
                day_types
                    .entry((day, facts.event_type.as_str()))
                    .or_default()
                    .insert(user);
            }
        }
        for ((day, t), users) in day_types {
            let set = SharedSet::DayTypeUsers(day, t.to_owned());
            members.entry(set).or_default().extend(users);
        }
    }

    /// Notes every user of a committed batch for the cohorts, whatever the
    /// event's day (an old event may move a user's cohort back): the round
    /// reads their first days from the store.
    pub(super) fn note_first_days_of(&self, ack: &BatchAck) {
        let users = ack
            .processed
            .iter()
            .filter_map(|(_, f)| f.as_ref()?.user_id.as_deref());
        if self.note_first_days(users) > self.backlog_max {
            // The cohorts' heal offers every user again.
            self.forget_first_days();
            self.cohorts_heal_due.store(true, Ordering::Relaxed);
        }
    }

    /// Heals the deployment's DAU with every user this instance saw in the
    /// last `shared_days` days, read a day at a time by `users_of`, by
    /// event type (so that one day's users are in memory at once), then
    /// sets the mark,
    /// when a heal is due or the mark is gone (a Redis that lost it lost
    /// the users too). A heal that fails is due again. Called from its own
    /// task: one check and one heal at a time.
    pub async fn heal_dau<F, Fut, E>(&self, mut users_of: F)
    where
        F: FnMut(i32) -> Fut,
        Fut: std::future::Future<Output = Result<BTreeMap<String, BTreeSet<String>>, E>>,
        E: std::fmt::Display,
    {
        if !self.heal_wanted(&self.heal_due, "dau").await {
            return;
        }
        let today = day_of(now_ms());
        for day in today - (self.shared_days - 1)..=today + 1 {
            let by_type = match users_of(day).await {
                Ok(by_type) => by_type,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the users to share with redis failed");
                    self.heal_due.store(true, Ordering::Relaxed);
                    return;
                }
            };
            let all: BTreeSet<String> = by_type.values().flatten().cloned().collect();
            let mut sets: BTreeMap<SharedSet, BTreeSet<String>> = by_type
                .into_iter()
                .map(|(t, users)| (SharedSet::DayTypeUsers(day, t), users))
                .collect();
            sets.insert(SharedSet::DayUsers(day), all);
            if self.add_members(&sets).await.is_err() {
                self.heal_due.store(true, Ordering::Relaxed);
                return;
            }
        }
        if !self.healed(&self.heal_due, "dau", self.day_keep_ms()).await {
            return;
        }
        self.counters.dau_heals.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            days = self.shared_days,
            "added this instance's recent users to the deployment's daily active users"
        );
    }

    /// The deployment's distinct users in each period (first and last
    /// day, within the days shared), with an event of
    /// `event_type` (any: `None`), and whether each count is exact.
    pub async fn deployment_period_users(
        &self,
        periods: &[(i32, i32)],
        event_type: Option<&str>,
    ) -> Result<Vec<(u64, bool)>, MirrorError> {
        if !self.is_up() {
            return Err(MirrorError::Down);
        }
        if periods.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for (start, end) in periods {
            let sets: Vec<SharedSet> = (*start..=*end)
                .map(|day| match event_type {
                    Some(t) => SharedSet::DayTypeUsers(day, t.to_owned()),
                    None => SharedSet::DayUsers(day),
                })
                .collect();
            self.count_union(&mut pipe, &sets);
        }
        let mut conn = self.conn.clone();
        let answers: Vec<redis::Value> = self.read(pipe.query_async(&mut conn)).await?;
        let mut answers = answers.into_iter();
        periods
            .iter()
            .map(|_| union_count(answers.next()))
            .collect()
    }

    /// The deployment's distinct users on each day of `from..=to` (a range
    /// within the days shared).
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
            let keys = SharedSet::DayUsers(day).keys(&self.prefix);
            pipe.cmd("EXISTS")
                .arg(keys.over)
                .cmd("SCARD")
                .arg(keys.set)
                .cmd("PFCOUNT")
                .arg(keys.hll);
        }
        let mut conn = self.conn.clone();
        // Three integers a day: over (0 or 1), the set's size, the estimate.
        let answers: Vec<u64> = self.read(pipe.query_async(&mut conn)).await?;
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
