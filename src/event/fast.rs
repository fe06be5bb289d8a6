//! The fast path of parsing: the body is checked as it is parsed, into the
//! few fields the contract reads, and each event's text is kept as it came
//! instead of being built into a tree of JSON values and written out again:
//! less than half the CPU a single event's parse took, half a batch's
//! (BENCHMARKS.md, "Events kept as the text they came as").
//!
//! It answers only when it is sure to answer as [`super::validate`] would;
//! `None` sends the body down the reference path. Every value in the body
//! is still parsed as `serde_json::Value` would parse it (numbers in range,
//! escapes and surrogates valid, nesting under serde_json's limit), only
//! nothing is allocated for it. These take the reference path: an object
//! that has an `event_id` member that is not a string and must have one
//! filled in; a batch over `max_batch_events`, with a repeated `events`
//! member or an event nested too deep; anything that is not JSON or not an
//! object. Its errors are then the ones users see, as before.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use super::{Event, FieldError, Fields, Found};

/// How deep a batch's event may nest: serde_json refuses a body nested
/// 128 deep, and the envelope's object and array take two of those.
/// An event is parsed on its own, so its own nesting is bounded here.
const EVENT_DEPTH_LIMIT: usize = 125;

/// The body as text, if the fast path can take it.
pub(super) fn usable(body: &[u8]) -> Option<&str> {
    std::str::from_utf8(body).ok()
}

/// One event object, or `None` for the reference path.
pub(super) fn single(
    text: &str,
    header_key: Option<&str>,
    received_at_ms: i64,
) -> Option<Result<Event, FieldError>> {
    let fields = serde_json::from_str::<Fields<'_>>(text).ok()?;
    let object = text.trim_matches(is_json_space);
    event(object, &fields, header_key, received_at_ms)
}

/// A batch envelope, or `None` for the reference path.
pub(super) fn batch(
    text: &str,
    max_events: usize,
    received_at_ms: i64,
) -> Option<Vec<Result<Event, FieldError>>> {
    let Envelope(events) = serde_json::from_str::<Envelope<'_>>(text).ok()?;
    let events = events?;
    if events.len() > max_events {
        // The events were only skimmed: bad JSON in one of them is the
        // reference path's first answer.
        return None;
    }
    let mut out = Vec::with_capacity(events.len());
    for raw in events {
        let object = raw.get();
        // An event with fewer opening brackets cannot nest deeper.
        let brackets = object.bytes().filter(|&b| b == b'{' || b == b'[').count();
        if brackets > EVENT_DEPTH_LIMIT {
            return None;
        }
        let fields = serde_json::from_str::<Fields<'_>>(object).ok()?;
        out.push(event(object, &fields, None, received_at_ms)?);
    }
    Some(out)
}

fn event(
    object: &str,
    fields: &Fields<'_>,
    header_key: Option<&str>,
    received_at_ms: i64,
) -> Option<Result<Event, FieldError>> {
    let checked = match fields.check(header_key, received_at_ms) {
        Ok(checked) => checked,
        Err(fault) => return Some(Err(fault)),
    };
    let (event_id, body) = match checked.event_id {
        Some(id) => (id, object.to_owned()),
        None if fields.has_event_id => return None,
        None => (checked.key.clone(), with_event_id(object, &checked.key)?),
    };
    Some(Ok(Event {
        key: checked.key,
        event_id,
        event_type: checked.event_type,
        occurred_at_ms: checked.occurred_at_ms,
        body,
    }))
}

/// `object` (JSON object text without an `event_id` member) with one
/// added first; `None` if it is not an object's text after all.
pub(super) fn with_event_id(object: &str, id: &str) -> Option<String> {
    let rest = object.strip_prefix('{')?;
    let id = serde_json::to_string(id).ok()?;
    Some(if rest.trim_start_matches(is_json_space).starts_with('}') {
        format!("{{\"event_id\":{id}}}")
    } else {
        format!("{{\"event_id\":{id},{rest}")
    })
}

fn is_json_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r')
}

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(FieldsVisitor)
    }
}

/// Reads an event object into [`Fields`], member by member.
struct FieldsVisitor;

impl<'de> Visitor<'de> for FieldsVisitor {
    type Value = Fields<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an event object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields<'de>, A::Error> {
        let mut fields = Fields::default();
        while let Some(Key(name)) = map.next_key()? {
            // A repeated member: the last one counts, as in a JSON map.
            match fields.slot(&name) {
                Some(slot) => *slot = map.next_value()?,
                None => {
                    map.next_value::<Valid>()?;
                }
            }
        }
        Ok(fields)
    }
}

/// `{"events": [...]}`: the events' text (`None`: no `events` member).
struct Envelope<'a>(Option<Vec<&'a RawValue>>);

impl<'de> Deserialize<'de> for Envelope<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(EnvelopeVisitor)
    }
}

/// Reads a batch's envelope into [`Envelope`].
struct EnvelopeVisitor;

impl<'de> Visitor<'de> for EnvelopeVisitor {
    type Value = Envelope<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a batch object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Envelope<'de>, A::Error> {
        let mut events = None;
        while let Some(Key(name)) = map.next_key()? {
            if name != "events" {
                map.next_value::<Valid>()?;
            } else if events.is_some() {
                // The first array's events were only skimmed, not
                // parsed; the reference path parses them.
                return Err(de::Error::duplicate_field("events"));
            } else {
                events = Some(map.next_value()?);
            }
        }
        Ok(Envelope(events))
    }
}

/// A member name, borrowed from the body unless it has escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(KeyVisitor)
    }
}

/// Reads a member name into [`Key`].
struct KeyVisitor;

impl<'de> Visitor<'de> for KeyVisitor {
    type Value = Key<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a member name")
    }

    fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Key<'de>, E> {
        Ok(Key(Cow::Borrowed(s)))
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Key<'de>, E> {
        Ok(Key(Cow::Owned(s.to_owned())))
    }
}

impl<'de> Deserialize<'de> for Found<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(FoundVisitor)
    }
}

/// Reads one checked member's value into [`Found`].
struct FoundVisitor;

impl<'de> Visitor<'de> for FoundVisitor {
    type Value = Found<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Found<'de>, E> {
        Ok(Found::Null)
    }

    fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Found<'de>, E> {
        Ok(Found::Text(Cow::Borrowed(s)))
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Found<'de>, E> {
        Ok(Found::Text(Cow::Owned(s.to_owned())))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Found<'de>, E> {
        Ok(Found::Other)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Found<'de>, E> {
        Ok(Found::Other)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Found<'de>, E> {
        Ok(Found::Other)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Found<'de>, E> {
        Ok(Found::Other)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Found<'de>, A::Error> {
        Valid::drain_seq(seq)?;
        Ok(Found::Other)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Found<'de>, A::Error> {
        Valid::drain_map(map)?;
        Ok(Found::Object)
    }
}

/// Any JSON value, parsed as `serde_json::Value` parses it and then
/// dropped (unlike [`serde::de::IgnoredAny`], which skims numbers and
/// escapes unchecked).
struct Valid;

impl Valid {
    fn drain_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<Valid>()?.is_some() {}
        Ok(())
    }

    fn drain_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
        while map.next_entry::<Valid, Valid>()?.is_some() {}
        Ok(())
    }
}

impl<'de> Deserialize<'de> for Valid {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ValidVisitor)
    }
}

/// Takes any value for [`Valid`].
struct ValidVisitor;

impl<'de> Visitor<'de> for ValidVisitor {
    type Value = Valid;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Valid, E> {
        Ok(Valid)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Valid, E> {
        Ok(Valid)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Valid, E> {
        Ok(Valid)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Valid, E> {
        Ok(Valid)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Valid, E> {
        Ok(Valid)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Valid, E> {
        Ok(Valid)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Valid, A::Error> {
        Valid::drain_seq(seq)?;
        Ok(Valid)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Valid, A::Error> {
        Valid::drain_map(map)?;
        Ok(Valid)
    }
}
