//! Intake: `POST /webhook/…`, `/events`. Reads the body within its limit,
//! hands it to the pipeline, and maps the verdicts to the answer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use serde_json::json;
use warp::http::{HeaderMap, StatusCode};
use warp::reply::Response;
use warp::{Rejection, Reply};

use super::answers::VerdictAnswer;
use super::error::ApiError;
use super::{Api, service_unavailable};
use crate::event::BodyError;
use crate::event::now_ms;
use crate::pipeline::Refusal;
use crate::pipeline::messages::{IngestError, IngestRequest, Shape, Verdict};
use crate::signature::{Scheme, SignedHeaders};

pub(super) async fn ingest<S, B>(
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
    // Held until the answer: the drain waits for this request.
    let admission = api.pipeline.admit(&source).map_err(refusal)?;
    let config = admission.config();
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
        let header_key = match admission.scheme() {
            None | Some(Scheme::None) => header("idempotency-key").or_else(|| header("webhook-id")),
            Some(Scheme::StandardWebhooks) => header("webhook-id"),
            Some(Scheme::Github | Scheme::Stripe) => None,
        };
        Shape::Single { header_key }
    };
    // Only a signed source's requests need them: five lookups and copies
    // saved on every other request.
    let signed = match admission.scheme() {
        None | Some(Scheme::None) => SignedHeaders::default(),
        Some(_) => SignedHeaders {
            webhook_id: header("webhook-id"),
            webhook_timestamp: header("webhook-timestamp"),
            webhook_signature: header("webhook-signature"),
            hub_signature_256: header("x-hub-signature-256"),
            stripe_signature: header("stripe-signature"),
        },
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
        live: admission.live(),
    };
    let verdicts = api.pipeline.ingest(request).await.map_err(ingest_error)?;
    Ok(match shape {
        Shape::Single { .. } => single_answer(verdicts)?,
        Shape::Batch => batch_answer(&verdicts),
    })
}

fn single_answer(verdicts: Vec<Verdict>) -> Result<Response, Rejection> {
    // Written straight from the typed answer: no map of JSON values built
    // for every request.
    let reply = |status, verdict: &Verdict| {
        let body = warp::reply::json(&VerdictAnswer::from(verdict));
        Ok(warp::reply::with_status(body, status).into_response())
    };
    match verdicts.into_iter().next() {
        Some(v @ Verdict::Accepted { .. }) => reply(StatusCode::ACCEPTED, &v),
        Some(v @ Verdict::Duplicate { .. }) => reply(StatusCode::OK, &v),
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
        "results": verdicts.iter().map(VerdictAnswer::from).collect::<Vec<_>>(),
    });
    warp::reply::with_status(warp::reply::json(&body), StatusCode::ACCEPTED).into_response()
}

/// Why the request was not let in, as an answer.
fn refusal(refusal: Refusal) -> Rejection {
    let detail = refusal.to_string();
    match refusal {
        Refusal::Draining => service_unavailable("draining", &detail, 5),
        Refusal::UnknownSource(_) => {
            ApiError::new(StatusCode::NOT_FOUND, "unknown_source", detail).into()
        }
        Refusal::RateLimited { wait, .. } => {
            ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", detail)
                .retry_after(wait.as_secs_f64().ceil() as u64)
                .into()
        }
        Refusal::QueueFull { .. } | Refusal::QueueBytesFull { .. } => {
            service_unavailable("queue_full", &detail, 10)
        }
        Refusal::Storage(e) => ingest_error(IngestError::Storage(e)),
    }
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

#[cfg(test)]
mod tests {
    /// warp boxes each request's future, and it was 1.9 KiB (ractor's
    /// `call` kept the request in every layer of its state): an allocation
    /// over glibc's per-thread cache on every request, when inletd ran on
    /// glibc, and a copy of every layer as the future is built. Measured in
    /// a debug build, where futures are no smaller, with a zero-sized body
    /// stream standing in for warp's (whose type cannot be named): the
    /// limit leaves room for it and for warp's filters around it in the
    /// same box.
    #[test]
    fn an_intake_request_future_stays_small() {
        fn future_size<A, B, C, D, E, F>(_: fn(A, B, C, D, E) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        type Body = futures_util::stream::Empty<Result<bytes::Bytes, warp::Error>>;
        let size = future_size(super::ingest::<Body, bytes::Bytes>);
        assert!(size <= 640, "an intake request's future is {size} bytes");
    }
}
