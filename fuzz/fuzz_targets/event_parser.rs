//! Arbitrary bytes as the body of `POST /webhook/events` (with and without
//! an idempotency header) and of the batch endpoint.
//!
//! Properties: nothing panics; a body that is not JSON is `Malformed`; a
//! rejected event names one of the contract's fields (`""` exactly when the
//! event is not a JSON object); an accepted event satisfies the contract
//! and survives the trip through a WAL record.
#![no_main]

use inletd::event::{
    self, BodyError, Event, FieldError, MAX_EVENT_ID_CHARS, MAX_EVENT_TYPE_CHARS, WalRecord,
};
use inletd::storage::{decode_record, encode_record};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const RECEIVED_AT_MS: i64 = 1_765_879_200_000;

/// Whether a rejection may name `field`: a member the contract checks,
/// the idempotency header, or `""` (the event as a whole).
fn nameable(field: &str) -> bool {
    field.is_empty() || field == "Idempotency-Key" || event::FIELDS.contains(&field)
}

fuzz_target!(|data: &[u8]| {
    let json: Option<Value> = serde_json::from_slice(data).ok();
    let too_long = "k".repeat(MAX_EVENT_ID_CHARS + 1);
    for header in [None, Some("hdr-1"), Some(""), Some(too_long.as_str())] {
        match event::parse_single(data, header, RECEIVED_AT_MS) {
            Err(BodyError::Malformed { line, .. }) => {
                assert!(json.is_none(), "valid JSON reported as malformed");
                assert!(line >= 1);
            }
            Err(other) => panic!("parse_single returned a batch error: {other:?}"),
            Ok(Ok(event)) => check_accepted(&event, header, json.as_ref()),
            Ok(Err(err)) => check_rejected(&err, json.as_ref()),
        }
    }
    for max in [0, 1, 1000] {
        match event::parse_batch(data, max, RECEIVED_AT_MS) {
            Err(BodyError::Malformed { .. }) => assert!(json.is_none()),
            Err(BodyError::Shape(err)) => {
                assert!(err.field.is_empty() || err.field == "events", "{err:?}");
            }
            Err(BodyError::TooManyEvents { got, max: m }) => assert!(m == max && got > max),
            Ok(results) => {
                assert!(results.len() <= max);
                let events = json
                    .as_ref()
                    .and_then(|j| j.get("events"))
                    .and_then(Value::as_array)
                    .expect("a batch was taken without an events array");
                assert_eq!(events.len(), results.len());
                for (result, value) in results.iter().zip(events) {
                    match result {
                        Ok(event) => check_accepted(event, None, Some(value)),
                        Err(err) => check_rejected(err, Some(value)),
                    }
                }
            }
        }
    }
});

fn check_rejected(err: &FieldError, json: Option<&Value>) {
    assert!(nameable(&err.field), "unknown field {err:?}");
    assert!(!err.detail.is_empty(), "{err:?}");
    let is_object = matches!(json, Some(Value::Object(_)));
    assert_eq!(
        err.field.is_empty(),
        !is_object,
        "an object's rejection must name a field, and only a non-object may name none: {err:?}"
    );
}

fn check_accepted(event: &Event, header: Option<&str>, json: Option<&Value>) {
    let Some(Value::Object(original)) = json else {
        panic!("accepted something that is not a JSON object: {event:?}");
    };
    let key_chars = event.key.chars().count();
    assert!((1..=MAX_EVENT_ID_CHARS).contains(&key_chars), "{event:?}");
    match header {
        Some(h) => assert_eq!(event.key, h),
        None => assert_eq!(
            original.get("event_id").and_then(Value::as_str),
            Some(event.key.as_str())
        ),
    }
    let type_chars = event.event_type.chars().count();
    assert!(
        (1..=MAX_EVENT_TYPE_CHARS).contains(&type_chars),
        "{event:?}"
    );
    assert_eq!(
        original.get("event_type").and_then(Value::as_str),
        Some(event.event_type.as_str())
    );
    // The body is the event's JSON text, with `event_id` filled in.
    let body: Value = serde_json::from_str(&event.body).expect("an accepted body is JSON");
    assert!(body.get("event_id").is_some_and(Value::is_string));
    let filled_in = !original.get("event_id").is_some_and(Value::is_string);
    // Everything else is forwarded as it came.
    for (k, v) in original {
        if !(filled_in && k == "event_id") {
            assert_eq!(body.get(k), Some(v), "field {k} changed");
        }
    }
    let has_time = ["timestamp", "occurred_at"]
        .iter()
        .any(|f| original.get(*f).is_some_and(|v| !v.is_null()));
    if !has_time {
        assert_eq!(event.occurred_at_ms, RECEIVED_AT_MS);
    }
    let record = WalRecord::new("default", event.clone(), RECEIVED_AT_MS);
    let bytes = encode_record(&record);
    assert_eq!(decode_record::<WalRecord>(&bytes), Ok(record.clone()));
    assert!(matches!(record.body_json(), Value::Object(_)));
}
