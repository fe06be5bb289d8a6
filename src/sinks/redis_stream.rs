//! The `redis-stream` sink: XADDs each event to a Redis stream, for
//! consumers downstream (`XREAD`, consumer groups). One entry per event,
//! fields `event` (the event's JSON), `event_type`, `source` and `key` (its
//! idempotency key, for consumers that drop repeats: delivery is
//! at-least-once).

use std::time::Duration;

use super::{Delivery, Sink, SinkError};
use crate::event::Queued;
use crate::mirror::{MirrorError, StreamWriter};

/// Adds events to a Redis stream.
pub struct RedisStreamSink {
    /// Sink name.
    name: String,
    /// The stream and its connection; `Err` when the URL was unusable,
    /// reported by every delivery (validation normally catches it).
    writer: Result<StreamWriter, MirrorError>,
}

impl RedisStreamSink {
    /// A sink adding to `stream` on the Redis at `url`.
    pub fn new(
        name: &str,
        url: &str,
        stream: &str,
        maxlen: Option<u64>,
        timeout: Duration,
    ) -> Self {
        RedisStreamSink {
            name: name.to_owned(),
            writer: StreamWriter::new(url, stream, maxlen, timeout),
        }
    }
}

impl Sink for RedisStreamSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn deliver<'a>(&'a self, events: &'a [Queued]) -> Delivery<'a> {
        Box::pin(async move {
            let writer = self
                .writer
                .as_ref()
                .map_err(|e| SinkError::Permanent(e.to_string()))?;
            let entries: Vec<_> = events
                .iter()
                .map(|q| {
                    vec![
                        ("event", q.record.body.clone()),
                        ("event_type", q.record.event_type.clone()),
                        ("source", q.record.source.clone()),
                        ("key", q.record.key.clone()),
                    ]
                })
                .collect();
            writer
                .add(&entries)
                .await
                .map_err(|e| SinkError::Retryable {
                    message: e.to_string(),
                    retry_after: None,
                })
        })
    }
}
