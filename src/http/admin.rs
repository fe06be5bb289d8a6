//! The admin API: `/admin/dlq…` and `/admin/queue`, behind the admin token
//! (or loopback only without one).

use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Rejection, Reply};

use super::answers::{DlqEntryAnswer, ReplayAnswer};
use super::error::ApiError;
use super::{Api, PeerAddr, bearer, internal};
use crate::event::now_ms;
use crate::pipeline::QueueStatus;
use crate::signature::constant_time_eq;

/// Admin access: the bearer token when one is set, else loopback callers only.
pub(super) async fn authorize(
    api: Arc<Api>,
    peer: Option<PeerAddr>,
    authorization: Option<String>,
) -> Result<(), Rejection> {
    let config = api.pipeline.config();
    let token = &config.admin_token;
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
pub(super) struct ListQuery {
    /// List entries with ids above this.
    #[serde(default)]
    after: u64,
    /// At most this many (capped at 1000).
    #[serde(default = "default_limit")]
    limit: usize,
}

#[derive(Debug, Deserialize)]
pub(super) struct ReplayQuery {
    /// Replay at most this many entries (capped at 1000).
    #[serde(default = "default_limit")]
    limit: usize,
}

fn default_limit() -> usize {
    100
}

pub(super) async fn dlq_list(api: Arc<Api>, q: ListQuery) -> Result<Response, Rejection> {
    let items = api
        .pipeline
        .dlq_list(q.after, q.limit.clamp(1, 1000))
        .await
        .map_err(internal)?;
    let next_after = items.last().map(|i| i.id);
    let entries: Vec<DlqEntryAnswer> = items.iter().map(DlqEntryAnswer::from).collect();
    Ok(warp::reply::json(&json!({"entries": entries, "next_after": next_after})).into_response())
}

pub(super) async fn dlq_get(id: u64, api: Arc<Api>) -> Result<Response, Rejection> {
    match api.pipeline.dlq_get(id).await.map_err(internal)? {
        Some(item) => Ok(warp::reply::json(&DlqEntryAnswer::from(&item)).into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no DLQ entry {id}"),
        )
        .into()),
    }
}

pub(super) async fn dlq_replay(
    api: Arc<Api>,
    q: ReplayQuery,
    body: Bytes,
) -> Result<Response, Rejection> {
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
    Ok(warp::reply::with_status(
        warp::reply::json(&ReplayAnswer::from(report)),
        StatusCode::ACCEPTED,
    )
    .into_response())
}

pub(super) async fn dlq_remove(
    api: Arc<Api>,
    ids: Option<Vec<u64>>,
) -> Result<Response, Rejection> {
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

pub(super) async fn queue(api: Arc<Api>) -> Result<Response, Rejection> {
    let QueueStatus { info, dlq_size } = api
        .pipeline
        .queue()
        .await
        .map_err(|e| internal(e.to_string()))?;
    let oldest_age_ms = info.oldest_received_ms.map(|t| (now_ms() - t).max(0));
    Ok(warp::reply::json(&json!({
        "depth": info.depth,
        "bytes": info.bytes,
        "cursor": info.cursor,
        "last_seq": info.last_seq,
        "oldest_age_ms": oldest_age_ms,
        "dlq_size": dlq_size,
    }))
    .into_response())
}
