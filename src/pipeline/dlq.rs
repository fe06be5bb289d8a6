//! DLQ: the admin side of the dead-letter queue. Entries are written by the
//! Processor inside its batch commit; this actor lists, shows, deletes and
//! replays them. A replay moves entries back into the WAL addressed to the
//! sink that failed them, at most `limit` per request, so a recovering sink
//! is fed at the Batcher's pace rather than all at once.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use ractor::{Actor, ActorProcessingErr, ActorRef};

use super::messages::{BatcherMsg, DlqItem, DlqMsg, ReplayReport};
use super::{BATCHER, Context, blocking};
use crate::storage::{Storage, StorageError};

/// The DLQ actor.
pub struct Dlq;

/// DLQ state.
pub struct State {
    /// Storage and names.
    context: Arc<Context>,
}

/// The DLQ actor starts from the pipeline context.
pub type Arguments = Arc<Context>;

impl Actor for Dlq {
    type Msg = DlqMsg;
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
        let storage = &state.context.storage;
        let text = |e: StorageError| e.to_string();
        match message {
            DlqMsg::List {
                after,
                limit,
                reply,
            } => {
                let items = blocking(storage, move |s| s.dlq_list(after, limit))
                    .await
                    .map(|v| {
                        v.into_iter()
                            .map(|(id, entry)| DlqItem { id, entry })
                            .collect()
                    })
                    .map_err(text);
                let _ = reply.send(items);
            }
            DlqMsg::Get { id, reply } => {
                let item = blocking(storage, move |s| s.dlq_get(id))
                    .await
                    .map(|e| e.map(|entry| DlqItem { id, entry }))
                    .map_err(text);
                let _ = reply.send(item);
            }
            DlqMsg::Replay { ids, limit, reply } => {
                let report = blocking(storage, move |s| replay(s, ids, limit)).await;
                if let Ok(report) = &report
                    && report.report.replayed > 0
                {
                    tracing::info!(
                        replayed = report.report.replayed,
                        "DLQ entries replayed into the queue"
                    );
                    let context = &state.context;
                    context
                        .status
                        .last_seq
                        .fetch_max(report.last_seq, Ordering::Relaxed);
                    context.names.cast(
                        BATCHER,
                        BatcherMsg::Appended {
                            upto: report.last_seq,
                            records: Vec::new(),
                        },
                    );
                }
                let _ = reply.send(report.map(|r| r.report).map_err(text));
            }
            DlqMsg::Remove { ids, reply } => {
                // Flushed before the answer, like a replay: a removal that
                // a power cut undid would bring the entries back.
                let removed = blocking(storage, move |s| {
                    let n = match ids {
                        Some(ids) => s.dlq_remove(&ids)?,
                        None => purge(s)?,
                    };
                    s.flush()?;
                    Ok(n)
                })
                .await;
                let _ = reply.send(removed.map_err(text));
            }
        }
        Ok(())
    }
}

/// What a replay did: the answer, and the last seq it appended.
struct Replayed {
    report: ReplayReport,
    last_seq: u64,
}

/// Moves up to `limit` entries (the given ones, or the oldest) back into
/// the WAL and flushes.
fn replay(
    storage: &dyn Storage,
    ids: Option<Vec<u64>>,
    limit: usize,
) -> Result<Replayed, StorageError> {
    let ids = match ids {
        Some(ids) => ids.into_iter().take(limit).collect(),
        None => storage
            .dlq_list(0, limit)?
            .into_iter()
            .map(|(id, _)| id)
            .collect::<Vec<_>>(),
    };
    let (moved, last_seq) = storage.dlq_replay(&ids)?;
    storage.flush()?;
    Ok(Replayed {
        report: ReplayReport {
            replayed: moved.len(),
            remaining: storage.dlq_len()?,
        },
        last_seq,
    })
}

fn purge(storage: &dyn Storage) -> Result<usize, StorageError> {
    let mut removed = 0;
    loop {
        let ids: Vec<u64> = storage
            .dlq_list(0, 1000)?
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        if ids.is_empty() {
            return Ok(removed);
        }
        removed += storage.dlq_remove(&ids)?;
    }
}
