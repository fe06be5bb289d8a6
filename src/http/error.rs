//! The one error type of the HTTP layer: `{"error": kind, "detail": …}`
//! (plus `field`, `line`, `column` where they apply), and the one
//! `recover()` that turns every rejection into it.

use std::convert::Infallible;

use serde::Serialize;
use warp::http::StatusCode;
use warp::http::header::{HeaderValue, RETRY_AFTER};
use warp::reply::Response;
use warp::{Rejection, Reply};

/// An HTTP error answer.
#[derive(Debug, Clone, Serialize)]
pub struct ApiError {
    /// HTTP status.
    #[serde(skip)]
    pub status: StatusCode,
    /// Seconds to send as `Retry-After` (429, 503).
    #[serde(skip)]
    pub retry_after: Option<u64>,
    /// Machine-readable kind, e.g. `schema_violation`.
    pub error: &'static str,
    /// One human sentence.
    pub detail: String,
    /// The field at fault (422).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Where malformed JSON broke (400).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    /// Where malformed JSON broke (400).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub column: Option<usize>,
}

impl warp::reject::Reject for ApiError {}

impl ApiError {
    /// An error with no field or position.
    pub fn new(status: StatusCode, error: &'static str, detail: impl Into<String>) -> Self {
        ApiError {
            status,
            retry_after: None,
            error,
            detail: detail.into(),
            field: None,
            line: None,
            column: None,
        }
    }

    /// Adds a `Retry-After`.
    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds.max(1));
        self
    }

    /// 422 naming a field.
    pub fn schema(field: &str, detail: &str) -> Self {
        let mut e = ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "schema_violation",
            if field.is_empty() {
                detail.to_owned()
            } else {
                format!("{field}: {detail}")
            },
        );
        e.field = Some(field.to_owned());
        e
    }

    /// 400 naming a query parameter.
    pub fn param(param: &str, detail: &str) -> Self {
        let mut e = ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
            format!("{param}: {detail}"),
        );
        e.field = Some(param.to_owned());
        e
    }

    /// As a response.
    pub fn response(&self) -> Response {
        let mut r = warp::reply::with_status(warp::reply::json(self), self.status).into_response();
        if let Some(s) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&s.to_string())
        {
            r.headers_mut().insert(RETRY_AFTER, v);
        }
        r
    }
}

/// Turns any rejection into the JSON error body.
pub async fn recover(rejection: Rejection) -> Result<Response, Infallible> {
    let e = if let Some(e) = rejection.find::<ApiError>() {
        e.clone()
    } else if rejection.is_not_found() {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
    } else if let Some(q) = rejection.find::<warp::reject::InvalidQuery>() {
        // Before MethodNotAllowed: other methods on the same path leave that
        // rejection behind even when this route matched the method.
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", q.to_string())
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "this endpoint does not take that method",
        )
    } else if let Some(h) = rejection.find::<warp::reject::InvalidHeader>() {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_header", h.to_string())
    } else if rejection.find::<warp::reject::PayloadTooLarge>().is_some() {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "the body is too large",
        )
    } else {
        tracing::warn!(?rejection, "unhandled rejection");
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("{rejection:?}"),
        )
    };
    Ok(e.response())
}
