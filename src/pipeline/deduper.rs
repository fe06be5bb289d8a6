//! Deduper: idempotency check and WAL append as one step, with group
//! commit. Each group is written (storage invariant 1), flushed once, and
//! only then are its requests answered. Groups are written one at a time,
//! in order.
//!
//! Without Redis, requests go to a [`Lane`]: a writer thread takes every
//! request waiting as the next group the moment it has answered the last,
//! so nothing but that group's own work lies between one sync and the next
//! write. Requests that arrive meanwhile make the group after.
//!
//! With Redis on, a group's keys are claimed in Redis before the commit
//! (one call per group) and confirmed after it, before the answers.
//! Requests wait in `pending` for a `Commit`; the next group is formed and
//! claimed while the current one is written, so that round trip overlaps
//! the flush.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures_util::FutureExt as _;
use ractor::{Actor, ActorProcessingErr, ActorRef};

use super::messages::{AppendRequest, BatcherMsg, DeduperMsg, IngestError, Observation, Verdict};
use super::{BATCHER, Context, StoreWrite, StoreWriteKind, blocking};
use crate::config::{Config, Durability};
use crate::event::{Queued, now_ms};
use crate::mirror::{Accepted, Claim};
use crate::storage::{AppendOutcome, NewEvent, Storage};

/// The Deduper actor.
pub struct Deduper;

/// A group stops taking requests once it holds this many events.
const MAX_GROUP_EVENTS: usize = 1000;

/// Deduper state.
pub struct State {
    /// Storage, config and names.
    context: Arc<Context>,
    /// With Redis: requests gathered for the next group commit.
    pending: Vec<AppendRequest>,
    /// A `Commit` is already in the mailbox.
    commit_scheduled: bool,
    /// The group being written, flushed and answered. The next group's keys
    /// are claimed in Redis meanwhile; it is written only once this ends.
    storing: Option<tokio::task::JoinHandle<()>>,
    /// The number of the last group started, for the log.
    started: u64,
    /// Without Redis: where requests wait for the writer thread.
    lane: Arc<Lane>,
}

impl State {
    /// Sends the Deduper a `Commit` if requests wait and none is on its way.
    /// It goes behind everything already queued: those requests join the
    /// group.
    fn schedule_commit(&mut self, myself: &ActorRef<DeduperMsg>) -> Result<(), ActorProcessingErr> {
        if self.pending.is_empty() || self.commit_scheduled {
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
            lane: Arc::new(Lane::default()),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            DeduperMsg::Append(request) if state.context.mirror.is_none() => {
                state.lane.push(&state.context, request);
            }
            DeduperMsg::Append(request) => {
                state.pending.push(request);
                state.schedule_commit(&myself)?;
            }
            DeduperMsg::Commit => {
                state.commit_scheduled = false;
                // Bounded groups keep each append short, so the ack path
                // gets its turn at the store between them.
                let take = group_len(&state.pending);
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
                state.storing = Some(tokio::spawn(async move {
                    // A group that panicked still ends: its requests were
                    // answered 503 when their reply ports dropped.
                    if AssertUnwindSafe(storing).catch_unwind().await.is_err() {
                        tracing::error!(
                            group = number,
                            "a group commit panicked; its requests were answered 503"
                        );
                    }
                }));
                // What did not fit in this group.
                state.schedule_commit(&myself)?;
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
/// [`crate::mirror`]). Without Redis (not a case the Deduper sends here)
/// every key is left to the local index.
async fn claim(context: &Arc<Context>, mut group: Vec<AppendRequest>) -> Claimed {
    let events = take_events(&mut group);
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

/// With Redis: writes one claimed group on a blocking thread, flushes once,
/// confirms in Redis the keys it stored, then answers every request in it.
async fn store(context: Arc<Context>, claimed: Claimed) {
    let context = &context;
    let Claimed {
        group,
        events,
        redis_keys,
        claims,
        claimed_ms,
    } = claimed;
    // Only the events no other instance holds are written here.
    let to_store: Vec<NewEvent> = events
        .into_iter()
        .zip(&claims)
        .filter(|(_, claim)| claim.is_local())
        .map(|(event, _)| event)
        .collect();
    let _writing = watch_group_commit(context, to_store.len(), group.len());
    let config = context.live().config.clone();
    let synced = config.durability == Durability::Fsync;
    let ttl_ms = config.idempotency_ttl_ms();
    let written = if to_store.is_empty() {
        Ok((Vec::new(), Vec::new()))
    } else {
        blocking(&context.storage, move |s| {
            Ok(write(s, &to_store, &config).map(|outcomes| (outcomes, to_store)))
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()))
    };
    let (stored, stored_events) = match written {
        Ok(written) => written,
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
    let (outcomes, appended) = settle(claims, &stored, stored_events);
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
    answer(context, group, outcomes, appended, synced);
}

/// Appends a group's events to the store and, under `durability =
/// "fsync"`, flushes them, on the calling thread: one outcome per event,
/// or an error (no answer can be trusted then: a 202 is only ever sent for
/// an event the store said it holds).
fn write(
    storage: &dyn Storage,
    events: &[NewEvent],
    config: &Config,
) -> Result<Vec<AppendOutcome>, String> {
    let outcomes = storage
        .append(events, now_ms(), config.idempotency_ttl_ms())
        .map_err(|e| e.to_string())?;
    if outcomes.len() != events.len() {
        return Err(format!(
            "the store answered {} outcomes for {} events",
            outcomes.len(),
            events.len()
        ));
    }
    if config.durability == Durability::Fsync {
        storage.flush().map_err(|e| e.to_string())?;
    }
    Ok(outcomes)
}

/// What became of each event of a group, from Redis's claims and the
/// store's outcomes of the events it wrote; and the events the group added
/// to the WAL, with their seqs (the Batcher's copy and, with Redis, the
/// mirror's, for a takeover).
fn settle(
    claims: Vec<Claim>,
    stored: &[AppendOutcome],
    stored_events: Vec<NewEvent>,
) -> (Vec<Outcome>, Vec<Queued>) {
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
    (outcomes, appended)
}

/// Tells the Batcher of a stored group, then answers each of its requests.
/// `synced`: the group was flushed (`durability = "fsync"`).
fn answer(
    context: &Arc<Context>,
    mut group: Vec<AppendRequest>,
    outcomes: Vec<Outcome>,
    appended: Vec<Queued>,
    synced: bool,
) {
    context
        .status
        .storage_failed
        .store(false, Ordering::Relaxed);
    // The Batcher hears of the group before any client does: a drain that
    // follows the last answer then finds the group waiting to be processed.
    if let Some(upto) = appended.iter().map(|q| q.seq).max() {
        context.status.last_seq.fetch_max(upto, Ordering::Relaxed);
        // Only a synced group is handed on from memory. With "interval" it
        // is not synced yet: a store that fails before it is reopens
        // without it (its seqs set aside as lost), and the Batcher must
        // then find it gone from the WAL, not deliver it anyway.
        let records = if synced { appended } else { Vec::new() };
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

/// Without Redis, groups are written by one thread at a time that takes
/// the next group as soon as it has answered the last: no message, task or
/// thread hand-off lies between one group's sync and the next group's
/// write, so the disk is idle only while no request waits. (With Redis each
/// group is claimed and confirmed there, which the Deduper's tasks
/// overlap with the writes instead.)
#[derive(Default)]
struct Lane {
    /// The requests waiting, and whether a writer thread is running.
    queue: std::sync::Mutex<LaneQueue>,
}

#[derive(Default)]
struct LaneQueue {
    /// Requests not yet in a group, in arrival order.
    pending: Vec<AppendRequest>,
    /// A writer thread is running: it takes `pending` before it ends.
    writing: bool,
}

impl Lane {
    fn lock(&self) -> std::sync::MutexGuard<'_, LaneQueue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a request for the next group, and starts a writer thread
    /// unless one runs.
    fn push(self: &Arc<Self>, context: &Arc<Context>, request: AppendRequest) {
        let start = {
            let mut queue = self.lock();
            queue.pending.push(request);
            !std::mem::replace(&mut queue.writing, true)
        };
        if start {
            let (lane, context) = (self.clone(), context.clone());
            tokio::task::spawn_blocking(move || lane.write_groups(&context));
        }
    }

    /// Writes group after group until no request waits.
    fn write_groups(&self, context: &Arc<Context>) {
        let mut number = 0u64;
        loop {
            let group = {
                let mut queue = self.lock();
                let take = group_len(&queue.pending);
                if take == 0 {
                    queue.writing = false;
                    return;
                }
                queue.pending.drain(..take).collect::<Vec<_>>()
            };
            number += 1;
            // A group that panicked still ends: its requests were answered
            // 503 when their reply ports dropped.
            let written =
                std::panic::catch_unwind(AssertUnwindSafe(|| write_group(context, group)));
            if written.is_err() {
                tracing::error!(
                    group = number,
                    "a group commit panicked; its requests were answered 503"
                );
            }
        }
    }
}

/// Writes, flushes and answers one group on the calling thread (no Redis).
fn write_group(context: &Arc<Context>, mut group: Vec<AppendRequest>) {
    let events = take_events(&mut group);
    let claims = vec![Claim::Unchecked; events.len()];
    let config = context.live().config.clone();
    let written = {
        let _writing = watch_group_commit(context, events.len(), group.len());
        write(context.storage.as_ref(), &events, &config)
    };
    match written {
        Ok(stored) => {
            let (outcomes, appended) = settle(claims, &stored, events);
            let synced = config.durability == Durability::Fsync;
            answer(context, group, outcomes, appended, synced);
        }
        Err(error) => fail(context, group, error),
    }
}

/// Moves every event out of a group's requests, in order: moved, not
/// copied, since once written a request needs only its slots.
fn take_events(group: &mut [AppendRequest]) -> Vec<NewEvent> {
    group
        .iter_mut()
        .flat_map(|r| std::mem::take(&mut r.events))
        .collect()
}

/// Registers a group commit with the stall watch until the guard drops.
fn watch_group_commit(context: &Context, events: usize, requests: usize) -> StoreWrite<'_> {
    context
        .status
        .store_writes
        .begin(StoreWriteKind::GroupCommit { events, requests })
}

/// How many of the first requests make the next group: at least one, and
/// no more once it holds [`MAX_GROUP_EVENTS`] events.
fn group_len(pending: &[AppendRequest]) -> usize {
    let mut events = 0;
    pending
        .iter()
        .take_while(|r| {
            events += r.events.len();
            events - r.events.len() < MAX_GROUP_EVENTS
        })
        .count()
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
