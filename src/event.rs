//! Domain types: what an event is, how a request body becomes events, and
//! the record that the write-ahead queue stores for each of them.
//!
//! Parsing never panics on outside data: every failure is a [`BodyError`]
//! (the whole body is unusable) or a [`FieldError`] (one event is rejected,
//! naming its field).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Longest accepted `event_id` / idempotency key, in characters.
pub const MAX_EVENT_ID_CHARS: usize = 256;
/// Longest accepted `event_type`, in characters.
pub const MAX_EVENT_TYPE_CHARS: usize = 128;

/// The body as a whole could not be used; nothing in it was taken.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BodyError {
    /// Not JSON at all; line and column of the first error.
    #[error("malformed JSON at line {line}, column {column}: {message}")]
    Malformed {
        line: usize,
        column: usize,
        message: String,
    },
    /// JSON, but not the shape the endpoint takes.
    #[error("{0}")]
    Shape(FieldError),
    /// A batch longer than `max_batch_events`.
    #[error("batch holds {got} events; at most {max} are taken per request")]
    TooManyEvents { got: usize, max: usize },
}

/// One event broke the schema; `field` names the culprit.
#[derive(Debug, Clone, PartialEq, Serialize, thiserror::Error)]
#[error("{field}: {detail}")]
pub struct FieldError {
    /// The JSON field at fault (`""` for the event object itself).
    pub field: String,
    /// A human sentence saying what is wrong.
    pub detail: String,
}

impl FieldError {
    fn new(field: &str, detail: impl Into<String>) -> Self {
        FieldError {
            field: field.to_owned(),
            detail: detail.into(),
        }
    }
}

/// A validated event, ready to be keyed and stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The idempotency key (header or `event_id`), unique per source.
    pub key: String,
    /// The event's `event_type`; the built-in counter groups by it.
    pub event_type: String,
    /// Event time in ms since the epoch (`timestamp` / `occurred_at`, or receipt).
    pub occurred_at_ms: i64,
    /// The event object as it came, with `event_id` filled in from the key
    /// when the body had none; this is what sinks receive.
    pub body: Map<String, Value>,
}

/// Parses the body of `POST /webhook/events`: one event object.
/// `header_key` is the `Idempotency-Key` or `webhook-id` header, if any.
pub fn parse_single(
    body: &[u8],
    header_key: Option<&str>,
    received_at_ms: i64,
) -> Result<Result<Event, FieldError>, BodyError> {
    let value = parse_json(body)?;
    Ok(validate(value, header_key, received_at_ms))
}

/// Parses the body of a batch endpoint: `{"events": [...]}`. Each element is
/// validated on its own so that good events are taken beside bad ones.
pub fn parse_batch(
    body: &[u8],
    max_events: usize,
    received_at_ms: i64,
) -> Result<Vec<Result<Event, FieldError>>, BodyError> {
    let value = parse_json(body)?;
    let Value::Object(mut envelope) = value else {
        return Err(BodyError::Shape(FieldError::new(
            "",
            "a batch is a JSON object with an \"events\" array",
        )));
    };
    let events = match envelope.remove("events") {
        Some(Value::Array(events)) => events,
        Some(_) => {
            return Err(BodyError::Shape(FieldError::new(
                "events",
                "must be an array of event objects",
            )));
        }
        None => {
            return Err(BodyError::Shape(FieldError::new(
                "events",
                "is required: {\"events\": [...]}",
            )));
        }
    };
    if events.len() > max_events {
        return Err(BodyError::TooManyEvents {
            got: events.len(),
            max: max_events,
        });
    }
    Ok(events
        .into_iter()
        .map(|event| validate(event, None, received_at_ms))
        .collect())
}

fn parse_json(body: &[u8]) -> Result<Value, BodyError> {
    serde_json::from_slice(body).map_err(|e| BodyError::Malformed {
        line: e.line(),
        column: e.column(),
        message: e.to_string(),
    })
}

/// Checks one event object against the contract's schema.
pub fn validate(
    value: Value,
    header_key: Option<&str>,
    received_at_ms: i64,
) -> Result<Event, FieldError> {
    let Value::Object(mut body) = value else {
        return Err(FieldError::new("", "an event must be a JSON object"));
    };
    let event_id = optional_string(&body, "event_id")?;
    if let Some(id) = event_id {
        check_len("event_id", id, MAX_EVENT_ID_CHARS)?;
    }
    let key = match (header_key, event_id) {
        (Some(h), _) => {
            check_len("Idempotency-Key", h, MAX_EVENT_ID_CHARS)?;
            h.to_owned()
        }
        (None, Some(id)) => id.to_owned(),
        (None, None) => {
            return Err(FieldError::new(
                "event_id",
                "is required (or send an Idempotency-Key or webhook-id header)",
            ));
        }
    };
    let event_type = match body.get("event_type") {
        Some(Value::String(t)) => {
            check_len("event_type", t, MAX_EVENT_TYPE_CHARS)?;
            t.clone()
        }
        Some(_) => return Err(FieldError::new("event_type", "must be a string")),
        None => return Err(FieldError::new("event_type", "is required")),
    };
    optional_string(&body, "user_id")?;
    optional_string(&body, "session_id")?;
    let mut occurred_at_ms = received_at_ms;
    for field in ["timestamp", "occurred_at"] {
        if let Some(ts) = optional_string(&body, field)? {
            occurred_at_ms = parse_rfc3339_ms(ts).ok_or_else(|| {
                FieldError::new(field, "must be an RFC 3339 time, e.g. 2025-12-16T10:00:00Z")
            })?;
        }
    }
    for field in ["metadata", "properties"] {
        match body.get(field) {
            None | Some(Value::Null) | Some(Value::Object(_)) => {}
            Some(_) => return Err(FieldError::new(field, "must be a JSON object")),
        }
    }
    if event_id.is_none() {
        body.insert("event_id".to_owned(), Value::String(key.clone()));
    }
    Ok(Event {
        key,
        event_type,
        occurred_at_ms,
        body,
    })
}

fn optional_string<'a>(
    body: &'a Map<String, Value>,
    field: &str,
) -> Result<Option<&'a str>, FieldError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(FieldError::new(field, "must be a string")),
    }
}

fn check_len(field: &str, value: &str, max: usize) -> Result<(), FieldError> {
    let chars = value.chars().count();
    if chars == 0 {
        return Err(FieldError::new(field, "must not be empty"));
    }
    if chars > max {
        return Err(FieldError::new(
            field,
            format!("is {chars} characters long; at most {max} are allowed"),
        ));
    }
    Ok(())
}

/// RFC 3339 text to milliseconds since the epoch; `None` when unparseable.
pub fn parse_rfc3339_ms(text: &str) -> Option<i64> {
    let t = OffsetDateTime::parse(text, &Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

/// Milliseconds since the epoch as RFC 3339 text (UTC).
pub fn format_ms(ms: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| ms.to_string())
}

/// Wall-clock now in milliseconds since the epoch.
pub fn now_ms() -> i64 {
    let nanos = OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
    i64::try_from(nanos).unwrap_or(i64::MAX)
}

/// What the write-ahead queue holds for one accepted event. Encoded with
/// bincode inside a versioned, checksummed envelope (see `storage`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WalRecord {
    /// The source the event came in on (its idempotency scope).
    pub source: String,
    /// The idempotency key within that source.
    pub key: String,
    /// `event_type`, kept beside the body so counting needs no JSON parse.
    pub event_type: String,
    /// When inletd received it (ms since epoch): receipt→processed latency.
    pub received_at_ms: i64,
    /// The event's own time (ms since epoch).
    pub occurred_at_ms: i64,
    /// `Some(sink)` for a DLQ replay: deliver to that sink only, count nothing.
    pub only_sink: Option<String>,
    /// The event object as JSON text (bincode cannot carry `serde_json::Value`).
    pub body: String,
}

impl WalRecord {
    /// The record for an event accepted now on `source`.
    pub fn new(source: &str, event: &Event, received_at_ms: i64) -> Self {
        WalRecord {
            source: source.to_owned(),
            key: event.key.clone(),
            event_type: event.event_type.clone(),
            received_at_ms,
            occurred_at_ms: event.occurred_at_ms,
            only_sink: None,
            // A map of JSON values always serialises.
            body: serde_json::to_string(&event.body).unwrap_or_default(),
        }
    }

    /// The body as JSON for a sink; a body that no longer parses is passed
    /// on as a string rather than dropped.
    pub fn body_json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|_| Value::String(self.body.clone()))
    }
}

/// A record read back from the queue with its sequence number.
#[derive(Debug, Clone, PartialEq)]
pub struct Queued {
    /// Position in the write-ahead queue; strictly increasing.
    pub seq: u64,
    /// What was stored.
    pub record: WalRecord,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_seed_shapes_are_accepted() {
        let a = br#"{"event_id":"e1","event_type":"user_signup","user_id":"u","timestamp":"2025-12-16T10:00:00Z","metadata":{"a":1}}"#;
        let e = parse_single(a, None, 0).unwrap().unwrap();
        assert_eq!(e.key, "e1");
        assert_eq!(e.occurred_at_ms, 1_765_879_200_000);
        let b = br#"{"events":[{"event_id":"e2","event_type":"page_view","occurred_at":"2024-01-15T10:30:00Z","properties":{"page":"/home"}}]}"#;
        let events = parse_batch(b, 10, 0).unwrap();
        assert_eq!(events[0].as_ref().unwrap().event_type, "page_view");
    }

    #[test]
    fn header_key_stands_in_for_event_id() {
        let e = parse_single(br#"{"event_type":"x"}"#, Some("hdr-1"), 5)
            .unwrap()
            .unwrap();
        assert_eq!(e.key, "hdr-1");
        assert_eq!(e.body["event_id"], "hdr-1");
        assert_eq!(e.occurred_at_ms, 5);
    }

    #[test]
    fn schema_violations_name_the_field() {
        let cases: &[(&[u8], &str)] = &[
            (br#"{"event_type":"x"}"#, "event_id"),
            (br#"{"event_id":"","event_type":"x"}"#, "event_id"),
            (br#"{"event_id":"a"}"#, "event_type"),
            (br#"{"event_id":"a","event_type":7}"#, "event_type"),
            (
                br#"{"event_id":"a","event_type":"x","user_id":1}"#,
                "user_id",
            ),
            (
                br#"{"event_id":"a","event_type":"x","timestamp":"yesterday"}"#,
                "timestamp",
            ),
            (
                br#"{"event_id":"a","event_type":"x","properties":[1]}"#,
                "properties",
            ),
            (br#"[1,2]"#, ""),
        ];
        for (body, field) in cases {
            let err = parse_single(body, None, 0).unwrap().unwrap_err();
            assert_eq!(&err.field, field, "{}", String::from_utf8_lossy(body));
        }
        let long = format!(r#"{{"event_id":"{}","event_type":"x"}}"#, "a".repeat(257));
        assert_eq!(
            parse_single(long.as_bytes(), None, 0)
                .unwrap()
                .unwrap_err()
                .field,
            "event_id"
        );
    }

    #[test]
    fn malformed_json_reports_line_and_column() {
        let err = parse_single(b"{\n  \"a\": ,\n}", None, 0).unwrap_err();
        match err {
            BodyError::Malformed { line, column, .. } => assert_eq!((line, column), (2, 8)),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn batch_envelope_is_checked() {
        assert!(matches!(parse_batch(b"{}", 5, 0), Err(BodyError::Shape(_))));
        assert!(matches!(
            parse_batch(br#"{"events":[{},{}]}"#, 1, 0),
            Err(BodyError::TooManyEvents { got: 2, max: 1 })
        ));
    }
}
