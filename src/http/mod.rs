//! The HTTP layer: warp filters and thin handlers. Handlers ask the
//! [`Pipeline`] (admission, queries, the actors), read a body within its
//! limit, and map the pipeline's answers to status codes and JSON: the
//! answer shapes are here (`answers`), not in the pipeline. Errors are [`error::ApiError`], turned into responses by one
//! `recover()`.
//!
//! Here: the routes, `/health`, `/ready`, `/metrics`. Intake is in
//! `ingest.rs`, `/admin` in `admin.rs`, `/stats` in `stats.rs`.

mod admin;
mod answers;
pub mod dashboard;
pub mod error;
mod ingest;
pub mod server;
mod stats;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::json;
use warp::filters::BoxedFilter;
use warp::http::{HeaderValue, StatusCode};
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::pipeline::{Pipeline, Readiness};
use error::ApiError;

/// The peer address of a connection, put into each request by the server.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// What the handlers need.
pub struct Api {
    /// The actor pipeline (and through it the live config).
    pub pipeline: Pipeline,
}

impl Api {
    /// The handler state for `pipeline`.
    pub fn new(pipeline: Pipeline) -> Arc<Self> {
        Arc::new(Api { pipeline })
    }
}

/// Every route, with errors recovered into JSON.
pub fn routes(api: Arc<Api>) -> BoxedFilter<(Response,)> {
    let with_api = {
        let api = api.clone();
        warp::any().map(move || api.clone())
    };
    let body = warp::body::stream();
    let ingest_common = warp::post()
        .and(with_api.clone())
        .and(warp::header::headers_cloned());

    let single_default = warp::path!("webhook" / "events")
        .and(ingest_common.clone())
        .and(body)
        .and_then(|api, headers, body| {
            ingest::ingest(api, "default".to_owned(), false, headers, body)
        });
    let batch_default = warp::path!("webhook" / "batch")
        .or(warp::path!("events"))
        .unify()
        .and(ingest_common.clone())
        .and(body)
        .and_then(|api, headers, body| {
            ingest::ingest(api, "default".to_owned(), true, headers, body)
        });
    let single_source = warp::path!("webhook" / String / "events")
        .and(ingest_common.clone())
        .and(body)
        .and_then(|source, api, headers, body| ingest::ingest(api, source, false, headers, body));
    let batch_source = warp::path!("webhook" / String / "batch")
        .and(ingest_common)
        .and(body)
        .and_then(|source, api, headers, body| ingest::ingest(api, source, true, headers, body));

    let health = warp::path!("health")
        .and(warp::get())
        .and(with_api.clone())
        .map(health);
    let ready = warp::path!("ready")
        .and(warp::get())
        .and(with_api.clone())
        .map(ready);
    let metrics = warp::path!("metrics")
        .and(warp::get())
        .and(with_api.clone())
        .and_then(metrics);

    let stats_access = with_api
        .clone()
        .and(warp::header::optional::<String>("authorization"))
        .and_then(stats::authorize_stats)
        .untuple_one();
    let summary = warp::path!("stats" / "summary")
        .and(warp::get())
        .and(stats_access.clone())
        .and(with_api.clone())
        .and_then(stats::summary);
    let custom_window = warp::path!("stats" / "windows" / String)
        .and(warp::get())
        .and(stats_access.clone())
        .and(with_api.clone())
        .and(warp::query::<HashMap<String, String>>())
        .and_then(stats::custom_window);
    let stats = warp::path("stats")
        .and(warp::path::param::<String>())
        .and(warp::path::end())
        .and(warp::get())
        .and(stats_access)
        .and(with_api.clone())
        .and(warp::query::<HashMap<String, String>>())
        .and_then(stats::stats);

    let admin = warp::path("admin")
        .and(with_api.clone())
        .and(warp::ext::optional::<PeerAddr>())
        .and(warp::header::optional::<String>("authorization"))
        .and_then(admin::authorize)
        .untuple_one();
    let dlq_list = warp::path!("dlq")
        .and(warp::get())
        .and(with_api.clone())
        .and(warp::query::<admin::ListQuery>())
        .and_then(admin::dlq_list);
    let dlq_get = warp::path!("dlq" / u64)
        .and(warp::get())
        .and(with_api.clone())
        .and_then(admin::dlq_get);
    let dlq_replay = warp::path!("dlq" / "replay")
        .and(warp::post())
        .and(with_api.clone())
        .and(warp::query::<admin::ReplayQuery>())
        .and(optional_body(1 << 20))
        .and_then(admin::dlq_replay);
    let dlq_delete = warp::path!("dlq" / u64)
        .and(warp::delete())
        .and(with_api.clone())
        .and_then(|id, api| admin::dlq_remove(api, Some(vec![id])));
    let dlq_purge = warp::path!("dlq")
        .and(warp::delete())
        .and(with_api.clone())
        .and_then(|api| admin::dlq_remove(api, None));
    let queue = warp::path!("queue")
        .and(warp::get())
        .and(with_api)
        .and_then(admin::queue);
    let admin_routes = admin.and(
        dlq_replay
            .or(dlq_list)
            .unify()
            .or(dlq_get)
            .unify()
            .or(dlq_delete)
            .unify()
            .or(dlq_purge)
            .unify()
            .or(queue)
            .unify(),
    );

    // Intake and the rest are boxed apart: a request then builds, moves and
    // drops the future of the intake routes alone, not one nested through
    // every route (BENCHMARKS.md, "Intake routes boxed apart": about 4 %
    // less CPU per single event).
    let intake = single_default
        .or(batch_default)
        .unify()
        .or(single_source)
        .unify()
        .or(batch_source)
        .unify()
        .boxed();
    let rest = health
        .or(ready)
        .unify()
        .or(metrics)
        .unify()
        .or(summary)
        .unify()
        .or(custom_window)
        .unify()
        .or(stats)
        .unify()
        .or(admin_routes)
        .unify()
        .or(dashboard::routes())
        .unify()
        .boxed();
    let routes = intake.or(rest).unify().recover(error::recover).unify();
    // A 405 says which methods the path takes (RFC 9110 requires `Allow`).
    warp::path::full()
        .and(routes)
        .map(|path: warp::path::FullPath, mut response: Response| {
            if response.status() == StatusCode::METHOD_NOT_ALLOWED
                && let Some(allow) = allowed_methods(path.as_str())
            {
                response
                    .headers_mut()
                    .insert(warp::http::header::ALLOW, HeaderValue::from_static(allow));
            }
            response
        })
        .boxed()
}

/// The methods a path takes, for the `Allow` header of a 405.
fn allowed_methods(path: &str) -> Option<&'static str> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    Some(match parts.as_slice() {
        ["webhook", "events" | "batch"] | ["events"] | ["webhook", _, "events" | "batch"] => "POST",
        [""] | ["dashboard.js" | "dashboard.css"] => "GET, HEAD",
        ["health"] | ["ready"] | ["metrics"] | ["stats", _] | ["stats", "windows", _] => "GET",
        ["admin", "queue"] => "GET",
        ["admin", "dlq", "replay"] => "POST",
        ["admin", "dlq"] | ["admin", "dlq", _] => "GET, DELETE",
        _ => return None,
    })
}

/// A body of at most `limit` bytes, or none at all: a request with
/// neither `Content-Length` nor `Transfer-Encoding` (`curl -X POST URL`)
/// has an empty body, where warp's limit would answer 411.
fn optional_body(limit: u64) -> BoxedFilter<(Bytes,)> {
    let none = warp::header::optional::<String>("content-length")
        .and(warp::header::optional::<String>("transfer-encoding"))
        .and_then(
            |length: Option<String>, encoding: Option<String>| async move {
                match (length, encoding) {
                    (None, None) => Ok(Bytes::new()),
                    _ => Err(warp::reject()),
                }
            },
        );
    let some = warp::body::content_length_limit(limit).and(warp::body::bytes());
    none.or(some).unify().boxed()
}

/// A storage failure behind an answer: 503, try again shortly.
fn internal(detail: String) -> Rejection {
    service_unavailable("storage_unavailable", &detail, 1)
}

fn service_unavailable(kind: &'static str, detail: &str, retry: u64) -> Rejection {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, kind, detail)
        .retry_after(retry)
        .into()
}

/// `/health`: the process answers; with Redis on, how Redis is (a Redis
/// that is down leaves the daemon healthy: intake goes on without it).
fn health(api: Arc<Api>) -> Response {
    let mut body = json!({"status": "ok"});
    if let Some(redis) = api.pipeline.redis_health() {
        body["redis"] = json!(redis);
    }
    warp::reply::json(&body).into_response()
}

fn ready(api: Arc<Api>) -> Response {
    let (code, state) = match api.pipeline.readiness() {
        Readiness::Ready => (StatusCode::OK, "ready"),
        Readiness::Draining => (StatusCode::SERVICE_UNAVAILABLE, "draining"),
        Readiness::StorageFailed => (StatusCode::SERVICE_UNAVAILABLE, "storage_failed"),
    };
    warp::reply::with_status(warp::reply::json(&json!({"status": state})), code).into_response()
}

async fn metrics(api: Arc<Api>) -> Result<Response, Rejection> {
    match api.pipeline.render_metrics().await {
        Some(text) => {
            Ok(
                warp::reply::with_header(text, "content-type", "text/plain; version=0.0.4")
                    .into_response(),
            )
        }
        None => Err(service_unavailable(
            "unavailable",
            "the metrics actor is restarting",
            1,
        )),
    }
}

/// The token of an `Authorization: Bearer <token>` header ("" without one).
fn bearer(authorization: Option<&str>) -> &str {
    authorization
        .and_then(|h| h.strip_prefix("Bearer "))
        .unwrap_or("")
}
