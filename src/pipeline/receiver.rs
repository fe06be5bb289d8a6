//! Receiver: checks the content type and the source's signature over the
//! raw body, parses and validates the body, and
//! hands the valid events to the Deduper together with the reply port. It
//! never waits for storage or processing.

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};

use super::messages::{
    AppendRequest, DeduperMsg, IngestError, IngestRequest, Observation, ReceiverMsg, Shape, Verdict,
};
use super::{Context, DEDUPER};
use crate::event::{self, BodyError, WalRecord};
use crate::storage::NewEvent;

/// The Receiver actor.
pub struct Receiver;

/// Receiver state: only the shared context.
pub struct State {
    /// Config (limits) and names.
    context: Arc<Context>,
}

/// The Receiver starts from the pipeline context.
pub type Arguments = Arc<Context>;

/// Whether a Content-Type names JSON (`application/json`, `…+json`, any parameters).
pub fn is_json(content_type: Option<&str>) -> bool {
    let Some(ct) = content_type else { return false };
    // Compared without case and without a lowercased copy: it is asked of
    // every request.
    let mime = ct.split(';').next().unwrap_or("").trim().as_bytes();
    let starts = |prefix: &str| {
        mime.len() >= prefix.len() && mime[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
    };
    let ends = |suffix: &str| {
        mime.len() >= suffix.len()
            && mime[mime.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
    };
    mime.eq_ignore_ascii_case(b"application/json") || (starts("application/") && ends("+json"))
}

impl Actor for Receiver {
    type Msg = ReceiverMsg;
    type State = State;
    type Arguments = Arguments;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        context: Arguments,
    ) -> Result<State, ActorProcessingErr> {
        Ok(State { context })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut State,
    ) -> Result<(), ActorProcessingErr> {
        let ReceiverMsg::Ingest(request, reply) = message;
        let names = &state.context.names;
        if !is_json(request.content_type.as_deref()) {
            names.observe(Observation::Rejected {
                reason: "content_type",
                count: 1,
            });
            let _ = reply.send(Err(IngestError::NotJson(request.content_type)));
            return Ok(());
        }
        let live = &request.live;
        if let Some(verifier) = live
            .sources
            .get(&request.source)
            .and_then(|s| s.verifier.as_ref())
        {
            let now = request.received_at_ms.div_euclid(1000);
            if let Err(e) = verifier.verify(&request.signed, &request.body, now) {
                names.observe(Observation::Rejected {
                    reason: "signature",
                    count: 1,
                });
                let _ = reply.send(Err(IngestError::Signature(e)));
                return Ok(());
            }
        }
        let parsed = parse(&request, live.config.max_batch_events);
        let candidates = match parsed {
            Ok(c) => c,
            Err(e) => {
                let reason = match e {
                    BodyError::Malformed { .. } => "malformed_json",
                    BodyError::Shape(_) => "schema",
                    BodyError::TooManyEvents { .. } => "too_many_events",
                };
                names.observe(Observation::Rejected { reason, count: 1 });
                let _ = reply.send(Err(IngestError::Body(e)));
                return Ok(());
            }
        };
        let mut verdicts = Vec::with_capacity(candidates.len());
        let mut events = Vec::new();
        let mut slots = Vec::new();
        for (index, candidate) in candidates.into_iter().enumerate() {
            match candidate {
                Ok(mut e) => {
                    verdicts.push(Verdict::Accepted {
                        event_id: std::mem::take(&mut e.event_id),
                    });
                    slots.push(index);
                    events.push(NewEvent {
                        record: WalRecord::new(&request.source, e, request.received_at_ms),
                    });
                }
                Err(field) => verdicts.push(Verdict::Rejected(field)),
            }
        }
        let rejected = (verdicts.len() - events.len()) as u64;
        if rejected > 0 {
            names.observe(Observation::Rejected {
                reason: "schema",
                count: rejected,
            });
        }
        if events.is_empty() {
            let _ = reply.send(Ok(verdicts));
            return Ok(());
        }
        let append = AppendRequest {
            events,
            slots,
            verdicts,
            received: request.received,
            reply,
        };
        match names.find(DEDUPER) {
            // If the Deduper is gone the reply port drops and the caller answers 503.
            Some(deduper) => {
                let _ = deduper.cast(DeduperMsg::Append(append));
            }
            None => {
                let _ = append.reply.send(Err(IngestError::Unavailable));
            }
        }
        Ok(())
    }
}

fn parse(
    request: &IngestRequest,
    max_batch_events: usize,
) -> Result<Vec<Result<event::Event, event::FieldError>>, BodyError> {
    match &request.shape {
        Shape::Single { header_key } => {
            event::parse_single(&request.body, header_key.as_deref(), request.received_at_ms)
                .map(|one| vec![one])
        }
        Shape::Batch => event::parse_batch(&request.body, max_batch_events, request.received_at_ms),
    }
}

#[cfg(test)]
mod tests {
    use super::is_json;

    #[test]
    fn json_content_types() {
        assert!(is_json(Some("application/json")));
        assert!(is_json(Some("Application/JSON; charset=utf-8")));
        assert!(is_json(Some("application/cloudevents+json")));
        assert!(is_json(Some("APPLICATION/CloudEvents+JSON")));
        assert!(!is_json(Some("application/+jso")));
        assert!(!is_json(Some("text/x+json")));
        assert!(!is_json(Some("application/jsonx")));
        assert!(!is_json(Some("text/plain")));
        assert!(!is_json(Some("application/x-www-form-urlencoded")));
        assert!(!is_json(None));
    }
}
