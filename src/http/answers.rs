//! The JSON shapes of the HTTP answers built from the pipeline's own types.
//! The pipeline's messages say what happened; these say how an HTTP client
//! sees it, so that a change inside the pipeline cannot change an answer
//! by accident (the README and `/admin/dlq` document these shapes).

use serde::Serialize;

use crate::event::WalRecord;
use crate::pipeline::messages::{
    DlqItem, LatencySummary, ReplayReport, SinkHealth, SinkState, Verdict,
};

/// One event of a batch answer (`results`).
#[derive(Debug, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub(super) enum VerdictAnswer<'a> {
    /// Stored.
    Accepted { event_id: &'a str },
    /// Seen before within the idempotency window.
    Duplicate { event_id: &'a str },
    /// Another instance is storing the same key right now.
    InProgress { event_id: &'a str },
    /// Broke the schema.
    Rejected { field: &'a str, detail: &'a str },
}

impl<'a> From<&'a Verdict> for VerdictAnswer<'a> {
    fn from(verdict: &'a Verdict) -> Self {
        match verdict {
            Verdict::Accepted { event_id } => VerdictAnswer::Accepted { event_id },
            Verdict::Duplicate { event_id } => VerdictAnswer::Duplicate { event_id },
            Verdict::InProgress { event_id } => VerdictAnswer::InProgress { event_id },
            Verdict::Rejected(f) => VerdictAnswer::Rejected {
                field: &f.field,
                detail: &f.detail,
            },
        }
    }
}

/// One DLQ entry (`GET /admin/dlq`, `GET /admin/dlq/{id}`).
#[derive(Debug, Serialize)]
pub(super) struct DlqEntryAnswer<'a> {
    /// For show, replay and delete.
    id: u64,
    /// The sink that failed.
    sink: &'a str,
    /// The last error that sink gave.
    error: &'a str,
    /// Deliveries tried.
    attempts: u32,
    /// First failure (ms since epoch).
    first_failed_ms: i64,
    /// Last failure (ms since epoch).
    last_failed_ms: i64,
    /// The event as it was queued.
    record: RecordAnswer<'a>,
}

/// A queued event as the admin API shows it.
#[derive(Debug, Serialize)]
struct RecordAnswer<'a> {
    /// The source it came in on.
    source: &'a str,
    /// Its idempotency key within that source.
    key: &'a str,
    /// Its type.
    event_type: &'a str,
    /// Receipt (ms since epoch).
    received_at_ms: i64,
    /// The event's own time (ms since epoch).
    occurred_at_ms: i64,
    /// Set on a replayed entry: the one sink it goes to.
    only_sink: Option<&'a str>,
    /// The event object as JSON text, as received.
    body: &'a str,
}

impl<'a> From<&'a DlqItem> for DlqEntryAnswer<'a> {
    fn from(item: &'a DlqItem) -> Self {
        let entry = &item.entry;
        DlqEntryAnswer {
            id: item.id,
            sink: &entry.sink,
            error: &entry.error,
            attempts: entry.attempts,
            first_failed_ms: entry.first_failed_ms,
            last_failed_ms: entry.last_failed_ms,
            record: RecordAnswer::from(&entry.record),
        }
    }
}

impl<'a> From<&'a WalRecord> for RecordAnswer<'a> {
    fn from(r: &'a WalRecord) -> Self {
        RecordAnswer {
            source: &r.source,
            key: &r.key,
            event_type: &r.event_type,
            received_at_ms: r.received_at_ms,
            occurred_at_ms: r.occurred_at_ms,
            only_sink: r.only_sink.as_deref(),
            body: &r.body,
        }
    }
}

/// What `POST /admin/dlq/replay` did.
#[derive(Debug, Serialize)]
pub(super) struct ReplayAnswer {
    /// Entries moved back into the queue.
    replayed: usize,
    /// Entries still parked.
    remaining: u64,
}

impl From<ReplayReport> for ReplayAnswer {
    fn from(r: ReplayReport) -> Self {
        ReplayAnswer {
            replayed: r.replayed,
            remaining: r.remaining,
        }
    }
}

/// `latency_ms` of `/stats/summary`.
#[derive(Debug, Serialize)]
pub(super) struct LatencyAnswer {
    /// Receipt→processed, median.
    p50: f64,
    /// Receipt→processed, 99th percentile.
    p99: f64,
    /// Receipt→durable answer, median.
    ack_p50: f64,
    /// Receipt→durable answer, 99th percentile.
    ack_p99: f64,
}

impl From<LatencySummary> for LatencyAnswer {
    fn from(l: LatencySummary) -> Self {
        LatencyAnswer {
            p50: l.p50,
            p99: l.p99,
            ack_p50: l.ack_p50,
            ack_p99: l.ack_p99,
        }
    }
}

/// One sink of `/stats/summary`'s `sinks`.
#[derive(Debug, Serialize)]
pub(super) struct SinkAnswer<'a> {
    /// The sink's configured name.
    name: &'a str,
    /// `ok`, `retrying`, `open`, or `half_open` once the cool-down is over
    /// (the next batch probes the sink).
    state: &'static str,
    /// Batches in a row that failed.
    consecutive_failures: u32,
    /// The last error, while not ok.
    last_error: Option<&'a str>,
    /// While open: when a probe goes through (ms since epoch).
    open_until_ms: Option<i64>,
}

impl<'a> SinkAnswer<'a> {
    /// `h` as it stands at `now_ms`: the breaker reports a sink's health
    /// after each batch, so a circuit reported open whose cool-down has
    /// passed since is half-open, waiting for the next batch to probe it.
    pub(super) fn at(h: &'a SinkHealth, now_ms: i64) -> Self {
        SinkAnswer {
            name: &h.name,
            state: match h.state {
                SinkState::Ok => "ok",
                SinkState::Retrying => "retrying",
                SinkState::Open if h.open_until_ms.is_some_and(|t| t <= now_ms) => "half_open",
                SinkState::Open => "open",
            },
            consecutive_failures: h.consecutive_failures,
            last_error: h.last_error.as_deref(),
            open_until_ms: h.open_until_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::FieldError;

    #[test]
    fn verdicts_keep_their_documented_shape() {
        let answers = [
            Verdict::Accepted {
                event_id: "a".into(),
            },
            Verdict::InProgress {
                event_id: "b".into(),
            },
            Verdict::Rejected(FieldError {
                field: "event_type".into(),
                detail: "is required".into(),
            }),
        ];
        let json: Vec<_> = answers
            .iter()
            .map(|v| serde_json::to_string(&VerdictAnswer::from(v)).unwrap())
            .collect();
        assert_eq!(
            json,
            [
                r#"{"status":"accepted","event_id":"a"}"#,
                r#"{"status":"in_progress","event_id":"b"}"#,
                r#"{"status":"rejected","field":"event_type","detail":"is required"}"#,
            ]
        );
    }

    #[test]
    fn an_open_circuit_whose_cool_down_passed_is_half_open() {
        let health = SinkHealth {
            name: "dashboard".into(),
            state: SinkState::Open,
            consecutive_failures: 3,
            last_error: Some("503".into()),
            open_until_ms: Some(1_000),
        };
        let state = |now| {
            serde_json::to_value(SinkAnswer::at(&health, now)).expect("serializes")["state"].clone()
        };
        assert_eq!(state(999), "open");
        assert_eq!(state(1_000), "half_open");
        assert_eq!(state(5_000), "half_open");
    }
}
