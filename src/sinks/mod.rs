//! Forwarding sinks (HTTP, file, Redis stream): where processed batches go. Delivery is at-least-once;
//! every event carries its `event_id`, so receivers can drop repeats.

pub mod file;
pub mod http;
pub mod redis_stream;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::config::{Config, SinkConfig, SinkKind};
use crate::event::Queued;

/// Why a delivery failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SinkError {
    /// Worth trying again (timeouts, connection errors, 429, 5xx).
    #[error("{message}")]
    Retryable {
        message: String,
        /// The sink asked to wait this long (Retry-After).
        retry_after: Option<Duration>,
    },
    /// Trying again will not help (e.g. 400 from the receiver).
    #[error("{0}")]
    Permanent(String),
}

/// A boxed delivery future (the trait is used as `dyn Sink`).
pub type Delivery<'a> = Pin<Box<dyn Future<Output = Result<(), SinkError>> + Send + 'a>>;

/// A destination for processed events.
pub trait Sink: Send + Sync + 'static {
    /// Name in logs, metrics and DLQ entries.
    fn name(&self) -> &str;
    /// Delivers the whole batch, or fails as a whole.
    fn deliver<'a>(&'a self, events: &'a [Queued]) -> Delivery<'a>;
}

/// Builds the sinks the config names.
pub fn build(config: &Config) -> Vec<Arc<dyn Sink>> {
    config.sinks.iter().map(|s| build_one(s, config)).collect()
}

fn build_one(s: &SinkConfig, config: &Config) -> Arc<dyn Sink> {
    match s.kind {
        SinkKind::Http => Arc::new(http::HttpSink::new(
            &s.name,
            s.url.as_deref().unwrap_or_default(),
            Duration::from_millis(s.timeout_ms),
        )),
        SinkKind::File => Arc::new(file::FileSink::new(
            &s.name,
            s.path.clone().unwrap_or_default(),
        )),
        SinkKind::RedisStream => Arc::new(redis_stream::RedisStreamSink::new(
            &s.name,
            s.url.as_deref().unwrap_or(&config.redis.url),
            s.stream.as_deref().unwrap_or_default(),
            s.maxlen,
            Duration::from_millis(s.timeout_ms),
        )),
    }
}

/// The JSON body of a batch as sinks send it: `{"events":[…]}`.
pub fn batch_json(events: &[Queued]) -> Value {
    json!({ "events": events.iter().map(|q| q.record.body_json()).collect::<Vec<_>>() })
}

/// A stable key for a batch: the same events give the same key, so a
/// receiver that dedupes on `Idempotency-Key` drops a re-delivered batch.
pub fn batch_key(events: &[Queued]) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for q in events {
        h.update(q.record.source.as_bytes());
        h.update([0]);
        h.update(q.record.key.as_bytes());
        h.update([0]);
    }
    let digest = h.finalize();
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("inletd-{hex}")
}
