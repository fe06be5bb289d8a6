//! Domain types: what an event is, how a request body becomes events, and
//! the record that the write-ahead queue stores for each of them.
//!
//! Parsing never panics on outside data: every failure is a [`BodyError`]
//! (the whole body is unusable) or a [`FieldError`] (one event is rejected,
//! naming its field).

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

mod fast;

/// The members of an event object that the contract checks; the rest are
/// kept as they came.
pub const FIELDS: [&str; 8] = [
    "event_id",
    "event_type",
    "user_id",
    "session_id",
    "timestamp",
    "occurred_at",
    "metadata",
    "properties",
];

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
    /// The body's `event_id` (the key when the body had none): what the
    /// answer names the event by.
    pub event_id: String,
    /// The event's `event_type`; the built-in counter groups by it.
    pub event_type: String,
    /// Event time in ms since the epoch (`timestamp` / `occurred_at`, or receipt).
    pub occurred_at_ms: i64,
    /// The event object as JSON text, as it came, with `event_id` filled in
    /// from the key when the body had none; this is what sinks receive.
    pub body: String,
}

/// Parses the body of `POST /webhook/events`: one event object.
/// `header_key` is the `Idempotency-Key` or `webhook-id` header, if any.
pub fn parse_single(
    body: &[u8],
    header_key: Option<&str>,
    received_at_ms: i64,
) -> Result<Result<Event, FieldError>, BodyError> {
    if let Some(text) = fast::usable(body)
        && let Some(event) = fast::single(text, header_key, received_at_ms)
    {
        return Ok(event);
    }
    single_by_value(body, header_key, received_at_ms)
}

/// [`parse_single`] by the reference path.
fn single_by_value(
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
    if let Some(text) = fast::usable(body)
        && let Some(events) = fast::batch(text, max_events, received_at_ms)
    {
        return Ok(events);
    }
    batch_by_value(body, max_events, received_at_ms)
}

/// [`parse_batch`] by the reference path.
fn batch_by_value(
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

/// Checks one event object against the contract's schema: the reference
/// path, on a parsed JSON value (the fast path gives the same answers).
pub fn validate(
    value: Value,
    header_key: Option<&str>,
    received_at_ms: i64,
) -> Result<Event, FieldError> {
    let Value::Object(mut body) = value else {
        return Err(FieldError::new("", "an event must be a JSON object"));
    };
    let checked = Fields::of_map(&body).check(header_key, received_at_ms)?;
    let event_id = match checked.event_id {
        Some(id) => id,
        None => {
            body.insert("event_id".to_owned(), Value::String(checked.key.clone()));
            checked.key.clone()
        }
    };
    Ok(Event {
        key: checked.key,
        event_id,
        event_type: checked.event_type,
        occurred_at_ms: checked.occurred_at_ms,
        // A map of JSON values always serialises.
        body: serde_json::to_string(&body).unwrap_or_default(),
    })
}

/// One field the contract checks, as an event object holds it.
#[derive(Debug, Default, Clone, PartialEq)]
enum Found<'a> {
    /// No such member: optional fields may be left out.
    #[default]
    Absent,
    /// `null`: absent to the optional members, a wrong type to `event_type`.
    Null,
    /// A string, borrowed from the body unless it had escapes.
    Text(Cow<'a, str>),
    /// An object: what `metadata` and `properties` must be.
    Object,
    /// A number, a boolean or an array.
    Other,
}

impl Found<'_> {
    fn of_value(value: Option<&Value>) -> Found<'_> {
        match value {
            None => Found::Absent,
            Some(Value::Null) => Found::Null,
            Some(Value::String(s)) => Found::Text(Cow::Borrowed(s)),
            Some(Value::Object(_)) => Found::Object,
            Some(_) => Found::Other,
        }
    }

    /// The contract's optional string: absent or null is none.
    fn optional_string(&self, field: &str) -> Result<Option<&str>, FieldError> {
        match self {
            Found::Absent | Found::Null => Ok(None),
            Found::Text(s) => Ok(Some(s)),
            Found::Object | Found::Other => Err(FieldError::new(field, "must be a string")),
        }
    }
}

/// The fields of one event object that the contract checks; the rest of
/// the object is passed on untouched.
#[derive(Debug, Default)]
struct Fields<'a> {
    /// The idempotency key unless a header gives one.
    event_id: Found<'a>,
    /// Required: what the built-in counters group by.
    event_type: Found<'a>,
    /// Optional string: DAU, retention and trends count users by it.
    user_id: Found<'a>,
    /// Optional string: the minute windows count sessions by it.
    session_id: Found<'a>,
    /// Optional RFC 3339 time of the event.
    timestamp: Found<'a>,
    /// The same, under the other seeds' name; it wins over `timestamp`.
    occurred_at: Found<'a>,
    /// Optional object; analytics read `page` from it.
    metadata: Found<'a>,
    /// The same, under the other seeds' name.
    properties: Found<'a>,
    /// The object has an `event_id` member at all (null included): filling
    /// one in must then replace it, not add a second.
    has_event_id: bool,
}

/// What [`Fields::check`] found valid.
struct Checked {
    /// The idempotency key: the header's, else the body's `event_id`.
    key: String,
    /// The body's own `event_id`, if it has one.
    event_id: Option<String>,
    /// The event's type.
    event_type: String,
    /// When it happened: its own time, else the receipt time.
    occurred_at_ms: i64,
}

impl<'a> Fields<'a> {
    fn of_map(body: &'a Map<String, Value>) -> Fields<'a> {
        let get = |name| Found::of_value(body.get(name));
        Fields {
            event_id: get("event_id"),
            event_type: get("event_type"),
            user_id: get("user_id"),
            session_id: get("session_id"),
            timestamp: get("timestamp"),
            occurred_at: get("occurred_at"),
            metadata: get("metadata"),
            properties: get("properties"),
            has_event_id: body.contains_key("event_id"),
        }
    }

    /// The member named `name`, if the contract checks it.
    fn slot(&mut self, name: &str) -> Option<&mut Found<'a>> {
        Some(match name {
            "event_id" => {
                self.has_event_id = true;
                &mut self.event_id
            }
            "event_type" => &mut self.event_type,
            "user_id" => &mut self.user_id,
            "session_id" => &mut self.session_id,
            "timestamp" => &mut self.timestamp,
            "occurred_at" => &mut self.occurred_at,
            "metadata" => &mut self.metadata,
            "properties" => &mut self.properties,
            _ => return None,
        })
    }

    /// The contract's schema, checked in a fixed order: the first fault
    /// found is the one reported.
    fn check(&self, header_key: Option<&str>, received_at_ms: i64) -> Result<Checked, FieldError> {
        let event_id = self.event_id.optional_string("event_id")?;
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
        let event_type = match &self.event_type {
            Found::Text(t) => {
                check_len("event_type", t, MAX_EVENT_TYPE_CHARS)?;
                t.as_ref().to_owned()
            }
            Found::Absent => return Err(FieldError::new("event_type", "is required")),
            _ => return Err(FieldError::new("event_type", "must be a string")),
        };
        self.user_id.optional_string("user_id")?;
        self.session_id.optional_string("session_id")?;
        let mut occurred_at_ms = received_at_ms;
        for (field, found) in [
            ("timestamp", &self.timestamp),
            ("occurred_at", &self.occurred_at),
        ] {
            if let Some(ts) = found.optional_string(field)? {
                occurred_at_ms = parse_rfc3339_ms(ts).ok_or_else(|| {
                    FieldError::new(field, "must be an RFC 3339 time, e.g. 2025-12-16T10:00:00Z")
                })?;
            }
        }
        for (field, found) in [
            ("metadata", &self.metadata),
            ("properties", &self.properties),
        ] {
            match found {
                Found::Absent | Found::Null | Found::Object => {}
                _ => return Err(FieldError::new(field, "must be a JSON object")),
            }
        }
        Ok(Checked {
            key,
            event_id: event_id.map(str::to_owned),
            event_type,
            occurred_at_ms,
        })
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
    pub fn new(source: &str, event: Event, received_at_ms: i64) -> Self {
        WalRecord {
            source: source.to_owned(),
            key: event.key,
            event_type: event.event_type,
            received_at_ms,
            occurred_at_ms: event.occurred_at_ms,
            only_sink: None,
            body: event.body,
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
        assert_eq!(e.event_id, "hdr-1");
        assert_eq!(body_of(&e)["event_id"], "hdr-1");
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

    fn body_of(e: &Event) -> Value {
        serde_json::from_str(&e.body).expect("an event's body is JSON")
    }

    /// The fast path's answer and the reference path's agree: the same
    /// fault, or the same event. The body must be `object` (the event's
    /// text in the request) as parsed, with `event_id` filled in: not the
    /// reference's body, which went through `f64` and back and may differ
    /// from what came in the last digit of a number too long for one.
    fn same(
        object: &str,
        fast: &Result<Event, FieldError>,
        reference: &Result<Event, FieldError>,
    ) -> Result<(), String> {
        match (fast, reference) {
            (Ok(f), Ok(r)) => {
                let strip = |e: &Event| {
                    (
                        e.key.clone(),
                        e.event_id.clone(),
                        e.event_type.clone(),
                        e.occurred_at_ms,
                    )
                };
                let mut sent: Value = serde_json::from_str(object).map_err(|e| e.to_string())?;
                if let Some(members) = sent.as_object_mut()
                    && !members.get("event_id").is_some_and(Value::is_string)
                {
                    members.insert("event_id".into(), Value::String(r.key.clone()));
                }
                if strip(f) != strip(r) || body_of(f) != sent {
                    return Err(format!("fast {f:?}\nreference {r:?}"));
                }
                Ok(())
            }
            (Err(f), Err(r)) if f == r => Ok(()),
            _ => Err(format!("fast {fast:?}\nreference {reference:?}")),
        }
    }

    #[test]
    fn every_member_the_contract_checks_is_read_by_both_paths() {
        let mut fields = Fields::default();
        for name in FIELDS {
            assert!(fields.slot(name).is_some(), "the fast path skips {name}");
        }
        assert!(fields.slot("events").is_none());
        let body: Map<String, Value> = FIELDS
            .iter()
            .map(|name| (name.to_string(), Value::Bool(true)))
            .collect();
        let read = Fields::of_map(&body);
        for found in [
            &read.event_id,
            &read.event_type,
            &read.user_id,
            &read.session_id,
            &read.timestamp,
            &read.occurred_at,
            &read.metadata,
            &read.properties,
        ] {
            assert_eq!(found, &Found::Other);
        }
    }

    #[test]
    fn the_contracts_shapes_take_the_fast_path_and_keep_their_text() {
        let text = "{ \"event_type\" : \"signup\",\n  \"event_id\":\"e1\", \"n\": 1.50 }\n";
        let e = fast::single(text, None, 0)
            .expect("answered by the fast path")
            .unwrap();
        assert_eq!(e.body, text.trim(), "the event is stored as it came");
        assert_eq!((e.key.as_str(), e.event_id.as_str()), ("e1", "e1"));

        let e = fast::single(r#"{"event_type":"x","a":[1]}"#, Some("h\"1"), 0)
            .expect("a header key is filled in on the fast path")
            .unwrap();
        assert_eq!(e.body, r#"{"event_id":"h\"1","event_type":"x","a":[1]}"#);
        let e = fast::single("{ }", Some("h"), 0).unwrap();
        assert_eq!(e.unwrap_err().field, "event_type");
        assert_eq!(
            fast::with_event_id("{ }", "k").as_deref(),
            Some(r#"{"event_id":"k"}"#)
        );

        let batch =
            r#"{"events":[ {"event_id":"a","event_type":"x"} ,{"event_type":"y"}],"note":{}}"#;
        let events = fast::batch(batch, 10, 0).expect("answered");
        assert_eq!(
            events[0].as_ref().unwrap().body,
            r#"{"event_id":"a","event_type":"x"}"#
        );
        assert_eq!(events[1].as_ref().unwrap_err().field, "event_id");
    }

    #[test]
    fn what_the_fast_path_cannot_answer_alike_goes_the_reference_way() {
        // Each is handed on (`None`) and answered by the reference path.
        let cases: &[(&str, Option<&str>)] = &[
            // `event_id` null must be replaced by the header key, not joined.
            (r#"{"event_id":null,"event_type":"x"}"#, Some("h")),
            // Not an object: the reference path names the fault.
            ("[1]", None),
            // Bad JSON: the reference path reports line and column.
            (r#"{"event_id":"a","event_type":"x""#, None),
            // Numbers out of range and lone surrogates are errors to
            // `serde_json::Value`, and so to the fast path too.
            (r#"{"event_id":"a","event_type":"x","n":1e400}"#, None),
            (r#"{"event_id":"a","event_type":"x","s":"\ud800"}"#, None),
        ];
        for (text, header) in cases {
            assert!(fast::single(text, *header, 0).is_none(), "{text}");
            let reference = single_by_value(text.as_bytes(), *header, 0);
            assert_eq!(
                parse_single(text.as_bytes(), *header, 0),
                reference,
                "{text}"
            );
        }
        let e = parse_single(br#"{"event_id":null,"event_type":"x"}"#, Some("h"), 0)
            .unwrap()
            .unwrap();
        assert_eq!(
            body_of(&e),
            serde_json::json!({"event_id": "h", "event_type": "x"})
        );

        // Nesting: a single event's is checked by serde_json as it parses;
        // a batch's events are parsed one by one, so the fast path bounds
        // their depth by that of the whole body.
        let nested = |depth: usize| {
            format!(
                r#"{{"event_id":"a","event_type":"x","d":{}1{}}}"#,
                "[".repeat(depth - 1),
                "]".repeat(depth - 1)
            )
        };
        let deepest = nested(127);
        assert!(matches!(fast::single(&deepest, None, 0), Some(Ok(_))));
        assert!(single_by_value(deepest.as_bytes(), None, 0).is_ok());
        let deep = nested(128);
        assert!(fast::single(&deep, None, 0).is_none());
        assert!(matches!(
            parse_single(deep.as_bytes(), None, 0),
            Err(BodyError::Malformed { .. })
        ));
        let deepest_in_a_batch = format!(r#"{{"events":[{}]}}"#, nested(125));
        assert!(fast::batch(&deepest_in_a_batch, 10, 0).is_some());
        assert!(batch_by_value(deepest_in_a_batch.as_bytes(), 10, 0).is_ok());
        let too_deep_in_a_batch = format!(r#"{{"events":[{}]}}"#, nested(126));
        assert!(fast::batch(&too_deep_in_a_batch, 10, 0).is_none());
        assert!(matches!(
            parse_batch(too_deep_in_a_batch.as_bytes(), 10, 0),
            Err(BodyError::Malformed { .. })
        ));

        let twice = br#"{"events":[{"event_id":"a","event_type":"x","n":1e400}],"events":[]}"#;
        assert!(fast::batch(std::str::from_utf8(twice).unwrap(), 10, 0).is_none());
        assert!(matches!(
            parse_batch(twice, 10, 0),
            Err(BodyError::Malformed { .. })
        ));
    }

    mod differential {
        use super::super::*;
        use super::same;
        use proptest::collection::vec;
        use proptest::prelude::*;
        use proptest::sample::select;

        /// The contract's members, and a batch's.
        fn member() -> impl Strategy<Value = &'static str> {
            select(FIELDS.iter().copied().chain(["events"]).collect::<Vec<_>>())
        }

        /// JSON text with what tells parsers apart: escapes, surrogates,
        /// control characters, numbers out of range, repeated members.
        fn text() -> impl Strategy<Value = String> {
            let leaf = prop_oneof![
                select(vec![
                    "null",
                    "true",
                    "0",
                    "-1",
                    "1.5",
                    "1e400",
                    "-0.0",
                    "123456789012345678901234",
                    r#""2025-12-16T10:00:00Z""#,
                    r#""yesterday""#,
                    r#""""#,
                    r#""a\u005fb""#,
                    r#""\ud800""#,
                    r#""\ud83d\ude00""#,
                    "\"\u{1}\"",
                    r#""\n\"\\""#,
                    "\"é\"",
                ])
                .prop_map(str::to_owned),
                "\"[a-z0-9 _-]{0,8}\"",
            ];
            leaf.prop_recursive(3, 24, 5, |inner| {
                prop_oneof![
                    vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(","))),
                    vec((key(), inner), 0..7).prop_map(|m| {
                        let members: Vec<String> =
                            m.iter().map(|(k, v)| format!("{k}:{v}")).collect();
                        format!("{{ {} }}", members.join(" ,"))
                    }),
                ]
            })
        }

        fn key() -> impl Strategy<Value = String> {
            prop_oneof![
                4 => member().prop_map(|f| format!("\"{f}\"")),
                1 => Just(r#""event\u005fid""#.to_owned()),
                1 => "\"[a-z]{1,3}\"",
            ]
        }

        /// An event object whose known fields are mostly well formed, with
        /// odd members before or after them (a repeated one overrides).
        fn event() -> impl Strategy<Value = String> {
            let id = prop_oneof![
                6 => Just(vec![r#""event_id":"e1""#]),
                1 => Just(vec![r#""event_id":null"#]),
                3 => Just(vec![]),
            ];
            let event_type =
                prop_oneof![4 => Just(vec![r#""event_type":"page_view""#]), 1 => Just(vec![])];
            let more = vec(
                select(vec![
                    r#""user_id":"u1""#,
                    r#""session_id":null"#,
                    r#""timestamp":"2025-12-16T10:00:00Z""#,
                    r#""occurred_at":"2024-01-15T10:30:00.5+02:00""#,
                    r#""properties":{"page":"/","n":[1,2.5]}"#,
                    r#""metadata":null"#,
                ]),
                0..3,
            );
            let odd = vec(
                (
                    prop_oneof![3 => "\"[a-z]{1,3}\"".boxed(), 1 => key().boxed()],
                    text(),
                ),
                0..3,
            );
            (id, event_type, more, odd, any::<bool>()).prop_map(
                |(id, event_type, more, odd, odd_first)| {
                    let mut members: Vec<String> = id
                        .into_iter()
                        .chain(event_type)
                        .chain(more)
                        .map(str::to_owned)
                        .collect();
                    let odd = odd.into_iter().map(|(k, v)| format!("{k}:{v}"));
                    if odd_first {
                        members.splice(0..0, odd);
                    } else {
                        members.extend(odd);
                    }
                    format!("{{{}}}", members.join(","))
                },
            )
        }

        fn check_single(text: &str, header: Option<&str>) -> Result<(), TestCaseError> {
            let Some(fast) = fast::usable(text.as_bytes()).and_then(|t| fast::single(t, header, 7))
            else {
                return Ok(());
            };
            match single_by_value(text.as_bytes(), header, 7) {
                Ok(reference) => {
                    if let Err(diff) = same(text, &fast, &reference) {
                        prop_assert!(false, "{text}: {diff}");
                    }
                }
                Err(e) => prop_assert!(
                    false,
                    "{text}: the fast path answered, the reference path said {e:?}"
                ),
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn single_events_are_answered_as_the_reference_answers(
                text in prop_oneof![4 => event(), 1 => text()],
                header in prop_oneof![Just(None), Just(Some("hdr")), Just(Some(""))],
            ) {
                check_single(&text, header)?;
            }

            #[test]
            fn batches_are_answered_as_the_reference_answers(
                events in vec(prop_oneof![3 => event(), 1 => text()], 0..4),
                extra in proptest::option::of((key(), text())),
                max in 0usize..4,
            ) {
                let mut body = format!("{{\"events\":[{}]", events.join(","));
                if let Some((k, v)) = extra {
                    body.push_str(&format!(",{k}:{v}"));
                }
                body.push('}');
                let Some(fast) = fast::usable(body.as_bytes()).and_then(|t| fast::batch(t, max, 7)) else {
                    return Ok(());
                };
                let reference = batch_by_value(body.as_bytes(), max, 7);
                match (&fast, &reference) {
                    (f, Ok(r)) => {
                        prop_assert_eq!(f.len(), r.len());
                        for ((f, r), object) in f.iter().zip(r).zip(&events) {
                            if let Err(diff) = same(object, f, r) {
                                prop_assert!(false, "{body}: {diff}");
                            }
                        }
                    }
                    (_, Err(r)) => prop_assert!(false, "{body}: the fast path answered, the reference path said {r:?}"),
                }
            }
        }
    }
}
