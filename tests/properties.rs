//! Property tests for everything that reads outside data: request bodies,
//! signature headers, on-disk records and `/stats` dates. They are the
//! quick, CI-sized versions of the cargo-fuzz targets in `fuzz/` (run
//! those with `scripts/fuzz.sh`).
//!
//! Every test is a statement of the property it checks; case counts keep
//! the whole file to a few seconds in a debug build.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use inletd::analytics::{format_day, parse_day};
use inletd::event::{
    self, BodyError, Event, FieldError, MAX_EVENT_ID_CHARS, MAX_EVENT_TYPE_CHARS, WalRecord,
};
use inletd::signature::{Scheme, SignatureError, SignedHeaders, TOLERANCE, Verifier, sign};
use inletd::storage::{
    DlqEntry, FORMAT_VERSION, RecordError, decode_key_list, decode_record, decode_segment,
    encode_key_list, encode_record, encode_segment,
};
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{Map, Number, Value};
use time::{OffsetDateTime, UtcOffset};

const RECEIVED_AT_MS: i64 = 1_765_879_200_000;

/// The fields of the event contract; a rejection names one of them
/// (`""` for an event that is not an object at all).
const FIELDS: &[&str] = &event::FIELDS;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::with_cases(cases)
    }
}

// ---------------------------------------------------------------- parser

/// Any JSON value, with object keys biased toward the contract's fields.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| Number::from_f64(f).map(Value::Number)),
        any::<String>().prop_map(Value::String),
        "[0-9T:.Z+-]{0,30}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Value::Array),
            btree_map(json_key(), inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn json_key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => select(FIELDS).prop_map(str::to_owned),
        1 => Just("events".to_owned()),
        1 => any::<String>(),
    ]
}

/// Checks the shape of a rejection of `value` (`None`: not JSON at all).
fn check_rejection(err: &FieldError, value: Option<&Value>) -> Result<(), TestCaseError> {
    prop_assert!(!err.detail.is_empty(), "{:?}", err);
    if matches!(value, Some(Value::Object(_))) {
        prop_assert!(
            FIELDS.contains(&err.field.as_str()) || err.field == "Idempotency-Key",
            "an object's rejection names no contract field: {:?}",
            err
        );
    } else {
        prop_assert_eq!(&err.field, "", "a non-object is rejected as a whole");
    }
    Ok(())
}

/// Runs both endpoints' parsers over `body` and checks every outcome.
fn check_body(body: &[u8]) -> Result<(), TestCaseError> {
    let json: Option<Value> = serde_json::from_slice(body).ok();
    for header in [None, Some("hdr-1"), Some("")] {
        match event::parse_single(body, header, RECEIVED_AT_MS) {
            Err(BodyError::Malformed { line, column, .. }) => {
                prop_assert!(json.is_none(), "valid JSON reported malformed");
                prop_assert!(line >= 1 && column <= body.len() + 1);
            }
            Err(other) => prop_assert!(false, "single-event body gave {:?}", other),
            Ok(Ok(event)) => {
                prop_assert!(matches!(json, Some(Value::Object(_))));
                prop_assert!((1..=MAX_EVENT_ID_CHARS).contains(&event.key.chars().count()));
                prop_assert!(
                    (1..=MAX_EVENT_TYPE_CHARS).contains(&event.event_type.chars().count())
                );
            }
            Ok(Err(err)) => check_rejection(&err, json.as_ref())?,
        }
    }
    match event::parse_batch(body, 100, RECEIVED_AT_MS) {
        Err(BodyError::Malformed { .. }) => prop_assert!(json.is_none()),
        Err(BodyError::Shape(err)) => prop_assert!(err.field.is_empty() || err.field == "events"),
        Err(BodyError::TooManyEvents { got, max }) => prop_assert!(got > max),
        Ok(results) => {
            let events = json
                .as_ref()
                .and_then(|j| j.get("events"))
                .and_then(Value::as_array);
            prop_assert_eq!(events.map(Vec::len), Some(results.len()));
            for (result, value) in results.iter().zip(events.into_iter().flatten()) {
                if let Err(err) = result {
                    check_rejection(err, Some(value))?;
                }
            }
        }
    }
    Ok(())
}

/// An event in the contract's shape, for byte-level mutation.
const SAMPLE_EVENT: &str = r#"{"event_id":"evt_123456","event_type":"user_signup","user_id":"user_abc123","timestamp":"2025-12-16T10:00:00Z","metadata":{"source":"organic"}}"#;
const SAMPLE_BATCH: &str = r#"{"events":[{"event_id":"evt_001","event_type":"page_view","occurred_at":"2024-01-15T10:30:00Z","properties":{"page":"/home","duration":5.2}},{"event_type":"no_id"}]}"#;

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn parser_never_panics_on_arbitrary_bytes(body in vec(any::<u8>(), 0..512)) {
        check_body(&body)?;
    }

    #[test]
    fn parser_never_panics_on_mutated_events(
        batch in any::<bool>(),
        edits in vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let mut body = if batch { SAMPLE_BATCH } else { SAMPLE_EVENT }.as_bytes().to_vec();
        for (at, byte) in edits {
            let i = at.index(body.len());
            body[i] = byte;
        }
        check_body(&body)?;
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn parser_never_panics_on_arbitrary_json_and_every_rejection_names_a_field(
        value in json_value(),
    ) {
        check_body(value.to_string().as_bytes())?;
        let batch = serde_json::json!({ "events": [value.clone(), value.clone()] });
        check_body(batch.to_string().as_bytes())?;
        match event::validate(value.clone(), None, RECEIVED_AT_MS) {
            Ok(_) => prop_assert!(value.is_object()),
            Err(err) => check_rejection(&err, Some(&value))?,
        }
    }
}

// ---------------------------------------------------------- the contract

/// One optional string field of a generated event.
#[derive(Debug, Clone)]
enum Text {
    Absent,
    Null,
    Str(String),
    /// Present but not a string.
    Other(Value),
}

impl Text {
    fn json(&self) -> Option<Value> {
        match self {
            Text::Absent => None,
            Text::Null => Some(Value::Null),
            Text::Str(s) => Some(Value::String(s.clone())),
            Text::Other(v) => Some(v.clone()),
        }
    }
    fn str(&self) -> Option<&str> {
        match self {
            Text::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// Not a string, not null.
fn non_string() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<bool>().prop_map(Value::Bool),
        any::<i32>().prop_map(Value::from),
        Just(serde_json::json!([])),
        Just(serde_json::json!({"a": 1})),
    ]
}

/// A string of `n` characters, `n` clustered around the limits 0 and `max`.
fn sized_string(max: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        Just(0usize),
        Just(1),
        Just(max),
        Just(max + 1),
        1..=max,
        max + 1..max + 20,
    ]
    .prop_flat_map(|n| {
        vec(
            prop_oneof![4 => proptest::char::range('a', 'z'), 1 => any::<char>()],
            n,
        )
        .prop_map(|cs| cs.into_iter().collect())
    })
}

fn text(string: impl Strategy<Value = String>) -> impl Strategy<Value = Text> {
    prop_oneof![
        1 => Just(Text::Absent),
        1 => Just(Text::Null),
        6 => string.prop_map(Text::Str),
        1 => non_string().prop_map(Text::Other),
    ]
}

/// A time field: absent, null, an RFC 3339 text with the instant it
/// denotes (ms since the epoch), an unparseable text, or not a string.
#[derive(Debug, Clone)]
enum Time {
    Absent,
    Null,
    Valid(String, i64),
    Invalid(String),
    Other(Value),
}

/// RFC 3339 text for `utc_nanos` at `offset_min`, with `digits` of fraction.
fn rfc3339(utc_nanos: i128, offset_min: i32, digits: usize) -> String {
    let offset = UtcOffset::from_whole_seconds(offset_min * 60).expect("offset in range");
    let t = OffsetDateTime::from_unix_timestamp_nanos(utc_nanos)
        .expect("instant in range")
        .to_offset(offset);
    let mut s = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
    if digits > 0 {
        let frac = format!("{:09}", t.nanosecond());
        s.push('.');
        s.push_str(&frac[..digits]);
    }
    if offset_min == 0 {
        s.push('Z');
    } else {
        let sign = if offset_min < 0 { '-' } else { '+' };
        let m = offset_min.unsigned_abs();
        s.push_str(&format!("{sign}{:02}:{:02}", m / 60, m % 60));
    }
    s
}

fn valid_time() -> impl Strategy<Value = (String, i64)> {
    // 0001-01-02 .. 9998-12-31 at millisecond precision, or after 1970 at
    // any precision (before 1970 a sub-millisecond fraction is truncated
    // toward zero, not floored: see the fuzzing report).
    const MIN_MS: i64 = -62_135_510_400_000;
    const MAX_MS: i64 = 253_370_678_400_000;
    prop_oneof![
        (MIN_MS..MAX_MS, -1439..=1439i32, 0..=3usize).prop_map(|(ms, off, digits)| {
            let ms = ms - ms.rem_euclid(10i64.pow(3 - digits as u32));
            (rfc3339(i128::from(ms) * 1_000_000, off, digits), ms)
        }),
        (0..MAX_MS, 0..1_000_000i64, -1439..=1439i32, 4..=9usize).prop_map(
            |(ms, sub, off, digits)| {
                let ns = i128::from(ms) * 1_000_000 + i128::from(sub);
                let ns = ns - ns % 10i128.pow(9 - digits as u32);
                (rfc3339(ns, off, digits), ms)
            }
        ),
    ]
}

fn time_field() -> impl Strategy<Value = Time> {
    prop_oneof![
        1 => Just(Time::Absent),
        1 => Just(Time::Null),
        4 => valid_time().prop_map(|(s, ms)| Time::Valid(s, ms)),
        1 => prop_oneof![
            Just(String::new()),
            Just("yesterday".to_owned()),
            Just("2025-12-16".to_owned()),
            Just("2025-12-16T10:00:00".to_owned()),
            Just("2025-02-30T10:00:00Z".to_owned()),
            Just("2025-12-16T25:00:00Z".to_owned()),
            "[0-9T:.Z+-]{0,25}".prop_filter("not RFC 3339", |s| {
                OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).is_err()
            }),
        ]
        .prop_map(Time::Invalid),
        1 => non_string().prop_map(Time::Other),
    ]
}

impl Time {
    fn json(&self) -> Option<Value> {
        match self {
            Time::Absent => None,
            Time::Null => Some(Value::Null),
            Time::Valid(s, _) | Time::Invalid(s) => Some(Value::String(s.clone())),
            Time::Other(v) => Some(v.clone()),
        }
    }
}

/// `metadata` / `properties`: absent, null, an object, or something else.
fn object_field() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        Just(None),
        Just(Some(Value::Null)),
        Just(Some(serde_json::json!({"page": "/home", "n": 1}))),
        Just(Some(serde_json::json!({}))),
        non_string()
            .prop_filter("not an object", |v| !v.is_object())
            .prop_map(Some),
        any::<String>().prop_map(|s| Some(Value::String(s))),
    ]
}

#[derive(Debug, Clone)]
struct Generated {
    header: Option<String>,
    event_id: Text,
    event_type: Text,
    user_id: Text,
    session_id: Text,
    timestamp: Time,
    occurred_at: Time,
    metadata: Option<Value>,
    properties: Option<Value>,
    extra: Vec<(String, Value)>,
}

fn generated() -> impl Strategy<Value = Generated> {
    (
        prop::option::weighted(0.3, sized_string(MAX_EVENT_ID_CHARS)),
        text(sized_string(MAX_EVENT_ID_CHARS)),
        text(sized_string(MAX_EVENT_TYPE_CHARS)),
        text(any::<String>()),
        text(any::<String>()),
        time_field(),
        time_field(),
        object_field(),
        object_field(),
        vec(("x_[a-z]{1,8}", json_value()), 0..3),
    )
        .prop_map(
            |(
                header,
                event_id,
                event_type,
                user_id,
                session_id,
                timestamp,
                occurred_at,
                metadata,
                properties,
                extra,
            )| Generated {
                header,
                event_id,
                event_type,
                user_id,
                session_id,
                timestamp,
                occurred_at,
                metadata,
                properties,
                extra,
            },
        )
}

impl Generated {
    fn body(&self) -> Map<String, Value> {
        let mut m = Map::new();
        let mut put = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                m.insert(k.to_owned(), v);
            }
        };
        put("event_id", self.event_id.json());
        put("event_type", self.event_type.json());
        put("user_id", self.user_id.json());
        put("session_id", self.session_id.json());
        put("timestamp", self.timestamp.json());
        put("occurred_at", self.occurred_at.json());
        put("metadata", self.metadata.clone());
        put("properties", self.properties.clone());
        for (k, v) in &self.extra {
            m.insert(k.clone(), v.clone());
        }
        m
    }

    /// The contract (README, "Events"), written independently of
    /// `validate`: `Ok` with the expected event, or every field at fault.
    fn expected(&self) -> Result<Event, Vec<&'static str>> {
        let len_ok = |s: &str, max: usize| (1..=max).contains(&s.chars().count());
        let mut faults = Vec::new();
        match &self.event_id {
            Text::Other(_) => faults.push("event_id"),
            Text::Str(s) if !len_ok(s, MAX_EVENT_ID_CHARS) => faults.push("event_id"),
            _ => {}
        }
        match (&self.header, self.event_id.str()) {
            (Some(h), _) if !len_ok(h, MAX_EVENT_ID_CHARS) => faults.push("Idempotency-Key"),
            (None, None) => faults.push("event_id"),
            _ => {}
        }
        match &self.event_type {
            Text::Str(s) if len_ok(s, MAX_EVENT_TYPE_CHARS) => {}
            _ => faults.push("event_type"),
        }
        for (name, t) in [("user_id", &self.user_id), ("session_id", &self.session_id)] {
            if matches!(t, Text::Other(_)) {
                faults.push(name);
            }
        }
        for (name, t) in [
            ("timestamp", &self.timestamp),
            ("occurred_at", &self.occurred_at),
        ] {
            if matches!(t, Time::Invalid(_) | Time::Other(_)) {
                faults.push(name);
            }
        }
        for (name, v) in [
            ("metadata", &self.metadata),
            ("properties", &self.properties),
        ] {
            if v.as_ref().is_some_and(|v| !v.is_null() && !v.is_object()) {
                faults.push(name);
            }
        }
        if !faults.is_empty() {
            return Err(faults);
        }
        let key = self
            .header
            .clone()
            .or_else(|| self.event_id.str().map(str::to_owned))
            .expect("checked above");
        // `occurred_at` wins over `timestamp`; neither: the receipt time.
        let occurred_at_ms = match (&self.occurred_at, &self.timestamp) {
            (Time::Valid(_, ms), _) | (_, Time::Valid(_, ms)) => *ms,
            _ => RECEIVED_AT_MS,
        };
        let mut body = self.body();
        if self.event_id.str().is_none() {
            body.insert("event_id".to_owned(), Value::String(key.clone()));
        }
        Ok(Event {
            event_id: self.event_id.str().unwrap_or(&key).to_owned(),
            key,
            event_type: self.event_type.str().expect("checked above").to_owned(),
            occurred_at_ms,
            body: Value::Object(body).to_string(),
        })
    }
}

/// `got` is the event `want` describes; bodies are compared as JSON, since
/// an event is kept as the text it came as.
fn check_event(want: &Event, got: &Event) -> Result<(), TestCaseError> {
    let json = |e: &Event| serde_json::from_str::<Value>(&e.body).expect("an event's body is JSON");
    prop_assert_eq!(
        (
            &want.key,
            &want.event_id,
            &want.event_type,
            want.occurred_at_ms
        ),
        (&got.key, &got.event_id, &got.event_type, got.occurred_at_ms)
    );
    prop_assert_eq!(json(want), json(got));
    Ok(())
}

proptest! {
    #![proptest_config(config(768))]

    #[test]
    fn validate_accepts_exactly_what_the_contract_allows(
        g in generated(),
        as_text in any::<bool>(),
    ) {
        // As a parsed value (the reference path), or as the request's
        // text (the fast path first, as the Receiver parses it).
        let got = if as_text {
            let text = Value::Object(g.body()).to_string();
            event::parse_single(text.as_bytes(), g.header.as_deref(), RECEIVED_AT_MS)
                .expect("generated text is JSON")
        } else {
            event::validate(Value::Object(g.body()), g.header.as_deref(), RECEIVED_AT_MS)
        };
        match (g.expected(), got) {
            (Ok(want), Ok(got)) => check_event(&want, &got)?,
            (Err(faults), Err(err)) => prop_assert!(
                faults.contains(&err.field.as_str()),
                "rejected for {:?}, but the faults are {:?}",
                err,
                faults
            ),
            (Ok(_), Err(err)) => prop_assert!(false, "a valid event was rejected: {:?}", err),
            (Err(faults), Ok(ev)) => {
                prop_assert!(false, "accepted despite {:?}: {:?}", faults, ev)
            }
        }
    }
}

// ------------------------------------------------------------ signatures

const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const PLAIN_SECRET: &str = "It's a Secret to Everybody";
const NOW: i64 = 1_765_879_200;

fn verifier(scheme: Scheme) -> Verifier {
    let secret = match scheme {
        Scheme::StandardWebhooks => WHSEC,
        _ => PLAIN_SECRET,
    };
    Verifier::new(scheme, secret)
        .expect("valid secret")
        .expect("a signing scheme")
}

fn any_scheme() -> impl Strategy<Value = Scheme> {
    select(vec![
        Scheme::StandardWebhooks,
        Scheme::Github,
        Scheme::Stripe,
    ])
}

/// A header value: arbitrary text, or something shaped like a signature.
fn header_text() -> impl Strategy<Value = Option<String>> {
    prop::option::weighted(
        0.9,
        prop_oneof![
            any::<String>(),
            "[ -~]{0,80}",
            "(v1|v2|v1a)?,[A-Za-z0-9+/=]{0,50}( v1,[A-Za-z0-9+/=]{0,50})?",
            "(sha256=)?[0-9a-fA-F+-]{0,70}",
            "(t=[0-9+-]{0,12},)?(v1=[0-9a-f]{0,64},?){0,3}",
            "[+-]?[0-9]{1,19}",
        ],
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn signature_verification_never_panics_on_arbitrary_headers(
        scheme in any_scheme(),
        webhook_id in header_text(),
        webhook_timestamp in header_text(),
        webhook_signature in header_text(),
        hub_signature_256 in header_text(),
        stripe_signature in header_text(),
        body in vec(any::<u8>(), 0..64),
        now in any::<i64>(),
    ) {
        let headers = SignedHeaders {
            webhook_id,
            webhook_timestamp,
            webhook_signature,
            hub_signature_256,
            stripe_signature,
        };
        prop_assert!(verifier(scheme).verify(&headers, &body, now).is_err());
    }

    #[test]
    fn signature_verification_never_accepts_a_random_signature(
        scheme in any_scheme(),
        mac in vec(any::<u8>(), 32),
        extra in vec(vec(any::<u8>(), 0..40), 0..3),
        id in "[a-zA-Z0-9_]{1,40}",
        skew in -300..=300i64,
        body in vec(any::<u8>(), 0..128),
    ) {
        let ts = NOW + skew;
        // Well-formed headers, fresh timestamp: only the MAC is wrong.
        let headers = match scheme {
            Scheme::StandardWebhooks => {
                let mut sigs = vec![format!("v1,{}", STANDARD.encode(&mac))];
                sigs.extend(extra.iter().map(|e| format!("v1,{}", STANDARD.encode(e))));
                SignedHeaders {
                    webhook_id: Some(id),
                    webhook_timestamp: Some(ts.to_string()),
                    webhook_signature: Some(sigs.join(" ")),
                    ..SignedHeaders::default()
                }
            }
            Scheme::Github => SignedHeaders {
                hub_signature_256: Some(format!("sha256={}", hex(&mac))),
                ..SignedHeaders::default()
            },
            _ => {
                let mut value = format!("t={ts},v1={}", hex(&mac));
                for e in &extra {
                    value.push_str(&format!(",v1={}", hex(e)));
                }
                SignedHeaders {
                    stripe_signature: Some(value),
                    ..SignedHeaders::default()
                }
            }
        };
        prop_assert_eq!(
            verifier(scheme).verify(&headers, &body, NOW),
            Err(SignatureError::Mismatch)
        );
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn verifier_new_never_panics_and_refuses_only_empty_or_non_base64_secrets(
        secret in prop_oneof![any::<String>(), "(whsec_)?[A-Za-z0-9+/=]{0,24}"],
    ) {
        prop_assert!(Verifier::new(Scheme::None, &secret).unwrap().is_none());
        for scheme in [Scheme::Github, Scheme::Stripe] {
            prop_assert_eq!(Verifier::new(scheme, &secret).is_ok(), !secret.is_empty());
        }
        let b64 = secret.strip_prefix("whsec_").unwrap_or(&secret);
        let decodes = STANDARD.decode(b64).is_ok_and(|key| !key.is_empty());
        prop_assert_eq!(Verifier::new(Scheme::StandardWebhooks, &secret).is_ok(), decodes);
    }
}

fn standard_headers(id: &str, ts: i64, signature: String) -> SignedHeaders {
    SignedHeaders {
        webhook_id: Some(id.to_owned()),
        webhook_timestamp: Some(ts.to_string()),
        webhook_signature: Some(signature),
        ..SignedHeaders::default()
    }
}

/// Any Standard Webhooks secret: `whsec_` (or not) and base64 of 1–64 bytes.
fn standard_secret() -> impl Strategy<Value = String> {
    (any::<bool>(), vec(any::<u8>(), 1..64)).prop_map(|(prefix, key)| {
        format!(
            "{}{}",
            if prefix { "whsec_" } else { "" },
            STANDARD.encode(key)
        )
    })
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn standard_webhooks_accepts_a_correct_signature_for_any_id_timestamp_and_body_within_tolerance(
        secret in standard_secret(),
        id in any::<String>(),
        ts in -10_000_000_000i64..10_000_000_000,
        skew in -(TOLERANCE.as_secs() as i64)..=TOLERANCE.as_secs() as i64,
        body in vec(any::<u8>(), 0..256),
    ) {
        let v = Verifier::new(Scheme::StandardWebhooks, &secret).unwrap().unwrap();
        let signature = sign::standard(&secret, &id, ts, &body).expect("valid secret");
        prop_assert_eq!(v.verify(&standard_headers(&id, ts, signature), &body, ts + skew), Ok(()));
    }

    #[test]
    fn standard_webhooks_rejects_a_timestamp_beyond_tolerance(
        ts in -10_000_000_000i64..10_000_000_000,
        beyond in 1..1_000_000i64,
        later in any::<bool>(),
    ) {
        let v = verifier(Scheme::StandardWebhooks);
        let signature = sign::standard(WHSEC, "msg_1", ts, b"{}").unwrap();
        let off = TOLERANCE.as_secs() as i64 + beyond;
        let now = if later { ts + off } else { ts - off };
        prop_assert_eq!(
            v.verify(&standard_headers("msg_1", ts, signature), b"{}", now),
            Err(SignatureError::Stale)
        );
    }

    #[test]
    fn standard_webhooks_rejects_any_single_byte_change_of_the_body(
        id in "[a-zA-Z0-9_]{1,40}",
        body in vec(any::<u8>(), 1..256),
        at in any::<prop::sample::Index>(),
        flip in 1..=255u8,
    ) {
        let v = verifier(Scheme::StandardWebhooks);
        let signature = sign::standard(WHSEC, &id, NOW, &body).unwrap();
        let mut changed = body.clone();
        changed[at.index(body.len())] ^= flip;
        let headers = standard_headers(&id, NOW, signature);
        prop_assert_eq!(v.verify(&headers, &body, NOW), Ok(()));
        prop_assert_eq!(v.verify(&headers, &changed, NOW), Err(SignatureError::Mismatch));
    }

    #[test]
    fn github_and_stripe_accept_their_own_signature_and_reject_any_single_byte_change(
        body in vec(any::<u8>(), 1..256),
        at in any::<prop::sample::Index>(),
        flip in 1..=255u8,
        skew in -300..=300i64,
    ) {
        let mut changed = body.clone();
        changed[at.index(body.len())] ^= flip;
        let gh = SignedHeaders {
            hub_signature_256: sign::github(PLAIN_SECRET, &body),
            ..SignedHeaders::default()
        };
        let st = SignedHeaders {
            stripe_signature: sign::stripe(PLAIN_SECRET, NOW, &body),
            ..SignedHeaders::default()
        };
        for (scheme, headers) in [(Scheme::Github, gh), (Scheme::Stripe, st)] {
            let v = verifier(scheme);
            prop_assert_eq!(v.verify(&headers, &body, NOW + skew), Ok(()));
            prop_assert_eq!(
                v.verify(&headers, &changed, NOW + skew),
                Err(SignatureError::Mismatch)
            );
        }
    }
}

// --------------------------------------------------------------- records

fn wal_record() -> impl Strategy<Value = WalRecord> {
    (
        any::<String>(),
        any::<String>(),
        any::<String>(),
        any::<i64>(),
        any::<i64>(),
        any::<Option<String>>(),
        any::<String>(),
    )
        .prop_map(
            |(source, key, event_type, received_at_ms, occurred_at_ms, only_sink, body)| {
                WalRecord {
                    source,
                    key,
                    event_type,
                    received_at_ms,
                    occurred_at_ms,
                    only_sink,
                    body,
                }
            },
        )
}

fn dlq_entry() -> impl Strategy<Value = DlqEntry> {
    (
        any::<String>(),
        any::<String>(),
        any::<u32>(),
        any::<i64>(),
        any::<i64>(),
        wal_record(),
    )
        .prop_map(
            |(sink, error, attempts, first_failed_ms, last_failed_ms, record)| DlqEntry {
                sink,
                error,
                attempts,
                first_failed_ms,
                last_failed_ms,
                record,
            },
        )
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn decode_record_never_panics_on_arbitrary_bytes(bytes in prop_oneof![
        vec(any::<u8>(), 0..256),
        // Mostly a version this build reads, so the checksum is reached.
        (0..=FORMAT_VERSION + 1, vec(any::<u8>(), 0..256)).prop_map(|(v, mut rest)| {
            rest.insert(0, v);
            rest
        }),
    ]) {
        let crc_ok = bytes.len() >= 5
            && u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]])
                == crc32fast::hash(&bytes[5..]);
        for result in [
            decode_record::<WalRecord>(&bytes).map(|_| ()),
            decode_record::<DlqEntry>(&bytes).map(|_| ()),
        ] {
            match result {
                Err(RecordError::Truncated(n)) => prop_assert!(n == bytes.len() && n < 5),
                Err(RecordError::NewerVersion(v)) => prop_assert!(v > FORMAT_VERSION),
                Err(RecordError::Checksum) => prop_assert!(!crc_ok),
                Err(RecordError::Body(_)) | Ok(()) => prop_assert!(crc_ok),
            }
        }
    }

    #[test]
    fn decode_record_round_trips_arbitrary_wal_records(record in wal_record()) {
        let bytes = encode_record(&record);
        prop_assert_eq!(bytes[0], FORMAT_VERSION);
        prop_assert_eq!(decode_record::<WalRecord>(&bytes), Ok(record));
    }

    #[test]
    fn decode_record_round_trips_arbitrary_dlq_entries(entry in dlq_entry()) {
        prop_assert_eq!(decode_record::<DlqEntry>(&encode_record(&entry)), Ok(entry));
    }

    #[test]
    fn decode_record_detects_any_single_bit_flip_of_an_encoded_record(
        record in wal_record(),
        at in any::<prop::sample::Index>(),
    ) {
        let bytes = encode_record(&record);
        let bit = at.index(bytes.len() * 8);
        let mut flipped = bytes.clone();
        flipped[bit / 8] ^= 1 << (bit % 8);
        let got = decode_record::<WalRecord>(&flipped);
        if bit < 8 {
            // The version byte is outside the checksum: a flip to a newer
            // version is refused; the one flip to an older version (1 -> 0)
            // still decodes, and must decode to the very same record.
            match got {
                Err(RecordError::NewerVersion(_)) => {}
                Ok(r) => prop_assert_eq!(r, record),
                other => prop_assert!(false, "version flip gave {:?}", other),
            }
        } else {
            prop_assert_eq!(got, Err(RecordError::Checksum));
        }
    }
}

/// `body` in an envelope with the current version and a correct checksum,
/// so that the bincode decoder behind the checks is reached.
fn checksummed(body: &[u8]) -> Vec<u8> {
    let mut bytes = vec![FORMAT_VERSION];
    bytes.extend_from_slice(&crc32fast::hash(body).to_be_bytes());
    bytes.extend_from_slice(body);
    bytes
}

proptest! {
    #![proptest_config(config(1024))]

    /// Found by fuzzing: a length prefix of 2^40 (or 2^32, or usize::MAX)
    /// made bincode allocate that much and abort (or panic with "capacity
    /// overflow") before `decode_record` bounded its allocations.
    #[test]
    fn decode_record_never_panics_on_a_checksummed_arbitrary_body(
        body in prop_oneof![
            vec(any::<u8>(), 0..128),
            // A huge varint length prefix (u16/u32/u64/u128 markers) first.
            (251..=255u8, vec(any::<u8>(), 0..24)).prop_map(|(marker, rest)| {
                let mut b = vec![marker];
                b.extend(rest);
                b
            }),
        ],
    ) {
        let bytes = checksummed(&body);
        if let Ok(r) = decode_record::<WalRecord>(&bytes) {
            prop_assert_eq!(decode_record::<WalRecord>(&encode_record(&r)), Ok(r));
        }
        if let Ok(e) = decode_record::<DlqEntry>(&bytes) {
            prop_assert_eq!(decode_record::<DlqEntry>(&encode_record(&e)), Ok(e));
        }
    }
}

proptest! {
    #![proptest_config(config(512))]

    /// A key list gives back the keys it was given, in byte order, however
    /// much of their bytes they share (duplicates and the empty key too).
    #[test]
    fn key_lists_round_trip_arbitrary_keys(
        keys in vec(
            prop_oneof![
                vec(any::<u8>(), 0..40),
                // Keys that share a prefix, as the ids of one source do.
                (0..4u8, vec(0..3u8, 0..12)).prop_map(|(src, tail)| {
                    let mut k = format!("source-{src}\0evt_").into_bytes();
                    k.extend(tail);
                    k
                }),
            ],
            1..64,
        ),
    ) {
        let refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        let mut sorted = keys.clone();
        sorted.sort_unstable();
        prop_assert_eq!(decode_key_list(&encode_key_list(&refs)).unwrap(), sorted);
    }

    /// A segment round-trips under its last seq, whatever its records.
    #[test]
    fn segments_round_trip_arbitrary_records(
        first in 1..u64::MAX / 2,
        records in vec(wal_record(), 1..8),
    ) {
        let refs: Vec<&WalRecord> = records.iter().collect();
        let (bytes, sizes) = encode_segment(first, &refs);
        let last = first + records.len() as u64 - 1;
        let segment = decode_segment(last, &bytes).unwrap();
        for (i, r) in records.iter().enumerate() {
            prop_assert_eq!(&segment.record(first + i as u64).unwrap(), r);
            prop_assert_eq!(sizes[i], encode_record(r).len() as u64);
        }
    }

    /// Arbitrary bodies behind a correct checksum, read as a segment (under
    /// any key) and as a key list: an error or a value, never a panic, and
    /// every record a segment claims either decodes or is an error.
    #[test]
    fn segment_and_key_list_decoders_never_panic(
        body in prop_oneof![
            vec(any::<u8>(), 0..160),
            // A plausible header: first, n, then anything.
            (any::<u64>(), 0..6u32, vec(any::<u8>(), 0..120)).prop_map(|(first, n, rest)| {
                let mut b = first.to_be_bytes().to_vec();
                b.extend(n.to_be_bytes());
                b.extend(rest);
                b
            }),
        ],
        key in any::<u64>(),
    ) {
        let bytes = checksummed(&body);
        if let Ok(segment) = decode_segment(key, &bytes) {
            prop_assert_eq!(segment.last(), key);
            for seq in segment.first()..=segment.last() {
                let _ = segment.record(seq);
            }
        }
        let _ = decode_key_list(&bytes);
    }
}

#[test]
fn decode_record_refuses_the_length_prefixes_that_once_aborted_the_process() {
    for body in [
        &[0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00][..], // 2^40 - 1: abort
        &[0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff][..], // usize::MAX: panic
        &[0xfc, 0xfc, 0xfc, 0xfc, 0xfc][..],                         // ~4 GiB
    ] {
        assert!(matches!(
            decode_record::<WalRecord>(&checksummed(body)),
            Err(RecordError::Body(_))
        ));
        assert!(matches!(
            decode_record::<DlqEntry>(&checksummed(body)),
            Err(RecordError::Body(_))
        ));
    }
}

// ------------------------------------------------------------------ days

/// 0000-01-01 and 9999-12-31 as days since 1970-01-01.
const YEAR_0_DAY: i32 = -719_528;
const YEAR_9999_LAST_DAY: i32 = 2_932_896;

proptest! {
    #![proptest_config(config(1024))]

    #[test]
    fn parse_day_inverts_format_day_for_every_day_of_years_0000_to_9999(
        day in YEAR_0_DAY..=YEAR_9999_LAST_DAY,
    ) {
        let text = format_day(day);
        prop_assert_eq!(text.len(), 10, "{}", text);
        prop_assert_eq!(parse_day("from", &text).ok(), Some(day), "{}", text);
    }

    #[test]
    fn parse_day_never_panics_on_arbitrary_text(text in prop_oneof![
        any::<String>(),
        "[0-9+-]{4}-[0-9+-]{2}-[0-9+-]{2}",
        "[0-9]{4}-[0-9]{2}-[0-9]{2}.{0,3}",
    ]) {
        if let Ok(day) = parse_day("from", &text) {
            prop_assert!((YEAR_0_DAY..=YEAR_9999_LAST_DAY).contains(&day));
        }
    }
}
