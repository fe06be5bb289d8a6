//! `/stats/*`: the summary, the analytics queries and the rate, behind the
//! stats token when one is set.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::json;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Rejection, Reply};

use super::error::ApiError;
use super::{Api, bearer, query, service_unavailable};
use crate::analytics;
use crate::event::now_ms;
use crate::pipeline::messages::SinkHealth;
use crate::signature::constant_time_eq;

/// Analytics access: open when `stats_token` is empty, else that token or
/// the admin token.
pub(super) async fn authorize_stats(
    api: Arc<Api>,
    authorization: Option<String>,
) -> Result<(), Rejection> {
    let live = api.pipeline.context.live();
    let config = &live.config;
    if config.stats_token.is_empty() {
        return Ok(());
    }
    let given = bearer(authorization.as_deref()).as_bytes();
    let admin = &config.admin_token;
    if constant_time_eq(given, config.stats_token.as_bytes())
        || (!admin.is_empty() && constant_time_eq(given, admin.as_bytes()))
    {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send Authorization: Bearer <stats_token> (or the admin_token)",
        )
        .into())
    }
}

pub(super) async fn summary(api: Arc<Api>) -> Result<Response, Rejection> {
    let (counts, dlq, processed) = query(&api, |s| {
        Ok((
            s.counts()?,
            s.dlq_len()?,
            analytics::latency_percentiles(s, &[0.5, 0.99])?,
        ))
    })
    .await?;
    let live = api.pipeline.live_figures().await.unwrap_or_default();
    let mut latency = live.latency;
    // Receipt→processed from the on-disk histogram: it survives restarts.
    latency.p50 = processed[0];
    latency.p99 = processed[1];
    // Every configured sink, in config order; one that has not reported
    // yet (or whose name is new since a reload) has nothing against it.
    let sinks: Vec<SinkHealth> = api
        .pipeline
        .context
        .live()
        .sinks
        .iter()
        .map(|sink| {
            live.sinks
                .iter()
                .find(|h| h.name == sink.name())
                .cloned()
                .unwrap_or_else(|| SinkHealth::ok(sink.name()))
        })
        .collect();
    let total: u64 = counts.iter().map(|(_, n)| n).sum();
    let deployment = api.pipeline.deployment(&counts).await;
    let by_type: serde_json::Map<String, serde_json::Value> =
        counts.into_iter().map(|(t, n)| (t, n.into())).collect();
    let mut body = json!({
        "total_events": total,
        "by_type": by_type,
        "queue_depth": api.pipeline.context.status.queue_depth(),
        "dlq_size": dlq,
        "latency_ms": latency,
        "sinks": sinks,
    });
    // With Redis, the totals are the deployment's; the queue, the DLQ, the
    // latency and the sinks stay this instance's.
    match deployment {
        None => {}
        Some(Ok(deployment)) => {
            body["local"] = json!({"total_events": total, "by_type": body["by_type"].take()});
            body["total_events"] = deployment.by_type.values().sum::<u64>().into();
            body["by_type"] = json!(deployment.by_type);
            body["instances"] = json!(deployment.instances);
            body["scope"] = "deployment".into();
        }
        Some(Err(e)) => {
            body["scope"] = "instance".into();
            body["deployment_error"] = e.to_string().into();
        }
    }
    Ok(warp::reply::json(&body).into_response())
}

/// `/stats/dau`, `/stats/top-events`, `/stats/trends`, `/stats/retention`,
/// `/stats/windows`, `/stats/rate`.
pub(super) async fn stats(
    which: String,
    api: Arc<Api>,
    q: HashMap<String, String>,
) -> Result<Response, Rejection> {
    let bad =
        |e: analytics::QueryError| -> Rejection { ApiError::param(e.param, &e.detail).into() };
    let today = analytics::day_of(now_ms());
    let day = |name: &'static str, default: i32| -> Result<i32, Rejection> {
        q.get(name)
            .map_or(Ok(default), |t| analytics::parse_day(name, t).map_err(bad))
    };
    let number = |name, default, max| whole_number(&q, name, default, max);
    // `sum=FIELD`: one of the config's `sum_fields` (only those are summed).
    let sum_field = || -> Result<Option<String>, Rejection> {
        let Some(field) = q.get("sum") else {
            return Ok(None);
        };
        let live = api.pipeline.context.live();
        if live.config.sum_fields.iter().any(|f| f == field) {
            Ok(Some(field.clone()))
        } else {
            Err(ApiError::param(
                "sum",
                &format!(
                    "`{field}` is not summed: add it to sum_fields in the config \
                     (sums count from then on)"
                ),
            )
            .into())
        }
    };
    let mut answer = match which.as_str() {
        "dau" | "top-events" | "trends" => {
            let to = day("to", today)?;
            let from = day("from", to - 29)?;
            analytics::check_range(from, to).map_err(bad)?;
            let (f, t) = (analytics::format_day(from), analytics::format_day(to));
            match which.as_str() {
                "dau" => {
                    query(&api, move |s| {
                        Ok(json!({"from": f, "to": t, "days": analytics::dau(s, from, to)?}))
                    })
                    .await?
                }
                "top-events" => {
                    let limit = number("limit", 10, 1000)? as usize;
                    let sum = sum_field()?;
                    let by = match q.get("by").map(String::as_str) {
                        None | Some("count") => analytics::RankBy::Count,
                        Some("sum") if sum.is_some() => analytics::RankBy::Sum,
                        Some("sum") => {
                            return Err(ApiError::param("sum", "is required with by=sum").into());
                        }
                        Some(other) => {
                            return Err(ApiError::param(
                                "by",
                                &format!("`{other}` must be count or sum"),
                            )
                            .into());
                        }
                    };
                    // By count over recent days, with Redis: the deployment's.
                    let deployment = match sum {
                        None => api.pipeline.deployment_top_events(from, to, limit).await,
                        Some(_) => None,
                    };
                    match deployment {
                        Some(Ok(events)) => {
                            json!({"from": f, "to": t, "events": events, "scope": "deployment"})
                        }
                        deployment => {
                            let mut answer = query(&api, move |s| {
                                let events =
                                    analytics::top_events(s, from, to, limit, sum.as_deref(), by)?;
                                Ok(json!({"from": f, "to": t, "events": events}))
                            })
                            .await?;
                            if let Some(Err(e)) = deployment {
                                answer["deployment_error"] = e.into();
                            }
                            answer
                        }
                    }
                }
                _ => {
                    let interval =
                        analytics::Interval::parse(q.get("interval").map_or("day", String::as_str))
                            .map_err(bad)?;
                    let event_type = match q.get("event_type") {
                        Some(t) if t.is_empty() || t.chars().count() > 128 => {
                            return Err(ApiError::param(
                                "event_type",
                                "must be 1 to 128 characters",
                            )
                            .into());
                        }
                        other => other.cloned(),
                    };
                    let sum = sum_field()?;
                    // What `sum` may name, so that a caller can find out.
                    let summable = api.pipeline.context.live().config.sum_fields.clone();
                    query(&api, move |s| {
                        let trend = analytics::trends(
                            s,
                            from,
                            to,
                            interval,
                            event_type.as_deref(),
                            sum.as_deref(),
                        )?;
                        let mut answer = json!(trend);
                        answer["summable"] = json!(summable);
                        Ok(answer)
                    })
                    .await?
                }
            }
        }
        "retention" => {
            let start = match q.get("start_date") {
                Some(t) => analytics::parse_day("start_date", t).map_err(bad)?,
                None => {
                    return Err(ApiError::param("start_date", "is required (YYYY-MM-DD)").into());
                }
            };
            let windows = number("windows", 4, u64::from(analytics::MAX_WINDOWS))? as u32;
            let window_type = q
                .get("window_type")
                .map_or("daily", String::as_str)
                .to_owned();
            let days = match window_type.as_str() {
                "daily" => 1,
                "weekly" => 7,
                other => {
                    return Err(ApiError::param(
                        "window_type",
                        &format!("`{other}` must be daily or weekly"),
                    )
                    .into());
                }
            };
            let last_day = start.saturating_add((windows as i32) * days - 1);
            analytics::check_range(start, last_day.min(analytics::MAX_DAY))
                .and_then(|()| analytics::check_range(start, last_day))
                .map_err(|e| ApiError::param("start_date", &e.detail))?;
            query(&api, move |s| {
                let cohorts = analytics::retention(s, start, windows, days)?;
                Ok(json!({"window_type": window_type, "cohorts": cohorts}))
            })
            .await?
        }
        "windows" => {
            let custom: Vec<String> = api
                .pipeline
                .context
                .live()
                .config
                .windows
                .iter()
                .map(|w| w.name.clone())
                .collect();
            query(&api, move |s| {
                let mut answer = json!(analytics::windows(s, now_ms())?);
                answer["custom"] = json!(custom);
                Ok(answer)
            })
            .await?
        }
        "rate" => {
            let rate = api
                .pipeline
                .live_figures()
                .await
                .ok_or_else(|| {
                    service_unavailable("unavailable", "the metrics actor is restarting", 1)
                })?
                .rate;
            json!({
                "interval_secs": 1,
                "end_ms": rate.end_ms,
                "accepted": rate.accepted,
                "processed": rate.processed,
            })
        }
        _ => return Err(warp::reject::not_found()),
    };
    // With Redis, say whose figures these are: the deployment's only where
    // the instances share them.
    if api.pipeline.redis_health().is_some() && answer.get("scope").is_none() {
        answer["scope"] = "instance".into();
    }
    Ok(warp::reply::json(&answer).into_response())
}

/// The query parameter `name` as a whole number from 1 to `max`
/// (`default` when absent), else 400 naming it.
fn whole_number(
    q: &HashMap<String, String>,
    name: &'static str,
    default: u64,
    max: u64,
) -> Result<u64, Rejection> {
    match q.get(name) {
        None => Ok(default),
        Some(t) => match t.parse::<u64>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(ApiError::param(
                name,
                &format!("`{t}` must be a whole number from 1 to {max}"),
            )
            .into()),
        },
    }
}

/// `/stats/windows/{name}`: a `[[windows]]` window's groups, ranked.
pub(super) async fn custom_window(
    name: String,
    api: Arc<Api>,
    q: HashMap<String, String>,
) -> Result<Response, Rejection> {
    let live = api.pipeline.context.live();
    let Some(window) = live.config.windows.iter().find(|w| w.name == name).cloned() else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_window",
            format!("no window named `{name}` is configured ([[windows]])"),
        )
        .into());
    };
    let limit = whole_number(&q, "limit", 10, 1000)? as usize;
    let answer = query(&api, move |s| {
        let groups = analytics::custom_window(s, &window, now_ms(), limit)?;
        Ok(json!({"name": window.name, "minutes": window.minutes, "groups": groups}))
    })
    .await?;
    Ok(warp::reply::json(&answer).into_response())
}
