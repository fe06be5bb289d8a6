//! `/stats/trends`: events, distinct users and the sum of a field per day,
//! week or month, read from the `T`, `A` and `S` aggregates (module docs
//! of [`super`]).
//!
//! Periods are whole: a range is widened to the first day of the period
//! that holds `from` and the last day of the one that holds `to`, and the
//! answer says so in its `from` and `to`. A period is named by its first
//! day; weeks start on Monday, months on the 1st.

use std::collections::{BTreeMap, HashSet};

use serde::Serialize;
use time::{Date, Month};

use super::{
    KvRead, MAX_DAY, QueryError, date_of, day_key, day_of_date, format_day, from_millionths, key,
    query_error, split_part,
};

/// How long a trend's periods are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Interval {
    /// One UTC day.
    Day,
    /// Monday to Sunday.
    Week,
    /// A calendar month.
    Month,
}

impl Interval {
    /// `day`, `week` or `month`, as the `interval` parameter.
    pub fn parse(text: &str) -> Result<Interval, QueryError> {
        match text {
            "day" => Ok(Interval::Day),
            "week" => Ok(Interval::Week),
            "month" => Ok(Interval::Month),
            other => Err(query_error(
                "interval",
                format!("`{other}` must be day, week or month"),
            )),
        }
    }

    /// The first day of the period that holds `day`.
    fn start(self, day: i32) -> i32 {
        match self {
            Interval::Day => day,
            // Day 0, 1970-01-01, was a Thursday: three days after a Monday.
            Interval::Week => day - (day + 3).rem_euclid(7),
            Interval::Month => date_of(day).map_or(day, |d| day - (i32::from(d.day()) - 1)),
        }
    }

    /// The first day of the period after the one that starts on `start`.
    fn next(self, start: i32) -> i32 {
        match self {
            Interval::Day => start + 1,
            Interval::Week => start + 7,
            Interval::Month => {
                let next = date_of(start).and_then(|d| {
                    match d.month() {
                        Month::December => {
                            Date::from_calendar_date(d.year() + 1, Month::January, 1)
                        }
                        m => Date::from_calendar_date(d.year(), m.next(), 1),
                    }
                    .ok()
                });
                // Past year 9999 there is no next month: end the series.
                next.map_or(i32::MAX, day_of_date)
            }
        }
    }
}

/// The answer of `/stats/trends`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Trend {
    /// `day`, `week` or `month`.
    pub interval: Interval,
    /// The first day of the first period.
    pub from: String,
    /// The last day of the last period.
    pub to: String,
    /// Only events of this type, when given.
    pub event_type: Option<String>,
    /// The field summed, when asked.
    pub sum: Option<String>,
    /// One entry per period, oldest first.
    pub series: Vec<TrendPeriod>,
    /// With `sum`: events whose field was missing or not a number.
    pub skipped: Option<u64>,
}

/// One period of a trend.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrendPeriod {
    /// Its first day, `YYYY-MM-DD`.
    pub period: String,
    /// Events in it.
    pub count: u64,
    /// Distinct users with an event in it.
    pub users: u64,
    /// With `sum`: the sum of the field over its events.
    pub sum: Option<f64>,
    /// With `sum`: its events whose field was missing or not a number.
    pub skipped: Option<u64>,
}

/// What one day adds to a trend: its events (of the type asked, if one
/// was), and the sum of the field asked over them, with how many had a
/// number there.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrendDay {
    /// Events.
    pub count: u64,
    /// The sum, in millionths.
    pub sum: i128,
    /// Events that had a number in the field.
    pub present: u64,
}

/// The periods of `interval` (first and last day of each) that cover
/// `from..=to`, widened to whole periods.
pub fn periods(from: i32, to: i32, interval: Interval) -> Vec<(i32, i32)> {
    let mut periods: Vec<(i32, i32)> = Vec::new();
    let mut start = interval.start(from);
    while start <= to {
        let next = interval.next(start);
        // The last period of year 9999 ends with it.
        periods.push((start, next.saturating_sub(1).min(MAX_DAY)));
        start = next;
    }
    periods
}

/// Counts, distinct users and (with `sum`, a `sum_fields` path) sums per
/// period of `interval` over `from..=to` widened to whole periods, of
/// every event or of `event_type` only.
pub fn trends<E>(
    kv: &dyn KvRead<Error = E>,
    from: i32,
    to: i32,
    interval: Interval,
    event_type: Option<&str>,
    sum: Option<&str>,
) -> Result<Trend, E> {
    let periods = periods(from, to, interval);
    let (first, last) = match (periods.first(), periods.last()) {
        (Some(f), Some(l)) => (f.0, l.1),
        _ => (from, to),
    };
    let days = super::day_figures(kv, first, last, sum.is_some())?.trend_days(event_type, sum);
    let wanted = |t: &[u8]| event_type.is_none_or(|want| want.as_bytes() == t);

    let mut users = Vec::with_capacity(periods.len());
    for (start, end) in &periods {
        let mut distinct: HashSet<Vec<u8>> = HashSet::new();
        kv.scan(
            &key(&[b"A", &day_key(*start)]),
            &key(&[b"A", &day_key(end.saturating_add(1))]),
            &mut |k, record| {
                if let Some((t, _batch)) = k.get(5..).and_then(split_part)
                    && wanted(t)
                {
                    let mut rest = record;
                    while let Some((user, more)) = split_part(rest) {
                        distinct.insert(user.to_vec());
                        rest = more;
                    }
                }
                true
            },
        )?;
        users.push(distinct.len() as u64);
    }
    Ok(trend_of(
        interval,
        (from, to),
        &periods,
        &days,
        &users,
        event_type,
        sum,
    ))
}

/// A trend over `periods` (from [`periods`]; `asked` is the range they
/// cover, named when there are none) from what each day adds and the
/// distinct users of each period.
pub fn trend_of(
    interval: Interval,
    asked: (i32, i32),
    periods: &[(i32, i32)],
    days: &BTreeMap<i32, TrendDay>,
    users: &[u64],
    event_type: Option<&str>,
    sum: Option<&str>,
) -> Trend {
    let (first, last) = match (periods.first(), periods.last()) {
        (Some(f), Some(l)) => (f.0, l.1),
        _ => asked,
    };
    let series: Vec<TrendPeriod> = periods
        .iter()
        .enumerate()
        .map(|(i, (start, end))| {
            let mut total = TrendDay::default();
            for day in days.range(*start..=*end).map(|(_, d)| d) {
                total.count += day.count;
                total.sum = total.sum.saturating_add(day.sum);
                total.present += day.present;
            }
            TrendPeriod {
                period: format_day(*start),
                count: total.count,
                users: users.get(i).copied().unwrap_or(0),
                sum: sum.map(|_| from_millionths(total.sum)),
                skipped: sum.map(|_| total.count.saturating_sub(total.present)),
            }
        })
        .collect();
    let skipped = sum.map(|_| series.iter().filter_map(|p| p.skipped).sum());
    Trend {
        interval,
        from: format_day(first),
        to: format_day(last),
        event_type: event_type.map(str::to_owned),
        sum: sum.map(str::to_owned),
        series,
        skipped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analytics::parse_day;

    fn day(text: &str) -> i32 {
        parse_day("from", text).expect("a date")
    }

    #[test]
    fn periods_start_on_their_first_day() {
        // 2025-12-17 is a Wednesday.
        assert_eq!(Interval::Week.start(day("2025-12-17")), day("2025-12-15"));
        assert_eq!(Interval::Week.start(day("2025-12-15")), day("2025-12-15"));
        assert_eq!(Interval::Week.start(day("2025-12-21")), day("2025-12-15"));
        assert_eq!(Interval::Week.start(day("1969-12-31")), day("1969-12-29"));
        assert_eq!(Interval::Month.start(day("2024-02-29")), day("2024-02-01"));
        assert_eq!(Interval::Month.next(day("2024-02-01")), day("2024-03-01"));
        assert_eq!(Interval::Month.next(day("2025-12-01")), day("2026-01-01"));
        assert_eq!(Interval::Day.next(day("2025-12-31")), day("2026-01-01"));
        assert_eq!(Interval::Month.next(day("9999-12-01")), i32::MAX);
        assert_eq!(Interval::parse("fortnight").unwrap_err().param, "interval");
    }

    /// A key space with nothing in it: all the test below reads.
    struct Empty;

    impl KvRead for Empty {
        type Error = std::convert::Infallible;
        fn get(&self, _key: &[u8]) -> Result<Option<Vec<u8>>, Self::Error> {
            Ok(None)
        }
        fn scan(
            &self,
            _from: &[u8],
            _to: &[u8],
            _f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
        ) -> Result<(), Self::Error> {
            Ok(())
        }
    }

    #[test]
    fn the_last_periods_end_with_year_9999() {
        for interval in [Interval::Week, Interval::Month] {
            let t = trends(
                &Empty,
                day("9999-12-20"),
                day("9999-12-31"),
                interval,
                None,
                None,
            )
            .expect("a trend");
            assert_eq!(t.to, "9999-12-31", "{interval:?}");
        }
    }
}
