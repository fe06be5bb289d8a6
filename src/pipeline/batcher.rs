//! Batcher: reads the WAL from the ack cursor and hands the Processor one
//! batch at a time: as soon as `batch_size` records are durable, or
//! `batch_timeout_ms` after the first of a partial batch arrived.
//!
//! A backlog (start-up replay, a slow sink) is read from storage, which
//! keeps it in bounded memory. When caught up, the records a group commit
//! just wrote and synced come with its `Appended` and are handed on from
//! memory (`durability = "fsync"`; with `"interval"` they are not synced
//! yet, and are read back). The Batcher holds the newest run of them,
//! contiguous in seq and at most [`HELD_BYTES`], and uses it once
//! everything before its first seq has been handed out. They are the
//! records the WAL holds, in the same order, so the Processor sees the
//! same records either way (a held run that ends early makes a smaller
//! hand-over); reading them back cost a sled walk and a decode of every
//! string in every record.
//!
//! With a backlog, one hand-over holds up to [`CATCH_UP_BATCHES`] full
//! micro-batches: the sinks still get them one `batch_size` at a time, but
//! they are committed together, so that acks keep pace with group commits
//! of up to 1000 events instead of taking one lock turn per 100. Each
//! hand-over is a round of messages and blocking-pool calls whose waits do
//! not shrink with its size, so catching up must take more events a round
//! than intake adds in one, or a backlog only grows.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::messages::{BatcherMsg, Observation, ProcessorMsg};
use super::{Context, PROCESSOR, blocking};
use crate::event::Queued;

/// The Batcher actor.
pub struct Batcher;

/// Most micro-batches handed to the Processor at once (and committed in one
/// step) while a backlog waits. With 10, under batches of 100 from
/// 64 clients a round of hand-over, delivery and commit took long enough
/// that processing fell behind intake for good in some runs (BENCHMARKS.md,
/// "A writer thread for the group commits").
pub const CATCH_UP_BATCHES: usize = 40;

/// The most the records held in memory may weigh (their strings, roughly):
/// past it the Batcher reads from the WAL instead.
pub const HELD_BYTES: usize = 4 << 20;

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
    /// The newest durable records not yet handed on, as their group commits
    /// wrote them: contiguous seqs, all above `next_from`.
    held: Held,
}

/// Records kept from the latest `Appended`s, so that a Batcher that is
/// caught up need not read them back from the WAL.
#[derive(Default)]
struct Held {
    /// Contiguous in seq, oldest first.
    records: VecDeque<Queued>,
    /// Roughly what they weigh (see [`weight`]), held under [`HELD_BYTES`].
    bytes: usize,
}

impl Held {
    /// Keeps a group commit's `records` behind those held when they follow
    /// on; otherwise (a gap: records that only the WAL holds) they replace
    /// them. Past [`HELD_BYTES`] the oldest go: the WAL still has them.
    fn extend(&mut self, records: Vec<Queued>) {
        for record in records {
            if self
                .records
                .back()
                .is_some_and(|last| last.seq + 1 != record.seq)
            {
                self.clear();
            }
            self.bytes += weight(&record);
            self.records.push_back(record);
            while self.bytes > HELD_BYTES {
                let Some(oldest) = self.records.pop_front() else {
                    break;
                };
                self.bytes -= weight(&oldest);
            }
        }
    }

    /// Forgets the records at or below `seq` (handed on, or acknowledged).
    fn forget_upto(&mut self, seq: u64) {
        while self.records.front().is_some_and(|q| q.seq <= seq) {
            if let Some(gone) = self.records.pop_front() {
                self.bytes -= weight(&gone);
            }
        }
    }

    /// Takes up to `limit` records if the held ones start right after
    /// `after`; `None` if the WAL must be read first.
    fn take_after(&mut self, after: u64, limit: usize) -> Option<Vec<Queued>> {
        self.forget_upto(after);
        if self.records.front()?.seq != after + 1 {
            return None;
        }
        let n = limit.min(self.records.len());
        let taken: Vec<Queued> = self.records.drain(..n).collect();
        self.bytes -= taken.iter().map(weight).sum::<usize>();
        Some(taken)
    }

    fn clear(&mut self) {
        self.records.clear();
        self.bytes = 0;
    }
}

/// What a held record weighs: its strings and its own size.
fn weight(q: &Queued) -> usize {
    let r = &q.record;
    std::mem::size_of::<Queued>()
        + r.source.len()
        + r.key.len()
        + r.event_type.len()
        + r.body.len()
        + r.only_sink.as_ref().map_or(0, String::len)
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
            held: Held::default(),
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
            BatcherMsg::Appended { upto, records } => {
                state.durable_upto = state.durable_upto.max(upto);
                state.held.extend(records);
                state.held.forget_upto(state.next_from);
            }
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
                state.held.clear();
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
    let mut records = match state.held.take_after(from, limit) {
        Some(held) => held,
        None => {
            let (records, damaged) =
                blocking(&state.context.storage, move |s| s.read_after(from, limit)).await?;
            if !damaged.is_empty() {
                state.context.names.observe(Observation::Quarantined {
                    count: damaged.len() as u64,
                });
            }
            records
        }
    };
    records.retain(|q| q.seq <= state.durable_upto);
    // Records that were quarantined leave gaps; an empty batch still moves
    // the cursor past them.
    let upto = records.last().map_or(state.durable_upto, |q| q.seq);
    state.next_from = upto;
    state.held.forget_upto(upto);
    state.in_flight = Some(upto);
    processor.cast(ProcessorMsg::Process { records, upto })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::WalRecord;

    fn queued(seq: u64, body_bytes: usize) -> Queued {
        Queued {
            seq,
            record: WalRecord {
                source: "default".into(),
                key: format!("k{seq}"),
                event_type: "page_view".into(),
                received_at_ms: 0,
                occurred_at_ms: 0,
                only_sink: None,
                body: "x".repeat(body_bytes),
            },
        }
    }

    fn run(seqs: std::ops::RangeInclusive<u64>) -> Vec<Queued> {
        seqs.map(|seq| queued(seq, 10)).collect()
    }

    fn seqs(records: &[Queued]) -> Vec<u64> {
        records.iter().map(|q| q.seq).collect()
    }

    #[test]
    fn groups_that_follow_on_are_handed_on_in_order_without_a_read() {
        let mut held = Held::default();
        held.extend(run(1..=3));
        held.extend(run(4..=5));
        let taken = held.take_after(0, 4).expect("held from seq 1");
        assert_eq!(seqs(&taken), [1, 2, 3, 4]);
        let taken = held.take_after(4, 4).expect("held from seq 5");
        assert_eq!(seqs(&taken), [5]);
        assert_eq!((held.records.len(), held.bytes), (0, 0));
    }

    #[test]
    fn records_only_the_wal_holds_come_first_from_a_read() {
        // A DLQ replay wrote 4..=6 (no records with its `Appended`), then a
        // group commit wrote 7..=8.
        let mut held = Held::default();
        held.extend(run(1..=3));
        held.extend(run(7..=8));
        assert_eq!(seqs(held.records.make_contiguous()), [7, 8]);
        // The cursor is at 0: 1..=6 must be read, nothing held is used.
        assert!(held.take_after(0, 100).is_none());
        // A read took 1..=6; then the held records follow on.
        let taken = held.take_after(6, 100).expect("held from seq 7");
        assert_eq!(seqs(&taken), [7, 8]);
    }

    #[test]
    fn records_behind_the_cursor_are_forgotten_not_handed_on_again() {
        let mut held = Held::default();
        held.extend(run(1..=5));
        // A read handed 1..=3 on while these were held.
        let taken = held.take_after(3, 100).expect("held from seq 4");
        assert_eq!(seqs(&taken), [4, 5]);
        held.extend(run(6..=7));
        held.forget_upto(10);
        assert!(held.take_after(10, 100).is_none());
        assert_eq!(held.bytes, 0);
    }

    #[test]
    fn what_is_held_stays_under_its_bound_and_keeps_the_newest() {
        let mut held = Held::default();
        let big = HELD_BYTES / 4;
        held.extend((1..=10).map(|seq| queued(seq, big)).collect());
        assert!(held.bytes <= HELD_BYTES, "{} bytes held", held.bytes);
        assert_eq!(held.records.back().map(|q| q.seq), Some(10));
        let first = held.records.front().map_or(0, |q| q.seq);
        assert!(first > 1, "the oldest went first");
        // The dropped ones are read from the WAL: nothing held answers for 0.
        assert!(held.take_after(0, 100).is_none());
        assert!(held.take_after(first - 1, 100).is_some());
        // A record larger than the bound is not held at all.
        held.extend(vec![queued(11, HELD_BYTES + 1)]);
        assert_eq!((held.records.len(), held.bytes), (0, 0));
    }
}
