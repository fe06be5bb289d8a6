//! Hostile requests, the table: malformed, oversized and wrongly typed
//! bodies, wrong content types, bad and replayed signatures, skewed
//! timestamps, protocol garbage, header abuse, and slow and endless bodies,
//! each case one request (or raw bytes) against the real binary.
//!
//! The table test runs every case against ONE daemon with small limits and,
//! after each case, checks that `/health` still answers quickly and that a
//! fresh good event is still accepted. At the end the stored events must be
//! exactly the good ones sent: nothing bad was stored. The parallel test
//! sends the refused cases again from four threads at once.

mod common;

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::{Daemon, RawConnection, Response, good_event, health, request_bytes, serve_meanwhile};
use inletd::signature::sign;
use serde_json::{Value, json};

const MAX_BODY: usize = 131_072;
const MAX_BATCH: usize = 10;
const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const GH_SECRET: &str = "gh-secret";
const STRIPE_SECRET: &str = "whsec_stripe";
/// Longest a case may take to be answered.
const CASE_TIMEOUT: Duration = Duration::from_secs(10);

/// Small limits, one signed source per scheme and a rate-limited source.
/// `max_body_bytes` is 128 KiB so that 100,000 `[` fit under it and reach
/// the JSON parser.
fn config(extra: &str) -> String {
    format!(
        "max_body_bytes = {MAX_BODY}\nmax_batch_events = {MAX_BATCH}\n\
         header_read_timeout_secs = 2\nrequest_timeout_secs = 2\n{extra}\n\
         [[sources]]\nname = \"svix\"\nverify = \"standard-webhooks\"\nsecret = \"{WHSEC}\"\n\
         [[sources]]\nname = \"gh\"\nverify = \"github\"\nsecret = \"{GH_SECRET}\"\n\
         [[sources]]\nname = \"stripe\"\nverify = \"stripe\"\nsecret = \"{STRIPE_SECRET}\"\n\
         [[sources]]\nname = \"limited\"\nrate_limit_per_sec = 0.01\n"
    )
}

fn now() -> i64 {
    inletd::event::now_ms() / 1000
}

// ---------------------------------------------------------------------------
// Requests and cases
// ---------------------------------------------------------------------------

/// What a case sends.
enum Req {
    /// A well-formed HTTP/1.1 request with `Content-Length` and
    /// `Connection: close`, plus `headers` as given.
    Http {
        method: String,
        path: String,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// Bytes written as they are; `half_close` shuts the write side after.
    Raw { bytes: Vec<u8>, half_close: bool },
    /// A chunked body that never ends: 1 KiB chunks until the daemon hangs up.
    EndlessChunked { path: &'static str },
}

struct Case {
    name: String,
    request: Req,
    expect_status: u16,
    /// The JSON `error` kind; `None` for answers hyper writes itself (empty
    /// body) and for 2xx.
    expect_error_kind: Option<&'static str>,
    /// The `field` of a 422.
    expect_field: Option<&'static str>,
    /// A closed connection without an answer is also fine (protocol garbage).
    closed_ok: bool,
    /// Events this case stores (2xx cases).
    stores: u64,
    /// For batch answers: `(index, field)` of each rejected event.
    rejected: Vec<(u64, &'static str)>,
}

impl Case {
    fn new(
        name: impl Into<String>,
        request: Req,
        expect_status: u16,
        expect_error_kind: Option<&'static str>,
    ) -> Case {
        Case {
            name: name.into(),
            request,
            expect_status,
            expect_error_kind,
            expect_field: None,
            closed_ok: false,
            stores: 0,
            rejected: Vec::new(),
        }
    }

    fn field(mut self, field: &'static str) -> Case {
        self.expect_field = Some(field);
        self
    }

    fn or_closed(mut self) -> Case {
        self.closed_ok = true;
        self
    }

    fn stores(mut self, n: u64) -> Case {
        self.stores = n;
        self
    }

    fn rejected(mut self, rejected: &[(u64, &'static str)]) -> Case {
        self.rejected = rejected.to_vec();
        self
    }
}

fn http(method: &str, path: &str, headers: &[(&str, &str)], body: impl Into<Vec<u8>>) -> Req {
    Req::Http {
        method: method.to_owned(),
        path: path.to_owned(),
        headers: headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        body: body.into(),
    }
}

/// A POST with `Content-Type: application/json` and `headers`.
fn post_h(path: &str, headers: &[(&str, &str)], body: impl Into<Vec<u8>>) -> Req {
    let mut all = vec![("Content-Type", "application/json")];
    all.extend_from_slice(headers);
    http("POST", path, &all, body)
}

fn post(path: &str, body: impl Into<Vec<u8>>) -> Req {
    post_h(path, &[], body)
}

fn raw(bytes: impl Into<Vec<u8>>) -> Req {
    Req::Raw {
        bytes: bytes.into(),
        half_close: false,
    }
}

/// A request head for raw cases (`Connection: close`, no body length).
fn head(method: &str, path: &str, headers: &[&str]) -> Vec<u8> {
    let mut h = format!("{method} {path} HTTP/1.1\r\nHost: inletd\r\nConnection: close\r\n");
    for line in headers {
        h.push_str(line);
        h.push_str("\r\n");
    }
    h.push_str("\r\n");
    h.into_bytes()
}

/// A chunked POST of `chunks`, properly terminated.
fn chunked(path: &str, chunks: &[&[u8]]) -> Req {
    let mut bytes = head(
        "POST",
        path,
        &[
            "Content-Type: application/json",
            "Transfer-Encoding: chunked",
        ],
    );
    for c in chunks {
        bytes.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        bytes.extend_from_slice(c);
        bytes.extend_from_slice(b"\r\n");
    }
    bytes.extend_from_slice(b"0\r\n\r\n");
    raw(bytes)
}

fn body(v: &Value) -> Vec<u8> {
    v.to_string().into_bytes()
}

/// 400 malformed_json on `path`.
fn malformed(name: &str, path: &str, bytes: impl Into<Vec<u8>>) -> Case {
    Case::new(name, post(path, bytes), 400, Some("malformed_json"))
}

/// 422 schema_violation naming `field`, single event.
fn schema(name: &str, v: Value, field: &'static str) -> Case {
    Case::new(
        name,
        post("/webhook/events", body(&v)),
        422,
        Some("schema_violation"),
    )
    .field(field)
}

/// 202, one event stored.
fn accepted(name: &str, request: Req) -> Case {
    Case::new(name, request, 202, None).stores(1)
}

fn truncate(s: &str, n: usize) -> String {
    match s.char_indices().nth(n) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

fn event(id: &str) -> Value {
    json!({"event_id": id, "event_type": "hostile", "user_id": "u-hostile"})
}

// ---------------------------------------------------------------------------
// The table
// ---------------------------------------------------------------------------

fn malformed_json_cases() -> Vec<Case> {
    let e = "/webhook/events";
    let b = "/webhook/batch";
    let mut nested_meta = br#"{"event_id":"n","event_type":"t","metadata":"#.to_vec();
    for _ in 0..200 {
        nested_meta.extend_from_slice(br#"{"a":"#);
    }
    nested_meta.extend_from_slice(b"1");
    nested_meta.extend_from_slice(&[b'}'; 201]);
    vec![
        malformed("truncated object", e, r#"{"event_id":"a","event_type":"t""#),
        malformed("truncated inside a string", e, r#"{"event_id":"a"#),
        malformed(
            "trailing garbage",
            e,
            r#"{"event_id":"a","event_type":"t"} x"#,
        ),
        malformed(
            "two objects",
            e,
            r#"{"event_id":"a","event_type":"t"}{"event_id":"b","event_type":"t"}"#,
        ),
        malformed(
            "invalid UTF-8 in a string",
            e,
            &b"{\"event_id\":\"a\xff\",\"event_type\":\"t\"}"[..],
        ),
        malformed(
            "overlong UTF-8 encoding",
            e,
            &b"{\"event_id\":\"\xc0\xaf\",\"event_type\":\"t\"}"[..],
        ),
        malformed(
            "NaN",
            e,
            r#"{"event_id":"a","event_type":"t","metadata":{"x":NaN}}"#,
        ),
        malformed(
            "-Infinity",
            e,
            r#"{"event_id":"a","event_type":"t","metadata":{"x":-Infinity}}"#,
        ),
        malformed(
            "number out of range",
            e,
            r#"{"event_id":"a","event_type":"t","metadata":{"x":1e400}}"#,
        ),
        malformed(
            "lone leading surrogate",
            e,
            r#"{"event_id":"\ud800","event_type":"t"}"#,
        ),
        malformed(
            "lone trailing surrogate",
            e,
            r#"{"event_id":"\udc00x","event_type":"t"}"#,
        ),
        malformed(
            "surrogate followed by a non-surrogate",
            e,
            r#"{"event_id":"\ud800\u0041","event_type":"t"}"#,
        ),
        malformed(
            "byte order mark",
            e,
            &b"\xef\xbb\xbf{\"event_id\":\"a\",\"event_type\":\"t\"}"[..],
        ),
        malformed("empty body", e, ""),
        malformed("whitespace only", e, " \r\n\t "),
        malformed("single quotes", e, "{'event_id':'a','event_type':'t'}"),
        malformed("trailing comma", e, r#"{"event_id":"a","event_type":"t",}"#),
        malformed(
            "a comment",
            e,
            "// hi\n{\"event_id\":\"a\",\"event_type\":\"t\"}",
        ),
        malformed(
            "raw control character in a string",
            e,
            "{\"event_id\":\"a\nb\",\"event_type\":\"t\"}",
        ),
        malformed("NUL bytes", e, &[0u8; 16][..]),
        malformed("100,000 nested arrays", e, vec![b'['; 100_000]),
        malformed(
            "100,000 nested objects' openings",
            e,
            b"{\"a\":".repeat(20_000),
        ),
        malformed("200 nested objects in metadata", e, nested_meta),
        malformed("100,000 nested arrays, batch", b, vec![b'['; 100_000]),
        malformed("truncated batch", b, r#"{"events":[{"event_id":"a""#),
        malformed("batch: trailing garbage", "/events", r#"{"events":[]}]"#),
    ]
}

fn schema_cases() -> Vec<Case> {
    let t = "hostile";
    let mut cases = vec![
        Case::new(
            "null body",
            post("/webhook/events", "null"),
            422,
            Some("schema_violation"),
        )
        .field(""),
        schema("a string as the event", json!("event"), ""),
        schema("an array as the event", json!([1, 2]), ""),
        schema("a number as the event", json!(42), ""),
        Case::new(
            "Idempotency-Key of 257 chars",
            post_h(
                "/webhook/events",
                &[("Idempotency-Key", &"k".repeat(257))],
                body(&json!({"event_type": t})),
            ),
            422,
            Some("schema_violation"),
        )
        .field("Idempotency-Key"),
        Case::new(
            "Idempotency-Key empty",
            post_h(
                "/webhook/events",
                &[("Idempotency-Key", "")],
                body(&json!({"event_type": t})),
            ),
            422,
            Some("schema_violation"),
        )
        .field("Idempotency-Key"),
        accepted(
            "event_id of exactly 256 chars",
            post("/webhook/events", body(&event(&"x".repeat(256)))),
        ),
        accepted(
            "event_type of 128 two-byte chars",
            post(
                "/webhook/events",
                body(&json!({"event_id": "len-128-e", "event_type": "é".repeat(128)})),
            ),
        ),
        accepted(
            "unknown fields are kept",
            post(
                "/webhook/events",
                body(
                    &json!({"event_id": "extra-1", "event_type": t, "extra": {"deep": [1, {"x": null}]}, "n": 1e300}),
                ),
            ),
        ),
        accepted(
            "control characters in event_type",
            post(
                "/webhook/events",
                body(&json!({"event_id": "ctl-1", "event_type": "a\u{0}\n<script>\u{202e}"})),
            ),
        ),
        accepted(
            "a 100,000-char user_id",
            post(
                "/webhook/events",
                body(
                    &json!({"event_id": "long-user", "event_type": t, "user_id": "u".repeat(100_000)}),
                ),
            ),
        ),
        accepted(
            "event_id from the Idempotency-Key header",
            post_h(
                "/webhook/events",
                &[("Idempotency-Key", "hdr-key-1")],
                body(&json!({"event_type": t})),
            ),
        ),
    ];
    // Every field with a wrong type, an empty or an overlong value.
    let long = |c: &str, n: usize| json!(c.repeat(n));
    for (field, value) in [
        ("event_id", json!(5)),
        ("event_id", json!(["a"])),
        ("event_id", json!({"a": 1})),
        ("event_id", json!(true)),
        ("event_id", json!(null)),
        ("event_id", json!("")),
        ("event_id", long("i", 257)),
        ("event_type", json!(7)),
        ("event_type", json!(null)),
        ("event_type", json!(["t"])),
        ("event_type", json!({})),
        ("event_type", json!("")),
        ("event_type", long("t", 129)),
        ("event_type", long("é", 129)),
        ("user_id", json!(1)),
        ("user_id", json!({})),
        ("user_id", json!(false)),
        ("session_id", json!(false)),
        ("session_id", json!([])),
        ("session_id", json!(1.5)),
        ("timestamp", json!(1_700_000_000)),
        ("timestamp", json!({})),
        ("occurred_at", json!({})),
        ("occurred_at", json!([2025, 12, 16])),
        ("metadata", json!("x")),
        ("metadata", json!([1])),
        ("metadata", json!(1)),
        ("metadata", json!(true)),
        ("properties", json!("x")),
        ("properties", json!([])),
        ("properties", json!(true)),
    ] {
        let name = format!("{field} = {}", truncate(&value.to_string(), 20));
        let mut ev = json!({"event_id": "wrong-type", "event_type": t});
        ev[field] = value;
        cases.push(schema(&name, ev, field));
    }
    cases.push(schema(
        "event_id and event_type missing",
        json!({"user_id": "u"}),
        "event_id",
    ));
    cases.push(schema(
        "event_type missing",
        json!({"event_id": "a"}),
        "event_type",
    ));
    // Bad timestamps.
    for (name, field, ts) in [
        ("timestamp: a word", "timestamp", "yesterday"),
        ("timestamp: a date only", "timestamp", "2025-12-16"),
        ("timestamp: no offset", "timestamp", "2025-12-16T10:00:00"),
        (
            "timestamp: February 30",
            "timestamp",
            "2025-02-30T00:00:00Z",
        ),
        ("timestamp: hour 25", "timestamp", "2025-12-16T25:00:00Z"),
        ("timestamp: empty", "timestamp", ""),
        (
            "timestamp: leading space",
            "timestamp",
            " 2025-12-16T10:00:00Z",
        ),
        (
            "timestamp: offset +24:00",
            "timestamp",
            "2025-12-16T10:00:00+24:00",
        ),
        (
            "timestamp: year 10000",
            "timestamp",
            "10000-01-01T00:00:00Z",
        ),
        (
            "occurred_at: Unix seconds as text",
            "occurred_at",
            "1700000000",
        ),
        (
            "occurred_at: garbage",
            "occurred_at",
            "2025-12-16T10:00:00Zjunk",
        ),
    ] {
        cases.push(schema(
            name,
            json!({"event_id": "ts", "event_type": t, field: ts}),
            field,
        ));
    }
    // Valid but extreme times are stored and must not upset the processor.
    for (i, ts) in [
        "0000-01-01T00:00:00Z",
        "9999-12-31T23:59:59.999999999-23:59",
        "1969-12-31T23:59:59.999Z",
        "2016-12-31T23:59:60Z",
    ]
    .into_iter()
    .enumerate()
    {
        cases.push(accepted(
            &format!("extreme but valid timestamp {ts}"),
            post(
                "/webhook/events",
                body(&json!({"event_id": format!("extreme-{i}"), "event_type": t, "user_id": "u-x", "timestamp": ts})),
            ),
        ));
    }
    cases
}

fn batch_cases() -> Vec<Case> {
    let b = "/webhook/batch";
    let sv = |name: &str, bytes: &str, field: &'static str| {
        Case::new(name, post(b, bytes), 422, Some("schema_violation")).field(field)
    };
    let many = |n: usize, prefix: &str| -> Vec<Value> {
        (0..n).map(|i| event(&format!("{prefix}-{i}"))).collect()
    };
    vec![
        sv("batch: an array, not an object", "[]", ""),
        sv("batch: a string", "\"events\"", ""),
        sv("batch: null", "null", ""),
        sv("batch: no events key", "{}", "events"),
        sv("batch: events an object", r#"{"events":{}}"#, "events"),
        sv("batch: events a string", r#"{"events":"x"}"#, "events"),
        sv("batch: events null", r#"{"events":null}"#, "events"),
        Case::new(
            "batch: 11 events",
            post(b, body(&json!({"events": many(MAX_BATCH + 1, "over")}))),
            413,
            Some("too_many_events"),
        ),
        Case::new(
            "batch: 1,000 empty objects on /events",
            post("/events", body(&json!({"events": vec![json!({}); 1000]}))),
            413,
            Some("too_many_events"),
        ),
        Case::new("batch: empty array", post(b, r#"{"events":[]}"#), 202, None),
        Case::new(
            "batch: good beside bad",
            post(
                b,
                body(&json!({"events": [
                    event("mixed-1"),
                    {"event_type": "no_id"},
                    5,
                    {"event_id": "mixed-3", "event_type": "t", "metadata": []},
                    {"event_id": "mixed-4", "event_type": "t", "timestamp": "soon"},
                ]})),
            ),
            202,
            None,
        )
        .stores(1)
        .rejected(&[(1, "event_id"), (2, ""), (3, "metadata"), (4, "timestamp")]),
        Case::new(
            "batch: exactly max_batch_events on /events",
            post("/events", body(&json!({"events": many(MAX_BATCH, "full")}))),
            202,
            None,
        )
        .stores(MAX_BATCH as u64),
        Case::new(
            "batch: the same id twice",
            post(
                b,
                body(&json!({"events": [event("twice"), event("twice")]})),
            ),
            202,
            None,
        )
        .stores(1),
        Case::new(
            "batch: every event bad",
            post(b, r#"{"events":[[],{"event_id":1,"event_type":"t"}]}"#),
            202,
            None,
        )
        .rejected(&[(0, ""), (1, "event_id")]),
    ]
}

fn content_type_cases() -> Vec<Case> {
    let good = |id: &str| body(&event(id));
    let e = "/webhook/events";
    let refused = |name: &str, headers: &[(&str, &str)], bytes: Vec<u8>| {
        Case::new(
            name,
            http("POST", e, headers, bytes),
            415,
            Some("unsupported_media_type"),
        )
    };
    let mut non_utf8 = head(
        "POST",
        e,
        &["Content-Length: 2", "Content-Type: application/js\u{e9}on"],
    );
    // Make the header value a lone Latin-1 byte, not UTF-8.
    let pos = non_utf8
        .windows(2)
        .position(|w| w == "é".as_bytes())
        .unwrap();
    non_utf8.splice(pos..pos + 2, [0xe9]);
    non_utf8.extend_from_slice(b"{}");
    vec![
        refused("no Content-Type", &[], good("ct-none")),
        refused(
            "text/plain",
            &[("Content-Type", "text/plain")],
            good("ct-text"),
        ),
        refused(
            "a form post",
            &[("Content-Type", "application/x-www-form-urlencoded")],
            b"event_id=a&event_type=t".to_vec(),
        ),
        refused(
            "multipart",
            &[("Content-Type", "multipart/form-data; boundary=XyZ")],
            b"--XyZ\r\nContent-Disposition: form-data; name=\"event\"\r\n\r\n{}\r\n--XyZ--\r\n"
                .to_vec(),
        ),
        refused("text/json", &[("Content-Type", "text/json")], good("ct-tj")),
        refused(
            "application/jsonx",
            &[("Content-Type", "application/jsonx")],
            good("ct-x"),
        ),
        refused("empty Content-Type", &[("Content-Type", "")], good("ct-e")),
        Case::new(
            "batch as text/plain",
            http(
                "POST",
                "/webhook/batch",
                &[("Content-Type", "text/plain")],
                r#"{"events":[]}"#,
            ),
            415,
            Some("unsupported_media_type"),
        ),
        Case::new(
            "a Content-Type that is not UTF-8",
            raw(non_utf8),
            415,
            Some("unsupported_media_type"),
        ),
        accepted(
            "application/json; charset=utf-8",
            http(
                "POST",
                e,
                &[("Content-Type", "application/json; charset=utf-8")],
                good("ct-charset"),
            ),
        ),
        accepted(
            "APPLICATION/JSON",
            http(
                "POST",
                e,
                &[("Content-Type", "APPLICATION/JSON")],
                good("ct-upper"),
            ),
        ),
        accepted(
            "application/cloudevents+json",
            http(
                "POST",
                e,
                &[("Content-Type", "application/cloudevents+json")],
                good("ct-plus"),
            ),
        ),
    ]
}

fn size_cases() -> Vec<Case> {
    let e = "/webhook/events";
    let too_large =
        |name: &str, request: Req| Case::new(name, request, 413, Some("payload_too_large"));
    // A valid event padded with whitespace to exactly `len` bytes.
    let padded = |id: &str, len: usize| {
        let mut b = body(&event(id));
        b.resize(len, b' ');
        b
    };
    let filler = vec![b' '; 8192];
    let chunks: Vec<&[u8]> = std::iter::repeat_n(&filler[..], 25).collect();
    let good = body(&event("chunked-good"));
    let (a, rest) = good.split_at(5);
    let (b, c) = rest.split_at(7);
    let mut huge_chunk = head(
        "POST",
        e,
        &[
            "Content-Type: application/json",
            "Transfer-Encoding: chunked",
        ],
    );
    huge_chunk.extend_from_slice(b"100000\r\n");
    huge_chunk.extend_from_slice(&vec![b' '; 0x10_0000]);
    huge_chunk.extend_from_slice(b"\r\n0\r\n\r\n");
    let mut bad_chunk = head(
        "POST",
        e,
        &[
            "Content-Type: application/json",
            "Transfer-Encoding: chunked",
        ],
    );
    bad_chunk.extend_from_slice(b"zz\r\n{}\r\n0\r\n\r\n");
    let mut overflow_chunk = head(
        "POST",
        e,
        &[
            "Content-Type: application/json",
            "Transfer-Encoding: chunked",
        ],
    );
    overflow_chunk.extend_from_slice(b"ffffffffffffffffffff\r\n{}\r\n0\r\n\r\n");
    let mut understated = head(
        "POST",
        e,
        &["Content-Type: application/json", "Content-Length: 5"],
    );
    understated.extend_from_slice(&body(&event("understated")));
    let mut cl_and_te = head(
        "POST",
        e,
        &[
            "Content-Type: application/json",
            "Content-Length: 5",
            "Transfer-Encoding: chunked",
        ],
    );
    cl_and_te.extend_from_slice(b"12\r\n{\"event_type\":\"t\"}\r\n0\r\n\r\n");
    vec![
        too_large(
            "body one byte over max_body_bytes",
            post(e, padded("big", MAX_BODY + 1)),
        ),
        accepted(
            "body of exactly max_body_bytes",
            post(e, padded("exact-size", MAX_BODY)),
        ),
        too_large(
            "batch over max_body_bytes",
            post("/events", padded("bigb", 4 * MAX_BODY)),
        ),
        too_large(
            "declared over the limit, nothing sent",
            raw(head(
                "POST",
                e,
                &[
                    "Content-Type: application/json",
                    &format!("Content-Length: {}", MAX_BODY + 1),
                ],
            )),
        ),
        too_large(
            "10 MB declared with Expect: 100-continue",
            raw(head(
                "POST",
                e,
                &[
                    "Content-Type: application/json",
                    "Expect: 100-continue",
                    "Content-Length: 10000000",
                ],
            )),
        ),
        too_large("chunked, 200 KiB in 8 KiB chunks", chunked(e, &chunks)),
        too_large("chunked, one 1 MiB chunk", raw(huge_chunk)),
        too_large(
            "endless chunked body",
            Req::EndlessChunked {
                path: "/webhook/events",
            },
        ),
        too_large(
            "endless chunked body, batch",
            Req::EndlessChunked { path: "/events" },
        ),
        accepted("chunked good event", chunked(e, &[a, b, c])),
        accepted(
            "Expect: 100-continue, body sent at once",
            raw([
                head(
                    "POST",
                    e,
                    &[
                        "Content-Type: application/json",
                        "Expect: 100-continue",
                        &format!("Content-Length: {}", body(&event("expect-100")).len()),
                    ],
                ),
                body(&event("expect-100")),
            ]
            .concat()),
        ),
        Case::new(
            "chunked: a bad chunk size",
            raw(bad_chunk),
            400,
            Some("bad_body"),
        ),
        Case::new(
            "chunked: an overflowing chunk size",
            raw(overflow_chunk),
            400,
            Some("bad_body"),
        ),
        // The first 5 bytes are the body; the rest is never a request.
        Case::new(
            "Content-Length shorter than the body",
            raw(understated),
            400,
            Some("malformed_json"),
        ),
        // hyper follows Transfer-Encoding (RFC 9112 §6.3) and closes after.
        Case::new(
            "Content-Length and chunked together",
            raw(cl_and_te),
            422,
            Some("schema_violation"),
        )
        .field("event_id"),
        Case::new(
            "Content-Length not a number",
            raw(head("POST", e, &["Content-Length: abc"])),
            400,
            None,
        )
        .or_closed(),
        Case::new(
            "two different Content-Lengths",
            raw([
                head("POST", e, &["Content-Length: 2", "Content-Length: 3"]),
                b"{}x".to_vec(),
            ]
            .concat()),
            400,
            None,
        )
        .or_closed(),
        // hyper's own answer for a length it cannot represent.
        Case::new(
            "Content-Length of u64::MAX",
            raw(head(
                "POST",
                e,
                &[
                    "Content-Type: application/json",
                    "Content-Length: 18446744073709551615",
                ],
            )),
            431,
            None,
        )
        .or_closed(),
        Case::new(
            "Content-Length of 10^23",
            raw(head(
                "POST",
                e,
                &[
                    "Content-Type: application/json",
                    "Content-Length: 99999999999999999999999",
                ],
            )),
            400,
            None,
        )
        .or_closed(),
        Case::new(
            "Transfer-Encoding: gzip",
            raw([
                head(
                    "POST",
                    e,
                    &["Content-Type: application/json", "Transfer-Encoding: gzip"],
                ),
                b"{}".to_vec(),
            ]
            .concat()),
            400,
            None,
        )
        .or_closed(),
    ]
}

fn route_cases() -> Vec<Case> {
    let m405 = |method: &str, path: &str| {
        Case::new(
            format!("{method} {path}"),
            http(method, path, &[("Content-Type", "application/json")], "{}"),
            405,
            Some("method_not_allowed"),
        )
    };
    let m404 = |method: &str, path: &str, kind: &'static str| {
        Case::new(
            format!("{method} {path}"),
            http(
                method,
                path,
                &[("Content-Type", "application/json")],
                body(&event("route")),
            ),
            404,
            Some(kind),
        )
    };
    vec![
        m405("PUT", "/webhook/events"),
        m405("DELETE", "/webhook/batch"),
        m405("GET", "/webhook/events"),
        m405("PATCH", "/events"),
        m405("GET", "/webhook/svix/events"),
        m405("FOO", "/webhook/events"),
        m405("post", "/webhook/events"),
        m405("POST", "/health"),
        m404("GET", "/nope", "not_found"),
        m404("POST", "/webhook/events/extra", "not_found"),
        m404("POST", "/webhook", "not_found"),
        m404("POST", "/webhook//events", "not_found"),
        m404("POST", "/webhook/nope/events", "unknown_source"),
        m404("POST", "/webhook/nope/batch", "unknown_source"),
        m404("POST", "/webhook/%2e%2e/events", "unknown_source"),
        m404("POST", "/webhook/SVIX/events", "unknown_source"),
        Case::new(
            // The request head (line + headers) is capped at 64 KiB as a whole.
            "a 70,000-byte URI",
            raw(head("GET", &format!("/{}", "a".repeat(70_000)), &[])),
            431,
            None,
        )
        .or_closed(),
        Case::new(
            "rate-limited source",
            post("/webhook/limited/events", body(&event("limited-2"))),
            429,
            Some("rate_limited"),
        ),
        // Bad query parameters of the read side.
        param("/stats/dau?from=0000-01-01&to=9999-12-31", "from"),
        param("/stats/dau?from=0001-01-01&to=9999-12-31", "to"),
        param("/stats/dau?to=0001-01-05", "from"),
        param(
            "/stats/retention?start_date=9999-12-31&windows=3&window_type=weekly",
            "start_date",
        ),
        param("/stats/dau?from=2025-02-30", "from"),
        param("/stats/dau?from=%ff", "from"),
        param("/stats/top-events?limit=0", "limit"),
        param("/stats/top-events?limit=99999999999999999999999", "limit"),
        param("/stats/retention", "start_date"),
        param(
            "/stats/retention?start_date=2025-01-01&window_type=hourly",
            "window_type",
        ),
        param(
            "/stats/retention?start_date=2025-01-01&windows=91",
            "windows",
        ),
        Case::new(
            "POST /admin/dlq/replay?limit=abc",
            http("POST", "/admin/dlq/replay?limit=abc", &[], ""),
            400,
            Some("invalid_query"),
        ),
        Case::new(
            "POST /admin/dlq/replay with ids not a list",
            post("/admin/dlq/replay", r#"{"ids":"all"}"#),
            422,
            Some("schema_violation"),
        )
        .field("ids"),
        Case::new(
            "DELETE /admin/dlq/<past u64>",
            http("DELETE", "/admin/dlq/99999999999999999999", &[], ""),
            404,
            Some("not_found"),
        ),
    ]
}

/// 400 invalid_parameter naming `field` on a GET.
fn param(path_and_query: &str, field: &'static str) -> Case {
    Case::new(
        format!("GET {path_and_query}"),
        http("GET", path_and_query, &[], ""),
        400,
        Some("invalid_parameter"),
    )
    .field(field)
}

fn header_cases() -> Vec<Case> {
    let e = "/webhook/events";
    let many: Vec<(String, String)> = (0..101)
        .map(|i| (format!("X-Filler-{i}"), "v".to_owned()))
        .collect();
    let refs: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let big = "a".repeat(200 * 1024);
    let garbage = |name: &str, bytes: Vec<u8>| Case::new(name, raw(bytes), 400, None).or_closed();
    vec![
        Case::new(
            "101 headers",
            post_h(e, &refs, body(&event("h101"))),
            431,
            None,
        )
        .or_closed(),
        accepted("90 headers", post_h(e, &refs[..90], body(&event("h90")))),
        Case::new(
            "a 200 KiB header",
            post_h(e, &[("X-Big", &big)], body(&event("hbig"))),
            431,
            None,
        )
        .or_closed(),
        garbage(
            "a header line without a colon",
            head("POST", e, &["BadHeader", "Content-Length: 0"]),
        ),
        garbage(
            "obs-fold header continuation",
            head("POST", e, &["X-A: a", "  folded", "Content-Length: 0"]),
        ),
        garbage(
            "a space in a header name",
            head("POST", e, &["Bad Header: a", "Content-Length: 0"]),
        ),
        garbage(
            "NUL in a header value",
            head("POST", e, &["X-A: a\0b", "Content-Length: 0"]),
        ),
        // Protocol garbage: a 400 from hyper or a closed connection.
        garbage("a garbage request line", b"GARBAGE\r\n\r\n".to_vec()),
        garbage("all 256 byte values", (0..=255u8).collect()),
        garbage(
            "HTTP/9.9",
            b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n".to_vec(),
        ),
        garbage("HTTP/0.9 style", b"GET /health\r\n\r\n".to_vec()),
        garbage(
            "a TLS ClientHello",
            [
                &[
                    0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03,
                ][..],
                &[0u8; 160][..],
            ]
            .concat(),
        ),
        garbage(
            "double spaces in the request line",
            b"GET  /health  HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
        ),
        Case::new(
            "only blank lines, then EOF",
            Req::Raw {
                bytes: b"\r\n\r\n\r\n".to_vec(),
                half_close: true,
            },
            400,
            None,
        )
        .or_closed(),
        Case::new(
            "half a head, then EOF",
            Req::Raw {
                bytes: b"POST /webhook/events HTTP/1.1\r\nHost: x\r\nContent-Le".to_vec(),
                half_close: true,
            },
            400,
            None,
        )
        .or_closed(),
    ]
}

/// Signature cases; built right before they run (timestamps are "now").
fn signature_cases() -> Vec<Case> {
    let ts = now();
    let tss = ts.to_string();
    let svix = "/webhook/svix/events";
    let b = body(&json!({"event_type": "invoice.paid", "user_id": "u-svix"}));
    let good = sign::standard(WHSEC, "msg_good", ts, &b).unwrap();
    let other_key =
        sign::standard("whsec_b3RoZXJzZWNyZXRvdGhlcnNlY3JldA==", "msg_good", ts, &b).unwrap();
    let half = good[..good.len() / 2].to_owned();
    let std_headers = |id: &str, t: &str, sig: &str| -> Vec<(String, String)> {
        vec![
            ("Content-Type".into(), "application/json".into()),
            ("webhook-id".into(), id.into()),
            ("webhook-timestamp".into(), t.into()),
            ("webhook-signature".into(), sig.into()),
        ]
    };
    let std_req = |h: Vec<(String, String)>, bytes: &[u8]| Req::Http {
        method: "POST".into(),
        path: svix.into(),
        headers: h,
        body: bytes.to_vec(),
    };
    let unauthorized =
        |name: &str, request: Req| Case::new(name, request, 401, Some("bad_signature"));
    let skewed = |skew: i64, id: &str| {
        let t = ts + skew;
        let sig = sign::standard(WHSEC, id, t, &b).unwrap();
        std_req(std_headers(id, &t.to_string(), &sig), &b)
    };
    let bogus_list = std::iter::repeat_n("v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", 300)
        .collect::<Vec<_>>()
        .join(" ");
    let garbage_body = b"{not json".to_vec();
    let garbage_sig = sign::standard(WHSEC, "msg_garbage", ts, &garbage_body).unwrap();
    let mut no_sig = std_headers("msg_good", &tss, "");
    no_sig.pop();

    let gh = "/webhook/gh/events";
    let gb = body(&event("gh-push-1"));
    let gh_good = sign::github(GH_SECRET, &gb).unwrap();
    let gh_wrong = sign::github("not-the-secret", &gb).unwrap();
    let gh_other_body = sign::github(GH_SECRET, b"{}").unwrap();
    let gh_req = |sig: &str| post_h(gh, &[("X-Hub-Signature-256", sig)], gb.clone());

    let st = "/webhook/stripe/events";
    let sb = body(&event("evt_stripe_1"));
    let st_good = sign::stripe(STRIPE_SECRET, ts, &sb).unwrap();
    let st_req = |sig: &str, bytes: &[u8]| post_h(st, &[("Stripe-Signature", sig)], bytes.to_vec());
    let st_wrong = sign::stripe("whsec_other", ts, &sb).unwrap();
    let st_stale = sign::stripe(STRIPE_SECRET, ts - 600, &sb).unwrap();
    let st_future = sign::stripe(STRIPE_SECRET, ts + 600, &sb).unwrap();
    let st_v1 = st_good.split_once(",v1=").unwrap().1.to_owned();

    let tampered = body(&json!({"event_type": "invoice.paid", "user_id": "u-evil"}));
    vec![
        // Standard Webhooks.
        accepted(
            "svix: good signature",
            std_req(std_headers("msg_good", &tss, &good), &b),
        ),
        Case::new(
            "svix: the same request replayed",
            std_req(std_headers("msg_good", &tss, &good), &b),
            200,
            None,
        ),
        unauthorized(
            "svix: tampered body",
            std_req(std_headers("msg_good", &tss, &good), &tampered),
        ),
        unauthorized(
            "svix: another key",
            std_req(std_headers("msg_good", &tss, &other_key), &b),
        ),
        unauthorized(
            "svix: signature reused under another id",
            std_req(std_headers("msg_other", &tss, &good), &b),
        ),
        unauthorized("svix: no signature headers", post(svix, b.clone())),
        unauthorized("svix: webhook-signature missing", std_req(no_sig, &b)),
        unauthorized(
            "svix: v1, and nothing",
            std_req(std_headers("msg_good", &tss, "v1,"), &b),
        ),
        unauthorized(
            "svix: v1 alone",
            std_req(std_headers("msg_good", &tss, "v1"), &b),
        ),
        unauthorized(
            "svix: truncated signature",
            std_req(std_headers("msg_good", &tss, &half), &b),
        ),
        unauthorized(
            "svix: not base64",
            std_req(std_headers("msg_good", &tss, "v1,!!!!"), &b),
        ),
        unauthorized(
            "svix: 300 bogus signatures",
            std_req(std_headers("msg_good", &tss, &bogus_list), &b),
        ),
        unauthorized("svix: stale by 330 s", skewed(-330, "msg_stale")),
        unauthorized("svix: future by 600 s", skewed(600, "msg_future")),
        unauthorized("svix: an hour old", skewed(-3600, "msg_hour")),
        unauthorized(
            "svix: timestamp not a number",
            std_req(std_headers("msg_good", "soon", &good), &b),
        ),
        unauthorized(
            "svix: timestamp i64::MIN",
            std_req(std_headers("msg_good", "-9223372036854775808", &good), &b),
        ),
        unauthorized(
            "svix: timestamp past i64",
            std_req(std_headers("msg_good", "99999999999999999999", &good), &b),
        ),
        unauthorized(
            "svix: unsigned batch",
            post(
                "/webhook/svix/batch",
                body(&json!({"events": [event("svix-b")]})),
            ),
        ),
        // The signature holds, so the body is parsed next.
        Case::new(
            "svix: signed malformed JSON",
            std_req(
                std_headers("msg_garbage", &tss, &garbage_sig),
                &garbage_body,
            ),
            400,
            Some("malformed_json"),
        ),
        Case::new(
            "svix: signed but text/plain",
            http(
                "POST",
                svix,
                &[
                    ("Content-Type", "text/plain"),
                    ("webhook-id", "msg_good"),
                    ("webhook-timestamp", &tss),
                    ("webhook-signature", &good),
                ],
                b.clone(),
            ),
            415,
            Some("unsupported_media_type"),
        ),
        // GitHub.
        accepted("github: good signature", gh_req(&gh_good)),
        Case::new("github: replayed", gh_req(&gh_good), 200, None),
        unauthorized("github: another key", gh_req(&gh_wrong)),
        unauthorized(
            "github: the signature of another body",
            gh_req(&gh_other_body),
        ),
        unauthorized("github: sha256= and nothing", gh_req("sha256=")),
        unauthorized("github: sha1", gh_req(&gh_good.replace("sha256=", "sha1="))),
        unauthorized(
            "github: odd-length hex",
            gh_req(&gh_good[..gh_good.len() - 1]),
        ),
        unauthorized(
            "github: not hex",
            gh_req(&format!("sha256={}", "zz".repeat(32))),
        ),
        unauthorized("github: header missing", post(gh, gb.clone())),
        // Stripe.
        accepted("stripe: good signature", st_req(&st_good, &sb)),
        Case::new("stripe: replayed", st_req(&st_good, &sb), 200, None),
        unauthorized(
            "stripe: tampered body",
            st_req(&st_good, &body(&event("evt_stripe_2"))),
        ),
        unauthorized("stripe: another key", st_req(&st_wrong, &sb)),
        unauthorized("stripe: stale by 600 s", st_req(&st_stale, &sb)),
        unauthorized("stripe: future by 600 s", st_req(&st_future, &sb)),
        unauthorized("stripe: t=1,v1= (truncated)", st_req("t=1,v1=", &sb)),
        unauthorized("stripe: no t", st_req(&format!("v1={st_v1}"), &sb)),
        unauthorized(
            "stripe: t not a number",
            st_req(&format!("t=now,v1={st_v1}"), &sb),
        ),
        unauthorized("stripe: header missing", post(st, sb.clone())),
    ]
}

/// The whole table, in order.
fn all_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    cases.extend(malformed_json_cases());
    cases.extend(schema_cases());
    cases.extend(batch_cases());
    cases.extend(content_type_cases());
    cases.extend(size_cases());
    cases.extend(route_cases());
    cases.extend(header_cases());
    cases.extend(signature_cases());
    cases
}

// ---------------------------------------------------------------------------
// Sending and checking
// ---------------------------------------------------------------------------

/// Writes `bytes` on a fresh connection and reads until the daemon closes
/// (see [`RawConnection::send_and_read_answer`]).
fn exchange(
    addr: SocketAddr,
    bytes: Vec<u8>,
    half_close: bool,
) -> Result<Option<Response>, String> {
    let mut c = RawConnection::open(addr).map_err(|e| format!("connect: {e}"))?;
    c.set_read_timeout(CASE_TIMEOUT).unwrap();
    c.send_and_read_answer(bytes, half_close)
        .map_err(|e| e.to_string())
}

/// Resident memory of a process in KiB (Linux).
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Sends 1 KiB chunks until the daemon hangs up; it must answer 413, hang
/// up soon after, and not grow while doing so.
fn endless_chunked(addr: SocketAddr, pid: u32, path: &str) -> Result<Option<Response>, String> {
    let rss_before = rss_kib(pid);
    let mut c = RawConnection::open(addr).map_err(|e| format!("connect: {e}"))?;
    c.set_read_timeout(CASE_TIMEOUT).unwrap();
    let head = head(
        "POST",
        path,
        &[
            "Content-Type: application/json",
            "Transfer-Encoding: chunked",
        ],
    );
    let start = Instant::now();
    let writer = c
        .send_in_background(move |mut w| {
            let mut chunk = b"400\r\n".to_vec();
            chunk.extend_from_slice(&[b' '; 1024]);
            chunk.extend_from_slice(b"\r\n");
            let mut sent = 0usize;
            if w.send_bytes(&head).is_err() {
                return (sent, true);
            }
            while start.elapsed() < Duration::from_secs(20) {
                if w.send_bytes(&chunk).is_err() {
                    return (sent, true);
                }
                sent += chunk.len();
            }
            (sent, false)
        })
        .unwrap();
    let answer = c.read_answer();
    let answered = start.elapsed();
    let (sent, hung_up) = writer.join().unwrap();
    c.close();
    if let Err(e) = &answer
        && matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
    {
        return Err(format!(
            "no end of answer within {CASE_TIMEOUT:?} ({sent} bytes sent)"
        ));
    }
    if !hung_up {
        return Err(format!(
            "the daemon kept reading an endless body for 20 s ({sent} bytes)"
        ));
    }
    if answered > Duration::from_secs(5) {
        return Err(format!("answered only after {answered:?}"));
    }
    if let (Some(a), Some(b)) = (rss_before, rss_kib(pid))
        && b > a + 64 * 1024
    {
        return Err(format!("RSS grew from {a} KiB to {b} KiB"));
    }
    answer.map_err(|e| e.to_string())
}

/// Sends a case to the daemon at `addr` (process `pid`).
fn run(addr: SocketAddr, pid: u32, case: &Case) -> Result<Option<Response>, String> {
    match &case.request {
        Req::Http {
            method,
            path,
            headers,
            body,
        } => {
            let headers: Vec<(&str, &str)> = headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            exchange(
                addr,
                request_bytes(addr, method, path, &headers, body),
                false,
            )
        }
        Req::Raw { bytes, half_close } => exchange(addr, bytes.clone(), *half_close),
        Req::EndlessChunked { path } => endless_chunked(addr, pid, path),
    }
}

fn check(case: &Case, got: Option<&Response>) -> Result<(), String> {
    let Some(r) = got else {
        return if case.closed_ok {
            Ok(())
        } else {
            Err("closed without an answer".into())
        };
    };
    let text = || String::from_utf8_lossy(&r.body[..r.body.len().min(300)]).into_owned();
    if r.status != case.expect_status {
        return Err(format!(
            "status {} (want {}): {}",
            r.status,
            case.expect_status,
            text()
        ));
    }
    if r.status >= 400 {
        let Some(kind) = case.expect_error_kind else {
            // hyper's own protocol answers carry no body; ours are JSON.
            if !r.body.is_empty() {
                let b: Value = serde_json::from_slice(&r.body)
                    .map_err(|e| format!("error body not JSON ({e}): {}", text()))?;
                if !b["error"].is_string() {
                    return Err(format!("error body without a kind: {b}"));
                }
            }
            return Ok(());
        };
        if !r
            .header("content-type")
            .is_some_and(|c| c.starts_with("application/json"))
        {
            return Err(format!("error not sent as JSON: {:?}", r.headers));
        }
        let b: Value = serde_json::from_slice(&r.body)
            .map_err(|e| format!("error body not JSON ({e}): {}", text()))?;
        if b["error"] != kind {
            return Err(format!("error kind {} (want {kind}): {b}", b["error"]));
        }
        let detail = b["detail"].as_str().unwrap_or("");
        if detail.trim().is_empty() {
            return Err(format!("no detail sentence: {b}"));
        }
        if let Some(field) = case.expect_field
            && b["field"] != field
        {
            return Err(format!("field {} (want {field:?}): {b}", b["field"]));
        }
        if r.status == 422 && !b["field"].is_string() {
            return Err(format!("a 422 without a field: {b}"));
        }
        let positioned = b["line"].as_u64().is_some_and(|l| l >= 1) && b["column"].is_u64();
        if kind == "malformed_json" && !positioned {
            return Err(format!("malformed_json without line and column: {b}"));
        }
        let retry_after = r
            .header("retry-after")
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        if matches!(r.status, 429 | 503) && retry_after == 0 {
            return Err(format!("{} without Retry-After: {:?}", r.status, r.headers));
        }
        return Ok(());
    }
    let b: Value = serde_json::from_slice(&r.body)
        .map_err(|e| format!("answer not JSON ({e}): {}", text()))?;
    if let Some(n) = b.get("accepted") {
        if n != case.stores {
            return Err(format!("accepted {n} (want {}): {b}", case.stores));
        }
        let rejected: Vec<(u64, String)> = b["rejected"]
            .as_array()
            .ok_or_else(|| format!("no rejected list: {b}"))?
            .iter()
            .map(|x| {
                (
                    x["index"].as_u64().unwrap_or(u64::MAX),
                    x["field"].as_str().unwrap_or("?").to_owned(),
                )
            })
            .collect();
        let want: Vec<(u64, String)> = case
            .rejected
            .iter()
            .map(|(i, f)| (*i, (*f).to_owned()))
            .collect();
        if rejected != want {
            return Err(format!("rejected {rejected:?} (want {want:?}): {b}"));
        }
        for x in b["rejected"].as_array().into_iter().flatten() {
            if x["error"] != "schema_violation" || !x["detail"].is_string() {
                return Err(format!("a rejection without kind or detail: {x}"));
            }
        }
    } else {
        let want = match (r.status, case.stores) {
            (202, 1) => "accepted",
            (200, 0) => "duplicate",
            _ => return Err(format!("unexpected single answer: {b}")),
        };
        if b["status"] != want || !b["event_id"].is_string() {
            return Err(format!("answer {b} (want status {want:?} and an event_id)"));
        }
    }
    Ok(())
}

/// Actor restarts reported by `/metrics` (a panic on input restarts one).
fn actor_restarts(d: &Daemon) -> u64 {
    d.get("/metrics")
        .text()
        .lines()
        .filter(|l| l.starts_with("inletd_actor_restarts_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// Every bad input in the table, one after the other against one daemon;
/// after each, `/health` answers and a good event is taken; at the end
/// exactly the good events are stored and the daemon is alive.
#[test]
fn the_bad_input_table() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path(), &config(""));
    // The rate-limited source takes its one request of the next 100 s.
    let first = d.post_json("/webhook/limited/events", &event("limited-1"));
    assert_eq!(first.status, 202, "{}", first.text());
    let mut expected_stored = 1u64;

    let cases = all_cases();
    assert!(cases.len() >= 60, "only {} cases", cases.len());
    let mut names = std::collections::HashSet::new();
    for c in &cases {
        assert!(names.insert(c.name.clone()), "case {:?} twice", c.name);
    }

    let started = Instant::now();
    let mut failures = Vec::new();
    let mut slowest_health = Duration::ZERO;
    for (i, case) in cases.iter().enumerate() {
        let t = Instant::now();
        let outcome = run(d.addr, d.child.id(), case).and_then(|got| check(case, got.as_ref()));
        if let Err(e) = outcome {
            failures.push(format!("[{i}] {}: {e}", case.name));
        } else {
            expected_stored += case.stores;
        }
        match health(d.addr) {
            Ok(took) => slowest_health = slowest_health.max(took),
            Err(e) => failures.push(format!("[{i}] after {}: {e}", case.name)),
        }
        match good_event(d.addr, &format!("good-{i}")) {
            Ok(()) => expected_stored += 1,
            Err(e) => failures.push(format!("[{i}] after {}: {e}", case.name)),
        }
        if t.elapsed() > Duration::from_secs(5) {
            eprintln!("case {:?} took {:?}", case.name, t.elapsed());
        }
        d.assert_alive();
    }
    eprintln!(
        "{} cases in {:?}; slowest /health {:?}",
        cases.len(),
        started.elapsed(),
        slowest_health
    );
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );

    assert_eq!(
        d.stored(),
        expected_stored,
        "exactly the good events are stored: {}",
        d.get("/stats/summary").text()
    );
    assert_eq!(d.get("/admin/queue").json()["dlq_size"], 0);
    assert_eq!(actor_restarts(&d), 0, "no actor restarted");
    assert!(!d.log_text().contains("panicked"), "{}", d.log_text());
    d.assert_alive();
}

/// The refused cases of the table, three rounds from four threads at once, while another
/// checks `/health` and sends good events: those are all taken, and they
/// are all that is stored.
#[test]
fn bad_inputs_in_parallel_do_not_disturb_good_events() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path(), &config(""));
    let busy = Arc::new(AtomicBool::new(true));
    let meanwhile = serve_meanwhile(d.addr, "parallel-good", busy.clone());
    let attackers: Vec<_> = (0..4)
        .map(|_| {
            let (addr, pid) = (d.addr, d.child.id());
            thread::spawn(move || {
                let cases: Vec<Case> = all_cases()
                    .into_iter()
                    .filter(|c| c.expect_status >= 400)
                    .filter(|c| c.expect_error_kind != Some("rate_limited"))
                    .collect();
                let mut failures = Vec::new();
                for _round in 0..3 {
                    for case in &cases {
                        if let Err(e) =
                            run(addr, pid, case).and_then(|got| check(case, got.as_ref()))
                        {
                            failures.push(format!("{}: {e}", case.name));
                        }
                    }
                }
                (3 * cases.len(), failures)
            })
        })
        .collect();
    let mut failures = Vec::new();
    let mut sent = 0;
    for a in attackers {
        let (n, f) = a.join().unwrap();
        sent += n;
        failures.extend(f);
    }
    busy.store(false, Ordering::SeqCst);
    let good = meanwhile.join().unwrap().unwrap();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    eprintln!("{sent} bad requests in parallel; {good} good events meanwhile");
    assert!(good >= 3, "only {good} good events were served meanwhile");
    assert_eq!(d.stored(), good, "only the good events are stored");
    assert_eq!(actor_restarts(&d), 0, "no actor restarted");
    d.assert_alive();
}
