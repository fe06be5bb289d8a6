//! Takeover: with Redis on, a background task delivers what an instance
//! that stopped beating left queued, and counts it in that instance's
//! figures. The protocol (locks, fencing, why counts stay exact) is in
//! [`crate::mirror`]'s `handoff.rs`; this task strings the steps together:
//! find and lock an orphan, take a chunk, have the Processor deliver it
//! (its failures go to this instance's DLQ), record it, until the orphan's
//! stream holds nothing after its cursor, it beats again, or another
//! instance holds the lock.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::messages::ProcessorMsg;
use super::{Context, PROCESSOR, every_publish_interval};
use crate::mirror::{Mirror, MirrorError, Orphan, TakenCounts};

/// Every `publish_interval_ms`: look for an orphan and take it over.
pub async fn takeover_rounds(context: Arc<Context>, mirror: Arc<Mirror>) {
    let mut every = every_publish_interval(&context);
    // An instance is taken over only once this one has also seen it silent
    // this long (`handoff.rs`): a Redis that lost its data has lost every
    // heartbeat at once.
    let grace = every.period() * 3;
    let mut silent_since: HashMap<String, Instant> = HashMap::new();
    loop {
        every.tick().await;
        if !mirror.is_up() || context.status.draining.load(Ordering::SeqCst) {
            // Silence seen before an outage of our own proves nothing.
            silent_since.clear();
            continue;
        }
        let silent = match mirror.silent_with_events().await {
            Ok(silent) => silent,
            Err(e) => {
                tracing::debug!(error = %e, "looking for stopped instances failed");
                silent_since.clear();
                continue;
            }
        };
        let now = Instant::now();
        silent_since.retain(|name, _| silent.contains(name));
        for name in silent {
            let since = *silent_since.entry(name.clone()).or_insert(now);
            if now.duration_since(since) < grace {
                continue;
            }
            match mirror.lock_orphan(&name).await {
                Ok(Some(orphan)) => {
                    mirror.took_over(&orphan);
                    if let Err(e) = take_over(&context, &mirror, &orphan).await {
                        tracing::warn!(orphan = %orphan.name, error = %e,
                            "taking over a stopped instance's events paused; the next round goes on");
                    }
                    break;
                }
                Ok(None) => {}
                Err(e) => tracing::debug!(error = %e, "locking a stopped instance failed"),
            }
        }
    }
}

/// Why a chunk of a takeover was not recorded.
#[derive(Debug, thiserror::Error)]
enum TakeoverError {
    #[error(transparent)]
    Redis(#[from] MirrorError),
    #[error("the processor did not deliver the chunk: {0}")]
    Processor(String),
}

/// Takes `orphan`'s chunks one by one until its stream holds nothing after
/// its cursor, the lock is lost, or it beats again.
async fn take_over(
    context: &Context,
    mirror: &Mirror,
    orphan: &Orphan,
) -> Result<(), TakeoverError> {
    let mut delivered = 0usize;
    while let Some(mut taken) = mirror.take(orphan).await? {
        if context.status.draining.load(Ordering::SeqCst) {
            break;
        }
        // Moved to the Processor: recording needs only the chunk's bounds.
        let events = std::mem::take(&mut taken.events);
        let ack = if events.is_empty() {
            Default::default()
        } else {
            let processor = context
                .names
                .find(PROCESSOR)
                .ok_or_else(|| TakeoverError::Processor("it is restarting".into()))?;
            match processor
                .call(
                    |reply| ProcessorMsg::Foreign {
                        records: events,
                        reply,
                    },
                    None,
                )
                .await
            {
                Ok(ractor::rpc::CallResult::Success(ack)) => {
                    ack.map_err(TakeoverError::Processor)?
                }
                _ => return Err(TakeoverError::Processor("it stopped".into())),
            }
        };
        // Once the chunk is recorded no instance delivers it again, so its
        // users go to the deployment's sets first (adding them twice, had
        // another instance delivered it meanwhile, changes nothing).
        mirror.share_members_of(&ack).await?;
        if !mirror
            .record_taken(orphan, &taken, &TakenCounts::of(&ack))
            .await?
        {
            tracing::info!(orphan = %orphan.name, "takeover over: the instance beats again or another took it");
            return Ok(());
        }
        mirror.note_committed(&ack);
        delivered += ack.processed.len();
    }
    mirror
        .finish(orphan, context.live().config.idempotency_ttl_ms())
        .await?;
    tracing::info!(orphan = %orphan.name, events = delivered,
        "a stopped instance's queued events are delivered");
    Ok(())
}
