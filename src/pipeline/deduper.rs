//! Deduper: idempotency check and WAL append as one step, with group
//! commit. Requests that arrive while a group is being written and flushed
//! wait in `pending`; when that group ends (`Stored`), the next `Commit`
//! takes all of them, writes them as one group (storage invariant 1),
//! flushes once, and only then answers each. With Redis on, the group's
//! keys are claimed in Redis before the commit (one call per group) and
//! confirmed after it, before the answers; the next group is formed and
//! claimed while the current one is written, so that round trip overlaps
//! the flush. Groups are still written one at a time, in order.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures_util::FutureExt as _;
use ractor::{Actor, ActorProcessingErr, ActorRef};

use super::messages::{AppendRequest, BatcherMsg, DeduperMsg, IngestError, Observation, Verdict};
use super::{BATCHER, Context, StoreWriteKind, blocking};
use crate::config::Durability;
use crate::event::{Queued, now_ms};
use crate::mirror::{Accepted, Claim};
use crate::storage::{AppendOutcome, NewEvent};

/// The Deduper actor.
pub struct Deduper;

/// A group stops taking requests once it holds this many events.
const MAX_GROUP_EVENTS: usize = 1000;

/// Deduper state.
pub struct State {
    /// Storage, config and names.
    context: Arc<Context>,
    /// Requests gathered for the next group commit.
    pending: Vec<AppendRequest>,
    /// A `Commit` is already in the mailbox.
    commit_scheduled: bool,
    /// The group being written, flushed and answered. The next group's keys
    /// are claimed in Redis meanwhile; it is written only once this ends.
    storing: Option<tokio::task::JoinHandle<()>>,
    /// The number of the last group started: its `Stored` clears `storing`.
    started: u64,
}

impl State {
    /// Without Redis nothing can be prepared while a group is written: the
    /// requests wait, and all of them become the next group when it ends
    /// (`Stored`). Taking some before would split them into a small group
    /// and a large one: two flushes where one does.
    fn waits_for_stored(&self) -> bool {
        self.storing.is_some() && self.context.mirror.is_none()
    }

    /// Sends the Deduper a `Commit` if requests wait and none is on its way,
    /// unless the group being written will (`Stored`). It goes behind
    /// everything already queued: those requests join the group.
    fn schedule_commit(&mut self, myself: &ActorRef<DeduperMsg>) -> Result<(), ActorProcessingErr> {
        if self.pending.is_empty() || self.commit_scheduled || self.waits_for_stored() {
            return Ok(());
        }
        self.commit_scheduled = true;
        myself.send_message(DeduperMsg::Commit)?;
        Ok(())
    }
}

/// The Deduper starts from the pipeline context.
pub type Arguments = Arc<Context>;

impl Actor for Deduper {
    type Msg = DeduperMsg;
    type State = State;
    type Arguments = Arguments;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        context: Arguments,
    ) -> Result<State, ActorProcessingErr> {
        Ok(State {
            context,
            pending: Vec::new(),
            commit_scheduled: false,
            storing: None,
            started: 0,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            DeduperMsg::Append(request) => {
                state.pending.push(request);
                state.schedule_commit(&myself)?;
            }
            DeduperMsg::Commit => {
                state.commit_scheduled = false;
                if state.waits_for_stored() {
                    return Ok(());
                }
                // Bounded groups keep each append short, so the ack path
                // gets its turn at the store between them.
                let mut events = 0;
                let take = state
                    .pending
                    .iter()
                    .take_while(|r| {
                        events += r.events.len();
                        events - r.events.len() < MAX_GROUP_EVENTS
                    })
                    .count();
                let group: Vec<AppendRequest> = state.pending.drain(..take).collect();
                if group.is_empty() {
                    return Ok(());
                }
                let claimed = claim(&state.context, group).await;
                // One group is written at a time, in order.
                if let Some(previous) = state.storing.take() {
                    let _ = previous.await;
                }
                state.started += 1;
                let number = state.started;
                let storing = store(state.context.clone(), claimed);
                let deduper = myself.clone();
                state.storing = Some(tokio::spawn(async move {
                    // A group that panicked still ends: its requests were
                    // answered 503 when their reply ports dropped.
                    if AssertUnwindSafe(storing).catch_unwind().await.is_err() {
                        tracing::error!(
                            group = number,
                            "a group commit panicked; its requests were answered 503"
                        );
                    }
                    let _ = deduper.cast(DeduperMsg::Stored(number));
                }));
                // What did not fit in this group.
                state.schedule_commit(&myself)?;
            }
            DeduperMsg::Stored(number) => {
                // An earlier group's end is old news: a later one was started
                // after awaiting it.
                if number == state.started {
                    state.storing = None;
                    state.schedule_commit(&myself)?;
                }
            }
        }
        Ok(())
    }
}

/// What became of one event of a group.
enum Outcome {
    /// The local store took it, or found its key.
    Stored(AppendOutcome),
    /// Another instance holds its key in Redis; it was not written.
    Shared(Claim),
}

/// A group whose keys were claimed in Redis (when it is on), ready to be
/// written.
struct Claimed {
    /// Its requests, their events taken out.
    group: Vec<AppendRequest>,
    /// Every event of the group, in order.
    events: Vec<NewEvent>,
    /// Each event's Redis key (empty without Redis).
    redis_keys: Vec<String>,
    /// What Redis said of each event's key.
    claims: Vec<Claim>,
    /// When the claim was made (it is part of the claim's value).
    claimed_ms: i64,
}

/// Claims the group's keys in Redis: one call per group (see
/// [`crate::mirror`]). Without Redis every key is left to the local index.
async fn claim(context: &Arc<Context>, mut group: Vec<AppendRequest>) -> Claimed {
    // Moved, not copied: once written, a request needs only its slots.
    let events: Vec<NewEvent> = group
        .iter_mut()
        .flat_map(|r| std::mem::take(&mut r.events))
        .collect();
    let claimed_ms = now_ms();
    let (redis_keys, claims) = match &context.mirror {
        Some(mirror) => {
            let keys: Vec<String> = events
                .iter()
                .map(|e| mirror.idempotency_key(&e.record.source, &e.record.key))
                .collect();
            let claims = mirror.claim(&keys, claimed_ms).await;
            (keys, claims)
        }
        None => (Vec::new(), vec![Claim::Unchecked; events.len()]),
    };
    Claimed {
        group,
        events,
        redis_keys,
        claims,
        claimed_ms,
    }
}

/// Writes one group, flushes once, answers every request in it; with Redis,
/// confirms the keys it stored before the answers.
async fn store(context: Arc<Context>, claimed: Claimed) {
    let context = &context;
    let Claimed {
        mut group,
        events,
        redis_keys,
        claims,
        claimed_ms,
    } = claimed;
    let config = context.live().config.clone();
    let ttl_ms = config.idempotency_ttl_ms();
    // Only the events no other instance holds are written here.
    let to_store: Vec<NewEvent> = events
        .into_iter()
        .zip(&claims)
        .filter(|(_, claim)| claim.is_local())
        .map(|(event, _)| event)
        .collect();
    let storing = to_store.len();
    let _writing = context
        .status
        .store_writes
        .begin(StoreWriteKind::GroupCommit {
            events: storing,
            requests: group.len(),
        });
    let fsync = config.durability == Durability::Fsync;
    let written = if to_store.is_empty() {
        Ok((Vec::new(), Vec::new()))
    } else {
        blocking(&context.storage, move |s| {
            let outcomes = s.append(&to_store, now_ms(), ttl_ms)?;
            if fsync {
                s.flush()?;
            }
            // The events come back for the mirror's copy of the group.
            Ok((outcomes, to_store))
        })
        .await
    };
    let stored = match written {
        // One outcome per event, or no answer can be trusted: a 202 is
        // only ever sent for an event the store said it holds.
        Ok((outcomes, _)) if outcomes.len() != storing => Err(format!(
            "the store answered {} outcomes for {storing} events",
            outcomes.len()
        )),
        Ok(written) => Ok(written),
        Err(e) => Err(e.to_string()),
    };
    let (stored, stored_events) = match stored {
        Ok(stored) => stored,
        Err(error) => {
            if let Some(mirror) = &context.mirror {
                let ours: Vec<String> = redis_keys
                    .into_iter()
                    .zip(&claims)
                    .filter(|(_, c)| **c == Claim::New)
                    .map(|(k, _)| k)
                    .collect();
                mirror.release(&ours, claimed_ms).await;
            }
            return fail(context, group, error);
        }
    };
    context
        .status
        .storage_failed
        .store(false, Ordering::Relaxed);
    let mut stored_outcomes = stored.iter().copied();
    let outcomes: Vec<Outcome> = claims
        .into_iter()
        .map(|claim| match claim {
            local if local.is_local() => stored_outcomes
                .next()
                .map_or(Outcome::Shared(Claim::InProgress), Outcome::Stored),
            shared => Outcome::Shared(shared),
        })
        .collect();
    // The events this group added to the WAL, with their seqs: the
    // Batcher's copy (and, with Redis, the mirror's, for a takeover).
    let appended: Vec<Queued> = stored
        .iter()
        .zip(stored_events)
        .filter_map(|(outcome, event)| match outcome {
            AppendOutcome::Accepted { seq } => Some(Queued {
                seq: *seq,
                record: event.record,
            }),
            AppendOutcome::Duplicate { .. } => None,
        })
        .collect();
    if let Some(mirror) = &context.mirror {
        // Every key this instance holds, accepted now or before, becomes
        // this instance's in Redis for the rest of its window (a new key's
        // window runs from about now, as in the local index).
        let accepted: Vec<Accepted> = redis_keys
            .into_iter()
            .zip(&outcomes)
            .filter_map(|(key, outcome)| {
                let first_seen_ms = match outcome {
                    Outcome::Stored(AppendOutcome::Accepted { .. }) => claimed_ms,
                    Outcome::Stored(AppendOutcome::Duplicate { first_seen_ms }) => *first_seen_ms,
                    Outcome::Shared(_) => return None,
                };
                Some(Accepted { key, first_seen_ms })
            })
            .collect();
        // Before the answers: once a client holds a 202, every other
        // instance calls a retry a duplicate, not "in progress".
        let group_events: Vec<(u64, &crate::event::WalRecord)> =
            appended.iter().map(|q| (q.seq, &q.record)).collect();
        mirror.confirm(accepted, &group_events, ttl_ms).await;
    }
    // The Batcher hears of the group before any client does: a drain that
    // follows the last answer then finds the group waiting to be processed.
    if let Some(upto) = appended.iter().map(|q| q.seq).max() {
        context.status.last_seq.fetch_max(upto, Ordering::Relaxed);
        // Only a synced group is handed on from memory. With "interval" it
        // is not synced yet: a store that fails before it is reopens
        // without it (its seqs set aside as lost), and the Batcher must
        // then find it gone from the WAL, not deliver it anyway.
        let records = if fsync { appended } else { Vec::new() };
        context
            .names
            .cast(BATCHER, BatcherMsg::Appended { upto, records });
    }
    let mut outcomes = outcomes.into_iter();
    let (mut accepted, mut duplicates) = (0, 0);
    let mut latencies = Vec::with_capacity(group.len());
    for request in &mut group {
        for (slot, outcome) in request.slots.iter().zip(&mut outcomes) {
            let verdict = &mut request.verdicts[*slot];
            let Verdict::Accepted { event_id } = verdict else {
                continue;
            };
            match outcome {
                Outcome::Stored(AppendOutcome::Accepted { .. }) => accepted += 1,
                Outcome::Stored(AppendOutcome::Duplicate { .. })
                | Outcome::Shared(Claim::Duplicate { .. }) => {
                    duplicates += 1;
                    *verdict = Verdict::Duplicate {
                        event_id: std::mem::take(event_id),
                    };
                }
                Outcome::Shared(_) => {
                    *verdict = Verdict::InProgress {
                        event_id: std::mem::take(event_id),
                    };
                }
            }
        }
        latencies.push(request.received.elapsed().as_secs_f64());
    }
    // One observation for the group, not one per request: the Metrics
    // actor's mailbox would otherwise take a message for every request.
    context.names.observe(Observation::Ingested {
        accepted,
        duplicates,
        latencies,
    });
    for request in group {
        let _ = request.reply.send(Ok(request.verdicts));
    }
}

fn fail(context: &Arc<Context>, group: Vec<AppendRequest>, error: String) {
    tracing::error!(%error, requests = group.len(), "group commit failed; answering 503");
    context.status.storage_failed.store(true, Ordering::Relaxed);
    context.names.observe(Observation::Rejected {
        reason: "storage",
        count: group.len() as u64,
    });
    for request in group {
        let _ = request.reply.send(Err(IngestError::Storage(error.clone())));
    }
}
