//! The HTTP client the subcommands share: where the daemon is (the config's
//! `bind`, or `--url`), the admin token as a bearer token, a per-request
//! deadline, and answers read whole (up to a cap) with their `Retry-After`.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::config::Config;

/// Longest wait for one request's whole answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest answer body read; the daemon's answers are far smaller.
const MAX_ANSWER_BYTES: usize = 64 << 20;

/// The `--url` flag every client subcommand takes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DaemonArgs {
    /// Address of the running daemon, e.g. http://127.0.0.1:5015
    /// (default: the config's `bind`, as set by --bind, INLETD_BIND or --config).
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
}

/// Why talking to the daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// `--url` or the config's `bind` does not name a reachable http address.
    #[error("bad daemon address `{address}`: {reason}")]
    BadAddress {
        /// The address as given.
        address: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No connection, or the connection broke before an answer came.
    #[error("cannot reach the daemon at {url}: {reason} (is `inletd run` running there?)")]
    Unreachable {
        /// The URL requested.
        url: String,
        /// The transport error.
        reason: String,
    },
    /// No whole answer within the deadline.
    #[error("{method} {url} got no answer within {timeout:?}")]
    Timeout {
        /// GET, POST or DELETE.
        method: Method,
        /// The URL requested.
        url: String,
        /// The deadline that passed.
        timeout: Duration,
    },
    /// The answer was not what the daemon sends (not JSON, too large, …).
    #[error("{method} {url}: unexpected answer: {reason}")]
    BadAnswer {
        /// GET, POST or DELETE.
        method: Method,
        /// The URL requested.
        url: String,
        /// What was wrong with it.
        reason: String,
    },
}

/// A client for one daemon.
#[derive(Clone)]
pub struct Client {
    /// `http://host:port` (plus any path prefix from `--url`), no trailing slash.
    base: String,
    /// `Authorization` value: the config's `admin_token`, else its
    /// `stats_token` (which opens `/stats` only), else none.
    auth: Option<HeaderValue>,
    /// Pooled HTTP/1.1 connections (the burst demo shares them).
    http: HyperClient<HttpConnector, Full<Bytes>>,
}

/// One answer from the daemon, read whole.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The request's method, for error messages.
    pub method: Method,
    /// The URL requested, for error messages.
    pub url: String,
    /// HTTP status.
    pub status: StatusCode,
    /// `Retry-After` in seconds when the daemon sent one (429, 503).
    pub retry_after: Option<Duration>,
    /// The body.
    pub body: Bytes,
}

impl Answer {
    /// The body as JSON.
    pub fn json(&self) -> Result<Value, ClientError> {
        serde_json::from_slice(&self.body).map_err(|e| self.bad(format!("not JSON ({e})")))
    }

    /// The daemon's error body as `kind: detail` (or the raw text).
    pub fn error_text(&self) -> String {
        match serde_json::from_slice::<Value>(&self.body) {
            Ok(v) if v.get("error").is_some() => {
                let kind = v["error"].as_str().unwrap_or("error");
                match v["detail"].as_str() {
                    Some(detail) => format!("{kind}: {detail}"),
                    None => kind.to_owned(),
                }
            }
            _ => String::from_utf8_lossy(&self.body).trim().to_owned(),
        }
    }

    /// A [`ClientError::BadAnswer`] for this answer.
    pub fn bad(&self, reason: impl Into<String>) -> ClientError {
        ClientError::BadAnswer {
            method: self.method.clone(),
            url: self.url.clone(),
            reason: reason.into(),
        }
    }
}

impl Client {
    /// A client for the daemon at `url`, else at the config's `bind`.
    pub fn new(config: &Config, url: Option<&str>) -> Result<Client, ClientError> {
        let base = match url {
            Some(url) => base_from_url(url)?,
            None => base_from_bind(&config.bind)?,
        };
        let token = [
            ("admin_token", &config.admin_token),
            ("stats_token", &config.stats_token),
        ]
        .into_iter()
        .find(|(_, token)| !token.is_empty());
        let auth = match token {
            None => None,
            Some((name, token)) => Some(
                HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                    ClientError::BadAddress {
                        address: base.clone(),
                        reason: format!("{name} holds characters that cannot go in a header"),
                    }
                })?,
            ),
        };
        Ok(Client {
            base,
            auth,
            http: HyperClient::builder(TokioExecutor::new()).build_http(),
        })
    }

    /// The daemon's base URL, e.g. `http://127.0.0.1:5015`.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// GETs `path` (which starts with `/`).
    pub async fn get(&self, path: &str) -> Result<Answer, ClientError> {
        self.send(Method::GET, path, None).await
    }

    /// POSTs a JSON body to `path`.
    pub async fn post_json(&self, path: &str, body: Vec<u8>) -> Result<Answer, ClientError> {
        self.send(Method::POST, path, Some(Bytes::from(body))).await
    }

    /// DELETEs `path`.
    pub async fn delete(&self, path: &str) -> Result<Answer, ClientError> {
        self.send(Method::DELETE, path, None).await
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<Answer, ClientError> {
        let url = format!("{}{path}", self.base);
        let mut builder = Request::builder().method(method.clone()).uri(&url);
        if let Some(body) = &body {
            // Explicit, so that an empty body still says so (warp wants a length).
            builder = builder
                .header(CONTENT_TYPE, "application/json")
                .header(CONTENT_LENGTH, body.len());
        }
        if let Some(auth) = &self.auth {
            builder = builder.header(AUTHORIZATION, auth.clone());
        }
        let request = builder
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| ClientError::BadAddress {
                address: url.clone(),
                reason: e.to_string(),
            })?;
        let timeout = || ClientError::Timeout {
            method: method.clone(),
            url: url.clone(),
            timeout: REQUEST_TIMEOUT,
        };
        let exchange = async {
            let response =
                self.http
                    .request(request)
                    .await
                    .map_err(|e| ClientError::Unreachable {
                        url: url.clone(),
                        reason: error_chain(&e),
                    })?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(parse_retry_after);
            let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| ClientError::BadAnswer {
                    method: method.clone(),
                    url: url.clone(),
                    reason: format!("reading the body failed: {e}"),
                })?
                .to_bytes();
            Ok(Answer {
                method: method.clone(),
                url: url.clone(),
                status,
                retry_after,
                body,
            })
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| timeout())?
    }
}

/// The error and its causes on one line (hyper's top error says little).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// `Retry-After` in seconds (the HTTP-date form is ignored).
fn parse_retry_after(value: &HeaderValue) -> Option<Duration> {
    let seconds = value.to_str().ok()?.trim().parse::<u64>().ok()?;
    Some(Duration::from_secs(seconds))
}

/// Checks a `--url`: plain `http://host:port[/prefix]`.
fn base_from_url(url: &str) -> Result<String, ClientError> {
    let bad = |reason: &str| ClientError::BadAddress {
        address: url.to_owned(),
        reason: reason.to_owned(),
    };
    let uri: Uri = url.parse().map_err(|e: hyper::http::uri::InvalidUri| {
        bad(&format!("{e}; expected http://host:port"))
    })?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => {
            return Err(bad(&format!(
                "scheme `{other}` is not supported; inletd speaks plain http://"
            )));
        }
        None => return Err(bad("expected http://host:port")),
    }
    if uri.authority().is_none() {
        return Err(bad("no host; expected http://host:port"));
    }
    if uri.query().is_some() {
        return Err(bad(
            "a query string does not belong in the daemon's address",
        ));
    }
    Ok(url.trim_end_matches('/').to_owned())
}

/// The URL for a listen address: a wildcard address is reached over loopback.
fn base_from_bind(bind: &str) -> Result<String, ClientError> {
    let bad = |reason: &str| ClientError::BadAddress {
        address: bind.to_owned(),
        reason: reason.to_owned(),
    };
    let (host, port) = bind
        .rsplit_once(':')
        .ok_or_else(|| bad("expected host:port"))?;
    let port: u16 = port.parse().map_err(|_| bad("the port is not a number"))?;
    if port == 0 {
        return Err(bad(
            "port 0 means any free port, so the daemon's port is unknown; pass --url http://host:port",
        ));
    }
    let host = match host {
        "" | "0.0.0.0" => "127.0.0.1",
        "[::]" => "[::1]",
        other => other,
    };
    Ok(format!("http://{host}:{port}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_bind_is_reached_over_loopback() {
        assert_eq!(
            base_from_bind("0.0.0.0:5015").ok(),
            Some("http://127.0.0.1:5015".into())
        );
        assert_eq!(
            base_from_bind("[::]:80").ok(),
            Some("http://[::1]:80".into())
        );
        assert_eq!(
            base_from_bind("10.0.0.2:9").ok(),
            Some("http://10.0.0.2:9".into())
        );
        assert!(base_from_bind("127.0.0.1:0").is_err());
        assert!(base_from_bind("nonsense").is_err());
    }

    #[test]
    fn urls_must_be_plain_http() {
        assert_eq!(
            base_from_url("http://localhost:5015/").ok(),
            Some("http://localhost:5015".into())
        );
        assert!(base_from_url("https://localhost:5015").is_err());
        assert!(base_from_url("localhost:5015").is_err());
        assert!(base_from_url("http://h:1/?x=1").is_err());
    }

    #[test]
    fn the_admin_token_goes_in_a_bearer_header() {
        let config = Config {
            admin_token: "s3cret".into(),
            ..Config::default()
        };
        let client = Client::new(&config, None).expect("client");
        assert_eq!(
            client.auth.as_ref().and_then(|v| v.to_str().ok()),
            Some("Bearer s3cret")
        );
        assert!(Client::new(&Config::default(), None).is_ok_and(|c| c.auth.is_none()));
        // Only a stats token: `inletd stats` still gets in.
        let config = Config {
            stats_token: "figures".into(),
            ..Config::default()
        };
        let client = Client::new(&config, None).expect("client");
        assert_eq!(
            client.auth.as_ref().and_then(|v| v.to_str().ok()),
            Some("Bearer figures")
        );
    }

    #[test]
    fn error_bodies_read_as_kind_and_detail() {
        let answer = Answer {
            method: Method::POST,
            url: "http://h:1/x".into(),
            status: StatusCode::NOT_FOUND,
            retry_after: None,
            body: Bytes::from_static(br#"{"error":"unknown_source","detail":"no source"}"#),
        };
        assert_eq!(answer.error_text(), "unknown_source: no source");
        assert_eq!(
            parse_retry_after(&HeaderValue::from_static(" 3 ")),
            Some(Duration::from_secs(3))
        );
    }
}
