//! The `http` sink: POSTs `{"events":[…]}` per batch, with an
//! `Idempotency-Key` that is the same whenever the same events are sent.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::{Delivery, Sink, SinkError, batch_json, batch_key};
use crate::event::Queued;

/// POSTs batches to a URL.
pub struct HttpSink {
    /// Sink name.
    name: String,
    /// Target (validated as http:// by the config).
    url: String,
    /// The target as errors name it: without a user, password or query,
    /// which may hold credentials, since errors reach the DLQ, the logs
    /// and `/stats/summary`.
    shown: String,
    /// Per-request deadline; a timeout is retryable.
    timeout: Duration,
    /// Pooled HTTP/1.1 client.
    client: Client<HttpConnector, Full<Bytes>>,
}

impl HttpSink {
    /// A sink posting to `url`.
    pub fn new(name: &str, url: &str, timeout: Duration) -> Self {
        HttpSink {
            name: name.to_owned(),
            url: url.to_owned(),
            shown: shown_url(url),
            timeout,
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    async fn post(&self, events: &[Queued]) -> Result<(), SinkError> {
        let retry = |message: String| SinkError::Retryable {
            message,
            retry_after: None,
        };
        let body = batch_json(events).to_string();
        let request = Request::builder()
            .method(Method::POST)
            .uri(&self.url)
            .header(CONTENT_TYPE, "application/json")
            .header("Idempotency-Key", batch_key(events))
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| SinkError::Permanent(format!("bad request for {}: {e}", self.shown)))?;
        let response = tokio::time::timeout(self.timeout, self.client.request(request))
            .await
            .map_err(|_| {
                retry(format!(
                    "POST {} timed out after {:?}",
                    self.shown, self.timeout
                ))
            })?
            .map_err(|e| retry(format!("POST {} failed: {e}", self.shown)))?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(parse_retry_after);
        // Read the body so the connection can be reused; its content is not needed.
        let _ = tokio::time::timeout(self.timeout, response.into_body().collect()).await;
        if status.is_success() {
            return Ok(());
        }
        let message = format!("POST {} answered {status}", self.shown);
        if retryable(status) {
            Err(SinkError::Retryable {
                message,
                retry_after,
            })
        } else {
            Err(SinkError::Permanent(message))
        }
    }
}

/// `url` without its user, password and query (`http://host:port/path`).
fn shown_url(url: &str) -> String {
    match url.parse::<hyper::Uri>() {
        Ok(uri) => {
            let port = uri.port_u16().map(|p| format!(":{p}")).unwrap_or_default();
            format!(
                "{}://{}{port}{}",
                uri.scheme_str().unwrap_or("http"),
                uri.host().unwrap_or("?"),
                uri.path()
            )
        }
        Err(_) => "the configured URL".to_owned(),
    }
}

fn retryable(status: StatusCode) -> bool {
    status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
        || status.as_u16() == 425
}

/// `Retry-After` in seconds (the HTTP-date form is ignored).
fn parse_retry_after(value: &HeaderValue) -> Option<Duration> {
    value
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

impl Sink for HttpSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn deliver<'a>(&'a self, events: &'a [Queued]) -> Delivery<'a> {
        Box::pin(self.post(events))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified() {
        for s in [500, 502, 503, 429, 408, 425] {
            assert!(retryable(StatusCode::from_u16(s).unwrap()), "{s}");
        }
        for s in [400, 401, 404, 422] {
            assert!(!retryable(StatusCode::from_u16(s).unwrap()), "{s}");
        }
        assert_eq!(
            parse_retry_after(&HeaderValue::from_static("3")),
            Some(Duration::from_secs(3))
        );
        assert_eq!(parse_retry_after(&HeaderValue::from_static("soon")), None);
    }

    #[test]
    fn errors_name_the_url_without_its_credentials() {
        assert_eq!(
            shown_url("http://user:hunter2@hooks.example:8080/in?api_key=abc"),
            "http://hooks.example:8080/in"
        );
        assert_eq!(shown_url("http://127.0.0.1/x"), "http://127.0.0.1/x");
    }
}
