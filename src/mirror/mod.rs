//! The Redis mirror: what the instances of one deployment share. The only
//! module that imports `redis`.
//!
//! # What is shared, and what stays local
//!
//! Each instance's sled store stays the truth for what it accepted: its
//! WAL, its processing, its DLQ and its analytics. Redis adds:
//!
//! - **Idempotency keys.** Before a group commit, the Deduper claims the
//!   group's keys in one Lua call. A key another instance holds is a
//!   duplicate; a key this instance holds is left to the local index,
//!   which stays authoritative for its own keys.
//! - **Daily active users**, one set (a HyperLogLog past `dau_exact_max`)
//!   per day that every instance adds its processed users to
//!   (`dau.rs`, `sets.rs`).
//! - **Cohorts**: each user's first day over the deployment, for
//!   `/stats/retention` (`retention.rs`).
//! - **Rolling windows**: active users and sessions in sets per minute,
//!   page views and `[[windows]]` groups per instance and minute
//!   (`windows.rs`).
//! - **Figures.** Every `publish_interval_ms` each instance writes its
//!   processed counts per event type, all time and per day for the last
//!   `shared_days` days, with the days' `sum_fields` sums, absolute
//!   rather than as deltas, so a write repeated or lost changes nothing
//!   once the next one lands. `/stats/summary`, `/stats/top-events` and
//!   `/stats/trends` add them up across instances (trends' users from the
//!   day sets of `dau.rs`).
//! - **Handoff.** Each group commit's events are mirrored to the
//!   instance's stream before it answers; when an instance stops beating,
//!   a live one delivers what it left and adds it to its figures
//!   (`handoff.rs`).
//!
//! # Keys (`P` is `key_prefix`)
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P idem:{source}:{key}` | string | `p:{ms}:{instance}` while claimed by a commit in flight (expires after `claim_lease_ms`); `c:{ms}:{instance}` once accepted, `ms` the first receipt (expires with the idempotency window) |
//! | `P instances` | set | every instance that published figures |
//! | `P figures:{instance}` | hash | `type:{event_type}` → processed count; `updated_ms`; `cursor`, the last seq counted (`handoff.rs`) |
//! | `P dau:{day}`, `P dauh:{day}`, … | set, HyperLogLog | the deployment's users of a day (`dau.rs`) |
//! | `P winu:{minute}`, `P winp:{minute}:{instance}`, … | set, hash, … | the rolling windows (`windows.rs`) |
//! | `P first`, `P cohort:{day}` | hash, set | each user's first day over the deployment, and the cohorts (`retention.rs`) |
//! | `P days:{instance}` | hash | `{day}:{event_type}` → processed count that day (days since 1970-01-01), for the last `shared_days` days |
//! | `P sums:{instance}` | hash | `{day}:{length}:{field}{event_type}` → `{sum}:{events with a number}` of a `sum_fields` field that day (sum in millionths), same days |
//! | `P wal:{instance}`, `P alive:{instance}`, `P owner:{instance}` | stream, string, string | the queue mirrored for takeover, the heartbeat, a taker's lock (`handoff.rs`) |
//!
//! # A claim, step by step
//!
//! 1. Claim: `SET key p:… NX PX claim_lease_ms` for every key of the
//!    group, in one script. A key already set answers its value.
//! 2. The group commits to sled, as without Redis.
//! 3. Confirm: every key the group stored (or found in the local index)
//!    becomes `c:…` with the rest of its window, in one pipeline, before
//!    any request of the group is answered: once a client holds a 202,
//!    every other instance answers a retry as a duplicate.
//! 4. A commit that failed deletes its `p:` claims.
//!
//! The claim of the next group runs while this group is flushed (the
//! Deduper), so of the two round trips only the confirm adds to a group's
//! time.
//!
//! Another instance that meets a `p:` claim answers "in progress" (409,
//! retry): the first commit may yet fail, and a duplicate answer would
//! then lose the event. A crash between steps 1 and 3 leaves the claim to
//! expire after `claim_lease_ms`; from then on only the local index of the
//! instance that crashed knows those keys (at most one group's worth).
//!
//! # When Redis is unreachable
//!
//! No Redis call waits longer than `timeout_ms`. The first that fails marks
//! Redis down (logged once). A bulk write (the users a round shares, a
//! heal) that only ran past the timeout is the exception: it alone is
//! tried again at the next round, and intake goes on claiming in Redis,
//! whose small calls may well answer in time. Once Redis is marked down,
//! claims are skipped (dedupe is
//! local only, counted in `inletd_redis_fail_open_total`) and the keys
//! accepted go to a bounded backlog. A background task probes Redis every
//! `publish_interval_ms`; once it answers, the backlog is written and the
//! figures published again. Intake is never refused because of Redis.

mod dau;
mod handoff;
mod retention;
mod sets;
mod stream;
mod windows;

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::Serialize;

pub use dau::DeploymentDay;
pub use handoff::{Orphan, Taken, TakenCounts};
pub use stream::StreamWriter;
pub use windows::DeploymentWindows;

use crate::analytics::{DayFigures, DayTypeSum};
use crate::config::{RedisConfig, redacted_redis_url};
use crate::event::{WalRecord, now_ms};
use crate::storage::Counted;

/// Why a Redis call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MirrorError {
    /// The URL could not be used.
    #[error("redis url `{url}`: {reason}")]
    Url { url: String, reason: String },
    /// Redis answered with an error, or the connection failed.
    #[error("redis: {0}")]
    Redis(String),
    /// Redis did not answer within `timeout_ms`.
    #[error("redis did not answer within {0} ms")]
    Timeout(u64),
    /// Redis is marked down; the call was not tried.
    #[error("redis is unreachable")]
    Down,
}

/// What Redis said of one key of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Claimed for this group now.
    New,
    /// This instance holds it: the local index decides.
    Ours,
    /// Another instance accepted it, first received at this time.
    Duplicate { first_seen_ms: i64 },
    /// Another instance's commit holds it and has not answered yet.
    InProgress,
    /// Redis was not asked (unreachable): the local index decides.
    Unchecked,
}

impl Claim {
    /// The local index decides: no other instance holds the key (or Redis
    /// was not asked).
    pub fn is_local(&self) -> bool {
        matches!(self, Claim::New | Claim::Ours | Claim::Unchecked)
    }
}

/// A key to confirm: it was accepted at `first_seen_ms`.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// The Redis key.
    pub key: String,
    /// When it was first received (its window runs from then).
    pub first_seen_ms: i64,
}

/// The deployment's figures: every instance's processed counts, summed.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Deployment {
    /// Processed events per event type, over every instance.
    pub by_type: BTreeMap<String, u64>,
    /// Each instance: its total and when it last published.
    pub instances: Vec<InstanceFigures>,
}

/// One instance's published figures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InstanceFigures {
    /// Its `instance` name.
    pub name: String,
    /// Events it processed.
    pub total_events: u64,
    /// When it last published (ms since epoch).
    pub updated_ms: i64,
}

/// Redis as `/health` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct MirrorHealth {
    /// `up`, or `down` while unreachable.
    pub state: &'static str,
    /// The URL, password hidden.
    pub url: String,
    /// This instance's name.
    pub instance: String,
    /// Since when it is in this state (ms since epoch).
    pub since_ms: i64,
    /// The last error, while down.
    pub last_error: Option<String>,
    /// Keys accepted while Redis was down, not yet written to it.
    pub backlog: usize,
    /// Whether Redis keeps its data over a restart (`appendonly`); `None`
    /// until read, or where `CONFIG` is disabled. Without it a restart of
    /// Redis forgets the queues mirrored for takeover (each instance's
    /// store still holds its own).
    pub persistent: Option<bool>,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
struct Counters {
    /// Events deduped locally only because Redis was unreachable.
    fail_open: AtomicU64,
    /// Events answered "in progress" (another instance's commit held the key).
    in_progress: AtomicU64,
    /// Duplicates caught in Redis (held by another instance).
    shared_duplicates: AtomicU64,
    /// Times Redis went from up to down.
    outages: AtomicU64,
    /// Backlog keys dropped because the backlog was full.
    backlog_dropped: AtomicU64,
    /// Heals of the deployment's DAU completed (see `dau.rs`).
    dau_heals: AtomicU64,
    /// Heals of the deployment's rolling windows completed (`windows.rs`).
    window_heals: AtomicU64,
    /// Group commits not mirrored to this instance's stream (see
    /// `handoff.rs`).
    unmirrored: AtomicU64,
    /// Groups not mirrored because the stream's top was above them (logged
    /// once).
    stream_ahead: AtomicU64,
    /// Stream entries taken over that did not decode.
    undecodable: AtomicU64,
    /// Takeovers begun (a takeover that paused and resumes counts again).
    takeovers: AtomicU64,
    /// Events of orphans this instance delivered and counted.
    taken_events: AtomicU64,
}

/// The connection to the deployment's Redis and what is known of it.
pub struct Mirror {
    /// Reconnects by itself; each call is bounded by `timeout`.
    conn: ConnectionManager,
    /// The URL with the password hidden, for logs and /health.
    shown_url: String,
    /// `key_prefix`.
    prefix: String,
    /// This instance's name, in claims and figures.
    instance: String,
    /// `timeout_ms`.
    timeout: Duration,
    /// `claim_lease_ms`.
    lease_ms: u64,
    /// `takeover_after_ms`: this instance's heartbeat lasts this long, and
    /// a lock on an orphan until its next chunk.
    takeover_after_ms: u64,
    /// `backlog_max_keys`.
    backlog_max: usize,
    /// Redis answered the last call.
    up: AtomicBool,
    /// When `up` last changed.
    since_ms: AtomicI64,
    /// Why the last call failed.
    last_error: Mutex<Option<String>>,
    /// A bulk write (members, heals) ran past the timeout and none has
    /// finished since: said once, not every round.
    bulk_slow: AtomicBool,
    /// Keys accepted while Redis was down, oldest first.
    backlog: Mutex<VecDeque<Accepted>>,
    /// `dau_exact_max`.
    dau_exact_max: u64,
    /// `shared_days`.
    shared_days: i32,
    /// This instance's store (`Storage::store_id`), published with its
    /// figures: a takeover's cursor is trusted only by the same store.
    store_id: AtomicU64,
    /// `appendonly` as Redis last answered it (0 unknown, 1 no, 2 yes).
    persistent: std::sync::atomic::AtomicU8,
    /// Users and sessions of processed batches not yet added to the
    /// deployment's sets (`sets.rs`).
    pending: Mutex<sets::Pending>,
    /// The deployment's DAU needs all of this instance's recent users
    /// (at start, after `pending` overflowed, or when Redis lost them).
    heal_due: AtomicBool,
    /// Minutes whose page views or window groups changed since the last
    /// round (`windows.rs`).
    dirty_minutes: Mutex<std::collections::BTreeSet<i64>>,
    /// The deployment's windows need all of this instance's (as
    /// `heal_due`).
    windows_heal_due: AtomicBool,
    /// Users whose first day the next round offers for the deployment's
    /// cohorts (`retention.rs`).
    first_due: Mutex<std::collections::BTreeSet<String>>,
    /// The deployment's cohorts need every user of this store (at start,
    /// or when Redis lost them).
    cohorts_heal_due: AtomicBool,
    /// For `/metrics`.
    counters: Counters,
}

/// The field of a day's sum in `sums:{instance}`: `{day}:{length of
/// field}:{field}{event type}` (a field or a type may hold `:`).
fn sum_field(day: i32, field: &str, event_type: &str) -> String {
    format!("{day}:{}:{field}{event_type}", field.len())
}

/// The day, field and event type of a [`sum_field`].
fn parse_sum_field(key: &str) -> Option<(i32, &str, &str)> {
    let (day, rest) = key.split_once(':')?;
    let (len, rest) = rest.split_once(':')?;
    let len: usize = len.parse().ok()?;
    let field = rest.get(..len)?;
    Some((day.parse().ok()?, field, rest.get(len..)?))
}

/// Claims every key (`KEYS`) for `ARGV[1]` for `ARGV[2]` ms unless held;
/// answers "" for a key claimed now, else the value that holds it.
const CLAIM: &str = r"
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('SET', key, ARGV[1], 'NX', 'PX', ARGV[2]) then
    out[i] = ''
  else
    out[i] = redis.call('GET', key) or ''
  end
end
return out
";

/// Deletes every key (`KEYS`) that still holds `ARGV[1]`.
const RELEASE: &str = r"
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then redis.call('DEL', key) end
end
return 0
";

/// A connection to the Redis at `url` that reconnects by itself, each call
/// bounded by `timeout`; it connects on first use.
fn connection(url: &str, timeout: Duration) -> Result<ConnectionManager, MirrorError> {
    if url.starts_with("rediss://") {
        // rustls needs its crypto chosen once per process; a second
        // install (another TLS user got there first) is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    let url_error = |e: redis::RedisError| MirrorError::Url {
        url: redacted_redis_url(url),
        reason: e.to_string(),
    };
    let client = redis::Client::open(url).map_err(url_error)?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_secs(1));
    ConnectionManager::new_lazy_with_config(client, config).map_err(url_error)
}

impl Mirror {
    /// A mirror for `config`; it connects on first use, so a Redis that is
    /// down at start delays nothing.
    pub fn connect(config: &RedisConfig) -> Result<Arc<Mirror>, MirrorError> {
        let timeout = Duration::from_millis(config.timeout_ms);
        Ok(Arc::new(Mirror {
            conn: connection(&config.url, timeout)?,
            shown_url: redacted_redis_url(&config.url),
            prefix: config.key_prefix.clone(),
            instance: config.instance_name(),
            timeout,
            lease_ms: config.claim_lease_ms,
            takeover_after_ms: config.takeover_after_ms,
            backlog_max: config.backlog_max_keys,
            up: AtomicBool::new(true),
            since_ms: AtomicI64::new(now_ms()),
            last_error: Mutex::new(None),
            bulk_slow: AtomicBool::new(false),
            backlog: Mutex::new(VecDeque::new()),
            dau_exact_max: config.dau_exact_max,
            shared_days: i32::try_from(config.shared_days).unwrap_or(31),
            persistent: std::sync::atomic::AtomicU8::new(0),
            store_id: AtomicU64::new(0),
            pending: Mutex::new(sets::Pending::default()),
            heal_due: AtomicBool::new(true),
            dirty_minutes: Mutex::new(std::collections::BTreeSet::new()),
            windows_heal_due: AtomicBool::new(true),
            first_due: Mutex::new(std::collections::BTreeSet::new()),
            cohorts_heal_due: AtomicBool::new(true),
            counters: Counters::default(),
        }))
    }

    /// This instance's name.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// How many days back (today included) instances share their counts
    /// and users (`shared_days`): a range inside them answers for the
    /// deployment.
    pub fn shared_days(&self) -> i32 {
        self.shared_days
    }

    /// The first of the days shared.
    pub fn first_shared_day(&self) -> i32 {
        crate::analytics::day_of(now_ms()) - (self.shared_days - 1)
    }

    /// How long a shared day's keys live after their last write.
    fn day_keep_ms(&self) -> i64 {
        (i64::from(self.shared_days) + 1) * 86_400_000
    }

    /// The Redis key of an idempotency key of `source`.
    pub fn idempotency_key(&self, source: &str, key: &str) -> String {
        format!("{}idem:{source}:{key}", self.prefix)
    }

    /// Redis answered the last call.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Claims a group's keys (see the module docs). While Redis is down, or
    /// when this call fails, every key is [`Claim::Unchecked`].
    pub async fn claim(&self, keys: &[String], now_ms: i64) -> Vec<Claim> {
        let unchecked = || {
            self.counters
                .fail_open
                .fetch_add(keys.len() as u64, Ordering::Relaxed);
            vec![Claim::Unchecked; keys.len()]
        };
        if keys.is_empty() {
            return Vec::new();
        }
        if !self.is_up() {
            return unchecked();
        }
        let pending = format!("p:{now_ms}:{}", self.instance);
        let script = redis::Script::new(CLAIM);
        let mut invocation = script.prepare_invoke();
        for key in keys {
            invocation.key(key);
        }
        invocation.arg(&pending).arg(self.lease_ms);
        let mut conn = self.conn.clone();
        let held = self
            .call(invocation.invoke_async::<Vec<String>>(&mut conn))
            .await;
        let held = match held {
            Ok(held) if held.len() == keys.len() => held,
            Ok(held) => {
                self.went_down(format!(
                    "the claim script answered {} values for {} keys",
                    held.len(),
                    keys.len()
                ));
                return unchecked();
            }
            Err(_) => return unchecked(),
        };
        let claims: Vec<Claim> = held.iter().map(|v| self.read_claim(v)).collect();
        let duplicates = claims
            .iter()
            .filter(|c| matches!(c, Claim::Duplicate { .. }))
            .count();
        let in_progress = claims.iter().filter(|c| **c == Claim::InProgress).count();
        self.counters
            .shared_duplicates
            .fetch_add(duplicates as u64, Ordering::Relaxed);
        self.counters
            .in_progress
            .fetch_add(in_progress as u64, Ordering::Relaxed);
        claims
    }

    /// What a claim's answer means for this instance.
    fn read_claim(&self, held: &str) -> Claim {
        if held.is_empty() {
            return Claim::New;
        }
        // `{p|c}:{ms}:{instance}`; anything else was not written by inletd
        // and is taken as another instance's accepted key.
        let mut parts = held.splitn(3, ':');
        let (kind, ms, instance) = (parts.next(), parts.next(), parts.next());
        let first_seen_ms = ms.and_then(|m| m.parse().ok()).unwrap_or(0);
        match (kind, instance) {
            (_, Some(i)) if i == self.instance => Claim::Ours,
            (Some("p"), _) => Claim::InProgress,
            _ => Claim::Duplicate { first_seen_ms },
        }
    }

    /// Marks accepted keys as this instance's for the rest of their window
    /// (`ttl_ms` from `first_seen_ms`), and mirrors the group's accepted
    /// events to this instance's stream (`handoff.rs`), in one pipeline.
    /// While Redis is down, or when this fails, the keys wait in the
    /// backlog; the group is not mirrored (counted).
    pub async fn confirm(&self, keys: Vec<Accepted>, group: &[(u64, &WalRecord)], ttl_ms: i64) {
        if keys.is_empty() && group.is_empty() {
            return;
        }
        let written = self.is_up() && self.write_confirmed(&keys, group, ttl_ms).await.is_ok();
        if !written {
            if !group.is_empty() {
                self.counters.unmirrored.fetch_add(1, Ordering::Relaxed);
            }
            self.keep(keys);
        }
    }

    async fn write_confirmed(
        &self,
        keys: &[Accepted],
        group: &[(u64, &WalRecord)],
        ttl_ms: i64,
    ) -> Result<(), MirrorError> {
        let now = now_ms();
        let mut pipe = redis::pipe();
        let mut any = false;
        for a in keys {
            let left = a.first_seen_ms.saturating_add(ttl_ms).saturating_sub(now);
            if left > 0 {
                any = true;
                let value = format!("c:{}:{}", a.first_seen_ms, self.instance);
                pipe.cmd("SET")
                    .arg(&a.key)
                    .arg(value)
                    .arg("PX")
                    .arg(left)
                    .ignore();
            }
        }
        let appending = self.append_group(&mut pipe, group);
        if !any && !appending {
            // Every key's window is over: nothing to keep (and redis refuses
            // an empty pipeline).
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let appended: Vec<i64> = self.call(pipe.query_async(&mut conn)).await?;
        if let Some(added) = appended.first() {
            self.appended(*added);
        }
        Ok(())
    }

    /// Keeps keys for a Redis that comes back, dropping the oldest past
    /// `backlog_max_keys`.
    fn keep(&self, keys: Vec<Accepted>) {
        let mut backlog = self.backlog.lock().unwrap_or_else(|p| p.into_inner());
        backlog.extend(keys);
        let over = backlog.len().saturating_sub(self.backlog_max);
        if over > 0 {
            backlog.drain(..over);
            self.counters
                .backlog_dropped
                .fetch_add(over as u64, Ordering::Relaxed);
        }
    }

    /// Frees the claims of a group whose commit failed, so that its retry
    /// is not answered "in progress" elsewhere.
    pub async fn release(&self, keys: &[String], claimed_ms: i64) {
        if keys.is_empty() || !self.is_up() {
            return;
        }
        let script = redis::Script::new(RELEASE);
        let mut invocation = script.prepare_invoke();
        for key in keys {
            invocation.key(key);
        }
        invocation.arg(format!("p:{claimed_ms}:{}", self.instance));
        let mut conn = self.conn.clone();
        let _ = self.call(invocation.invoke_async::<i64>(&mut conn)).await;
    }

    /// Whether a heal (`dau.rs`, `windows.rs`, `retention.rs`) should run
    /// now: it is `due` (the flag is cleared), or Redis lost its mark
    /// `{name}:healed:{instance}` (a FLUSHALL, a restart without
    /// persistence), so lost what it writes too.
    async fn heal_wanted(&self, due: &AtomicBool, name: &str) -> bool {
        if !self.is_up() {
            return false;
        }
        if due.swap(false, Ordering::Relaxed) {
            return true;
        }
        let mut conn = self.conn.clone();
        let there: Result<bool, _> = self
            .call(
                redis::cmd("EXISTS")
                    .arg(self.heal_mark(name))
                    .query_async(&mut conn),
            )
            .await;
        matches!(there, Ok(false))
    }

    /// Sets the mark of a heal that wrote everything, for `keep_ms`;
    /// whether it was set (if not, the heal is `due` again).
    async fn healed(&self, due: &AtomicBool, name: &str, keep_ms: i64) -> bool {
        let mut set = redis::cmd("SET");
        set.arg(self.heal_mark(name))
            .arg(now_ms())
            .arg("PX")
            .arg(keep_ms);
        let mut conn = self.conn.clone();
        let done = self.call(set.query_async::<()>(&mut conn)).await.is_ok();
        if !done {
            due.store(true, Ordering::Relaxed);
        }
        done
    }

    fn heal_mark(&self, name: &str) -> String {
        format!("{}{name}:healed:{}", self.prefix, self.instance)
    }

    /// The background task's round: probes a Redis that was down, beats,
    /// writes the backlog, adds the users and sessions noted since the
    /// last round to the deployment's sets, and then publishes this
    /// instance's processed counts and its cursor (the rolling windows'
    /// cells are [`Mirror::share_windows`], which reads the store).
    ///
    /// The members go first: the cursor is where another instance starts
    /// if this one stops beating, and it neither delivers nor counts the
    /// events up to it, so their users must already be shared when the
    /// cursor lands. `counted` was read after they were noted: the
    /// Processor notes a batch's members before its commit moves the
    /// cursor. A round that cannot share them publishes nothing.
    pub async fn maintain(&self, counted: &Counted, ttl_ms: i64) {
        if !self.is_up() {
            let mut conn = self.conn.clone();
            let ping = redis::cmd("PING");
            if self
                .call_probe(ping.query_async::<String>(&mut conn))
                .await
                .is_err()
            {
                return;
            }
        }
        // The heartbeat first, alone: the backlog and the members may take
        // a while.
        if self.heartbeat().await.is_err() {
            return;
        }
        self.write_backlog(ttl_ms).await;
        if self.share_members().await.is_ok() && self.publish(counted).await.is_ok() {
            self.read_persistence().await;
        }
    }

    /// Reads `appendonly` once Redis answers (and again after an outage:
    /// it may have been restarted with another config); warns when Redis
    /// does not persist.
    async fn read_persistence(&self) {
        if self.persistent.load(Ordering::Relaxed) != 0 {
            return;
        }
        let mut conn = self.conn.clone();
        let answer: Result<Vec<String>, _> = self
            .bounded(
                redis::cmd("CONFIG")
                    .arg("GET")
                    .arg("appendonly")
                    .query_async(&mut conn),
            )
            .await;
        let Ok(answer) = answer else {
            // CONFIG may be disabled or renamed: unknown, not down.
            return;
        };
        let yes = answer.get(1).is_some_and(|v| v == "yes");
        self.persistent
            .store(if yes { 2 } else { 1 }, Ordering::Relaxed);
        if !yes {
            tracing::warn!(url = %self.shown_url,
                "redis does not persist (appendonly no): if it restarts, the queues mirrored \
                 for takeover are forgotten (each instance's store still holds its own)");
        }
    }

    async fn write_backlog(&self, ttl_ms: i64) {
        loop {
            let chunk: Vec<Accepted> = {
                let mut backlog = self.backlog.lock().unwrap_or_else(|p| p.into_inner());
                let n = backlog.len().min(1000);
                backlog.drain(..n).collect()
            };
            if chunk.is_empty() {
                return;
            }
            if self.write_confirmed(&chunk, &[], ttl_ms).await.is_err() {
                // Back to the front, in order: the next round tries again.
                let mut backlog = self.backlog.lock().unwrap_or_else(|p| p.into_inner());
                for a in chunk.into_iter().rev() {
                    backlog.push_front(a);
                }
                return;
            }
        }
    }

    /// Writes this instance's processed counts, whole, with the cursor they
    /// count up to and its heartbeat, in one transaction.
    async fn publish(&self, counted: &Counted) -> Result<(), MirrorError> {
        let totals = format!("{}figures:{}", self.prefix, self.instance);
        let days = format!("{}days:{}", self.prefix, self.instance);
        let mut fields: Vec<(String, String)> = counted
            .by_type
            .iter()
            .map(|(t, n)| (format!("type:{t}"), n.to_string()))
            .collect();
        fields.push(("updated_ms".into(), now_ms().to_string()));
        fields.push(("cursor".into(), counted.cursor.to_string()));
        fields.push((
            "store".into(),
            self.store_id.load(Ordering::Relaxed).to_string(),
        ));
        let day_fields: Vec<(String, String)> = counted
            .days
            .counts
            .iter()
            .map(|(day, t, n)| (format!("{day}:{t}"), n.to_string()))
            .collect();
        let sums = format!("{}sums:{}", self.prefix, self.instance);
        let sum_fields: Vec<(String, String)> = counted
            .days
            .sums
            .iter()
            .map(|s| {
                (
                    sum_field(s.day, &s.field, &s.event_type),
                    format!("{}:{}", s.sum, s.present),
                )
            })
            .collect();
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("DEL")
            .arg(&totals)
            .arg(&days)
            .arg(&sums)
            .ignore()
            .cmd("HSET")
            .arg(&totals)
            .arg(fields)
            .ignore();
        if !day_fields.is_empty() {
            pipe.cmd("HSET").arg(&days).arg(day_fields).ignore();
        }
        if !sum_fields.is_empty() {
            pipe.cmd("HSET").arg(&sums).arg(sum_fields).ignore();
        }
        pipe.cmd("SADD")
            .arg(format!("{}instances", self.prefix))
            .arg(&self.instance)
            .ignore();
        self.beat(&mut pipe, counted.cursor);
        let mut conn = self.conn.clone();
        self.call(pipe.query_async::<()>(&mut conn)).await
    }

    /// The other instances' names.
    async fn others(&self) -> Result<Vec<String>, MirrorError> {
        if !self.is_up() {
            return Err(MirrorError::Down);
        }
        let mut conn = self.conn.clone();
        let names: Vec<String> = self.call(self.instances().query_async(&mut conn)).await?;
        Ok(names.into_iter().filter(|n| *n != self.instance).collect())
    }

    /// Lists every instance that ever published.
    fn instances(&self) -> redis::Cmd {
        let mut cmd = redis::cmd("SMEMBERS");
        cmd.arg(format!("{}instances", self.prefix));
        cmd
    }

    /// One hash of each of `names`: `{prefix}{what}:{name}`.
    async fn hashes(
        &self,
        what: &str,
        names: &[String],
    ) -> Result<Vec<BTreeMap<String, String>>, MirrorError> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for name in names {
            pipe.cmd("HGETALL")
                .arg(format!("{}{what}:{name}", self.prefix));
        }
        let mut conn = self.conn.clone();
        self.read(pipe.query_async(&mut conn)).await
    }

    /// The processed counts (and, when `sums`, the sums) of the days
    /// `from..=to` over the deployment: this instance's `own` (current),
    /// the others' as last published. The range must lie within the last
    /// [`Mirror::shared_days`].
    pub async fn deployment_days(
        &self,
        own: DayFigures,
        from: i32,
        to: i32,
        sums: bool,
    ) -> Result<DayFigures, MirrorError> {
        let others = self.others().await?;
        let counts = self.hashes("days", &others).await?;
        let sum_hashes = match sums {
            true => self.hashes("sums", &others).await?,
            false => Vec::new(),
        };
        let mut days = own;
        let within = |day: &i32| (from..=to).contains(day);
        days.extend(DayFigures {
            counts: counts
                .iter()
                .flatten()
                .filter_map(|(key, value)| {
                    let (day, t) = key.split_once(':')?;
                    let day = day.parse().ok().filter(within)?;
                    Some((day, t.to_owned(), value.parse().unwrap_or(0)))
                })
                .collect(),
            sums: sum_hashes
                .iter()
                .flatten()
                .filter_map(|(key, value)| {
                    let (day, field, t) = parse_sum_field(key)?;
                    let (sum, present) = value.split_once(':')?;
                    Some(DayTypeSum {
                        day: Some(day).filter(within)?,
                        event_type: t.to_owned(),
                        field: field.to_owned(),
                        sum: sum.parse().ok()?,
                        present: present.parse().ok()?,
                    })
                })
                .collect(),
        });
        Ok(days)
    }

    /// Every instance's processed counts, summed: this instance's `own`
    /// counts (current), the others' as last published.
    pub async fn deployment(&self, own: &[(String, u64)]) -> Result<Deployment, MirrorError> {
        let others = self.others().await?;
        let hashes = self.hashes("figures", &others).await?;
        let mut deployment = Deployment::default();
        let mut add = |name: String, counts: &mut dyn Iterator<Item = (&str, u64)>, updated_ms| {
            let mut total = 0u64;
            for (event_type, n) in counts {
                total = total.saturating_add(n);
                let sum = deployment.by_type.entry(event_type.to_owned()).or_default();
                *sum = sum.saturating_add(n);
            }
            deployment.instances.push(InstanceFigures {
                name,
                total_events: total,
                updated_ms,
            });
        };
        add(
            self.instance.clone(),
            &mut own.iter().map(|(t, n)| (t.as_str(), *n)),
            now_ms(),
        );
        for (name, fields) in others.into_iter().zip(hashes) {
            let updated_ms = fields
                .get("updated_ms")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let mut counts = fields.iter().filter_map(|(field, value)| {
                Some((field.strip_prefix("type:")?, value.parse().unwrap_or(0)))
            });
            add(name, &mut counts, updated_ms);
        }
        deployment.instances.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(deployment)
    }

    /// For `/health`.
    pub fn health(&self) -> MirrorHealth {
        let up = self.is_up();
        MirrorHealth {
            state: if up { "up" } else { "down" },
            url: self.shown_url.clone(),
            instance: self.instance.clone(),
            since_ms: self.since_ms.load(Ordering::Relaxed),
            last_error: if up {
                None
            } else {
                self.last_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
            },
            backlog: self.backlog_len(),
            persistent: match self.persistent.load(Ordering::Relaxed) {
                1 => Some(false),
                2 => Some(true),
                _ => None,
            },
        }
    }

    fn backlog_len(&self) -> usize {
        self.backlog.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Appends the Redis metrics in the Prometheus text format.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        let c = &self.counters;
        let lines: [(&str, &str, &str, u64); 14] = [
            (
                "inletd_redis_up",
                "gauge",
                "1 while Redis answers, 0 while it is unreachable.",
                u64::from(self.is_up()),
            ),
            (
                "inletd_redis_backlog_keys",
                "gauge",
                "Keys accepted while Redis was unreachable, not yet written to it.",
                self.backlog_len() as u64,
            ),
            (
                "inletd_redis_fail_open_total",
                "counter",
                "Events deduplicated by this instance alone because Redis was unreachable.",
                c.fail_open.load(Ordering::Relaxed),
            ),
            (
                "inletd_redis_duplicates_total",
                "counter",
                "Duplicates found in Redis: another instance had accepted the key.",
                c.shared_duplicates.load(Ordering::Relaxed),
            ),
            (
                "inletd_redis_in_progress_total",
                "counter",
                "Events answered in progress: another instance's commit held the key.",
                c.in_progress.load(Ordering::Relaxed),
            ),
            (
                "inletd_redis_outages_total",
                "counter",
                "Times Redis became unreachable.",
                c.outages.load(Ordering::Relaxed),
            ),
            (
                "inletd_redis_backlog_dropped_total",
                "counter",
                "Backlog keys dropped because backlog_max_keys was reached.",
                c.backlog_dropped.load(Ordering::Relaxed),
            ),
            (
                "inletd_redis_pending_members",
                "gauge",
                "Users and sessions of processed batches not yet added to the deployment's sets (daily active users, active users and sessions by minute).",
                self.pending_members() as u64,
            ),
            (
                "inletd_redis_dau_heals_total",
                "counter",
                "Times this instance added all its users of the days shared (shared_days) to Redis again.",
                c.dau_heals.load(Ordering::Relaxed),
            ),
            (
                "inletd_redis_window_heals_total",
                "counter",
                "Times this instance wrote all its rolling windows to Redis again.",
                c.window_heals.load(Ordering::Relaxed),
            ),
            (
                "inletd_redis_unmirrored_groups_total",
                "counter",
                "Group commits not mirrored to this instance's stream for takeover (Redis unreachable, or the stream ahead of the store).",
                c.unmirrored.load(Ordering::Relaxed),
            ),
            (
                "inletd_redis_takeovers_total",
                "counter",
                "Takeovers begun: a stopped instance locked to deliver its queue (again after a takeover paused).",
                c.takeovers.load(Ordering::Relaxed),
            ),
            (
                "inletd_redis_taken_events_total",
                "counter",
                "Events of stopped instances this instance delivered and counted in their figures.",
                c.taken_events.load(Ordering::Relaxed),
            ),
            (
                "inletd_redis_taken_undecodable_total",
                "counter",
                "Stream entries taken over that did not decode, skipped.",
                c.undecodable.load(Ordering::Relaxed),
            ),
        ];
        for (name, kind, help, value) in lines {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
    }

    /// Runs one Redis call within the timeout; a failure marks Redis down.
    async fn call<T>(
        &self,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, MirrorError> {
        let result = self.bounded(call).await;
        if let Err(e) = &result {
            self.went_down(e.to_string());
        }
        result
    }

    /// Runs one bulk write (the members a round shares, a heal) within
    /// the timeout. A timeout is that write's alone, tried again at the
    /// next round: a pipeline of thousands of members on a busy Redis may
    /// take longer than a claim does, and marking Redis down for it would
    /// turn intake to local-only dedupe while Redis answers claims in
    /// time. Any other failure marks Redis down, as [`Mirror::call`] does.
    async fn call_bulk<T>(
        &self,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, MirrorError> {
        let result = self.bounded(call).await;
        match &result {
            Ok(_) => self.bulk_slow.store(false, Ordering::Relaxed),
            Err(e @ MirrorError::Timeout(_)) => {
                if !self.bulk_slow.swap(true, Ordering::Relaxed) {
                    tracing::warn!(url = %self.shown_url, error = %e,
                        "a bulk write to redis (users shared, or a heal) took too long; it is tried again, and intake keeps using redis");
                }
            }
            Err(e) => self.went_down(e.to_string()),
        }
        result
    }

    /// Runs one read for a `/stats` answer within the timeout. A failure
    /// is that answer's alone (it falls back to this instance's): a slow
    /// query or a server error does not mark Redis down for intake.
    async fn read<T>(
        &self,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, MirrorError> {
        self.bounded(call).await
    }

    /// The probe of a Redis marked down: a success marks it up.
    async fn call_probe<T>(
        &self,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, MirrorError> {
        let result = self.bounded(call).await;
        match &result {
            Ok(_) => {
                if !self.up.swap(true, Ordering::Relaxed) {
                    self.since_ms.store(now_ms(), Ordering::Relaxed);
                    tracing::info!(url = %self.shown_url, backlog = self.backlog_len(),
                        "redis is reachable again; shared dedupe is back on");
                }
            }
            Err(e) => {
                *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
            }
        }
        result
    }

    async fn bounded<T>(
        &self,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, MirrorError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(MirrorError::Redis(e.to_string())),
            Err(_) => Err(MirrorError::Timeout(self.timeout.as_millis() as u64)),
        }
    }

    /// Marks Redis down, logging once per outage.
    fn went_down(&self, error: String) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.clone());
        if self.up.swap(false, Ordering::Relaxed) {
            self.since_ms.store(now_ms(), Ordering::Relaxed);
            self.counters.outages.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(url = %self.shown_url, %error,
                "redis is unreachable; deduplicating locally until it is back");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mirror(instance: &str) -> Arc<Mirror> {
        let config = RedisConfig {
            url: "redis://127.0.0.1:1/".into(),
            instance: instance.into(),
            ..RedisConfig::default()
        };
        Mirror::connect(&config).expect("a lazy connection to a valid url")
    }

    /// A bulk write that only takes too long fails alone and leaves
    /// Redis up for intake; one that cannot reach Redis, or a claim's
    /// timeout, marks it down.
    #[tokio::test]
    async fn a_slow_bulk_write_does_not_mark_redis_down() {
        let m = mirror("a");
        let slow = || async {
            tokio::time::sleep(Duration::from_millis(400)).await;
            redis::RedisResult::Ok(())
        };
        assert!(m.is_up());
        assert!(matches!(
            m.call_bulk(slow()).await,
            Err(MirrorError::Timeout(_))
        ));
        assert!(m.is_up(), "a slow bulk write marked redis down");
        let refused = async {
            redis::RedisResult::<()>::Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "connection refused",
            )))
        };
        assert!(m.call_bulk(refused).await.is_err());
        assert!(!m.is_up(), "an unreachable redis stayed up");

        let m = mirror("b");
        assert!(matches!(m.call(slow()).await, Err(MirrorError::Timeout(_))));
        assert!(!m.is_up(), "a claim's timeout left redis up");
    }

    #[tokio::test]
    async fn a_claim_reads_whose_key_it_is() {
        let m = mirror("a");
        assert_eq!(m.read_claim(""), Claim::New);
        assert_eq!(m.read_claim("c:17:a"), Claim::Ours);
        assert_eq!(m.read_claim("p:17:a"), Claim::Ours);
        assert_eq!(m.read_claim("p:17:b"), Claim::InProgress);
        assert_eq!(
            m.read_claim("c:17:b:with:colons"),
            Claim::Duplicate { first_seen_ms: 17 }
        );
        assert_eq!(
            m.read_claim("set by hand"),
            Claim::Duplicate { first_seen_ms: 0 }
        );
    }

    #[tokio::test]
    async fn an_unreachable_redis_leaves_keys_unchecked_and_backlogged() {
        let m = mirror("a");
        let keys = vec![m.idempotency_key("default", "k1")];
        assert_eq!(m.claim(&keys, 1).await, vec![Claim::Unchecked]);
        assert!(!m.is_up());
        let record = WalRecord {
            source: "default".into(),
            key: "k1".into(),
            event_type: "signup".into(),
            received_at_ms: 0,
            occurred_at_ms: 0,
            only_sink: None,
            body: "{}".into(),
        };
        m.confirm(
            vec![Accepted {
                key: keys[0].clone(),
                first_seen_ms: now_ms(),
            }],
            &[(1, &record)],
            60_000,
        )
        .await;
        assert_eq!(m.health().backlog, 1);
        assert_eq!(m.health().state, "down");
        let mut text = String::new();
        m.render_metrics(&mut text);
        assert!(text.contains("inletd_redis_up 0"), "{text}");
        assert!(text.contains("inletd_redis_fail_open_total 1"), "{text}");
        // The group could not be mirrored for a takeover either.
        assert!(
            text.contains("inletd_redis_unmirrored_groups_total 1"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn the_backlog_keeps_the_newest_keys() {
        let config = RedisConfig {
            url: "redis://127.0.0.1:1/".into(),
            backlog_max_keys: 2,
            ..RedisConfig::default()
        };
        let m = Mirror::connect(&config).expect("lazy");
        let key = |k: &str| Accepted {
            key: k.into(),
            first_seen_ms: 0,
        };
        m.keep(vec![key("a"), key("b"), key("c")]);
        let kept: Vec<String> = m
            .backlog
            .lock()
            .expect("unpoisoned")
            .iter()
            .map(|a| a.key.clone())
            .collect();
        assert_eq!(kept, ["b", "c"]);
        assert_eq!(m.counters.backlog_dropped.load(Ordering::Relaxed), 1);
    }
}
