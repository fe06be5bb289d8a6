//! Takeover: with Redis on, a background task delivers what an instance
//! that stopped beating left queued, and counts it in that instance's
//! figures. The protocol (locks, fencing, why counts stay exact) is in
//! [`crate::mirror`]'s `handoff.rs`; this task strings the steps together:
//! find and lock an orphan, take a chunk, have the Processor deliver it
//! (its failures go to this instance's DLQ), record it, until the orphan's
//! stream is empty or the lock is lost.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::messages::ProcessorMsg;
use super::{Context, PROCESSOR};
use crate::mirror::{Mirror, MirrorError, Orphan, TakenCounts};

/// Every `publish_interval_ms`: look for an orphan and take it over.
pub async fn takeover_rounds(context: Arc<Context>, mirror: Arc<Mirror>) {
    let period = Duration::from_millis(context.live().config.redis.publish_interval_ms);
    let mut every = tokio::time::interval(period);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if !mirror.is_up() || context.status.draining.load(Ordering::SeqCst) {
            continue;
        }
        match mirror.find_orphan().await {
            Ok(Some(orphan)) => {
                mirror.took_over(&orphan);
                if let Err(e) = take_over(&context, &mirror, &orphan).await {
                    tracing::warn!(orphan = %orphan.name, error = %e,
                        "taking over a stopped instance's events paused; the next round goes on");
                }
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "looking for stopped instances failed"),
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
    while let Some(taken) = mirror.take(orphan).await? {
        if context.status.draining.load(Ordering::SeqCst) {
            break;
        }
        let events = taken.events.clone();
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
        if !mirror
            .record_taken(orphan, &taken, &TakenCounts::of(&ack))
            .await?
        {
            tracing::info!(orphan = %orphan.name, "takeover over: the instance beats again or another took it");
            return Ok(());
        }
        mirror.note_active(ack.active_users());
        delivered += taken.events.len();
    }
    tracing::info!(orphan = %orphan.name, events = delivered,
        "a stopped instance's queued events are delivered");
    Ok(())
}
