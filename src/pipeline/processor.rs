//! Processor: adds enrichment and derived fields to each event
//! ([`crate::transform`]), delivers each batch to every sink concurrently (retries with
//! exponential backoff and jitter, honouring Retry-After; a circuit breaker
//! isolates a sink that keeps failing), then commits the batch: WAL entries
//! removed, built-in counters added, failures parked in the DLQ and the
//! cursor moved, all in one storage transaction.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use ractor::{Actor, ActorProcessingErr, ActorRef};

use super::breaker::{Breaker, Decision, Policy};
use super::messages::{BatcherMsg, Observation, ProcessorMsg};
use super::{BATCHER, Context, StoreWriteKind, blocking};
use crate::analytics::Wanted;
use crate::config::Config;
use crate::event::{Queued, now_ms};
use crate::sinks::{Sink, SinkError};
use crate::storage::{BatchAck, SinkFailure};

/// The Processor actor.
pub struct Processor;

/// Processor state.
pub struct State {
    /// Storage, config, sinks and names.
    context: Arc<Context>,
    /// Each sink's circuit breaker.
    breaker: Breaker,
}

/// The Processor starts from the pipeline context.
pub type Arguments = Arc<Context>;

impl Actor for Processor {
    type Msg = ProcessorMsg;
    type State = State;
    type Arguments = Arguments;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        context: Arguments,
    ) -> Result<State, ActorProcessingErr> {
        // A batch the failed Processor held is lost with it: the Batcher
        // is told to read it again (supervisor), not to wait for it.
        context.status.processing.store(0, Ordering::SeqCst);
        Ok(State {
            context,
            breaker: Breaker::new(),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut State,
    ) -> Result<(), ActorProcessingErr> {
        let ProcessorMsg::Process { mut records, upto } = message;
        let started = Instant::now();
        let context = state.context.clone();
        context.status.processing.store(upto, Ordering::SeqCst);
        let live = context.live();
        let config = &live.config;
        let ctx = &context;
        // Enrichment and derived fields: the sinks, the analytics and the
        // DLQ all see the event with them.
        for q in &mut records {
            if let Some(body) =
                crate::transform::apply(&q.record.body, &config.enrichment, &config.derive)
            {
                q.record.body = body;
            }
        }

        // Each sink gets the micro-batches in order, one at a time; once one
        // fails (after its retries), the rest go to the DLQ with the same error
        // rather than wait through the retries again.
        let asked = Instant::now();
        let deliveries = live.sinks.iter().map(|sink| {
            let events: Vec<Queued> = records
                .iter()
                .filter(|q| {
                    q.record
                        .only_sink
                        .as_deref()
                        .is_none_or(|s| s == sink.name())
                })
                .cloned()
                .collect();
            let decision = state.breaker.allow(sink.name(), asked);
            async move {
                let mut outcomes: Vec<(Vec<Queued>, Result<(), SinkFailure>)> = Vec::new();
                for chunk in events.chunks(config.batch_size.max(1)) {
                    let result = match outcomes.last() {
                        Some((_, Err(f))) => Err(f.clone()),
                        _ => deliver(sink.as_ref(), chunk, config, decision, ctx).await,
                    };
                    outcomes.push((chunk.to_vec(), result));
                }
                (sink.clone(), outcomes)
            }
        });
        let results: Vec<_> = join_all(deliveries)
            .await
            .into_iter()
            .flat_map(|(sink, outcomes)| {
                outcomes
                    .into_iter()
                    .map(move |(events, result)| (sink.clone(), events, result))
            })
            .collect();

        let now = now_ms();
        let mut dead = unroutable(&records, &live.sinks, now);
        let policy = Policy::of(config);
        for (sink, events, result) in &results {
            match result {
                Ok(()) => {
                    state.breaker.record_success(sink.name());
                    if !events.is_empty() {
                        context.names.observe(Observation::Delivered {
                            sink: sink.name().to_owned(),
                            count: events.len() as u64,
                        });
                    }
                }
                Err(f) => {
                    state
                        .breaker
                        .record_failure(sink.name(), &f.error, policy, Instant::now());
                    tracing::warn!(sink = sink.name(), events = events.len(), attempts = f.attempts,
                        error = %f.error, "delivery failed; events parked in the DLQ");
                    context.names.observe(Observation::DeadLettered {
                        sink: sink.name().to_owned(),
                        count: events.len() as u64,
                    });
                    dead.extend(events.iter().map(|q| (q, f.clone())));
                }
            }
        }

        let ack = BatchAck::of(&records, upto, now, Wanted::of(config), dead);

        for sink in &live.sinks {
            if let Some(health) = state.breaker.health(sink.name(), Instant::now(), now_ms()) {
                context.names.observe(Observation::Sink(health));
            }
        }

        commit(&context, ack.clone()).await?;
        // Cleared after the commit: a Batcher that reads 0 then reads a
        // cursor past this batch.
        context.status.processing.store(0, Ordering::SeqCst);

        let done_ms = now_ms();
        let latencies: Vec<f64> = records
            .iter()
            .map(|q| (done_ms - q.record.received_at_ms).max(0) as f64 / 1000.0)
            .collect();
        let failed = ack.dead.len() as u64;
        if !records.is_empty() {
            let max_latency_ms = latencies.iter().cloned().fold(0.0, f64::max) * 1000.0;
            tracing::info!(
                events = records.len(),
                success = records.len() as u64 - failed.min(records.len() as u64),
                failed,
                max_latency_ms = format!("{max_latency_ms:.1}"),
                took_ms = started.elapsed().as_millis() as u64,
                "batch complete"
            );
            for q in &records {
                tracing::debug!(event_type = %q.record.event_type, key = %q.record.key,
                    latency_ms = done_ms - q.record.received_at_ms, "processed");
            }
        }
        context.names.observe(Observation::Batch {
            events: records.len() as u64,
            failed,
            latencies,
        });
        context.names.cast(BATCHER, BatcherMsg::Done(upto));
        Ok(())
    }
}

/// The events of a batch addressed to a sink that is not configured (a
/// DLQ replay after the sink was removed): each fails at once, untried.
fn unroutable<'a>(
    records: &'a [Queued],
    sinks: &[Arc<dyn Sink>],
    now_ms: i64,
) -> Vec<(&'a Queued, SinkFailure)> {
    records
        .iter()
        .filter_map(|q| {
            let target = q.record.only_sink.as_ref()?;
            if sinks.iter().any(|s| s.name() == target) {
                return None;
            }
            let failure = SinkFailure {
                sink: target.clone(),
                error: format!("sink `{target}` is not configured"),
                attempts: 0,
                first_failed_ms: now_ms,
                last_failed_ms: now_ms,
            };
            Some((q, failure))
        })
        .collect()
}

/// Commits the batch, retrying a failing store a few times before giving up
/// (the actor then fails, is restarted, and the batch is read again).
async fn commit(context: &Arc<Context>, ack: BatchAck) -> Result<(), ActorProcessingErr> {
    let mut delay = Duration::from_millis(50);
    for attempt in 1..=5 {
        let _writing = context.status.store_writes.begin(StoreWriteKind::BatchAck {
            upto: ack.upto,
            events: ack.processed.len(),
        });
        let ack = ack.clone();
        match blocking(&context.storage, move |s| s.commit_batch(&ack)).await {
            Ok(()) => return Ok(()),
            Err(e) if attempt < 5 => {
                tracing::warn!(error = %e, attempt, "acknowledging the batch failed; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(e) => return Err(Box::new(e)),
        }
    }
    Ok(())
}

/// Delivers `events` to one sink with retries; `Err` once it gives up.
async fn deliver(
    sink: &dyn Sink,
    events: &[Queued],
    config: &Config,
    decision: Decision,
    context: &Context,
) -> Result<(), SinkFailure> {
    let attempts_allowed = match decision {
        Decision::Skip { failures } => {
            let t = now_ms();
            return Err(SinkFailure {
                sink: sink.name().to_owned(),
                error: format!("circuit open after {failures} failed batches"),
                attempts: 0,
                first_failed_ms: t,
                last_failed_ms: t,
            });
        }
        Decision::Probe => 1,
        Decision::Deliver => config.max_retries + 1,
    };
    let mut first_failed_ms = None;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let (error, retry_after) = match sink.deliver(events).await {
            Ok(()) => return Ok(()),
            Err(SinkError::Permanent(m)) => (m, None),
            Err(SinkError::Retryable {
                message,
                retry_after,
            }) => (message, Some(retry_after)),
        };
        let t = now_ms();
        let first = *first_failed_ms.get_or_insert(t);
        let give_up = |error| SinkFailure {
            sink: sink.name().to_owned(),
            error,
            attempts: attempt,
            first_failed_ms: first,
            last_failed_ms: t,
        };
        let Some(retry_after) = retry_after else {
            return Err(give_up(error));
        };
        if attempt >= attempts_allowed {
            return Err(give_up(error));
        }
        context.names.observe(Observation::Retry {
            sink: sink.name().to_owned(),
            error: error.clone(),
        });
        let delay = retry_after
            .map(|d| d.min(Duration::from_millis(config.retry_max_ms)))
            .unwrap_or_else(|| backoff(config, attempt));
        tracing::debug!(sink = sink.name(), attempt, error = %error, delay_ms = delay.as_millis() as u64, "retrying");
        tokio::time::sleep(delay).await;
    }
}

/// Exponential backoff with "equal jitter": half fixed, half random.
fn backoff(config: &Config, attempt: u32) -> Duration {
    let exp = config
        .retry_base_ms
        .saturating_mul(1u64 << (attempt - 1).min(30))
        .min(config.retry_max_ms);
    Duration::from_millis(exp / 2 + fastrand::u64(0..=exp / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_within_its_cap() {
        let config = Config {
            retry_base_ms: 100,
            retry_max_ms: 1000,
            ..Config::default()
        };
        for attempt in 1..10 {
            let d = backoff(&config, attempt).as_millis() as u64;
            let exp = (100u64 << (attempt - 1)).min(1000);
            assert!(d >= exp / 2 && d <= exp, "attempt {attempt}: {d}");
        }
    }
}
