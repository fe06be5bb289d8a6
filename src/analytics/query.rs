//! The `/stats` queries as typed values, parsed from their query string.
//!
//! Parsing checks everything a query can get wrong before any store is
//! read, and names the parameter at fault ([`QueryError`]); the checks run
//! in a fixed order, so that a request with several faults is always told
//! the same one first.

use std::collections::HashMap;

use super::{
    Interval, MAX_DAY, MAX_WINDOWS, QueryError, RankBy, check_range, parse_day, query_error,
};

/// What `/stats/top-events` and `/stats/windows/{name}` return at most.
pub const MAX_LIMIT: u64 = 1000;

/// One analytics query, checked.
#[derive(Debug, Clone, PartialEq)]
pub enum StatsQuery {
    /// `/stats/dau`: distinct users per day.
    Dau { from: i32, to: i32 },
    /// `/stats/top-events`: event types ranked by count or by a summed field.
    TopEvents {
        from: i32,
        to: i32,
        limit: usize,
        /// `sum=FIELD`: a field of `sum_fields` to sum per type.
        sum: Option<String>,
        by: RankBy,
    },
    /// `/stats/trends`: events, users (and a sum) per day, week or month.
    Trends {
        from: i32,
        to: i32,
        interval: Interval,
        /// Only this event type; all types when `None`.
        event_type: Option<String>,
        /// `sum=FIELD`: a field of `sum_fields` to sum per period.
        sum: Option<String>,
    },
    /// `/stats/retention`: cohorts by first day, returning per window.
    Retention {
        start: i32,
        windows: u32,
        /// Days per window: 1 (`daily`) or 7 (`weekly`).
        days: i32,
        /// As asked (`daily` or `weekly`), echoed in the answer.
        window_type: String,
    },
    /// `/stats/windows`: the built-in rolling windows.
    Windows,
    /// `/stats/windows/{name}`: a configured `[[windows]]` window's groups.
    Window { name: String, limit: usize },
}

/// The query string of a `/stats` request.
pub type Params = HashMap<String, String>;

impl StatsQuery {
    /// The query `/stats/{which}` asks for; `Ok(None)` when there is no
    /// such query. `today` is the default end of a range; `sum_fields` are
    /// the fields `sum=` may name.
    pub fn parse(
        which: &str,
        params: &Params,
        today: i32,
        sum_fields: &[String],
    ) -> Result<Option<StatsQuery>, QueryError> {
        let query = match which {
            "dau" | "top-events" | "trends" => {
                let to = day(params, "to", today)?;
                let from = day(params, "from", to - 29)?;
                check_range(from, to)?;
                match which {
                    "dau" => StatsQuery::Dau { from, to },
                    "top-events" => {
                        let limit = whole_number(params, "limit", 10, MAX_LIMIT)? as usize;
                        let sum = sum_field(params, sum_fields)?;
                        let by = match params.get("by").map(String::as_str) {
                            None | Some("count") => RankBy::Count,
                            Some("sum") if sum.is_some() => RankBy::Sum,
                            Some("sum") => {
                                return Err(query_error("sum", "is required with by=sum"));
                            }
                            Some(other) => {
                                return Err(query_error(
                                    "by",
                                    format!("`{other}` must be count or sum"),
                                ));
                            }
                        };
                        StatsQuery::TopEvents {
                            from,
                            to,
                            limit,
                            sum,
                            by,
                        }
                    }
                    _ => {
                        let interval =
                            Interval::parse(params.get("interval").map_or("day", String::as_str))?;
                        let event_type = match params.get("event_type") {
                            Some(t) if t.is_empty() || t.chars().count() > 128 => {
                                return Err(query_error(
                                    "event_type",
                                    "must be 1 to 128 characters",
                                ));
                            }
                            other => other.cloned(),
                        };
                        let sum = sum_field(params, sum_fields)?;
                        StatsQuery::Trends {
                            from,
                            to,
                            interval,
                            event_type,
                            sum,
                        }
                    }
                }
            }
            "retention" => {
                let start = match params.get("start_date") {
                    Some(t) => parse_day("start_date", t)?,
                    None => return Err(query_error("start_date", "is required (YYYY-MM-DD)")),
                };
                let windows = whole_number(params, "windows", 4, u64::from(MAX_WINDOWS))? as u32;
                let window_type = params
                    .get("window_type")
                    .map_or("daily", String::as_str)
                    .to_owned();
                let days = match window_type.as_str() {
                    "daily" => 1,
                    "weekly" => 7,
                    other => {
                        return Err(query_error(
                            "window_type",
                            format!("`{other}` must be daily or weekly"),
                        ));
                    }
                };
                // The last window must end on a day the calendar has.
                let last_day = start.saturating_add((windows as i32) * days - 1);
                check_range(start, last_day.min(MAX_DAY))
                    .and_then(|()| check_range(start, last_day))
                    .map_err(|e| query_error("start_date", e.detail))?;
                StatsQuery::Retention {
                    start,
                    windows,
                    days,
                    window_type,
                }
            }
            "windows" => StatsQuery::Windows,
            _ => return Ok(None),
        };
        Ok(Some(query))
    }

    /// `/stats/windows/{name}`: the window `name` (whether it is configured
    /// is for the caller to say) and `limit`.
    pub fn window(name: String, params: &Params) -> Result<StatsQuery, QueryError> {
        let limit = whole_number(params, "limit", 10, MAX_LIMIT)? as usize;
        Ok(StatsQuery::Window { name, limit })
    }
}

/// The day parameter `name` (`YYYY-MM-DD`), `default` when absent.
fn day(params: &Params, name: &'static str, default: i32) -> Result<i32, QueryError> {
    params
        .get(name)
        .map_or(Ok(default), |text| parse_day(name, text))
}

/// `sum=FIELD`: one of the config's `sum_fields` (only those are summed).
fn sum_field(params: &Params, sum_fields: &[String]) -> Result<Option<String>, QueryError> {
    match params.get("sum") {
        None => Ok(None),
        Some(field) if sum_fields.iter().any(|f| f == field) => Ok(Some(field.clone())),
        Some(field) => Err(query_error(
            "sum",
            format!(
                "`{field}` is not summed: add it to sum_fields in the config \
                 (sums count from then on)"
            ),
        )),
    }
}

/// The parameter `name` as a whole number from 1 to `max` (`default` when
/// absent).
fn whole_number(
    params: &Params,
    name: &'static str,
    default: u64,
    max: u64,
) -> Result<u64, QueryError> {
    match params.get(name) {
        None => Ok(default),
        Some(text) => match text.parse::<u64>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(query_error(
                name,
                format!("`{text}` must be a whole number from 1 to {max}"),
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Params {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn parse(which: &str, pairs: &[(&str, &str)]) -> Result<Option<StatsQuery>, QueryError> {
        StatsQuery::parse(which, &params(pairs), 100, &["amount".to_owned()])
    }

    #[test]
    fn a_range_defaults_to_the_thirty_days_up_to_today() {
        assert_eq!(
            parse("dau", &[]),
            Ok(Some(StatsQuery::Dau { from: 71, to: 100 }))
        );
    }

    #[test]
    fn ranking_by_sum_needs_a_summed_field() {
        let err = parse("top-events", &[("by", "sum")]).unwrap_err();
        assert_eq!(err.param, "sum");
        let err = parse("top-events", &[("sum", "price")]).unwrap_err();
        assert_eq!(err.param, "sum");
        assert!(err.detail.contains("sum_fields"), "{}", err.detail);
        let query = parse("top-events", &[("sum", "amount"), ("by", "sum")]).unwrap();
        assert!(matches!(
            query,
            Some(StatsQuery::TopEvents {
                by: RankBy::Sum,
                ..
            })
        ));
    }

    #[test]
    fn the_first_fault_in_parameter_order_is_the_one_named() {
        // A bad range is reported before a bad limit.
        let err = parse("top-events", &[("from", "2025-02-30"), ("limit", "0")]).unwrap_err();
        assert_eq!(err.param, "from");
        let err = parse("top-events", &[("limit", "1001")]).unwrap_err();
        assert_eq!(err.param, "limit");
    }

    #[test]
    fn retention_needs_a_start_and_a_known_window_type() {
        assert_eq!(parse("retention", &[]).unwrap_err().param, "start_date");
        let err = parse(
            "retention",
            &[("start_date", "2025-01-01"), ("window_type", "monthly")],
        )
        .unwrap_err();
        assert_eq!(err.param, "window_type");
        let weekly = parse(
            "retention",
            &[("start_date", "1970-01-01"), ("window_type", "weekly")],
        )
        .unwrap();
        assert!(matches!(
            weekly,
            Some(StatsQuery::Retention {
                start: 0,
                windows: 4,
                days: 7,
                ..
            })
        ));
    }

    #[test]
    fn an_unknown_query_is_none_not_an_error() {
        assert_eq!(parse("nonsense", &[("from", "bad")]), Ok(None));
    }
}
