//! Built-in real-time analytics: the aggregates and the `/stats` queries.
//!
//! # Design
//!
//! Aggregates live in one key space (sled tree `aggregates`) and are updated
//! by [`apply`] in the same atomic storage commit that acknowledges the
//! batch in the WAL, so each accepted event is counted exactly once across
//! crashes and restarts. The same code runs over the sled store's staged
//! writes and over the in-memory model, through the small [`KvWrite`] / [`KvRead`]
//! traits. This module owns them and names no store: each store implements
//! them with its own error type, which the queries hand back as they got
//! it (storage depends on analytics, not the reverse). Everything is on
//! disk; memory does not grow with users or days (the cache of members
//! known to be stored, [`Known`], has a fixed bound).
//! A batch is aggregated in memory first: each counter is written once per
//! batch, each set member (user-day, first seen, cohort, a minute's users
//! and sessions) read once and written only when it is new.
//!
//! Days, hours and minutes are UTC and taken from the event's own time
//! (`timestamp` / `occurred_at`, else receipt).
//!
//! | key                                   | value | meaning |
//! |---------------------------------------|-------|---------|
//! | `T` day ‖ event type                  | u64   | events of a type on a day |
//! | `H` hour ‖ event type                 | u64   | events of a type in an hour |
//! | `U` user ‖ day                        | —     | the user was active that day |
//! | `D` day                               | u64   | distinct users that day (DAU) |
//! | `F` user                              | i64   | the user's first event time (ms), earliest by event time |
//! | `C` first day ‖ user                  | —     | cohort index: users by first day |
//! | `m` minute ‖ `u`/`s` ‖ id             | —     | a user / session seen in that minute |
//! | `p` minute ‖ page                     | u64   | page views of a page in that minute |
//! | `L` bucket                            | u64   | receipt→processed latency histogram |
//! | `A` day ‖ type ‖ batch                | users | the users with an event of that type that day, in one batch (trends' users) |
//! | `S` day ‖ type ‖ field                | i128 ‖ u64 | sum of a `sum_fields` field in millionths, and how many events had a number there |
//! | `W` minute ‖ window ‖ group           | i128 ‖ u64 | a `[[windows]]` window's sum (millionths) and events of a group in that minute |
//!
//! day = days since 1970-01-01 (i32 BE, offset so that order is kept),
//! hour and minute likewise (i64 BE, offset); a user id is length-prefixed
//! (u16 BE) so that no id is a prefix of another; so is the type in `A`
//! and `S` keys. An `A` value is its users one after another, each
//! length-prefixed; a user is in it once, but may be in several batches'
//! records of a day: a query unions them. One record per day and type per
//! batch, rather than a key per new user, type and day, is what keeps
//! trends' users from costing a sled insert per event. Once a day is over,
//! the sweeper merges its records into one per type ([`merge_user_records`]),
//! so that a user is kept once per day and type, not once per batch. Sums are fixed-point (millionths, i128), so that they are
//! exact and do not depend on the order events are added in. `A` and `S`
//! were added after the others: a store counts them from the version that
//! wrote them on. `W` entries are written for events of the last day and
//! pruned after [`MAX_WINDOW_MINUTES`]. Minute entries are only
//! written for events of the last hour and are pruned after
//! [`WINDOW_RETENTION_MINUTES`].

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::{Date, Duration as TimeDuration, Month};

use crate::config::{Config, MAX_WINDOW_MINUTES, WindowConfig};
use crate::event::WalRecord;

pub mod query;
mod trends;
pub use trends::{Interval, Trend, TrendDay, TrendPeriod, periods, trend_of, trends};

/// How far ahead of the processing clock an event's time may be and still
/// count in the rolling windows: a sender's clock a little ahead is fine,
/// a time days ahead would sit in a bucket no prune reaches for days.
pub const MAX_CLOCK_SKEW_MS: i64 = 5 * 60_000;

/// Minute buckets older than this are pruned (the longest window is 15 min).
pub const WINDOW_RETENTION_MINUTES: i64 = 60;
/// `active_users_5m` and `active_sessions_5m` span this many minutes.
pub const ACTIVE_WINDOW_MINUTES: i64 = 5;
/// `page_views_15m` and `top_pages_15m` span this many minutes.
pub const PAGE_WINDOW_MINUTES: i64 = 15;
/// 0001-01-01 and 9999-12-31 as day numbers: the dates a query may name.
pub const MIN_DAY: i32 = -719_162;
/// See [`MIN_DAY`].
pub const MAX_DAY: i32 = 2_932_896;
/// Longest date range a query may span.
pub const MAX_RANGE_DAYS: i64 = 366;
/// Most retention windows per query.
pub const MAX_WINDOWS: u32 = 90;

const MS_PER_MINUTE: i64 = 60_000;
const MS_PER_HOUR: i64 = 3_600_000;
const MS_PER_DAY: i64 = 86_400_000;

/// Upper bounds (ms) of the on-disk latency histogram buckets.
pub const LATENCY_BUCKETS_MS: [f64; 18] = [
    1.0,
    2.5,
    5.0,
    10.0,
    25.0,
    50.0,
    100.0,
    250.0,
    500.0,
    1000.0,
    2500.0,
    5000.0,
    10_000.0,
    30_000.0,
    60_000.0,
    300_000.0,
    3_600_000.0,
    f64::INFINITY,
];

/// What analytics needs of one processed event.
#[derive(Debug, Clone, PartialEq)]
pub struct Facts {
    /// `event_type`.
    pub event_type: String,
    /// The event's own time (ms since epoch).
    pub occurred_at_ms: i64,
    /// `user_id`, if any.
    pub user_id: Option<String>,
    /// `session_id`, if any.
    pub session_id: Option<String>,
    /// For `page_view` events: `properties.page` or `metadata.page`.
    pub page: Option<String>,
    /// Receipt→processed latency in ms.
    pub latency_ms: i64,
    /// Each configured `sum_fields` path, with the event's number there in
    /// millionths (`None`: missing or not a number).
    pub sums: Vec<(String, Option<i128>)>,
    /// The `[[windows]]` this event counts in: recent enough, of a type
    /// the window takes, with a group.
    pub windows: Vec<WindowFact>,
}

/// An event's place in one user-defined window.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowFact {
    /// The window's name.
    pub window: String,
    /// The event's group: the `group_by` value as text.
    pub group: String,
    /// The `sum` field's number in millionths (`None`: none, or missing).
    pub sum: Option<i128>,
}

/// What the configuration asks analytics to read of each event beyond
/// the built-in facts. Asking for nothing costs nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Wanted<'a> {
    /// `sum_fields`.
    pub sum_fields: &'a [String],
    /// `[[windows]]`.
    pub windows: &'a [WindowConfig],
}

impl<'a> Wanted<'a> {
    /// What `config` asks for.
    pub fn of(config: &'a Config) -> Self {
        Wanted {
            sum_fields: &config.sum_fields,
            windows: &config.windows,
        }
    }
}

impl Facts {
    /// Extracts the facts of a stored event processed at `processed_at_ms`,
    /// with what the configuration `wanted` of it.
    pub fn of(record: &WalRecord, processed_at_ms: i64, wanted: Wanted) -> Facts {
        // The fields analytics reads, without building the whole body as
        // JSON values; a body this does not read (a key with escapes, a
        // field twice) goes the general way, with the same rule.
        let (user_id, session_id, page) = match serde_json::from_str::<Fields>(&record.body) {
            Ok(f) => (
                f.user_id.0.map(Cow::into_owned),
                f.session_id.0.map(Cow::into_owned),
                f.properties.0.or(f.metadata.0).map(Cow::into_owned),
            ),
            Err(_) => fields_of_value(&record.body),
        };
        Facts {
            event_type: record.event_type.clone(),
            occurred_at_ms: record.occurred_at_ms,
            user_id,
            session_id,
            page: page.filter(|_| record.event_type == "page_view"),
            latency_ms: (processed_at_ms - record.received_at_ms).max(0),
            sums: Vec::new(),
            windows: Vec::new(),
        }
        .with_wanted(record, processed_at_ms, wanted)
    }

    /// Adds the sums and window places `wanted` (one parse of the body,
    /// only when something is wanted).
    fn with_wanted(mut self, record: &WalRecord, processed_at_ms: i64, wanted: Wanted) -> Facts {
        let windows: Vec<&WindowConfig> = wanted
            .windows
            .iter()
            .filter(|w| {
                record.occurred_at_ms > processed_at_ms - i64::from(w.minutes) * MS_PER_MINUTE
                    && record.occurred_at_ms <= processed_at_ms + MAX_CLOCK_SKEW_MS
                    && (w.event_types.is_empty() || w.event_types.contains(&record.event_type))
            })
            .collect();
        if wanted.sum_fields.is_empty() && windows.is_empty() {
            return self;
        }
        let body: Value = serde_json::from_str(&record.body).unwrap_or(Value::Null);
        let at = |path: &str| path.split('.').try_fold(&body, |v, part| v.get(part));
        self.sums = wanted
            .sum_fields
            .iter()
            .map(|field| (field.clone(), at(field).and_then(millionths)))
            .collect();
        self.windows = windows
            .into_iter()
            .filter_map(|w| {
                let group = match at(&w.group_by)? {
                    Value::String(s) if !s.is_empty() => s.clone(),
                    v @ (Value::Number(_) | Value::Bool(_)) => v.to_string(),
                    _ => return None,
                };
                Some(WindowFact {
                    window: w.name.clone(),
                    group: truncate(group, MAX_GROUP_BYTES),
                    sum: w.sum.as_deref().and_then(at).and_then(millionths),
                })
            })
            .collect();
        self
    }
}

/// A window group's name is kept to this many bytes.
const MAX_GROUP_BYTES: usize = 256;

/// `text` cut to at most `max` bytes, on a character boundary.
fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// The largest number summed, in absolute value: a sum of any count of
/// them stays far inside an `i128` of millionths.
const MAX_SUMMED: f64 = 1e15;

/// A JSON number in millionths, or `None` for anything else or a number
/// of `MAX_SUMMED` or more. Exact for integers, and for decimals of up to
/// six places below about 9e9 (a decimal goes through an `f64`).
pub fn millionths(value: &Value) -> Option<i128> {
    let n = value.as_number()?;
    if let Some(i) = n.as_i64() {
        return ((i as f64).abs() < MAX_SUMMED).then(|| i128::from(i) * 1_000_000);
    }
    let x = n.as_f64()?;
    (x.is_finite() && x.abs() < MAX_SUMMED).then(|| (x * 1e6).round() as i128)
}

/// Millionths as the number they stand for.
pub fn from_millionths(m: i128) -> f64 {
    // Whole and fraction apart, so that 19.99 prints as 19.99.
    (m / 1_000_000) as f64 + (m % 1_000_000) as f64 / 1e6
}

/// `user_id`, `session_id` and the page (`properties.page`, else
/// `metadata.page`) of a body, through `serde_json::Value`: each counts
/// only as a non-empty string.
fn fields_of_value(body: &str) -> (Option<String>, Option<String>, Option<String>) {
    let body: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let text = |v: &Value| v.as_str().filter(|s| !s.is_empty()).map(str::to_owned);
    let page = ["properties", "metadata"]
        .iter()
        .find_map(|f| body.get(f).and_then(|o| o.get("page")).and_then(text));
    (
        body.get("user_id").and_then(text),
        body.get("session_id").and_then(text),
        page,
    )
}

/// The body's fields that analytics reads; every other field is skipped
/// without being built.
#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow, default)]
    user_id: Text<'a>,
    #[serde(borrow, default)]
    session_id: Text<'a>,
    #[serde(borrow, default)]
    properties: Page<'a>,
    #[serde(borrow, default)]
    metadata: Page<'a>,
}

/// A non-empty string, or nothing for any other value (skipped unbuilt).
#[derive(Default)]
struct Text<'a>(Option<Cow<'a, str>>);

/// The `page` text of an object, or nothing for any other value.
#[derive(Default)]
struct Page<'a>(Option<Cow<'a, str>>);

/// Visits one JSON value: a string is kept when not empty; anything else
/// is read through and dropped. With `page_of`, an object's `page` is
/// kept instead.
struct TextVisitor {
    page_of: bool,
}

impl<'de> Visitor<'de> for TextVisitor {
    type Value = Option<Cow<'de, str>>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok((!self.page_of && !v.is_empty()).then_some(Cow::Borrowed(v)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok((!self.page_of && !v.is_empty()).then(|| Cow::Owned(v.to_owned())))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<de::IgnoredAny>()?.is_some() {}
        Ok(None)
    }
    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut page = None;
        while let Some(key) = map.next_key::<&'de str>()? {
            if self.page_of && key == "page" {
                page = map.next_value_seed(TextSeed)?;
            } else {
                map.next_value::<de::IgnoredAny>()?;
            }
        }
        Ok(page)
    }
}

/// Reads one value as [`Text`] inside a map.
struct TextSeed;

impl<'de> de::DeserializeSeed<'de> for TextSeed {
    type Value = Option<Cow<'de, str>>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(TextVisitor { page_of: false })
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TextVisitor { page_of: false }).map(Text)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Page<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TextVisitor { page_of: true }).map(Page)
    }
}

/// Writes of one batch commit.
pub trait KvWrite {
    /// The store's error.
    type Error;
    /// Reads a key (seeing this commit's own writes).
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, Self::Error>;
    /// Sets a key.
    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), Self::Error>;
    /// Removes a key.
    fn remove(&mut self, key: &[u8]) -> Result<(), Self::Error>;
}

/// Reads for the queries.
pub trait KvRead {
    /// The store's error: the queries hand it back untouched.
    type Error;
    /// Reads a key.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Self::Error>;
    /// Calls `f` for every key in `[from, to)` in order until it returns false.
    fn scan(
        &self,
        from: &[u8],
        to: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), Self::Error>;
}

/// Day number (days since 1970-01-01) of a time in ms.
pub fn day_of(ms: i64) -> i32 {
    ms.div_euclid(MS_PER_DAY) as i32
}

fn day_key(day: i32) -> [u8; 4] {
    ((day as u32) ^ 0x8000_0000).to_be_bytes()
}

fn i64_key(v: i64) -> [u8; 8] {
    ((v as u64) ^ 0x8000_0000_0000_0000).to_be_bytes()
}

fn user_part(user: &str) -> Vec<u8> {
    let bytes = user.as_bytes();
    let len = bytes.len().min(u16::MAX as usize);
    let mut out = Vec::with_capacity(2 + len);
    out.extend_from_slice(&(len as u16).to_be_bytes());
    out.extend_from_slice(&bytes[..len]);
    out
}

fn key(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn read_u64(v: Option<Vec<u8>>) -> u64 {
    v.and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
        .map_or(0, u64::from_be_bytes)
}

/// An `S` value: the sum (millionths) and how many events had a number.
fn read_sum(v: Option<Vec<u8>>) -> (i128, u64) {
    let Some(v) = v.filter(|v| v.len() == 24) else {
        return (0, 0);
    };
    let mut sum = [0u8; 16];
    let mut present = [0u8; 8];
    sum.copy_from_slice(&v[..16]);
    present.copy_from_slice(&v[16..]);
    (i128::from_be_bytes(sum), u64::from_be_bytes(present))
}

fn sum_value(sum: i128, present: u64) -> Vec<u8> {
    [&sum.to_be_bytes()[..], &present.to_be_bytes()].concat()
}

/// Splits a length-prefixed part off the front of `bytes`: (part, rest).
fn split_part(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = u16::from_be_bytes([*bytes.first()?, *bytes.get(1)?]) as usize;
    let rest = bytes.get(2..)?;
    (rest.len() >= len).then(|| rest.split_at(len))
}

fn add<K: KvWrite>(kv: &mut K, k: &[u8], n: u64) -> Result<(), K::Error> {
    let now = read_u64(kv.get(k)?);
    kv.put(k, &(now + n).to_be_bytes())
}

/// Set members that the store is known to hold: a user's active days
/// (`U`), a minute's users and sessions (`m`), and each user's first time
/// (`F`). [`apply`] reads a member from the store only when it is not here,
/// so that a batch of users seen before costs no read of the store for
/// them (reads of sled were about half of what a batch's analytics cost).
/// The store fills it after each batch whose commit succeeded
/// ([`Known::learn`]), never from a commit that may still fail, and
/// empties what it removes ([`Known::forget_minutes`]
/// after a prune). It is a cache: empty after a start, emptied when full.
#[derive(Debug, Default)]
pub struct Known {
    /// Keys of `U` and `m` entries in the store.
    present: HashSet<Vec<u8>>,
    /// A user (as in keys) → its `F` value in the store.
    first_seen: HashMap<Vec<u8>, i64>,
}

impl Known {
    /// Most members kept (about 80 B each, so about 2.5 MiB): past it the
    /// cache starts over rather than grow with the number of users.
    pub const CAPACITY: usize = 32_768;

    /// Keeps what a committed batch found or wrote.
    pub fn learn(&mut self, learned: Learned) {
        let size = self.present.len() + self.first_seen.len();
        if size + learned.present.len() + learned.first_seen.len() > Self::CAPACITY {
            self.present.clear();
            self.first_seen.clear();
        }
        self.present.extend(learned.present);
        self.first_seen.extend(learned.first_seen);
    }

    /// Forgets every minute's members: a prune has removed some of them.
    pub fn forget_minutes(&mut self) {
        self.present.retain(|k| k.first() != Some(&b'm'));
    }

    /// Members known.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.present.len() + self.first_seen.len()
    }
}

/// What one [`apply`] found in the store or wrote there that its [`Known`]
/// did not hold: for [`Known::learn`] once the batch is committed.
#[derive(Debug, Default)]
pub struct Learned {
    /// `U` and `m` keys now in the store.
    present: Vec<Vec<u8>>,
    /// Users' `F` values now in the store.
    first_seen: Vec<(Vec<u8>, i64)>,
}

/// Applies a batch of processed events to the aggregates. `now_ms` decides
/// which events are recent enough for the rolling-window buckets; `batch`
/// (the batch's last seq) names its `A` records. The batch is aggregated
/// in memory first: a counter is written once per batch, and a set member
/// (user-day, first seen, cohort, a minute's users and sessions) only when
/// it is new; a member in `known` is not read at all. Answers what the
/// batch taught that `known` did not hold.
pub fn apply<K: KvWrite>(
    kv: &mut K,
    facts: &[&Facts],
    now_ms: i64,
    batch: u64,
    known: &Known,
) -> Result<Learned, K::Error> {
    let mut learned = Learned::default();
    // Sum what can be summed before touching the store: one write per key.
    let mut per_type_day: HashMap<(i32, &str), u64> = HashMap::new();
    let mut per_type_hour: HashMap<(i64, &str), u64> = HashMap::new();
    let mut page_minutes: HashMap<(i64, &str), u64> = HashMap::new();
    let mut sums: HashMap<(i32, &str, &str), (i128, u64)> = HashMap::new();
    let mut window_minutes: HashMap<(i64, &str, &str), (i128, u64)> = HashMap::new();
    let mut latency = [0u64; LATENCY_BUCKETS_MS.len()];
    let recent_from = now_ms - WINDOW_RETENTION_MINUTES * MS_PER_MINUTE;
    let recent = |at: i64| at >= recent_from && at <= now_ms + MAX_CLOCK_SKEW_MS;
    for f in facts {
        let t = f.event_type.as_str();
        *per_type_day
            .entry((day_of(f.occurred_at_ms), t))
            .or_default() += 1;
        *per_type_hour
            .entry((f.occurred_at_ms.div_euclid(MS_PER_HOUR), t))
            .or_default() += 1;
        for w in &f.windows {
            let cell = window_minutes
                .entry((
                    f.occurred_at_ms.div_euclid(MS_PER_MINUTE),
                    w.window.as_str(),
                    w.group.as_str(),
                ))
                .or_default();
            cell.0 = cell.0.saturating_add(w.sum.unwrap_or(0));
            cell.1 += 1;
        }
        for (field, value) in &f.sums {
            if let Some(value) = value {
                let sum = sums
                    .entry((day_of(f.occurred_at_ms), t, field.as_str()))
                    .or_default();
                sum.0 = sum.0.saturating_add(*value);
                sum.1 += 1;
            }
        }
        let bucket = LATENCY_BUCKETS_MS
            .iter()
            .position(|b| f.latency_ms as f64 <= *b)
            .unwrap_or(LATENCY_BUCKETS_MS.len() - 1);
        latency[bucket] += 1;
        if recent(f.occurred_at_ms)
            && let Some(page) = &f.page
        {
            *page_minutes
                .entry((f.occurred_at_ms.div_euclid(MS_PER_MINUTE), page.as_str()))
                .or_default() += 1;
        }
    }
    for ((day, t), n) in per_type_day {
        add(kv, &key(&[b"T", &day_key(day), t.as_bytes()]), n)?;
    }
    for ((hour, t), n) in per_type_hour {
        add(kv, &key(&[b"H", &i64_key(hour), t.as_bytes()]), n)?;
    }
    for ((minute, page), n) in page_minutes {
        add(kv, &key(&[b"p", &i64_key(minute), page.as_bytes()]), n)?;
    }
    for (bucket, n) in latency.iter().enumerate() {
        if *n > 0 {
            add(kv, &key(&[b"L", &[bucket as u8]]), *n)?;
        }
    }
    for ((minute, window, group), (sum, count)) in window_minutes {
        let k = key(&[b"W", &i64_key(minute), &user_part(window), group.as_bytes()]);
        let (old_sum, old_count) = read_sum(kv.get(&k)?);
        kv.put(
            &k,
            &sum_value(old_sum.saturating_add(sum), old_count + count),
        )?;
    }
    for ((day, t, field), (sum, present)) in sums {
        let k = key(&[b"S", &day_key(day), &user_part(t), field.as_bytes()]);
        let (old_sum, old_present) = read_sum(kv.get(&k)?);
        kv.put(
            &k,
            &sum_value(old_sum.saturating_add(sum), old_present + present),
        )?;
    }
    // The sets: each distinct entity of the batch is read once and written
    // only when it is new, so a processed event costs a sled key only for a
    // new user, user-day, or user or session in a minute.
    // Each user's key part is built once an event; the sets borrow it.
    let users: Vec<Option<Vec<u8>>> = facts
        .iter()
        .map(|f| f.user_id.as_deref().map(user_part))
        .collect();
    // Gathered in vectors, then sorted and deduplicated: the order a
    // sorted set gives, for one sort each instead of a tree insert (and its
    // comparisons) per event: in a profile of batches of 100 the trees'
    // inserts were 6 % of the CPU.
    let mut minute_members: Vec<(i64, u8, &[u8])> = Vec::with_capacity(2 * facts.len());
    let mut user_days: Vec<(&[u8], i32)> = Vec::with_capacity(facts.len());
    let mut type_day_users: Vec<((i32, &str), &[u8])> = Vec::with_capacity(facts.len());
    let mut earliest: Vec<(&[u8], i64)> = Vec::with_capacity(facts.len());
    for (f, user) in facts.iter().zip(&users) {
        let in_window = recent(f.occurred_at_ms);
        let minute = f.occurred_at_ms.div_euclid(MS_PER_MINUTE);
        if in_window && let Some(s) = &f.session_id {
            minute_members.push((minute, b's', s.as_bytes()));
        }
        let Some(user) = user.as_deref() else {
            continue;
        };
        if in_window {
            minute_members.push((minute, b'u', user));
        }
        let day = day_of(f.occurred_at_ms);
        user_days.push((user, day));
        type_day_users.push(((day, f.event_type.as_str()), user));
        earliest.push((user, f.occurred_at_ms));
    }
    minute_members.sort_unstable();
    minute_members.dedup();
    user_days.sort_unstable();
    user_days.dedup();
    type_day_users.sort_unstable();
    type_day_users.dedup();
    // Each user's first time in the batch: the first of its run.
    earliest.sort_unstable();
    earliest.dedup_by_key(|(user, _)| *user);
    for (minute, kind, id) in &minute_members {
        let k = key(&[b"m", &i64_key(*minute), &[*kind], id]);
        if known.present.contains(&k) {
            continue;
        }
        if kv.get(&k)?.is_none() {
            kv.put(&k, &[])?;
        }
        learned.present.push(k);
    }
    let mut new_dau: BTreeMap<i32, u64> = BTreeMap::new();
    for (user, day) in &user_days {
        let active = key(&[b"U", user, &day_key(*day)]);
        if known.present.contains(&active) {
            continue;
        }
        if kv.get(&active)?.is_none() {
            kv.put(&active, &[])?;
            *new_dau.entry(*day).or_default() += 1;
        }
        learned.present.push(active);
    }
    for (day, n) in new_dau {
        add(kv, &key(&[b"D", &day_key(day)]), n)?;
    }
    for users in type_day_users.chunk_by(|a, b| a.0 == b.0) {
        let (day, event_type) = users[0].0;
        let k = key(&[
            b"A",
            &day_key(day),
            &user_part(event_type),
            &batch.to_be_bytes(),
        ]);
        // A record of this batch already there (never, as batches commit
        // once) is kept and added to, not replaced.
        let mut record = kv.get(&k)?.unwrap_or_default();
        for (_, user) in users {
            record.extend_from_slice(user);
        }
        kv.put(&k, &record)?;
    }
    for &(user, at) in &earliest {
        let day = day_of(at);
        let cached = known.first_seen.get(user).copied();
        if cached.is_some_and(|first| first <= at) {
            continue;
        }
        let first_key = key(&[b"F", user]);
        let first = match cached {
            Some(first) => Some(first),
            None => kv
                .get(&first_key)?
                .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
                .map(i64::from_be_bytes),
        };
        match first {
            Some(first) if first <= at => {
                learned.first_seen.push((user.to_vec(), first));
            }
            Some(first) => {
                kv.put(&first_key, &at.to_be_bytes())?;
                if day_of(first) != day {
                    kv.remove(&key(&[b"C", &day_key(day_of(first)), user]))?;
                    kv.put(&key(&[b"C", &day_key(day), user]), &[])?;
                }
                learned.first_seen.push((user.to_vec(), at));
            }
            None => {
                kv.put(&first_key, &at.to_be_bytes())?;
                kv.put(&key(&[b"C", &day_key(day), user]), &[])?;
                learned.first_seen.push((user.to_vec(), at));
            }
        }
    }
    Ok(learned)
}

/// The key ranges of rolling-window buckets older than `before_ms` (the
/// fixed windows'), and of user-defined windows' buckets that no window
/// reaches any more (a day and an hour before it), for pruning.
pub fn stale_window_ranges(before_ms: i64) -> [(Vec<u8>, Vec<u8>); 3] {
    let end = i64_key(before_ms.div_euclid(MS_PER_MINUTE));
    let custom_end = i64_key(
        before_ms.div_euclid(MS_PER_MINUTE)
            - i64::from(MAX_WINDOW_MINUTES)
            - WINDOW_RETENTION_MINUTES,
    );
    [
        (b"m".to_vec(), key(&[b"m", &end])),
        (b"p".to_vec(), key(&[b"p", &end])),
        (b"W".to_vec(), key(&[b"W", &custom_end])),
    ]
}

/// The `A` keys of the days `from..=to`: trends' user records.
pub fn user_record_range(from: i32, to: i32) -> (Vec<u8>, Vec<u8>) {
    (
        key(&[b"A", &day_key(from)]),
        key(&[b"A", &day_key(to.saturating_add(1))]),
    )
}

/// One merge of trends' user records: the records of one day and type
/// become one, under the first record's key.
#[derive(Debug, Clone, PartialEq)]
pub struct UserMerge {
    /// The keys merged away.
    pub remove: Vec<Vec<u8>>,
    /// The key kept.
    pub key: Vec<u8>,
    /// The merged record: each user of the day and type once.
    pub record: Vec<u8>,
}

/// The groups of `A` keys (in key order, as a scan of
/// [`user_record_range`] gives them) that hold more than one record of a
/// day and type: only their values need reading to merge.
pub fn user_record_groups(keys: &[Vec<u8>]) -> Vec<std::ops::Range<usize>> {
    // A key is `A` ‖ day ‖ type ‖ batch (8 bytes): records of one day and
    // type share all but the batch, and are next to each other.
    fn prefix(k: &[u8]) -> &[u8] {
        &k[..k.len().saturating_sub(8)]
    }
    let mut groups = Vec::new();
    let mut start = 0;
    while start < keys.len() {
        let group = prefix(&keys[start]);
        let end = keys[start..]
            .iter()
            .position(|k| prefix(k) != group)
            .map_or(keys.len(), |n| start + n);
        if end - start > 1 {
            groups.push(start..end);
        }
        start = end;
    }
    groups
}

/// Plans the merge of the `A` records given (in key order): one merge per
/// day and type that has more than one record.
pub fn merge_user_records(records: &[(Vec<u8>, Vec<u8>)]) -> Vec<UserMerge> {
    let keys: Vec<Vec<u8>> = records.iter().map(|(k, _)| k.clone()).collect();
    user_record_groups(&keys)
        .into_iter()
        .map(|group| {
            let mut users: BTreeSet<&[u8]> = BTreeSet::new();
            let mut record = Vec::new();
            for (_, value) in &records[group.clone()] {
                let mut rest = value.as_slice();
                while let Some((_, more)) = split_part(rest) {
                    // The user with its length prefix, as stored.
                    let whole = &rest[..rest.len() - more.len()];
                    if users.insert(whole) {
                        record.extend_from_slice(whole);
                    }
                    rest = more;
                }
            }
            UserMerge {
                remove: records[group.start + 1..group.end]
                    .iter()
                    .map(|(k, _)| k.clone())
                    .collect(),
                key: records[group.start].0.clone(),
                record,
            }
        })
        .collect()
}

/// One group of `/stats/windows/{name}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WindowGroup {
    /// The group: the `group_by` value.
    pub key: String,
    /// Its events in the window.
    pub count: u64,
    /// The sum of the window's `sum` field over them (null without one).
    pub sum: Option<f64>,
}

/// The groups of the user-defined window `window` ending at `now_ms`: the
/// current minute and the `window.minutes − 1` before it, by event time;
/// ranked by the sum when the window has one, else by count (ties by key).
pub fn custom_window<E>(
    kv: &dyn KvRead<Error = E>,
    window: &WindowConfig,
    now_ms: i64,
    limit: usize,
) -> Result<Vec<WindowGroup>, E> {
    let now_minute = now_ms.div_euclid(MS_PER_MINUTE);
    let first = now_minute - i64::from(window.minutes) + 1;
    let name = user_part(&window.name);
    let mut groups = GroupTotals::new();
    kv.scan(
        &key(&[b"W", &i64_key(first)]),
        &key(&[b"W", &i64_key(now_minute + 1)]),
        &mut |k, v| {
            if let Some(rest) = k.get(9..)
                && let Some(group) = rest.strip_prefix(name.as_slice())
            {
                let (sum, count) = read_sum(Some(v.to_vec()));
                add_group(
                    &mut groups,
                    String::from_utf8_lossy(group).into_owned(),
                    sum,
                    count,
                );
            }
            true
        },
    )?;
    Ok(rank_groups(groups, window.sum.is_some(), limit))
}

/// A window's groups: the sum (millionths) and the events of each.
pub type GroupTotals = BTreeMap<String, (i128, u64)>;

/// Adds `sum` and `count` to `group`'s totals.
pub fn add_group(groups: &mut GroupTotals, group: String, sum: i128, count: u64) {
    let cell = groups.entry(group).or_default();
    cell.0 = cell.0.saturating_add(sum);
    cell.1 += count;
}

/// A window's groups ranked by sum (`by_sum`) or by count, ties by key,
/// the first `limit` of them.
pub fn rank_groups(groups: GroupTotals, by_sum: bool, limit: usize) -> Vec<WindowGroup> {
    let mut rows: Vec<(String, i128, u64)> = groups
        .into_iter()
        .map(|(group, (sum, count))| (group, sum, count))
        .collect();
    rows.sort_by(|a, b| {
        let first = if by_sum { b.1.cmp(&a.1) } else { b.2.cmp(&a.2) };
        first.then_with(|| a.0.cmp(&b.0))
    });
    rows.into_iter()
        .take(limit)
        .map(|(key, sum, count)| WindowGroup {
            key,
            count,
            sum: by_sum.then(|| from_millionths(sum)),
        })
        .collect()
}

/// What one minute holds of this store's rolling windows that adds up
/// across instances: page views and `[[windows]]` groups. (Users and
/// sessions do not add up: [`minute_members`].)
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MinuteCells {
    /// Views by page.
    pub pages: BTreeMap<String, u64>,
    /// By window name, its groups.
    pub groups: BTreeMap<String, GroupTotals>,
}

/// The page views and window groups of `minute` (minutes since the epoch).
pub fn minute_cells<E>(kv: &dyn KvRead<Error = E>, minute: i64) -> Result<MinuteCells, E> {
    let mut cells = MinuteCells::default();
    let (from, to) = (
        key(&[b"p", &i64_key(minute)]),
        key(&[b"p", &i64_key(minute + 1)]),
    );
    kv.scan(&from, &to, &mut |k, v| {
        let page = String::from_utf8_lossy(k.get(9..).unwrap_or_default()).into_owned();
        *cells.pages.entry(page).or_default() += read_u64(Some(v.to_vec()));
        true
    })?;
    let (from, to) = (
        key(&[b"W", &i64_key(minute)]),
        key(&[b"W", &i64_key(minute + 1)]),
    );
    kv.scan(&from, &to, &mut |k, v| {
        if let Some((name, group)) = k.get(9..).and_then(split_part) {
            let (sum, count) = read_sum(Some(v.to_vec()));
            let window = String::from_utf8_lossy(name).into_owned();
            let group = String::from_utf8_lossy(group).into_owned();
            add_group(cells.groups.entry(window).or_default(), group, sum, count);
        }
        true
    })?;
    Ok(cells)
}

/// The users and the sessions with an event in `minute`.
pub fn minute_members<E>(
    kv: &dyn KvRead<Error = E>,
    minute: i64,
) -> Result<(BTreeSet<String>, BTreeSet<String>), E> {
    let (mut users, mut sessions) = (BTreeSet::new(), BTreeSet::new());
    let (from, to) = (
        key(&[b"m", &i64_key(minute)]),
        key(&[b"m", &i64_key(minute + 1)]),
    );
    kv.scan(&from, &to, &mut |k, _| {
        match (k.get(9), k.get(10..)) {
            (Some(b'u'), Some(part)) => {
                if let Some((user, _)) = split_part(part) {
                    users.insert(String::from_utf8_lossy(user).into_owned());
                }
            }
            (Some(b's'), Some(id)) => {
                sessions.insert(String::from_utf8_lossy(id).into_owned());
            }
            _ => {}
        }
        true
    })?;
    Ok((users, sessions))
}

/// A bad query parameter: answered 400 naming it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{param}: {detail}")]
pub struct QueryError {
    /// The parameter at fault.
    pub param: &'static str,
    /// What is wrong with it.
    pub detail: String,
}

fn query_error(param: &'static str, detail: impl Into<String>) -> QueryError {
    QueryError {
        param,
        detail: detail.into(),
    }
}

/// Parses `YYYY-MM-DD` into a day number.
pub fn parse_day(param: &'static str, text: &str) -> Result<i32, QueryError> {
    let bad = || query_error(param, format!("`{text}` is not a date like 2024-01-31"));
    let mut parts = text.splitn(3, '-');
    let (y, m, d) = (parts.next(), parts.next(), parts.next());
    let (Some(y), Some(m), Some(d)) = (y, m, d) else {
        return Err(bad());
    };
    if y.len() != 4 || m.len() != 2 || d.len() != 2 {
        return Err(bad());
    }
    let y: i32 = y.parse().map_err(|_| bad())?;
    let m: u8 = m.parse().map_err(|_| bad())?;
    let d: u8 = d.parse().map_err(|_| bad())?;
    let month = Month::try_from(m).map_err(|_| bad())?;
    let date = Date::from_calendar_date(y, month, d).map_err(|_| bad())?;
    Ok(day_of_date(date))
}

fn epoch() -> Date {
    Date::from_calendar_date(1970, Month::January, 1).unwrap_or(Date::MIN)
}

/// The date of a day number (`None` outside the calendar `time` knows).
fn date_of(day: i32) -> Option<Date> {
    epoch().checked_add(TimeDuration::days(i64::from(day)))
}

/// The day number of a date.
fn day_of_date(date: Date) -> i32 {
    (date - epoch()).whole_days() as i32
}

/// A day number as `YYYY-MM-DD`.
pub fn format_day(day: i32) -> String {
    match date_of(day) {
        Some(d) => format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day()),
        None => day.to_string(),
    }
}

/// Checks a `from`..=`to` range.
pub fn check_range(from: i32, to: i32) -> Result<(), QueryError> {
    if from < MIN_DAY {
        return Err(query_error("from", "must be in the years 0001 to 9999"));
    }
    if to > MAX_DAY {
        return Err(query_error("to", "must be in the years 0001 to 9999"));
    }
    if to < from {
        return Err(query_error("to", "must not be before `from`"));
    }
    if i64::from(to) - i64::from(from) + 1 > MAX_RANGE_DAYS {
        return Err(query_error(
            "to",
            format!("a range spans at most {MAX_RANGE_DAYS} days"),
        ));
    }
    Ok(())
}

/// One day of `/stats/dau`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DauDay {
    /// `YYYY-MM-DD`.
    pub date: String,
    /// Distinct users with an event that day.
    pub users: u64,
}

/// Distinct users per day, `from..=to`.
pub fn dau<E>(kv: &dyn KvRead<Error = E>, from: i32, to: i32) -> Result<Vec<DauDay>, E> {
    (from..=to)
        .map(|day| {
            Ok(DauDay {
                date: format_day(day),
                users: read_u64(kv.get(&key(&[b"D", &day_key(day)]))?),
            })
        })
        .collect()
}

/// The users active on `day` (those with an event that day) by event
/// type, from trends' user records: what an instance adds again to its
/// deployment's shared DAU when Redis lost it.
pub fn users_of_day<E>(
    kv: &dyn KvRead<Error = E>,
    day: i32,
) -> Result<BTreeMap<String, BTreeSet<String>>, E> {
    let mut by_type: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let (start, end) = user_record_range(day, day);
    kv.scan(&start, &end, &mut |k, record| {
        let Some((event_type, _batch)) = k.get(5..).and_then(split_part) else {
            return true;
        };
        let users = by_type
            .entry(String::from_utf8_lossy(event_type).into_owned())
            .or_default();
        let mut rest = record;
        while let Some((user, more)) = split_part(rest) {
            users.insert(String::from_utf8_lossy(user).into_owned());
            rest = more;
        }
        true
    })?;
    Ok(by_type)
}

/// One row of `/stats/top-events`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TypeCount {
    /// The event type.
    pub event_type: String,
    /// Events of it in the range.
    pub count: u64,
    /// With `sum=FIELD`: the sum of that field over them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sum: Option<f64>,
}

/// How `/stats/top-events` ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RankBy {
    /// By the number of events.
    Count,
    /// By the sum of the `sum` field.
    Sum,
}

/// Event types in `from..=to`, most first by `by` (ties by name); with
/// `sum`, each with the sum of that field.
pub fn top_events<E>(
    kv: &dyn KvRead<Error = E>,
    from: i32,
    to: i32,
    limit: usize,
    sum: Option<&str>,
    by: RankBy,
) -> Result<Vec<TypeCount>, E> {
    Ok(day_figures(kv, from, to, sum.is_some())?.top(sum, by, limit))
}

/// Processed counts and `sum_fields` sums per day and event type: what
/// `/stats/top-events` and `/stats/trends` add up, and what an instance
/// publishes for its deployment's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DayFigures {
    /// `(day, event type, events)`.
    pub counts: Vec<(i32, String, u64)>,
    /// The sums of those days (empty when not read).
    pub sums: Vec<DayTypeSum>,
}

/// The figures of the days `from..=to`, with their sums when `sums`.
pub fn day_figures<E>(
    kv: &dyn KvRead<Error = E>,
    from: i32,
    to: i32,
    sums: bool,
) -> Result<DayFigures, E> {
    Ok(DayFigures {
        counts: day_type_counts(kv, from, to)?,
        sums: if sums {
            day_type_sums(kv, from, to)?
        } else {
            Vec::new()
        },
    })
}

impl DayFigures {
    /// Adds `other`'s rows to these.
    pub fn extend(&mut self, other: DayFigures) {
        self.counts.extend(other.counts);
        self.sums.extend(other.sums);
    }

    /// Event types most first by `by` (ties by name), the first `limit`;
    /// with `field`, each with its sum of that field.
    pub fn top(&self, field: Option<&str>, by: RankBy, limit: usize) -> Vec<TypeCount> {
        let mut totals: BTreeMap<&str, u64> = BTreeMap::new();
        for (_, t, n) in &self.counts {
            let total = totals.entry(t).or_default();
            *total = total.saturating_add(*n);
        }
        let mut sums: HashMap<&str, i128> = HashMap::new();
        if let Some(field) = field {
            for s in self.sums.iter().filter(|s| s.field == field) {
                let total = sums.entry(&s.event_type).or_default();
                *total = total.saturating_add(s.sum);
            }
        }
        let rows: Vec<(TypeCount, i128)> = totals
            .into_iter()
            .map(|(event_type, count)| {
                let total = sums.get(event_type).copied().unwrap_or(0);
                let row = TypeCount {
                    sum: field.map(|_| from_millionths(total)),
                    event_type: event_type.to_owned(),
                    count,
                };
                (row, total)
            })
            .collect();
        rank(rows, by, limit)
    }

    /// What each day adds to a trend of `event_type` (every type: `None`)
    /// summing `field`.
    pub fn trend_days(
        &self,
        event_type: Option<&str>,
        field: Option<&str>,
    ) -> BTreeMap<i32, TrendDay> {
        let wanted = |t: &str| event_type.is_none_or(|want| want == t);
        let mut days: BTreeMap<i32, TrendDay> = BTreeMap::new();
        for (day, t, n) in &self.counts {
            if wanted(t) {
                days.entry(*day).or_default().count += n;
            }
        }
        if let Some(field) = field {
            for s in &self.sums {
                if s.field == field && wanted(&s.event_type) {
                    let day = days.entry(s.day).or_default();
                    day.sum = day.sum.saturating_add(s.sum);
                    day.present += s.present;
                }
            }
        }
        days
    }
}

/// Most first (by count or by sum), then by name; the first `limit`.
fn rank(mut rows: Vec<(TypeCount, i128)>, by: RankBy, limit: usize) -> Vec<TypeCount> {
    rows.sort_by(|(a, a_sum), (b, b_sum)| {
        let first = match by {
            RankBy::Count => b.count.cmp(&a.count),
            RankBy::Sum => b_sum.cmp(a_sum),
        };
        first.then_with(|| a.event_type.cmp(&b.event_type))
    });
    let mut rows: Vec<TypeCount> = rows.into_iter().map(|(row, _)| row).collect();
    rows.truncate(limit);
    rows
}

/// Processed events per day and type over `from..=to`, as `(day, type,
/// count)`: what an instance publishes for its deployment's top events.
pub fn day_type_counts<E>(
    kv: &dyn KvRead<Error = E>,
    from: i32,
    to: i32,
) -> Result<Vec<(i32, String, u64)>, E> {
    let mut counts = Vec::new();
    kv.scan(
        &key(&[b"T", &day_key(from)]),
        &key(&[b"T", &day_key(to.saturating_add(1))]),
        &mut |k, v| {
            if let Some(day) = k.get(1..5).and_then(|d| <[u8; 4]>::try_from(d).ok()) {
                let day = (u32::from_be_bytes(day) ^ 0x8000_0000) as i32;
                let t = String::from_utf8_lossy(k.get(5..).unwrap_or_default()).into_owned();
                counts.push((day, t, read_u64(Some(v.to_vec()))));
            }
            true
        },
    )?;
    Ok(counts)
}

/// One day's sum of a `sum_fields` field over the events of one type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DayTypeSum {
    /// Days since 1970-01-01.
    pub day: i32,
    /// The event type.
    pub event_type: String,
    /// The field (a `sum_fields` path).
    pub field: String,
    /// The sum, in millionths.
    pub sum: i128,
    /// Events that had a number there.
    pub present: u64,
}

/// Every day's sums of `from..=to`, by type and field.
pub fn day_type_sums<E>(
    kv: &dyn KvRead<Error = E>,
    from: i32,
    to: i32,
) -> Result<Vec<DayTypeSum>, E> {
    let mut sums = Vec::new();
    scan_sums(kv, from, to, &mut |entry| {
        sums.push(DayTypeSum {
            day: entry.day,
            event_type: String::from_utf8_lossy(entry.event_type).into_owned(),
            field: String::from_utf8_lossy(entry.field).into_owned(),
            sum: entry.sum,
            present: entry.present,
        })
    })?;
    Ok(sums)
}

/// One `S` entry: a field's sum over one type's events of one day.
struct DaySum<'a> {
    /// The day.
    day: i32,
    /// The event type.
    event_type: &'a [u8],
    /// The field (a `sum_fields` path).
    field: &'a [u8],
    /// The sum, in millionths.
    sum: i128,
    /// Events that had a number there.
    present: u64,
}

/// Calls `f` for every `S` entry of `from..=to`.
fn scan_sums<E>(
    kv: &dyn KvRead<Error = E>,
    from: i32,
    to: i32,
    f: &mut dyn FnMut(DaySum),
) -> Result<(), E> {
    kv.scan(
        &key(&[b"S", &day_key(from)]),
        &key(&[b"S", &day_key(to.saturating_add(1))]),
        &mut |k, v| {
            let day = k
                .get(1..5)
                .and_then(|d| <[u8; 4]>::try_from(d).ok())
                .map(|d| (u32::from_be_bytes(d) ^ 0x8000_0000) as i32);
            if let (Some(day), Some((event_type, field))) = (day, k.get(5..).and_then(split_part)) {
                let (sum, present) = read_sum(Some(v.to_vec()));
                f(DaySum {
                    day,
                    event_type,
                    field,
                    sum,
                    present,
                });
            }
            true
        },
    )
}

/// One cohort of `/stats/retention`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cohort {
    /// First day of the cohort's window, `YYYY-MM-DD`.
    pub cohort: String,
    /// Users whose first event falls in that window.
    pub size: u64,
    /// `retained[k]`: of them, users with an event in window `i + k`.
    pub retained: Vec<u64>,
}

/// Each of `users`' first day on this store (the day of its earliest
/// event), for those it has seen: what an instance shares for its
/// deployment's cohorts.
pub fn first_days<E>(
    kv: &dyn KvRead<Error = E>,
    users: &[String],
) -> Result<Vec<(String, i32)>, E> {
    let mut days = Vec::with_capacity(users.len());
    for user in users {
        let first = kv
            .get(&key(&[b"F", &user_part(user)]))?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map(i64::from_be_bytes);
        if let Some(first) = first {
            days.push((user.clone(), day_of(first)));
        }
    }
    Ok(days)
}

/// Up to `limit` users with their first day on this store, in key order
/// after the user `after` (from the first: `None`): a page of every user
/// this store has seen.
pub fn first_days_page<E>(
    kv: &dyn KvRead<Error = E>,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<(String, i32)>, E> {
    let from = match after {
        Some(user) => key(&[b"F", &user_part(user)]),
        None => b"F".to_vec(),
    };
    let mut page = Vec::new();
    kv.scan(&from, b"G", &mut |k, v| {
        if k == from.as_slice() {
            return true;
        }
        let user = k.get(1..).and_then(split_part).map(|(u, _)| u);
        let first = <[u8; 8]>::try_from(v).ok().map(i64::from_be_bytes);
        if let (Some(user), Some(first)) = (user, first) {
            page.push((String::from_utf8_lossy(user).into_owned(), day_of(first)));
        }
        page.len() < limit
    })?;
    Ok(page)
}

/// Cohort retention: `windows` windows of `window_days` from `start`.
pub fn retention<E>(
    kv: &dyn KvRead<Error = E>,
    start: i32,
    windows: u32,
    window_days: i32,
) -> Result<Vec<Cohort>, E> {
    let windows = windows as i32;
    let mut cohorts = Vec::new();
    for i in 0..windows {
        let from = start + i * window_days;
        let mut users: Vec<Vec<u8>> = Vec::new();
        kv.scan(
            &key(&[b"C", &day_key(from)]),
            &key(&[b"C", &day_key(from + window_days)]),
            &mut |k, _| {
                users.push(k.get(5..).unwrap_or_default().to_vec());
                true
            },
        )?;
        let mut retained = vec![users.len() as u64];
        for k in 1..(windows - i) {
            let w_from = from + k * window_days;
            let w_to = w_from + window_days;
            let mut n = 0;
            for user in &users {
                let mut active = false;
                kv.scan(
                    &key(&[b"U", user, &day_key(w_from)]),
                    &key(&[b"U", user, &day_key(w_to)]),
                    &mut |_, _| {
                        active = true;
                        false
                    },
                )?;
                n += u64::from(active);
            }
            retained.push(n);
        }
        cohorts.push(Cohort {
            cohort: format_day(from),
            size: users.len() as u64,
            retained,
        });
    }
    Ok(cohorts)
}

/// `/stats/windows`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Windows {
    /// Distinct users with an event in the last 5 minutes.
    pub active_users_5m: u64,
    /// Distinct sessions with an event in the last 5 minutes.
    pub active_sessions_5m: u64,
    /// `page_view` events in the last 15 minutes.
    pub page_views_15m: u64,
    /// Pages by views in the last 15 minutes, most first (top 10).
    pub top_pages_15m: Vec<PageViews>,
}

/// One row of `top_pages_15m`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PageViews {
    /// The page.
    pub page: String,
    /// Its views.
    pub views: u64,
}

/// Rolling windows ending at `now_ms`: the current minute and the ones
/// before it (5 and 15 minute buckets), by event time.
pub fn windows<E>(kv: &dyn KvRead<Error = E>, now_ms: i64) -> Result<Windows, E> {
    let now_minute = now_ms.div_euclid(MS_PER_MINUTE);
    let end = i64_key(now_minute + 1);
    let mut users = HashSet::new();
    let mut sessions = HashSet::new();
    kv.scan(
        &key(&[b"m", &i64_key(now_minute - (ACTIVE_WINDOW_MINUTES - 1))]),
        &key(&[b"m", &end]),
        &mut |k, _| {
            match k.get(9) {
                Some(b'u') => users.insert(k[10..].to_vec()),
                Some(b's') => sessions.insert(k[10..].to_vec()),
                _ => false,
            };
            true
        },
    )?;
    let mut pages: BTreeMap<String, u64> = BTreeMap::new();
    kv.scan(
        &key(&[b"p", &i64_key(now_minute - (PAGE_WINDOW_MINUTES - 1))]),
        &key(&[b"p", &end]),
        &mut |k, v| {
            let page = String::from_utf8_lossy(k.get(9..).unwrap_or_default()).into_owned();
            *pages.entry(page).or_default() += read_u64(Some(v.to_vec()));
            true
        },
    )?;
    Ok(Windows::of(
        users.len() as u64,
        sessions.len() as u64,
        pages,
    ))
}

impl Windows {
    /// The windows of these distinct users and sessions (5 minutes) and
    /// these views by page (15 minutes): the top 10 pages, most first,
    /// ties by name.
    pub fn of(users: u64, sessions: u64, pages: BTreeMap<String, u64>) -> Windows {
        let page_views_15m = pages.values().sum();
        let mut top: Vec<PageViews> = pages
            .into_iter()
            .map(|(page, views)| PageViews { page, views })
            .collect();
        top.sort_by(|a, b| b.views.cmp(&a.views).then_with(|| a.page.cmp(&b.page)));
        top.truncate(10);
        Windows {
            active_users_5m: users,
            active_sessions_5m: sessions,
            page_views_15m,
            top_pages_15m: top,
        }
    }
}

/// Receipt→processed latency percentiles (ms) from the on-disk histogram,
/// each the upper bound of the bucket that holds it.
pub fn latency_percentiles<E>(
    kv: &dyn KvRead<Error = E>,
    quantiles: &[f64],
) -> Result<Vec<f64>, E> {
    let mut counts = [0u64; LATENCY_BUCKETS_MS.len()];
    kv.scan(b"L", b"M", &mut |k, v| {
        if let Some(&b) = k.get(1)
            && let Some(c) = counts.get_mut(b as usize)
        {
            *c = read_u64(Some(v.to_vec()));
        }
        true
    })?;
    let total: u64 = counts.iter().sum();
    Ok(quantiles
        .iter()
        .map(|q| {
            if total == 0 {
                return 0.0;
            }
            let rank = (q * total as f64).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (i, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    let bound = LATENCY_BUCKETS_MS[i];
                    return if bound.is_finite() {
                        bound
                    } else {
                        LATENCY_BUCKETS_MS[i - 1]
                    };
                }
            }
            0.0
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The direct read of a body's fields agrees with the general one
    /// (`serde_json::Value`) on every shape, the awkward ones included.
    #[test]
    fn facts_read_directly_match_the_general_reading() {
        let bodies = [
            r#"{"event_id":"e","event_type":"page_view","user_id":"u1","session_id":"s1","properties":{"page":"/a","n":[1,{"x":2}]}}"#,
            r#"{"user_id":"","session_id":null,"metadata":{"page":"/m"}}"#,
            r#"{"user_id":42,"session_id":{"a":1},"properties":{"page":7},"metadata":{"page":"/m"}}"#,
            r#"{"user_id":"caf\u00e9 \"q\"","properties":{"pa\u0067e":"/escaped-key"}}"#,
            r#"{"user_id":"first","user_id":"second"}"#,
            r#"{"properties":"not an object","metadata":[1,2]}"#,
            r#"{"properties":{"page":""},"metadata":{"page":"/fallback"}}"#,
            r#""a string""#,
            r#"not json"#,
            r#"{}"#,
        ];
        for body in bodies {
            let record = WalRecord {
                source: "s".into(),
                key: "k".into(),
                event_type: "page_view".into(),
                received_at_ms: 0,
                occurred_at_ms: 0,
                only_sink: None,
                body: body.into(),
            };
            let facts = Facts::of(&record, 0, Wanted::default());
            let (user_id, session_id, page) = fields_of_value(body);
            assert_eq!(
                (facts.user_id, facts.session_id, facts.page),
                (user_id, session_id, page),
                "{body}"
            );
        }
    }

    #[test]
    fn sums_take_numbers_below_a_bound_and_windows_ignore_far_future_events() {
        assert_eq!(millionths(&serde_json::json!(19.99)), Some(19_990_000));
        assert_eq!(millionths(&serde_json::json!(-4)), Some(-4_000_000));
        assert_eq!(
            millionths(&serde_json::json!(1e14)),
            Some(100_000_000_000_000_000_000)
        );
        assert_eq!(millionths(&serde_json::json!(1e15)), None);
        assert_eq!(millionths(&serde_json::json!(u64::MAX)), None);
        assert_eq!(millionths(&serde_json::json!("12")), None);
        let window = WindowConfig {
            name: "w".into(),
            minutes: 10,
            event_types: Vec::new(),
            group_by: "g".into(),
            sum: None,
        };
        let wanted = Wanted {
            sum_fields: &[],
            windows: std::slice::from_ref(&window),
        };
        let at = |occurred_at_ms: i64| WalRecord {
            source: "s".into(),
            key: "k".into(),
            event_type: "t".into(),
            received_at_ms: 0,
            occurred_at_ms,
            only_sink: None,
            body: r#"{"g":"x"}"#.into(),
        };
        let now = 1_000 * MS_PER_MINUTE;
        assert_eq!(Facts::of(&at(now - 60_000), now, wanted).windows.len(), 1);
        assert_eq!(Facts::of(&at(now + 60_000), now, wanted).windows.len(), 1);
        assert!(
            Facts::of(&at(now + 86_400_000), now, wanted)
                .windows
                .is_empty()
        );
        assert!(
            Facts::of(&at(now - 11 * MS_PER_MINUTE), now, wanted)
                .windows
                .is_empty()
        );
    }

    /// What an instance shares of each minute, added up over the minutes a
    /// window spans, is what its own query answers: the deployment's
    /// answer over one instance equals the instance's.
    #[test]
    fn minute_cells_and_members_add_up_to_the_local_windows() {
        use crate::storage::memory::{MapRead, MapTx};

        let window = WindowConfig {
            name: "plays".into(),
            minutes: 10,
            event_types: vec!["play".into()],
            group_by: "properties.content_id".into(),
            sum: Some("properties.seconds".into()),
        };
        let wanted = Wanted {
            sum_fields: &[],
            windows: std::slice::from_ref(&window),
        };
        let now = 1_000 * MS_PER_MINUTE + 30_000;
        let event = |minutes_ago: i64, event_type: &str, body: &str| WalRecord {
            source: "s".into(),
            key: "k".into(),
            event_type: event_type.into(),
            received_at_ms: now,
            occurred_at_ms: now - minutes_ago * MS_PER_MINUTE,
            only_sink: None,
            body: body.into(),
        };
        let records = [
            event(
                0,
                "page_view",
                r#"{"user_id":"ann","session_id":"s1","properties":{"page":"/a"}}"#,
            ),
            event(
                2,
                "page_view",
                r#"{"user_id":"bob","session_id":"s2","properties":{"page":"/a"}}"#,
            ),
            event(
                7,
                "page_view",
                r#"{"user_id":"cy","properties":{"page":"/b"}}"#,
            ),
            event(
                20,
                "page_view",
                r#"{"user_id":"old","properties":{"page":"/old"}}"#,
            ),
            event(
                1,
                "play",
                r#"{"user_id":"ann","properties":{"content_id":"c1","seconds":2.5}}"#,
            ),
            event(
                9,
                "play",
                r#"{"user_id":"ann","properties":{"content_id":"c2","seconds":4}}"#,
            ),
        ];
        let facts: Vec<Facts> = records.iter().map(|r| Facts::of(r, now, wanted)).collect();
        let mut map = BTreeMap::new();
        let Ok(_) = apply(
            &mut MapTx(&mut map),
            &facts.iter().collect::<Vec<_>>(),
            now,
            1,
            &Known::default(),
        );
        let kv = MapRead(&map);

        let now_minute = now.div_euclid(MS_PER_MINUTE);
        let mut pages = BTreeMap::new();
        for m in now_minute - (PAGE_WINDOW_MINUTES - 1)..=now_minute {
            for (page, views) in minute_cells(&kv, m).unwrap().pages {
                *pages.entry(page).or_default() += views;
            }
        }
        let (mut users, mut sessions) = (BTreeSet::new(), BTreeSet::new());
        for m in now_minute - (ACTIVE_WINDOW_MINUTES - 1)..=now_minute {
            let (u, s) = minute_members(&kv, m).unwrap();
            users.extend(u);
            sessions.extend(s);
        }
        assert_eq!(users, BTreeSet::from(["ann".to_owned(), "bob".to_owned()]));
        let shared = Windows::of(users.len() as u64, sessions.len() as u64, pages);
        assert_eq!(shared, windows(&kv, now).unwrap());
        assert_eq!(shared.page_views_15m, 3, "the view 20 minutes ago is out");

        let mut groups = GroupTotals::new();
        for m in now_minute - 9..=now_minute {
            for (group, (sum, count)) in minute_cells(&kv, m)
                .unwrap()
                .groups
                .remove("plays")
                .unwrap_or_default()
            {
                add_group(&mut groups, group, sum, count);
            }
        }
        let shared = rank_groups(groups, true, 10);
        assert_eq!(shared, custom_window(&kv, &window, now, 10).unwrap());
        assert_eq!(
            shared
                .iter()
                .map(|g| (g.key.as_str(), g.sum))
                .collect::<Vec<_>>(),
            [("c2", Some(4.0)), ("c1", Some(2.5))]
        );
    }

    #[test]
    fn days_round_trip_and_bad_dates_name_the_parameter() {
        assert_eq!(parse_day("from", "1970-01-01"), Ok(0));
        assert_eq!(parse_day("from", "2024-01-15"), Ok(19737));
        assert_eq!(format_day(19737), "2024-01-15");
        assert_eq!(format_day(-1), "1969-12-31");
        assert_eq!(parse_day("from", "0001-01-01"), Ok(MIN_DAY));
        assert_eq!(parse_day("to", "9999-12-31"), Ok(MAX_DAY));
        assert!(check_range(MIN_DAY - 1, MIN_DAY).is_err());
        assert!(check_range(MAX_DAY, MAX_DAY + 1).is_err());
        for bad in ["2024-02-30", "2024-1-5", "yesterday", "", "2024-13-01"] {
            assert_eq!(parse_day("from", bad).unwrap_err().param, "from", "{bad}");
        }
        assert_eq!(day_of(-1), -1);
        assert!(day_key(-1) < day_key(0));
        assert!(check_range(5, 4).is_err());
        assert!(check_range(0, 366).is_err());
        assert!(check_range(0, 365).is_ok());
    }

    /// What `Known` lets `apply` skip changes nothing it writes: batches
    /// applied with the members learnt from the batches committed before
    /// leave the same aggregates as batches applied reading every member.
    /// Some commits fail (they write and teach nothing), restarts forget
    /// everything, prunes remove old minutes, and events come out of order
    /// in time (a user's first time moves earlier).
    mod known {
        use proptest::prelude::*;

        use super::super::*;
        use crate::storage::memory::MapTx;

        const NOW: i64 = 1_700_000_000_000;

        fn facts() -> impl Strategy<Value = Facts> {
            (
                0..3usize,
                proptest::option::of(0..5u8),
                proptest::option::of(0..3u8),
                prop_oneof![0..120_000i64, 0..2 * MS_PER_HOUR, 0..3 * MS_PER_DAY],
            )
                .prop_map(|(t, user, session, age)| Facts {
                    event_type: ["a", "b", "page_view"][t].to_owned(),
                    occurred_at_ms: NOW - age,
                    user_id: user.map(|u| format!("u{u}")),
                    session_id: session.map(|s| format!("s{s}")),
                    page: (t == 2).then(|| "/p".to_owned()),
                    latency_ms: 3,
                    sums: Vec::new(),
                    windows: Vec::new(),
                })
        }

        /// One step: a batch (processed at `advance` ms on, kept or lost
        /// when it commits), a prune of the old minutes, or a restart.
        #[derive(Debug, Clone)]
        enum Step {
            Batch {
                facts: Vec<Facts>,
                advance: i64,
                committed: bool,
            },
            Prune,
            /// The store reopens: it knows nothing, but holds everything.
            Restart,
        }

        fn step() -> impl Strategy<Value = Step> {
            prop_oneof![
                6 => (
                    proptest::collection::vec(facts(), 1..12),
                    0..20 * MS_PER_MINUTE,
                    proptest::bool::weighted(0.9),
                )
                    .prop_map(|(facts, advance, committed)| Step::Batch {
                        facts,
                        advance,
                        committed,
                    }),
                1 => Just(Step::Prune),
                1 => Just(Step::Restart),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(300))]

            #[test]
            fn known_members_change_no_aggregate(steps in proptest::collection::vec(step(), 1..40)) {
                let mut read_all = BTreeMap::new();
                let mut cached = BTreeMap::new();
                let mut known = Known::default();
                let mut now = NOW;
                let mut learnt_any = false;
                for (i, step) in steps.iter().enumerate() {
                    match step {
                        Step::Batch { facts, advance, committed } => {
                            now += advance;
                            let facts: Vec<&Facts> = facts.iter().collect();
                            let batch = i as u64 + 1;
                            if *committed {
                                let Ok(_) = apply(&mut MapTx(&mut read_all), &facts, now, batch, &Known::default());
                                let Ok(learned) = apply(&mut MapTx(&mut cached), &facts, now, batch, &known);
                                learnt_any |= !learned.present.is_empty() || !learned.first_seen.is_empty();
                                known.learn(learned);
                            } else {
                                // A commit that fails writes nothing, and what
                                // it learnt is dropped.
                                let mut aborted = cached.clone();
                                let Ok(_) = apply(&mut MapTx(&mut aborted), &facts, now, batch, &known);
                            }
                        }
                        Step::Prune => {
                            let before = now - WINDOW_RETENTION_MINUTES * MS_PER_MINUTE;
                            for map in [&mut read_all, &mut cached] {
                                for (from, to) in stale_window_ranges(before) {
                                    map.retain(|k: &Vec<u8>, _| !(k.as_slice() >= from.as_slice() && k.as_slice() < to.as_slice()));
                                }
                            }
                            known.forget_minutes();
                        }
                        Step::Restart => known = Known::default(),
                    }
                    prop_assert_eq!(&cached, &read_all, "after step {}", i);
                }
                // A case in which the cache never held anything proves
                // nothing: it is rejected (proptest gives up if many are).
                prop_assume!(learnt_any);
            }
        }

        #[test]
        fn a_full_cache_starts_over_and_a_prune_forgets_only_minutes() {
            let mut known = Known::default();
            let mut map = BTreeMap::new();
            let one = Facts {
                event_type: "a".into(),
                occurred_at_ms: NOW,
                user_id: Some("u".into()),
                session_id: Some("s".into()),
                page: None,
                latency_ms: 1,
                sums: Vec::new(),
                windows: Vec::new(),
            };
            let Ok(learned) = apply(&mut MapTx(&mut map), &[&one], NOW, 1, &known);
            known.learn(learned);
            // U, F, and the minute's user and session.
            assert_eq!(known.len(), 4);
            known.forget_minutes();
            assert_eq!(known.len(), 2);
            let Ok(learned) = apply(&mut MapTx(&mut map), &[&one], NOW, 2, &known);
            // The minute's members were read again, the rest was not.
            assert_eq!((learned.present.len(), learned.first_seen.len()), (2, 0));
            known.learn(learned);
            let many = Learned {
                present: (0..Known::CAPACITY)
                    .map(|i| i.to_be_bytes().to_vec())
                    .collect(),
                first_seen: Vec::new(),
            };
            known.learn(many);
            assert_eq!(
                known.len(),
                Known::CAPACITY,
                "started over, then took the new ones"
            );
        }
    }
}
