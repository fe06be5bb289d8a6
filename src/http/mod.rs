//! The HTTP layer: warp filters and thin handlers. Handlers check what can
//! be checked from headers (draining, source, rate limit, queue full, body
//! size), then hand the body to the pipeline and map its answer to status
//! codes. Errors are [`error::ApiError`], turned into responses by one
//! `recover()`.

pub mod dashboard;
pub mod error;
pub mod server;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::json;
use warp::filters::BoxedFilter;
use warp::http::{HeaderMap, HeaderValue, StatusCode};
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::analytics;
use crate::event::BodyError;
use crate::event::now_ms;
use crate::pipeline::Pipeline;
use crate::pipeline::messages::{IngestError, IngestRequest, Shape, SinkHealth, Verdict};
use crate::signature::{Scheme, SignedHeaders, constant_time_eq};
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
        .and_then(|api, headers, body| ingest(api, "default".to_owned(), false, headers, body));
    let batch_default = warp::path!("webhook" / "batch")
        .or(warp::path!("events"))
        .unify()
        .and(ingest_common.clone())
        .and(body)
        .and_then(|api, headers, body| ingest(api, "default".to_owned(), true, headers, body));
    let single_source = warp::path!("webhook" / String / "events")
        .and(ingest_common.clone())
        .and(body)
        .and_then(|source, api, headers, body| ingest(api, source, false, headers, body));
    let batch_source = warp::path!("webhook" / String / "batch")
        .and(ingest_common)
        .and(body)
        .and_then(|source, api, headers, body| ingest(api, source, true, headers, body));

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
        .and_then(authorize_stats)
        .untuple_one();
    let summary = warp::path!("stats" / "summary")
        .and(warp::get())
        .and(stats_access.clone())
        .and(with_api.clone())
        .and_then(summary);
    let custom_window = warp::path!("stats" / "windows" / String)
        .and(warp::get())
        .and(stats_access.clone())
        .and(with_api.clone())
        .and(warp::query::<HashMap<String, String>>())
        .and_then(custom_window);
    let stats = warp::path("stats")
        .and(warp::path::param::<String>())
        .and(warp::path::end())
        .and(warp::get())
        .and(stats_access)
        .and(with_api.clone())
        .and(warp::query::<HashMap<String, String>>())
        .and_then(stats);

    let admin = warp::path("admin")
        .and(with_api.clone())
        .and(warp::ext::optional::<PeerAddr>())
        .and(warp::header::optional::<String>("authorization"))
        .and_then(authorize)
        .untuple_one();
    let dlq_list = warp::path!("dlq")
        .and(warp::get())
        .and(with_api.clone())
        .and(warp::query::<ListQuery>())
        .and_then(dlq_list);
    let dlq_get = warp::path!("dlq" / u64)
        .and(warp::get())
        .and(with_api.clone())
        .and_then(dlq_get);
    let dlq_replay = warp::path!("dlq" / "replay")
        .and(warp::post())
        .and(with_api.clone())
        .and(warp::query::<ReplayQuery>())
        .and(optional_body(1 << 20))
        .and_then(dlq_replay);
    let dlq_delete = warp::path!("dlq" / u64)
        .and(warp::delete())
        .and(with_api.clone())
        .and_then(|id, api| dlq_remove(api, Some(vec![id])));
    let dlq_purge = warp::path!("dlq")
        .and(warp::delete())
        .and(with_api.clone())
        .and_then(|api| dlq_remove(api, None));
    let queue = warp::path!("queue")
        .and(warp::get())
        .and(with_api)
        .and_then(queue);
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

    let routes = single_default
        .or(batch_default)
        .unify()
        .or(single_source)
        .unify()
        .or(batch_source)
        .unify()
        .or(health)
        .unify()
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
        .recover(error::recover)
        .unify();
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

fn service_unavailable(kind: &'static str, detail: &str, retry: u64) -> Rejection {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, kind, detail)
        .retry_after(retry)
        .into()
}

async fn ingest<S, B>(
    api: Arc<Api>,
    source: String,
    batch: bool,
    headers: HeaderMap,
    body: S,
) -> Result<Response, Rejection>
where
    S: Stream<Item = Result<B, warp::Error>> + Unpin,
    B: Buf,
{
    let received = Instant::now();
    let received_at_ms = now_ms();
    let status = &api.pipeline.context.status;
    // Held until the answer: the drain waits for this request.
    let Some(_in_flight) = status.begin_intake() else {
        return Err(service_unavailable(
            "draining",
            "inletd is shutting down; retry against the restarted daemon",
            5,
        ));
    };
    let live = api.pipeline.context.live();
    let config = &live.config;
    let Some(source_parts) = live.sources.get(&source) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_source",
            format!("no source named `{source}` is configured"),
        )
        .into());
    };
    if let Some(bucket) = &source_parts.limiter
        && let Err(wait) = bucket.take()
    {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("source `{source}` is over its rate limit"),
        )
        .retry_after(wait.as_secs_f64().ceil() as u64)
        .into());
    }
    let depth = status.queue_depth();
    if depth >= config.max_queue_events {
        return Err(service_unavailable(
            "queue_full",
            &format!(
                "{depth} events are queued (max_queue_events = {}); retry later",
                config.max_queue_events
            ),
            10,
        ));
    }
    if config.max_queue_bytes > 0 {
        // Unknown is not empty: the byte limit cannot be checked, so nothing
        // is taken. An atomic read, fit for the request path.
        let bytes = api
            .pipeline
            .context
            .storage
            .queue_bytes()
            .map_err(|e| ingest_error(IngestError::Storage(e.to_string())))?;
        if bytes >= config.max_queue_bytes {
            return Err(service_unavailable(
                "queue_full",
                &format!(
                    "{bytes} bytes are queued (max_queue_bytes = {}); retry later",
                    config.max_queue_bytes
                ),
                10,
            ));
        }
    }
    let limit = Duration::from_secs(config.request_timeout_secs);
    let body = tokio::time::timeout(limit, read_body(&headers, body, config.max_body_bytes))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!(
                    "the body did not arrive within request_timeout_secs ({}s)",
                    limit.as_secs()
                ),
            )
        })??;
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let shape = if batch {
        Shape::Batch
    } else {
        // A signed source takes its key only from signed data: otherwise a
        // captured request replayed with a new Idempotency-Key would be new.
        let header_key = match source_parts.verifier.as_ref().map(|v| v.scheme()) {
            None | Some(Scheme::None) => header("idempotency-key").or_else(|| header("webhook-id")),
            Some(Scheme::StandardWebhooks) => header("webhook-id"),
            Some(Scheme::Github | Scheme::Stripe) => None,
        };
        Shape::Single { header_key }
    };
    let signed = SignedHeaders {
        webhook_id: header("webhook-id"),
        webhook_timestamp: header("webhook-timestamp"),
        webhook_signature: header("webhook-signature"),
        hub_signature_256: header("x-hub-signature-256"),
        stripe_signature: header("stripe-signature"),
    };
    let request = IngestRequest {
        source,
        shape: shape.clone(),
        // Lossy, so that a non-UTF-8 value is reported as sent, not as missing.
        content_type: headers
            .get("content-type")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
        signed,
        body,
        received_at_ms,
        received,
    };
    let verdicts = api.pipeline.ingest(request).await.map_err(ingest_error)?;
    Ok(match shape {
        Shape::Single { .. } => single_answer(verdicts)?,
        Shape::Batch => batch_answer(&verdicts),
    })
}

fn single_answer(verdicts: Vec<Verdict>) -> Result<Response, Rejection> {
    let reply = |status, body| {
        Ok(warp::reply::with_status(warp::reply::json(&body), status).into_response())
    };
    match verdicts.into_iter().next() {
        Some(Verdict::Accepted { event_id }) => reply(
            StatusCode::ACCEPTED,
            json!({"status": "accepted", "event_id": event_id}),
        ),
        Some(Verdict::Duplicate { event_id }) => reply(
            StatusCode::OK,
            json!({"status": "duplicate", "event_id": event_id}),
        ),
        Some(Verdict::InProgress { event_id }) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "in_progress",
            format!(
                "another instance is storing an event with this key ({event_id}) right now; retry"
            ),
        )
        .retry_after(1)
        .into()),
        Some(Verdict::Rejected(f)) => Err(ApiError::schema(&f.field, &f.detail).into()),
        None => {
            Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "no verdict").into())
        }
    }
}

fn batch_answer(verdicts: &[Verdict]) -> Response {
    let mut accepted = 0;
    let mut duplicates = 0;
    let mut in_progress = 0;
    let mut rejected = Vec::new();
    for (index, v) in verdicts.iter().enumerate() {
        match v {
            Verdict::Accepted { .. } => accepted += 1,
            Verdict::Duplicate { .. } => duplicates += 1,
            Verdict::InProgress { .. } => in_progress += 1,
            Verdict::Rejected(f) => rejected.push(json!({
                "index": index, "error": "schema_violation", "field": f.field, "detail": f.detail,
            })),
        }
    }
    let body = json!({
        "accepted": accepted,
        "duplicates": duplicates,
        "in_progress": in_progress,
        "rejected": rejected,
        "results": verdicts,
    });
    warp::reply::with_status(warp::reply::json(&body), StatusCode::ACCEPTED).into_response()
}

fn ingest_error(e: IngestError) -> Rejection {
    match e {
        IngestError::Body(BodyError::Malformed {
            line,
            column,
            message,
        }) => {
            let mut err = ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", message);
            err.line = Some(line);
            err.column = Some(column);
            err.into()
        }
        IngestError::Body(BodyError::Shape(f)) => ApiError::schema(&f.field, &f.detail).into(),
        IngestError::Body(e @ BodyError::TooManyEvents { .. }) => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_events",
            e.to_string(),
        )
        .into(),
        IngestError::Signature(e) => {
            ApiError::new(StatusCode::UNAUTHORIZED, "bad_signature", e.to_string()).into()
        }
        e @ IngestError::NotJson(_) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            e.to_string(),
        )
        .into(),
        IngestError::Storage(detail) => service_unavailable(
            "storage_unavailable",
            &format!("the event was not stored: {detail}"),
            5,
        ),
        IngestError::Unavailable => service_unavailable(
            "unavailable",
            "the pipeline is restarting; the event was not stored",
            1,
        ),
    }
}

/// Reads the body, refusing more than `limit` bytes whether or not a
/// Content-Length was sent.
async fn read_body<S, B>(headers: &HeaderMap, mut body: S, limit: usize) -> Result<Bytes, ApiError>
where
    S: Stream<Item = Result<B, warp::Error>> + Unpin,
    B: Buf,
{
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body is over max_body_bytes ({limit} bytes)"),
        )
    };
    let declared = headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let mut out = BytesMut::with_capacity(declared.map_or(8192, |n| n as usize));
    while let Some(chunk) = body.next().await {
        let mut chunk = chunk.map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_body",
                format!("reading the body failed: {e}"),
            )
        })?;
        if out.len() + chunk.remaining() > limit {
            return Err(too_large());
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            let n = part.len();
            out.put_slice(part);
            chunk.advance(n);
        }
    }
    Ok(out.freeze())
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
    let status = &api.pipeline.context.status;
    let (code, state) = if status.draining.load(Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else if status.storage_failed.load(Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "storage_failed")
    } else {
        (StatusCode::OK, "ready")
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

/// Analytics access: open when `stats_token` is empty, else that token or
/// the admin token.
async fn authorize_stats(api: Arc<Api>, authorization: Option<String>) -> Result<(), Rejection> {
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

/// Admin access: the bearer token when one is set, else loopback callers only.
async fn authorize(
    api: Arc<Api>,
    peer: Option<PeerAddr>,
    authorization: Option<String>,
) -> Result<(), Rejection> {
    let live = api.pipeline.context.live();
    let token = &live.config.admin_token;
    if token.is_empty() {
        return match peer {
            Some(PeerAddr(addr)) if addr.ip().is_loopback() => Ok(()),
            _ => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "the admin API answers loopback callers only unless admin_token is set",
            )
            .into()),
        };
    }
    let given = bearer(authorization.as_deref());
    if constant_time_eq(given.as_bytes(), token.as_bytes()) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send Authorization: Bearer <admin_token>",
        )
        .into())
    }
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    /// List entries with ids above this.
    #[serde(default)]
    after: u64,
    /// At most this many (capped at 1000).
    #[serde(default = "default_limit")]
    limit: usize,
}

#[derive(Debug, Deserialize)]
struct ReplayQuery {
    /// Replay at most this many entries (capped at 1000).
    #[serde(default = "default_limit")]
    limit: usize,
}

fn default_limit() -> usize {
    100
}

fn internal(detail: String) -> Rejection {
    service_unavailable("storage_unavailable", &detail, 1)
}

async fn dlq_list(api: Arc<Api>, q: ListQuery) -> Result<Response, Rejection> {
    let items = api
        .pipeline
        .dlq_list(q.after, q.limit.clamp(1, 1000))
        .await
        .map_err(internal)?;
    let next_after = items.last().map(|i| i.id);
    Ok(warp::reply::json(&json!({"entries": items, "next_after": next_after})).into_response())
}

async fn dlq_get(id: u64, api: Arc<Api>) -> Result<Response, Rejection> {
    match api.pipeline.dlq_get(id).await.map_err(internal)? {
        Some(item) => Ok(warp::reply::json(&item).into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no DLQ entry {id}"),
        )
        .into()),
    }
}

async fn dlq_replay(api: Arc<Api>, q: ReplayQuery, body: Bytes) -> Result<Response, Rejection> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct ReplayBody {
        ids: Option<Vec<u64>>,
    }
    let ids = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        serde_json::from_slice::<ReplayBody>(&body)
            .map_err(|e| {
                ApiError::schema(
                    "ids",
                    &format!("expected {{\"ids\": [1, 2]}} or no body: {e}"),
                )
            })?
            .ids
    };
    let report = api
        .pipeline
        .dlq_replay(ids, q.limit.clamp(1, 1000))
        .await
        .map_err(internal)?;
    Ok(warp::reply::with_status(warp::reply::json(&report), StatusCode::ACCEPTED).into_response())
}

async fn dlq_remove(api: Arc<Api>, ids: Option<Vec<u64>>) -> Result<Response, Rejection> {
    let single = ids.as_ref().and_then(|v| v.first().copied());
    let removed = api.pipeline.dlq_remove(ids).await.map_err(internal)?;
    if let Some(id) = single
        && removed == 0
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no DLQ entry {id}"),
        )
        .into());
    }
    Ok(warp::reply::json(&json!({"removed": removed})).into_response())
}

async fn queue(api: Arc<Api>) -> Result<Response, Rejection> {
    let (info, dlq) = query(&api, |s| Ok((s.queue_info()?, s.dlq_len()?))).await?;
    let oldest_age_ms = info.oldest_received_ms.map(|t| (now_ms() - t).max(0));
    Ok(warp::reply::json(&json!({
        "depth": info.depth,
        "bytes": info.bytes,
        "cursor": info.cursor,
        "last_seq": info.last_seq,
        "oldest_age_ms": oldest_age_ms,
        "dlq_size": dlq,
    }))
    .into_response())
}

async fn summary(api: Arc<Api>) -> Result<Response, Rejection> {
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
async fn stats(
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
async fn custom_window(
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

/// Runs a storage query off the async threads ([`crate::pipeline::blocking`]).
async fn query<T: Send + 'static>(
    api: &Api,
    call: impl FnOnce(&dyn crate::storage::Storage) -> Result<T, crate::storage::StorageError>
    + Send
    + 'static,
) -> Result<T, Rejection> {
    crate::pipeline::blocking(&api.pipeline.context.storage, call)
        .await
        .map_err(|e| internal(e.to_string()))
}
