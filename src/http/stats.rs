//! `/stats/*`: the summary, the analytics queries and the rate, behind the
//! stats token when one is set.

use std::sync::Arc;

use serde_json::json;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Rejection, Reply};

use super::answers::{LatencyAnswer, SinkAnswer};
use super::error::ApiError;
use super::{Api, bearer, internal, service_unavailable};
use crate::analytics::query::{Params, StatsQuery};
use crate::analytics::{self, QueryError};
use crate::event::now_ms;
use crate::pipeline::{StatsAnswer, StatsError};
use crate::signature::constant_time_eq;

/// Analytics access: open when `stats_token` is empty, else that token or
/// the admin token.
pub(super) async fn authorize_stats(
    api: Arc<Api>,
    authorization: Option<String>,
) -> Result<(), Rejection> {
    let config = api.pipeline.config();
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
    let summary = api
        .pipeline
        .summary()
        .await
        .map_err(|e| internal(e.to_string()))?;
    let total: u64 = summary.counts.iter().map(|(_, n)| n).sum();
    let by_type: serde_json::Map<String, serde_json::Value> = summary
        .counts
        .into_iter()
        .map(|(t, n)| (t, n.into()))
        .collect();
    let now = crate::event::now_ms();
    let sinks: Vec<SinkAnswer> = summary
        .sinks
        .iter()
        .map(|h| SinkAnswer::at(h, now))
        .collect();
    let mut body = json!({
        "total_events": total,
        "by_type": by_type,
        "queue_depth": summary.queue_depth,
        "dlq_size": summary.dlq_size,
        "latency_ms": LatencyAnswer::from(summary.latency),
        "sinks": sinks,
    });
    // With Redis, the totals are the deployment's; the queue, the DLQ, the
    // latency and the sinks stay this instance's.
    match summary.deployment {
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
    params: Params,
) -> Result<Response, Rejection> {
    if which == "rate" {
        return rate(&api).await;
    }
    let today = analytics::day_of(now_ms());
    let query = StatsQuery::parse(&which, &params, today, &api.pipeline.config().sum_fields)
        .map_err(bad_param)?
        .ok_or_else(warp::reject::not_found)?;
    answer(&api, query).await
}

/// `/stats/windows/{name}`: a `[[windows]]` window's groups, ranked.
pub(super) async fn custom_window(
    name: String,
    api: Arc<Api>,
    params: Params,
) -> Result<Response, Rejection> {
    let query = StatsQuery::window(name, &params).map_err(bad_param)?;
    answer(&api, query).await
}

/// Runs `query` and shapes its answer.
async fn answer(api: &Api, query: StatsQuery) -> Result<Response, Rejection> {
    let answer = api.pipeline.stats(query).await.map_err(|e| match e {
        e @ StatsError::UnknownWindow(_) => {
            ApiError::new(StatusCode::NOT_FOUND, "unknown_window", e.to_string()).into()
        }
        StatsError::Storage(e) => internal(e.to_string()),
    })?;
    let day = analytics::format_day;
    let mut body = match answer {
        StatsAnswer::Dau {
            from,
            to,
            days,
            exact,
            deployment_error,
        } => {
            let mut body = json!({"from": day(from), "to": day(to), "days": days});
            deployment_scope(&mut body, exact.is_some(), deployment_error);
            each_exact(&mut body["days"], exact);
            body
        }
        StatsAnswer::TopEvents {
            from,
            to,
            events,
            deployment,
            deployment_error,
        } => {
            let mut body = json!({"from": day(from), "to": day(to), "events": events});
            deployment_scope(&mut body, deployment, deployment_error);
            body
        }
        StatsAnswer::Trends {
            trend,
            summable,
            exact,
            deployment_error,
        } => {
            let mut body = json!(trend);
            // What `sum` may name, so that a caller can find out.
            body["summable"] = json!(summable);
            deployment_scope(&mut body, exact.is_some(), deployment_error);
            each_exact(&mut body["series"], exact);
            body
        }
        StatsAnswer::Retention {
            window_type,
            cohorts,
            deployment,
            deployment_error,
        } => {
            let mut body = json!({"window_type": window_type, "cohorts": cohorts});
            deployment_scope(&mut body, deployment, deployment_error);
            body
        }
        StatsAnswer::Windows {
            windows,
            custom,
            exact,
            deployment_error,
        } => {
            let mut body = json!(windows);
            body["custom"] = json!(custom);
            deployment_scope(&mut body, exact.is_some(), deployment_error);
            if let Some(exact) = exact {
                body["exact"] = exact.into();
            }
            body
        }
        StatsAnswer::Window {
            window,
            groups,
            deployment,
            deployment_error,
        } => {
            let mut body =
                json!({"name": window.name, "minutes": window.minutes, "groups": groups});
            deployment_scope(&mut body, deployment, deployment_error);
            body
        }
    };
    scope(api, &mut body);
    Ok(warp::reply::json(&body).into_response())
}

/// `/stats/rate`: events accepted and processed per second, recent seconds.
async fn rate(api: &Api) -> Result<Response, Rejection> {
    let rate =
        api.pipeline.rate().await.ok_or_else(|| {
            service_unavailable("unavailable", "the metrics actor is restarting", 1)
        })?;
    let mut body = json!({
        "interval_secs": 1,
        "end_ms": rate.end_ms,
        "accepted": rate.accepted,
        "processed": rate.processed,
    });
    scope(api, &mut body);
    Ok(warp::reply::json(&body).into_response())
}

/// With Redis, says whose figures an answer holds: the deployment's only
/// where the instances share them.
fn scope(api: &Api, body: &mut serde_json::Value) {
    if api.pipeline.redis_health().is_some() && body.get("scope").is_none() {
        body["scope"] = "instance".into();
    }
}

/// Marks an answer the deployment's (`deployment`), or says why the
/// deployment's could not be read (it is then this instance's).
fn deployment_scope(body: &mut serde_json::Value, deployment: bool, error: Option<String>) {
    if deployment {
        body["scope"] = "deployment".into();
    }
    if let Some(e) = error {
        body["deployment_error"] = e.into();
    }
}

/// Gives each row of `rows` (days, periods) its `exact` flag, when the
/// deployment's answer has them.
fn each_exact(rows: &mut serde_json::Value, exact: Option<Vec<bool>>) {
    let Some(exact) = exact else {
        return;
    };
    for (row, exact) in rows.as_array_mut().into_iter().flatten().zip(exact) {
        row["exact"] = exact.into();
    }
}

fn bad_param(e: QueryError) -> Rejection {
    ApiError::param(e.param, &e.detail).into()
}
