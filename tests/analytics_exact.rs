//! The `/stats` answers checked against an independent recomputation.
//!
//! Each test generates a data set from a seeded RNG, sends it to the real
//! binary out of time order, and recomputes every answer here in plain Rust
//! over the events it sent (distinct users per UTC day, counts per type,
//! cohorts by each user's earliest event, trends and sums per day, week
//! and month, rolling windows over enriched events). Nothing of inletd's analytics
//! code is used for the expected values; dates are formatted and parsed by
//! hand, too.
//!
//! A failing run prints its seed; `ANALYTICS_EXACT_SEED=<seed> cargo test
//! --test analytics_exact` replays it.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt::Debug;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Daemon;
use serde_json::{Value, json};

const DAY_MS: i64 = 86_400_000;

// ---------------------------------------------------------------------------
// Seeds

/// Prints the seed when the test fails, so the run can be replayed.
struct SeedReport(u64);

impl Drop for SeedReport {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "analytics_exact: this run used seed {0}; replay it with ANALYTICS_EXACT_SEED={0}",
                self.0
            );
        }
    }
}

/// The seed from `ANALYTICS_EXACT_SEED`, else a fresh one.
fn seed() -> (u64, SeedReport) {
    let seed = std::env::var("ANALYTICS_EXACT_SEED")
        .ok()
        .map(|s| s.trim().parse().expect("ANALYTICS_EXACT_SEED: a u64"))
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("analytics_exact: seed {seed}");
    (seed, SeedReport(seed))
}

// ---------------------------------------------------------------------------
// Calendar (proleptic Gregorian, by hand: independent of the daemon's code)

/// Days since 1970-01-01 of a civil date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date of a day number.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (
        if m <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        m,
        d,
    )
}

/// `YYYY-MM-DD` of a day number.
fn date(day: i64) -> String {
    let (y, m, d) = civil_from_days(day);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The UTC day of a time in ms.
fn day_of(ms: i64) -> i64 {
    ms.div_euclid(DAY_MS)
}

/// RFC 3339 text for `ms`, written in a random offset and precision: the
/// local date in the text is often not the UTC day the event belongs to.
fn rfc3339(rng: &mut fastrand::Rng, ms: i64) -> String {
    const OFFSETS_MIN: [i64; 9] = [0, 120, -300, 330, -570, 840, -720, 60, 345];
    let offset = if rng.bool() {
        0
    } else {
        OFFSETS_MIN[rng.usize(..OFFSETS_MIN.len())]
    };
    let local = ms + offset * 60_000;
    let (y, mo, d) = civil_from_days(day_of(local));
    let t = local.rem_euclid(DAY_MS);
    let (h, mi, s, milli) = (t / 3_600_000, t / 60_000 % 60, t / 1000 % 60, t % 1000);
    // Sub-millisecond digits never move an event across midnight: the event
    // time is ms + a fraction of a ms.
    let frac = match rng.u32(0..4) {
        0 if milli == 0 => String::new(),
        1 => format!(".{milli:03}{:03}", rng.u32(0..1000)),
        2 => format!(".{milli:03}{:06}", rng.u32(0..1_000_000)),
        _ => format!(".{milli:03}"),
    };
    let zone = if offset == 0 && rng.bool() {
        "Z".to_owned()
    } else {
        let sign = if offset < 0 { '-' } else { '+' };
        format!("{sign}{:02}:{:02}", offset.abs() / 60, offset.abs() % 60)
    };
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}{frac}{zone}")
}

#[test]
fn the_tests_own_calendar_is_right() {
    assert_eq!(days_from_civil(1970, 1, 1), 0);
    assert_eq!(days_from_civil(2024, 1, 15), 19_737);
    assert_eq!(date(days_from_civil(2024, 2, 29)), "2024-02-29");
    assert_eq!(date(days_from_civil(2024, 3, 1) - 1), "2024-02-29");
    assert_eq!(date(-1), "1969-12-31");
    for day in 19_000..21_000 {
        let (y, m, d) = civil_from_days(day);
        assert_eq!(days_from_civil(y, m, d), day);
    }
    let mut rng = fastrand::Rng::with_seed(7);
    let ms = days_from_civil(2024, 3, 1) * DAY_MS + 30_000;
    let texts: HashSet<String> = (0..200).map(|_| rfc3339(&mut rng, ms)).collect();
    assert!(texts.contains("2024-03-01T00:00:30Z"), "{texts:?}");
    assert!(texts.contains("2024-02-29T19:00:30.000-05:00"), "{texts:?}");
}

// ---------------------------------------------------------------------------
// The data set

/// One event as sent, with what the recomputation needs of it.
#[derive(Debug, Clone)]
struct Sent {
    id: String,
    kind: String,
    user: Option<String>,
    at_ms: i64,
    /// `properties.amount` in cents, when it is a number.
    amount: Option<i64>,
    body: Value,
}

/// The field the daemon is told to sum (`sum_fields`).
const AMOUNT: &str = "properties.amount";
/// The config every test here starts the daemon with.
const CONFIG: &str = "sum_fields = [\"properties.amount\"]";

/// What to generate.
struct Shape {
    events: usize,
    users: usize,
    first_day: i64,
    days: i64,
    id_prefix: &'static str,
}

/// Event types with their weights.
const TYPES: [(&str, u32); 8] = [
    ("page_view", 35),
    ("click", 20),
    ("search", 12),
    ("login", 10),
    ("add_to_cart", 8),
    ("logout", 6),
    ("signup", 5),
    ("purchase", 4),
];

/// A user: active from `start` (inclusive) to `end` (exclusive), day
/// offsets from the first day.
struct Persona {
    id: String,
    start: i64,
    end: i64,
}

fn pick_weighted(rng: &mut fastrand::Rng, cumulative: &[u64]) -> usize {
    let total = *cumulative.last().expect("weights");
    let r = rng.u64(0..total);
    cumulative.partition_point(|c| *c <= r)
}

/// Events (distinct ids, in time order per user as generated, not as sent)
/// spread over `shape.days` UTC days; about 8% without a user. User ids
/// include prefixes of each other (`u7`, `u70`, `u700`) and non-ASCII ones.
fn generate(rng: &mut fastrand::Rng, shape: &Shape) -> Vec<Sent> {
    let personas: Vec<Persona> = (0..shape.users)
        .map(|n| {
            let id = match n % 10 {
                3 => format!("用户{n}"),
                7 => format!("josé-{n}"),
                _ => format!("u{n}"),
            };
            // Skewed towards early starts so that cohorts have a history.
            let start = rng.i64(0..shape.days).min(rng.i64(0..shape.days));
            let end = (start + rng.i64(1..=shape.days)).min(shape.days);
            Persona { id, start, end }
        })
        .collect();
    let mut cumulative_users = Vec::with_capacity(personas.len());
    let mut sum = 0;
    for _ in &personas {
        sum += rng.u64(1..=20);
        cumulative_users.push(sum);
    }
    let mut cumulative_types = Vec::with_capacity(TYPES.len());
    let mut sum = 0;
    for (_, w) in TYPES {
        sum += u64::from(w);
        cumulative_types.push(sum);
    }
    (0..shape.events)
        .map(|i| {
            let kind = TYPES[pick_weighted(rng, &cumulative_types)].0.to_owned();
            let (user, day) = if rng.u32(0..100) < 8 {
                (None, rng.i64(0..shape.days))
            } else {
                let p = &personas[pick_weighted(rng, &cumulative_users)];
                (Some(p.id.clone()), rng.i64(p.start..p.end))
            };
            let time_of_day = match rng.u32(0..100) {
                0 => 0,
                1..=5 => rng.i64(0..120_000),
                6..=10 => DAY_MS - 1 - rng.i64(0..120_000),
                _ => rng.i64(0..DAY_MS),
            };
            let at_ms = (shape.first_day + day) * DAY_MS + time_of_day;
            let id = format!("{}-{i:06}", shape.id_prefix);
            let mut body = json!({"event_id": id, "event_type": kind});
            let field = if rng.bool() {
                "occurred_at"
            } else {
                "timestamp"
            };
            body[field] = json!(rfc3339(rng, at_ms));
            match &user {
                Some(u) => body["user_id"] = json!(u),
                None if rng.bool() => body["user_id"] = Value::Null,
                None => {}
            }
            if rng.u32(0..3) == 0 {
                body["session_id"] = json!(format!("s{}", rng.u32(0..5000)));
            }
            if kind == "page_view" {
                let holder = if rng.bool() { "properties" } else { "metadata" };
                body[holder] = json!({"page": format!("/p/{}", rng.u32(0..30))});
            }
            // Revenue on carts and purchases: decimals, whole numbers,
            // refunds below zero, and some that are not numbers at all.
            let mut amount = None;
            if kind == "purchase" || kind == "add_to_cart" {
                let cents = rng.i64(-5_000..50_000);
                let value = match rng.u32(0..10) {
                    0 => None,
                    1 => Some(json!(format!("{}.50", cents / 100))),
                    2 => Some(Value::Null),
                    3 | 4 => {
                        amount = Some(cents / 100 * 100);
                        Some(json!(cents / 100))
                    }
                    _ => {
                        amount = Some(cents);
                        Some(json!(cents as f64 / 100.0))
                    }
                };
                if let Some(value) = value {
                    body["properties"] = json!({ "amount": value });
                }
            }
            Sent {
                id,
                kind,
                user,
                at_ms,
                amount,
                body,
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------
// The recomputation

/// The answers, recomputed from the distinct events that were accepted.
struct Model {
    total: u64,
    by_type: BTreeMap<String, u64>,
    per_day_type: BTreeMap<i64, BTreeMap<String, u64>>,
    users_per_day: BTreeMap<i64, HashSet<String>>,
    first_ms: HashMap<String, i64>,
    active_days: HashMap<String, BTreeSet<i64>>,
    /// Per day and type: the users, the amount in cents, events with one.
    day_type: BTreeMap<i64, BTreeMap<String, DayType>>,
}

/// One type on one day.
#[derive(Default)]
struct DayType {
    users: HashSet<String>,
    cents: i64,
    with_amount: u64,
}

/// A trend period: first day, events, users, cents summed, skipped.
type Period = (String, u64, u64, i64, u64);

impl Model {
    fn of(events: &[Sent]) -> Model {
        let ids: HashSet<&str> = events.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids.len(), events.len(), "the model takes distinct events");
        let mut m = Model {
            total: 0,
            by_type: BTreeMap::new(),
            per_day_type: BTreeMap::new(),
            users_per_day: BTreeMap::new(),
            first_ms: HashMap::new(),
            active_days: HashMap::new(),
            day_type: BTreeMap::new(),
        };
        for e in events {
            let day = day_of(e.at_ms);
            m.total += 1;
            *m.by_type.entry(e.kind.clone()).or_default() += 1;
            *m.per_day_type
                .entry(day)
                .or_default()
                .entry(e.kind.clone())
                .or_default() += 1;
            let cell = m
                .day_type
                .entry(day)
                .or_default()
                .entry(e.kind.clone())
                .or_default();
            if let Some(cents) = e.amount {
                cell.cents += cents;
                cell.with_amount += 1;
            }
            if let Some(u) = &e.user {
                cell.users.insert(u.clone());
                m.users_per_day.entry(day).or_default().insert(u.clone());
                let first = m.first_ms.entry(u.clone()).or_insert(e.at_ms);
                *first = (*first).min(e.at_ms);
                m.active_days.entry(u.clone()).or_default().insert(day);
            }
        }
        m
    }

    fn dau(&self, from: i64, to: i64) -> Vec<(String, u64)> {
        (from..=to)
            .map(|d| {
                let n = self.users_per_day.get(&d).map_or(0, HashSet::len);
                (date(d), n as u64)
            })
            .collect()
    }

    fn top_events(&self, from: i64, to: i64, limit: usize) -> Vec<(String, u64)> {
        let mut totals: BTreeMap<&str, u64> = BTreeMap::new();
        for (_, types) in self.per_day_type.range(from..=to) {
            for (t, n) in types {
                *totals.entry(t).or_default() += n;
            }
        }
        let mut rows: Vec<(String, u64)> =
            totals.into_iter().map(|(t, n)| (t.to_owned(), n)).collect();
        rows.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        rows.truncate(limit);
        rows
    }

    /// Event types by the cents summed over `from..=to`, most first (ties
    /// by name), with their counts.
    fn top_by_amount(&self, from: i64, to: i64) -> Vec<(String, u64, i64)> {
        let mut totals: BTreeMap<&str, (u64, i64)> = BTreeMap::new();
        for (day, types) in self.per_day_type.range(from..=to) {
            for (t, n) in types {
                let total = totals.entry(t).or_default();
                total.0 += n;
                total.1 += self.day_type[day][t].cents;
            }
        }
        let mut rows: Vec<(String, u64, i64)> = totals
            .into_iter()
            .map(|(t, (n, cents))| (t.to_owned(), n, cents))
            .collect();
        rows.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.0.cmp(&b.0)));
        rows
    }

    /// Whole periods (`day`, `week` from Monday, `month` from the 1st)
    /// covering `from..=to`: each with its events, distinct users, cents
    /// and events without a numeric amount, of `kind` or of every type.
    fn trends(&self, from: i64, to: i64, interval: &str, kind: Option<&str>) -> Vec<Period> {
        let start_of = |day: i64| match interval {
            "day" => day,
            // 1970-01-05 (day 4) was a Monday.
            "week" => day - (day - 4).rem_euclid(7),
            _ => {
                let (y, m, _) = civil_from_days(day);
                days_from_civil(y, m, 1)
            }
        };
        let next = |start: i64| match interval {
            "day" => start + 1,
            "week" => start + 7,
            _ => {
                let (y, m, _) = civil_from_days(start);
                if m == 12 {
                    days_from_civil(y + 1, 1, 1)
                } else {
                    days_from_civil(y, m + 1, 1)
                }
            }
        };
        let mut out = Vec::new();
        let mut start = start_of(from);
        while start <= to {
            let end = next(start);
            let (mut count, mut cents, mut with_amount) = (0, 0, 0);
            let mut users: HashSet<&String> = HashSet::new();
            for (_, types) in self.day_type.range(start..end) {
                for (t, cell) in types {
                    if kind.is_some_and(|k| k != t) {
                        continue;
                    }
                    cents += cell.cents;
                    with_amount += cell.with_amount;
                    users.extend(cell.users.iter());
                }
            }
            for (_, types) in self.per_day_type.range(start..end) {
                for (t, n) in types {
                    if kind.is_none_or(|k| k == t) {
                        count += n;
                    }
                }
            }
            out.push((
                date(start),
                count,
                users.len() as u64,
                cents,
                count - with_amount,
            ));
            start = end;
        }
        out
    }

    /// Cohort `i` = users whose earliest event falls in window `i`;
    /// `retained[k]` = those of them with an event in window `i + k`.
    fn retention(
        &self,
        start: i64,
        windows: i64,
        window_days: i64,
    ) -> Vec<(String, u64, Vec<u64>)> {
        (0..windows)
            .map(|i| {
                let from = start + i * window_days;
                let cohort: Vec<&String> = self
                    .first_ms
                    .iter()
                    .filter(|(_, ms)| (from..from + window_days).contains(&day_of(**ms)))
                    .map(|(u, _)| u)
                    .collect();
                let retained = (0..windows - i)
                    .map(|k| {
                        let w = from + k * window_days;
                        cohort
                            .iter()
                            .filter(|u| {
                                self.active_days[**u]
                                    .range(w..w + window_days)
                                    .next()
                                    .is_some()
                            })
                            .count() as u64
                    })
                    .collect();
                (date(from), cohort.len() as u64, retained)
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------
// The daemon's answers

fn stats(d: &Daemon, path: &str) -> Value {
    let r = d.get(path);
    assert_eq!(r.status, 200, "GET {path}: {}", r.text());
    r.json()
}

fn dau_of(d: &Daemon, from: i64, to: i64) -> Vec<(String, u64)> {
    let path = format!("/stats/dau?from={}&to={}", date(from), date(to));
    let r = stats(d, &path);
    assert_eq!(
        (&r["from"], &r["to"]),
        (&json!(date(from)), &json!(date(to)))
    );
    r["days"]
        .as_array()
        .unwrap_or_else(|| panic!("{path}: no days: {r}"))
        .iter()
        .map(|day| {
            let date = day["date"].as_str().unwrap_or_else(|| panic!("{day}"));
            let users = day["users"].as_u64().unwrap_or_else(|| panic!("{day}"));
            (date.to_owned(), users)
        })
        .collect()
}

/// The rows of a `/stats/top-events` answer, each as (type, count) and
/// the row itself.
fn top_rows(d: &Daemon, path: &str) -> Vec<(String, u64, Value)> {
    let r = stats(d, path);
    r["events"]
        .as_array()
        .unwrap_or_else(|| panic!("{path}: no events: {r}"))
        .iter()
        .map(|row| {
            let t = row["event_type"]
                .as_str()
                .unwrap_or_else(|| panic!("{row}"));
            let n = row["count"].as_u64().unwrap_or_else(|| panic!("{row}"));
            (t.to_owned(), n, row.clone())
        })
        .collect()
}

fn top_events_of(d: &Daemon, from: i64, to: i64, limit: usize) -> Vec<(String, u64)> {
    let path = format!(
        "/stats/top-events?from={}&to={}&limit={limit}",
        date(from),
        date(to)
    );
    top_rows(d, &path)
        .into_iter()
        .map(|(t, n, _)| (t, n))
        .collect()
}

/// A sum as the daemon answered it, in cents.
fn cents(value: &Value) -> i64 {
    let x = value.as_f64().unwrap_or_else(|| panic!("a sum: {value}"));
    (x * 100.0).round() as i64
}

fn top_by_amount_of(d: &Daemon, from: i64, to: i64) -> Vec<(String, u64, i64)> {
    let path = format!(
        "/stats/top-events?from={}&to={}&limit=1000&by=sum&sum={AMOUNT}",
        date(from),
        date(to)
    );
    top_rows(d, &path)
        .into_iter()
        .map(|(t, n, row)| (t, n, cents(&row["sum"])))
        .collect()
}

fn trends_of(d: &Daemon, from: i64, to: i64, interval: &str, kind: Option<&str>) -> Vec<Period> {
    let mut path = format!(
        "/stats/trends?from={}&to={}&interval={interval}&sum={AMOUNT}",
        date(from),
        date(to)
    );
    if let Some(kind) = kind {
        path.push_str(&format!("&event_type={kind}"));
    }
    let r = stats(d, &path);
    assert_eq!(
        (&r["interval"], &r["sum"], &r["event_type"]),
        (&json!(interval), &json!(AMOUNT), &json!(kind)),
        "{path}"
    );
    let series: Vec<Period> = r["series"]
        .as_array()
        .unwrap_or_else(|| panic!("{path}: no series: {r}"))
        .iter()
        .map(|p| {
            let number = |k: &str| p[k].as_u64().unwrap_or_else(|| panic!("{k} of {p}"));
            let period = p["period"].as_str().unwrap_or_else(|| panic!("{p}"));
            (
                period.to_owned(),
                number("count"),
                number("users"),
                cents(&p["sum"]),
                number("skipped"),
            )
        })
        .collect();
    let skipped: u64 = series.iter().map(|p| p.4).sum();
    assert_eq!(r["skipped"], skipped, "{path}: the total of the periods");
    assert_eq!(
        r["from"],
        json!(series[0].0),
        "{path}: from is the first period's start"
    );
    series
}

fn retention_of(d: &Daemon, start: i64, windows: i64, kind: &str) -> Vec<(String, u64, Vec<u64>)> {
    let path = format!(
        "/stats/retention?start_date={}&windows={windows}&window_type={kind}",
        date(start)
    );
    let r = stats(d, &path);
    assert_eq!(r["window_type"], kind, "{path}");
    r["cohorts"]
        .as_array()
        .unwrap_or_else(|| panic!("{path}: no cohorts: {r}"))
        .iter()
        .map(|c| {
            let cohort = c["cohort"].as_str().unwrap_or_else(|| panic!("{c}"));
            let size = c["size"].as_u64().unwrap_or_else(|| panic!("{c}"));
            let retained = c["retained"]
                .as_array()
                .unwrap_or_else(|| panic!("{c}"))
                .iter()
                .map(|n| n.as_u64().unwrap_or_else(|| panic!("{c}")))
                .collect();
            (cohort.to_owned(), size, retained)
        })
        .collect()
}

/// `total_events` and `by_type` of `/stats/summary`.
fn summary_of(d: &Daemon) -> (u64, Vec<(String, u64)>) {
    let r = stats(d, "/stats/summary");
    let total = r["total_events"].as_u64().unwrap_or_else(|| panic!("{r}"));
    let by_type = r["by_type"]
        .as_object()
        .unwrap_or_else(|| panic!("{r}"))
        .iter()
        .map(|(t, n)| (t.clone(), n.as_u64().unwrap_or_else(|| panic!("{r}"))))
        .collect();
    (total, by_type)
}

/// Fails listing the rows that differ (not two walls of numbers).
fn same_rows<T: PartialEq + Debug>(what: &str, got: &[T], want: &[T]) {
    if got == want {
        return;
    }
    let rows = got.len().max(want.len());
    let differing: Vec<usize> = (0..rows).filter(|i| got.get(*i) != want.get(*i)).collect();
    let listed: Vec<String> = differing
        .iter()
        .take(25)
        .map(|i| {
            format!(
                "  row {i}: answered {:?}, recomputed {:?}",
                got.get(*i),
                want.get(*i)
            )
        })
        .collect();
    panic!(
        "{what}: {} of {rows} rows differ from the recomputation ({} answered, {} recomputed):\n{}",
        differing.len(),
        got.len(),
        want.len(),
        listed.join("\n")
    );
}

/// Every stats answer against the model, for data on `first_day` and the
/// `days − 1` days after it.
fn assert_answers_match(d: &Daemon, model: &Model, first_day: i64, days: i64) {
    let last_day = first_day + days - 1;
    // A few empty days either side: nothing may leak across the range ends.
    let (from, to) = (first_day - 3, last_day + 3);
    same_rows(
        "DAU over the whole range",
        &dau_of(d, from, to),
        &model.dau(from, to),
    );
    same_rows(
        "DAU over one day",
        &dau_of(d, first_day + 9, first_day + 9),
        &model.dau(first_day + 9, first_day + 9),
    );
    same_rows(
        "top events over the whole range",
        &top_events_of(d, from, to, 1000),
        &model.top_events(from, to, 1000),
    );
    let (sub_from, sub_to) = (first_day + 10, first_day + 19);
    same_rows(
        "top events over days 10..=19",
        &top_events_of(d, sub_from, sub_to, 1000),
        &model.top_events(sub_from, sub_to, 1000),
    );
    same_rows(
        "top 3 events over days 10..=19",
        &top_events_of(d, sub_from, sub_to, 3),
        &model.top_events(sub_from, sub_to, 3),
    );
    same_rows(
        "top events over the last day",
        &top_events_of(d, last_day, last_day, 1000),
        &model.top_events(last_day, last_day, 1000),
    );
    for (start, windows, kind, window_days) in [
        (first_day, 10, "daily", 1),
        // Users who started before day 5 belong to no cohort here.
        (first_day + 5, 12, "daily", 1),
        // The whole triangle, the last windows past the data.
        (first_day, days + 2, "daily", 1),
        (first_day, 5, "weekly", 7),
        (first_day - 1, 6, "weekly", 7),
    ] {
        same_rows(
            &format!("retention from {} ({windows} {kind} windows)", date(start)),
            &retention_of(d, start, windows, kind),
            &model.retention(start, windows, window_days),
        );
    }
    for (interval, kind, trend_from, trend_to) in [
        ("day", None, from, to),
        ("day", Some("purchase"), first_day + 3, first_day + 12),
        // A range that starts mid-week and mid-month: whole periods.
        ("week", None, first_day + 2, last_day),
        ("week", Some("add_to_cart"), from, to),
        ("week", Some("page_view"), first_day, first_day + 20),
        ("month", None, from, to),
        ("month", Some("purchase"), first_day + 1, last_day),
    ] {
        same_rows(
            &format!(
                "trends by {interval} of {} from {} to {}",
                kind.unwrap_or("every type"),
                date(trend_from),
                date(trend_to)
            ),
            &trends_of(d, trend_from, trend_to, interval, kind),
            &model.trends(trend_from, trend_to, interval, kind),
        );
    }
    same_rows(
        "top events by amount over the whole range",
        &top_by_amount_of(d, from, to),
        &model.top_by_amount(from, to),
    );
    same_rows(
        "top events by amount over days 10..=19",
        &top_by_amount_of(d, sub_from, sub_to),
        &model.top_by_amount(sub_from, sub_to),
    );
    let (total, by_type) = summary_of(d);
    let want_by_type: Vec<(String, u64)> =
        model.by_type.iter().map(|(t, n)| (t.clone(), *n)).collect();
    same_rows("summary by_type", &by_type, &want_by_type);
    assert_eq!(total, model.total, "summary total_events");
}

// ---------------------------------------------------------------------------
// The tests

/// A copy of an event re-sent later under the same `event_id` but with a
/// different body (another type, user and day): the first one seen counts.
fn altered_copy(e: &Sent, n: usize, rng: &mut fastrand::Rng) -> Value {
    let at = days_from_civil(2024, 6, 1) * DAY_MS + rng.i64(0..DAY_MS);
    json!({
        "event_id": e.id,
        "event_type": "resent_with_changes",
        "user_id": format!("ghost-{n}"),
        "occurred_at": rfc3339(rng, at),
    })
}

/// A user sends 20,000 events of ~800 users over 40 days of February and
/// March 2024 (leap day included), shuffled out of time order, in batches
/// of ~500. Event times are RFC 3339 in `occurred_at` or `timestamp`, with
/// offsets from −12:00 to +14:00, so the date in the text is often not the
/// event's UTC day, and many events lie within two minutes of midnight.
/// About 2% of the events are sent again in a later batch under the same
/// `event_id`, half as exact copies, half with a changed body.
///
/// Once processed, every answer equals the recomputation over the distinct
/// events (first copy wins): DAU per UTC day, top events over ranges,
/// daily and weekly cohort retention (cohorts by each user's earliest event
/// whatever the arrival order), and the summary totals.
#[test]
fn answers_match_a_recomputation_over_a_large_out_of_order_data_set() {
    let started = Instant::now();
    let (seed, _report) = seed();
    let mut rng = fastrand::Rng::with_seed(seed);
    let shape = Shape {
        events: 20_000,
        users: 800,
        first_day: days_from_civil(2024, 2, 10),
        days: 40,
        id_prefix: "big",
    };
    let mut events = generate(&mut rng, &shape);
    rng.shuffle(&mut events);

    const BATCH: usize = 500;
    let mut batches: Vec<Vec<Value>> = events
        .chunks(BATCH)
        .map(|c| c.iter().map(|e| e.body.clone()).collect())
        .collect();
    let repeats = events.len() / 50;
    let mut repeated = HashSet::new();
    while repeated.len() < repeats {
        // Never from the last batch: the copy goes into a later one.
        let p = rng.usize(..events.len() - BATCH);
        if !repeated.insert(p) {
            continue;
        }
        let copy = if repeated.len() % 2 == 0 {
            events[p].body.clone()
        } else {
            altered_copy(&events[p], repeated.len(), &mut rng)
        };
        let later = rng.usize(p / BATCH + 1..batches.len());
        let at = rng.usize(..=batches[later].len());
        batches[later].insert(at, copy);
    }

    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), CONFIG);
    let (mut accepted, mut duplicates) = (0, 0);
    for (i, batch) in batches.iter().enumerate() {
        let r = d.post_json("/webhook/batch", &json!({ "events": batch }));
        assert_eq!(r.status, 202, "batch {i}: {}", r.text());
        let answer = r.json();
        assert_eq!(answer["rejected"], json!([]), "batch {i}");
        accepted += answer["accepted"].as_u64().unwrap();
        duplicates += answer["duplicates"].as_u64().unwrap();
    }
    assert_eq!(
        (accepted, duplicates),
        (events.len() as u64, repeats as u64),
        "(accepted, duplicates) over all batches"
    );
    let sent_at = started.elapsed();
    d.wait_processed(Duration::from_secs(45));
    let processed_at = started.elapsed();

    let model = Model::of(&events);
    assert_answers_match(&d, &model, shape.first_day, shape.days);
    eprintln!(
        "analytics_exact: {} events ({} users active, {repeats} repeats): sent in {sent_at:?}, \
         processed by {processed_at:?}, checked by {:?}",
        model.total,
        model.first_ms.len(),
        started.elapsed()
    );
}

/// Batches still to send, shared by the client threads.
struct Outbox {
    bodies: Vec<Vec<u8>>,
    pending: Mutex<VecDeque<usize>>,
    /// `(accepted, duplicates)` of the 202 that settled each batch.
    answers: Mutex<Vec<Option<(u64, u64)>>>,
}

/// What the clients of one thread or round saw.
#[derive(Debug, Default, Clone, Copy)]
struct ClientTally {
    settled: usize,
    interrupted: usize,
    /// Events accepted but not yet processed just before the kill.
    depth_at_kill: Option<u64>,
}

/// Sends batches from the outbox until it is empty, `stop` is set, or a
/// request fails (the daemon was killed): the failed batch goes back to
/// the outbox to be sent again to the next daemon.
fn client(addr: SocketAddr, outbox: &Outbox, stop: &AtomicBool, pace_seed: u64) -> ClientTally {
    let mut rng = fastrand::Rng::with_seed(pace_seed);
    let mut tally = ClientTally::default();
    while !stop.load(Ordering::SeqCst) {
        let Some(i) = outbox.pending.lock().unwrap().pop_front() else {
            break;
        };
        let answer = common::try_request(
            addr,
            "POST",
            "/webhook/batch",
            &[("Content-Type", "application/json")],
            &outbox.bodies[i],
        );
        match answer {
            Ok(r) if r.status == 202 => {
                let a = r.json();
                assert_eq!(a["rejected"], json!([]), "batch {i}");
                let counts = (
                    a["accepted"].as_u64().unwrap(),
                    a["duplicates"].as_u64().unwrap(),
                );
                outbox.answers.lock().unwrap()[i] = Some(counts);
                tally.settled += 1;
            }
            Ok(r) if r.status == 503 => {
                outbox.pending.lock().unwrap().push_back(i);
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(r) => panic!("batch {i}: unexpected answer {}: {}", r.status, r.text()),
            Err(_) => {
                outbox.pending.lock().unwrap().push_back(i);
                tally.interrupted += 1;
                break;
            }
        }
        // Paced so that intake spans several kills.
        std::thread::sleep(Duration::from_millis(rng.u64(10..50)));
    }
    tally
}

/// Runs four client threads against `d`; when `kill_after` is given,
/// kills the daemon (kill -9) after it and returns once the clients stop.
fn send_round(
    d: &mut Daemon,
    outbox: &Arc<Outbox>,
    kill_after: Option<Duration>,
    rng: &mut fastrand::Rng,
) -> ClientTally {
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (outbox, stop, addr, pace) = (outbox.clone(), stop.clone(), d.addr, rng.u64(..));
            std::thread::spawn(move || client(addr, &outbox, &stop, pace))
        })
        .collect();
    let mut depth = None;
    if let Some(after) = kill_after {
        std::thread::sleep(after);
        depth = common::try_request(d.addr, "GET", "/admin/queue", &[], b"")
            .ok()
            .and_then(|r| serde_json::from_slice::<Value>(&r.body).ok())
            .and_then(|q| q["depth"].as_u64());
        // Clients start no new request once this is set; those in flight
        // fail and go back to the outbox.
        stop.store(true, Ordering::SeqCst);
        d.kill9();
    }
    clients
        .into_iter()
        .map(|c| c.join().expect("client thread"))
        .fold(
            ClientTally {
                depth_at_kill: depth,
                ..ClientTally::default()
            },
            |a, b| ClientTally {
                settled: a.settled + b.settled,
                interrupted: a.interrupted + b.interrupted,
                ..a
            },
        )
}

/// Sends every batch of `outbox` to the daemon of `config`, killing it
/// (SIGKILL) `kills` times 100–500 ms after each start, then once more
/// without a kill until every batch has its 202; answers the last daemon,
/// its queue processed, and how many requests the kills interrupted.
fn deliver_through_kills(
    dir: &std::path::Path,
    config: &std::path::Path,
    outbox: &Arc<Outbox>,
    kills: usize,
    rng: &mut fastrand::Rng,
) -> (Daemon, usize) {
    let mut interrupted = 0;
    for round in 0..kills {
        let mut d = Daemon::start_with(dir, config, &[]);
        let after = Duration::from_millis(rng.u64(100..=500));
        let tally = send_round(&mut d, outbox, Some(after), rng);
        interrupted += tally.interrupted;
        eprintln!(
            "analytics_exact: round {round}: killed after {after:?} with {:?} events \
             unprocessed; {} batches settled, {} interrupted, {} left",
            tally.depth_at_kill,
            tally.settled,
            tally.interrupted,
            outbox.pending.lock().unwrap().len()
        );
    }
    let mut d = Daemon::start_with(dir, config, &[]);
    let tally = send_round(&mut d, outbox, None, rng);
    assert_eq!(
        outbox.pending.lock().unwrap().len(),
        0,
        "the last daemon took every batch ({tally:?}); log:\n{}",
        d.log_text()
    );
    d.wait_processed(Duration::from_secs(30));
    (d, interrupted)
}

/// A user sends 3,000 events of ~200 users (out of time order) from four
/// client threads in batches of 50, while the daemon is killed with
/// SIGKILL five times, 100–500 ms after each start, during intake and
/// during processing (micro-batches of 10). The clients re-send, to the
/// restarted daemon, every batch that did not get its 202.
///
/// Re-sent events that had already been committed are duplicates, so each
/// event is counted exactly once: DAU, top events, retention and the
/// summary total equal the recomputation over the distinct events.
#[test]
fn answers_stay_exact_across_kill_9_during_intake() {
    let (seed, _report) = seed();
    let mut rng = fastrand::Rng::with_seed(seed);
    let shape = Shape {
        events: 3_000,
        users: 200,
        first_day: days_from_civil(2024, 10, 20),
        days: 30,
        id_prefix: "k9",
    };
    let mut events = generate(&mut rng, &shape);
    rng.shuffle(&mut events);
    const BATCH: usize = 50;
    let bodies: Vec<Vec<u8>> = events
        .chunks(BATCH)
        .map(|c| {
            let batch: Vec<&Value> = c.iter().map(|e| &e.body).collect();
            json!({ "events": batch }).to_string().into_bytes()
        })
        .collect();
    let outbox = Arc::new(Outbox {
        pending: Mutex::new((0..bodies.len()).collect()),
        answers: Mutex::new(vec![None; bodies.len()]),
        bodies,
    });

    let dir = tempfile::tempdir().unwrap();
    let config = common::write_config(dir.path(), &format!("batch_size = 10\n{CONFIG}"));
    let (d, interrupted) = deliver_through_kills(dir.path(), &config, &outbox, 5, &mut rng);

    let answers: Vec<(u64, u64)> = outbox
        .answers
        .lock()
        .unwrap()
        .iter()
        .map(|a| a.expect("every batch settled"))
        .collect();
    let accepted: u64 = answers.iter().map(|a| a.0).sum();
    let duplicates: u64 = answers.iter().map(|a| a.1).sum();
    assert_eq!(accepted + duplicates, events.len() as u64);
    // Only events of interrupted requests can have been seen before.
    assert!(
        duplicates <= (interrupted * BATCH) as u64,
        "{duplicates} duplicates but only {interrupted} interrupted batches"
    );
    let model = Model::of(&events);
    assert_answers_match(&d, &model, shape.first_day, shape.days);
    assert_eq!(stats(&d, "/stats/summary")["dlq_size"], 0);
    eprintln!(
        "analytics_exact: {interrupted} batches interrupted by kill -9, {duplicates} events \
         re-sent after their commit"
    );
}

/// A video service sends 2,000 plays, pauses and clicks of the last eight
/// minutes on 40 pieces of content (half of them in its content table),
/// from four client threads, while the daemon is killed three times. Each
/// event is enriched from the table and gains its seconds watched; two
/// windows read them: seconds watched per content over plays and pauses
/// (a type filter, ranked by the sum), and events per content category,
/// a column of the table (no filter, ranked by count). Both equal the
/// recomputation over the distinct events.
#[test]
fn windows_over_enriched_events_stay_exact_across_kill_9() {
    let (seed, _report) = seed();
    let mut rng = fastrand::Rng::with_seed(seed);
    let dir = tempfile::tempdir().unwrap();

    // The content table: c0..c19 with a category; c20..c39 are unknown.
    let category = |c: usize| format!("cat-{}", c % 3);
    let mut table = String::from("id,category,length_seconds\n");
    for c in 0..20 {
        table.push_str(&format!("c{c},{},{}\n", category(c), rng.u32(60..3600)));
    }
    let content = dir.path().join("content.csv");
    std::fs::write(&content, table).unwrap();

    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    struct Play {
        kind: &'static str,
        content: usize,
        duration_ms: Option<i64>,
    }
    let mut plays = Vec::new();
    let bodies_of: Vec<Value> = (0..2_000)
        .map(|i| {
            let kind = match rng.u32(0..10) {
                0..=5 => "play",
                6 | 7 => "pause",
                _ => "click",
            };
            let c = rng.usize(0..40);
            let duration_ms = (rng.u32(0..10) != 0).then(|| rng.i64(0..600_000));
            let at = now_ms - rng.i64(0..8 * 60_000);
            let mut properties = json!({"content_id": format!("c{c}")});
            if let Some(ms) = duration_ms {
                properties["duration_ms"] = json!(ms);
            }
            plays.push(Play {
                kind,
                content: c,
                duration_ms,
            });
            json!({"event_id": format!("w-{i:05}"), "event_type": kind,
                   "occurred_at": rfc3339(&mut rng, at), "properties": properties})
        })
        .collect();
    const BATCH: usize = 50;
    let bodies: Vec<Vec<u8>> = bodies_of
        .chunks(BATCH)
        .map(|c| json!({ "events": c }).to_string().into_bytes())
        .collect();
    let outbox = Arc::new(Outbox {
        pending: Mutex::new((0..bodies.len()).collect()),
        answers: Mutex::new(vec![None; bodies.len()]),
        bodies,
    });
    let config = common::write_config(
        dir.path(),
        &format!(
            "batch_size = 10\n\
             [[enrichment]]\nname = \"content\"\nfile = \"{}\"\nkey_column = \"id\"\n\
             match = \"properties.content_id\"\n\
             [[derive]]\nfield = \"derived.seconds\"\ndivide = [\"properties.duration_ms\", 1000]\n\
             [[windows]]\nname = \"watched\"\nminutes = 10\nevent_types = [\"play\", \"pause\"]\n\
             group_by = \"properties.content_id\"\nsum = \"derived.seconds\"\n\
             [[windows]]\nname = \"by_category\"\nminutes = 10\n\
             group_by = \"enriched.content.category\"\n",
            content.display()
        ),
    );
    let (d, interrupted) = deliver_through_kills(dir.path(), &config, &outbox, 3, &mut rng);

    // The recomputation: (key, count, ms watched), ranked as the daemon ranks.
    let mut watched: BTreeMap<String, (u64, i64)> = BTreeMap::new();
    let mut categories: BTreeMap<String, u64> = BTreeMap::new();
    for p in &plays {
        if p.kind != "click" {
            let cell = watched.entry(format!("c{}", p.content)).or_default();
            cell.0 += 1;
            cell.1 += p.duration_ms.unwrap_or(0);
        }
        if p.content < 20 {
            *categories.entry(category(p.content)).or_default() += 1;
        }
    }
    let mut want_watched: Vec<(String, u64, i64)> =
        watched.into_iter().map(|(k, (n, ms))| (k, n, ms)).collect();
    want_watched.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.0.cmp(&b.0)));
    let mut want_categories: Vec<(String, u64)> = categories.into_iter().collect();
    want_categories.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));

    let groups = |name: &str| {
        let r = stats(&d, &format!("/stats/windows/{name}?limit=1000"));
        r["groups"]
            .as_array()
            .unwrap_or_else(|| panic!("{name}: {r}"))
            .clone()
    };
    let got_watched: Vec<(String, u64, i64)> = groups("watched")
        .iter()
        .map(|g| {
            let seconds = g["sum"].as_f64().unwrap_or_else(|| panic!("{g}"));
            (
                g["key"].as_str().unwrap_or_default().to_owned(),
                g["count"].as_u64().unwrap_or_default(),
                (seconds * 1000.0).round() as i64,
            )
        })
        .collect();
    let got_categories: Vec<(String, u64)> = groups("by_category")
        .iter()
        .map(|g| {
            assert_eq!(g["sum"], Value::Null, "no sum configured: {g}");
            (
                g["key"].as_str().unwrap_or_default().to_owned(),
                g["count"].as_u64().unwrap_or_default(),
            )
        })
        .collect();
    same_rows("seconds watched per content", &got_watched, &want_watched);
    same_rows("events per category", &got_categories, &want_categories);
    eprintln!("analytics_exact: windows: {interrupted} batches interrupted by kill -9");
}
