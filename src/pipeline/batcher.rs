//! Batcher: reads the WAL from the ack cursor and hands the Processor one
//! batch at a time: as soon as `batch_size` records are durable, or
//! `batch_timeout_ms` after the first of a partial batch arrived. Reading
//! from storage rather than from memory keeps start-up replay of any
//! backlog in bounded memory.
//!
//! With a backlog, one hand-over holds up to [`CATCH_UP_BATCHES`] full
//! micro-batches: the sinks still get them one `batch_size` at a time, but
//! they are committed together, so that acks keep pace with group commits
//! of up to 1000 events instead of taking one lock turn per 100.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::messages::{BatcherMsg, Observation, ProcessorMsg};
use super::{Context, PROCESSOR, blocking};

/// The Batcher actor.
pub struct Batcher;

/// Most micro-batches handed to the Processor at once (and committed in one
/// transaction) while a backlog waits.
pub const CATCH_UP_BATCHES: usize = 10;

/// Batcher state.
pub struct State {
    /// Storage, config and names.
    context: Arc<Context>,
    /// Highest seq handed to the Processor (or acknowledged).
    next_from: u64,
    /// Highest seq known durable.
    durable_upto: u64,
    /// The batch being processed, by its last seq.
    in_flight: Option<u64>,
    /// A `Tick` is scheduled.
    timer_armed: bool,
    /// Set while draining: process partial batches at once, answer when caught up.
    drain: Option<RpcReplyPort<()>>,
}

/// The Batcher starts from the pipeline context.
pub type Arguments = Arc<Context>;

impl Actor for Batcher {
    type Msg = BatcherMsg;
    type State = State;
    type Arguments = Arguments;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        context: Arguments,
    ) -> Result<State, ActorProcessingErr> {
        // Read before the cursor: a batch the Processor still holds (this
        // is a restart) is waited for, not handed out again; one it has
        // finished since is behind the cursor read next.
        let held = context.status.processing.load(Ordering::SeqCst);
        let info = blocking(&context.storage, |s| s.queue_info()).await?;
        context.status.cursor.store(info.cursor, Ordering::Relaxed);
        context
            .status
            .last_seq
            .fetch_max(info.last_seq, Ordering::Relaxed);
        if info.depth > 0 {
            tracing::info!(
                depth = info.depth,
                cursor = info.cursor,
                "replaying the queue from the ack cursor"
            );
        }
        let in_flight = (held > info.cursor).then_some(held);
        let mut state = State {
            context,
            next_from: info.cursor.max(held),
            durable_upto: info.last_seq,
            in_flight,
            timer_armed: false,
            drain: None,
        };
        schedule(&myself, &mut state, false).await?;
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut State,
    ) -> Result<(), ActorProcessingErr> {
        let mut timed_out = false;
        match message {
            BatcherMsg::Appended(seq) => state.durable_upto = state.durable_upto.max(seq),
            BatcherMsg::Tick => {
                state.timer_armed = false;
                timed_out = true;
            }
            BatcherMsg::Done(upto) => {
                if state.in_flight != Some(upto) {
                    return Ok(()); // from before a Reset
                }
                state.in_flight = None;
                state
                    .context
                    .status
                    .cursor
                    .fetch_max(upto, Ordering::Relaxed);
            }
            BatcherMsg::Reset => {
                let info = blocking(&state.context.storage, |s| s.queue_info()).await?;
                state.next_from = info.cursor;
                state.durable_upto = state.durable_upto.max(info.last_seq);
                state.in_flight = None;
            }
            BatcherMsg::Drain(reply) => state.drain = Some(reply),
        }
        schedule(&myself, state, timed_out).await
    }
}

/// Emits a batch if one is due, arms the timer if one is pending, and
/// answers a drain once nothing is left.
async fn schedule(
    myself: &ActorRef<BatcherMsg>,
    state: &mut State,
    timed_out: bool,
) -> Result<(), ActorProcessingErr> {
    if state.in_flight.is_some() {
        return Ok(());
    }
    let available = state.durable_upto.saturating_sub(state.next_from);
    if available == 0 {
        if let Some(reply) = state.drain.take() {
            let _ = reply.send(());
        }
        return Ok(());
    }
    let batch_size = state.context.live().config.batch_size;
    if available >= batch_size as u64 || timed_out || state.drain.is_some() {
        // Whole micro-batches only, unless the partial one is due.
        let full = (available / batch_size as u64).min(CATCH_UP_BATCHES as u64) as usize;
        let batches = if timed_out || state.drain.is_some() {
            CATCH_UP_BATCHES
        } else {
            full
        };
        return emit(myself, state, batches.max(1) * batch_size).await;
    }
    if !state.timer_armed {
        state.timer_armed = true;
        myself.send_after(state.context.live().config.batch_timeout(), || {
            BatcherMsg::Tick
        });
    }
    Ok(())
}

async fn emit(
    myself: &ActorRef<BatcherMsg>,
    state: &mut State,
    limit: usize,
) -> Result<(), ActorProcessingErr> {
    let Some(processor) = state.context.names.find(PROCESSOR) else {
        // The Processor is being restarted; try again shortly.
        if !state.timer_armed {
            state.timer_armed = true;
            myself.send_after(Duration::from_millis(50), || BatcherMsg::Tick);
        }
        return Ok(());
    };
    let from = state.next_from;
    let (mut records, damaged) =
        blocking(&state.context.storage, move |s| s.read_after(from, limit)).await?;
    if !damaged.is_empty() {
        state.context.names.observe(Observation::Quarantined {
            count: damaged.len() as u64,
        });
    }
    records.retain(|q| q.seq <= state.durable_upto);
    // Records that were quarantined leave gaps; an empty batch still moves
    // the cursor past them.
    let upto = records.last().map_or(state.durable_upto, |q| q.seq);
    state.next_from = upto;
    state.in_flight = Some(upto);
    processor.cast(ProcessorMsg::Process { records, upto })?;
    Ok(())
}
