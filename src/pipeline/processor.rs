//! Processor: adds enrichment and derived fields to each event
//! ([`crate::transform`]), delivers each batch to every sink concurrently (retries with
//! exponential backoff and jitter, honouring Retry-After; a circuit breaker
//! isolates a sink that keeps failing), then commits the batch: WAL entries
//! removed, built-in counters added, failures parked in the DLQ and the
//! cursor moved, all in one atomic storage commit (storage invariant 3).
//!
//! `handle` only strings the steps together: the breaker (`breaker.rs`)
//! decides what each sink may do, `fan_out` delivers, the pure
//! [`BatchAck::of`] builds the acknowledgement, `commit` writes it, and
//! `settle`, `report_sinks` and `report_batch` tell the metrics.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use ractor::{Actor, ActorProcessingErr, ActorRef};

use super::breaker::{Breaker, Decision, Policy};
use super::messages::{BatcherMsg, Observation, ProcessorMsg};
use super::{BATCHER, Context, Names, StoreWriteKind, blocking};
use crate::analytics::Wanted;
use crate::config::{Config, Durability};
use crate::event::{Queued, now_ms};
use crate::sinks::{Sink, SinkError};
use crate::storage::{BatchAck, DlqEntry, SinkFailure};

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
        match message {
            ProcessorMsg::Process { mut records, upto } => {
                let started = Instant::now();
                let context = state.context.clone();
                context.status.processing.store(upto, Ordering::SeqCst);
                let delivered_elsewhere = *context
                    .status
                    .delivered_elsewhere
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                let ack = deliver_batch(state, &mut records, upto, delivered_elsewhere).await;
                let failed = ack.dead.len() as u64;
                let ack = Arc::new(ack);
                // Its users before the commit, what the store holds after:
                // a mirror round that reads the cursor past this batch
                // shares its users before it publishes that cursor.
                if let Some(mirror) = &context.mirror {
                    mirror.note_members_of(&ack);
                }
                commit(&context, &ack).await?;
                // Cleared after the commit: a Batcher that reads 0 then reads a
                // cursor past this batch.
                context.status.processing.store(0, Ordering::SeqCst);
                if let Some(mirror) = &context.mirror {
                    mirror.note_committed(&ack);
                }
                report_batch(&records, failed, started, &context.names);
                context.names.cast(BATCHER, BatcherMsg::Done(upto));
            }
            ProcessorMsg::Foreign { mut records, reply } => {
                let started = Instant::now();
                let context = state.context.clone();
                // Another instance's seqs: none was delivered elsewhere.
                let ack = deliver_batch(state, &mut records, 0, (0, 0)).await;
                let entries: Vec<DlqEntry> = ack.dead.iter().map(|(_, e)| e.clone()).collect();
                let fsync = context.live().config.durability == Durability::Fsync;
                let parked = blocking(&context.storage, move |s| {
                    s.park(&entries)?;
                    if fsync {
                        s.flush()?;
                    }
                    Ok(())
                })
                .await;
                report_batch(&records, ack.dead.len() as u64, started, &context.names);
                let _ = reply.send(parked.map(|()| ack).map_err(|e| e.to_string()));
            }
        }
        Ok(())
    }
}

/// Enriches `records`, delivers them to every sink as the breakers allow
/// (but for the seqs in `delivered_elsewhere`, `(after, upto]`, delivered
/// by another instance that took this one's queue over: counted, not sent
/// again),
/// tells the breakers and the metrics how it went, and answers the batch's
/// acknowledgement up to `upto` (nothing is written yet).
async fn deliver_batch(
    state: &mut State,
    records: &mut [Queued],
    upto: u64,
    delivered_elsewhere: (u64, u64),
) -> BatchAck {
    let context = &state.context;
    let live = context.live();
    let config = &live.config;
    enrich(records, config);

    let asked = Instant::now();
    let plan: Vec<(Arc<dyn Sink>, Decision)> = live
        .sinks
        .iter()
        .map(|sink| (sink.clone(), state.breaker.allow(sink.name(), asked)))
        .collect();
    let (after, upto_elsewhere) = delivered_elsewhere;
    let elsewhere = |q: &Queued| after < q.seq && q.seq <= upto_elsewhere;
    let outcomes = if records.iter().any(elsewhere) {
        // DLQ replays come later, with seqs above the range.
        let to_send: Vec<Queued> = records.iter().filter(|q| !elsewhere(q)).cloned().collect();
        fan_out(&to_send, &plan, config, context).await
    } else {
        fan_out(records, &plan, config, context).await
    };

    let now = now_ms();
    let dead = unroutable(records, &live.sinks, now)
        .into_iter()
        .chain(outcomes.iter().flat_map(Outcome::dead_letters));
    let ack = BatchAck::of(records, upto, now, Wanted::of(config), dead);
    settle(
        &mut state.breaker,
        &outcomes,
        Policy::of(config),
        &context.names,
    );
    report_sinks(&state.breaker, &live.sinks, &context.names);
    ack
}

/// Adds enrichment and derived fields: the sinks, the analytics and the
/// DLQ all see the event with them.
fn enrich(records: &mut [Queued], config: &Config) {
    for q in records {
        if let Some(body) =
            crate::transform::apply(&q.record.body, &config.enrichment, &config.derive)
        {
            q.record.body = body;
        }
    }
}

/// How one sink's delivery of one micro-batch ended.
struct Outcome {
    /// The sink the micro-batch went to.
    sink: Arc<dyn Sink>,
    /// The micro-batch: the events of the batch addressed to this sink,
    /// at most `batch_size` of them.
    events: Vec<Queued>,
    /// Delivered, or how the sink failed it.
    result: Result<(), SinkFailure>,
    /// Whether the sink was called for it: not when its circuit was open,
    /// nor after an earlier micro-batch failed. Only a tried micro-batch
    /// tells the breaker anything: counting the untried ones as failures
    /// would push an open circuit's end forward with every batch, and a
    /// sink under steady traffic would never be probed again.
    tried: bool,
}

impl Outcome {
    /// Each event of a failed micro-batch with the failure: what the DLQ
    /// gets of it (nothing when it was delivered).
    fn dead_letters(&self) -> impl Iterator<Item = (&Queued, SinkFailure)> {
        self.result
            .as_ref()
            .err()
            .into_iter()
            .flat_map(|failure| self.events.iter().map(move |q| (q, failure.clone())))
    }
}

/// Delivers `records` to every sink of `plan` at once, each as the breaker
/// decided for it, and answers how each micro-batch ended: sink by sink in
/// `plan`'s order, each sink's micro-batches in order.
///
/// A sink gets the events addressed to it (all but those a DLQ replay
/// addressed to another sink) in micro-batches of `batch_size`, one at a
/// time; once one fails (after its retries), the rest go to the DLQ with
/// the same error rather than wait through the retries again.
async fn fan_out(
    records: &[Queued],
    plan: &[(Arc<dyn Sink>, Decision)],
    config: &Config,
    context: &Context,
) -> Vec<Outcome> {
    let deliveries = plan.iter().map(|(sink, decision)| async move {
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
        let mut outcomes: Vec<Outcome> = Vec::new();
        for chunk in events.chunks(config.batch_size.max(1)) {
            let (result, tried) = match outcomes.last() {
                Some(Outcome {
                    result: Err(failure),
                    ..
                }) => (Err(failure.clone()), false),
                _ => (
                    deliver(sink.as_ref(), chunk, config, *decision, context).await,
                    !matches!(decision, Decision::Skip { .. }),
                ),
            };
            outcomes.push(Outcome {
                sink: sink.clone(),
                events: chunk.to_vec(),
                result,
                tried,
            });
        }
        outcomes
    });
    join_all(deliveries).await.into_iter().flatten().collect()
}

/// Tells the breaker how each tried micro-batch went (a circuit may close
/// or open), and the metrics what was delivered and what was dead-lettered.
fn settle(breaker: &mut Breaker, outcomes: &[Outcome], policy: Policy, names: &Names) {
    for Outcome {
        sink,
        events,
        result,
        tried,
    } in outcomes
    {
        match result {
            Ok(()) => {
                breaker.record_success(sink.name());
                if !events.is_empty() {
                    names.observe(Observation::Delivered {
                        sink: sink.name().to_owned(),
                        count: events.len() as u64,
                    });
                }
            }
            Err(f) => {
                if *tried {
                    breaker.record_failure(sink.name(), &f.error, policy, Instant::now());
                }
                tracing::warn!(sink = sink.name(), events = events.len(), attempts = f.attempts,
                    error = %f.error, "delivery failed; events parked in the DLQ");
                names.observe(Observation::DeadLettered {
                    sink: sink.name().to_owned(),
                    count: events.len() as u64,
                });
            }
        }
    }
}

/// Where each configured sink's circuit stands, for `/stats/summary`, the
/// dashboard and `inletd_sink_circuit_open` (a sink no batch reached yet
/// is left as it is shown: ok).
fn report_sinks(breaker: &Breaker, sinks: &[Arc<dyn Sink>], names: &Names) {
    for sink in sinks {
        if let Some(health) = breaker.health(sink.name(), Instant::now(), now_ms()) {
            names.observe(Observation::Sink(health));
        }
    }
}

/// Logs a committed batch and gives the metrics its size, failures and
/// each event's receipt→processed latency.
fn report_batch(records: &[Queued], failed: u64, started: Instant, names: &Names) {
    let done_ms = now_ms();
    let latencies: Vec<f64> = records
        .iter()
        .map(|q| (done_ms - q.record.received_at_ms).max(0) as f64 / 1000.0)
        .collect();
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
        for q in records {
            tracing::debug!(event_type = %q.record.event_type, key = %q.record.key,
                latency_ms = done_ms - q.record.received_at_ms, "processed");
        }
    }
    names.observe(Observation::Batch {
        events: records.len() as u64,
        failed,
        latencies,
    });
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
async fn commit(context: &Arc<Context>, ack: &Arc<BatchAck>) -> Result<(), ActorProcessingErr> {
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
    use std::sync::Mutex;

    use super::*;
    use crate::event::WalRecord;
    use crate::pipeline::Live;
    use crate::sinks::Delivery;
    use crate::storage::memory::MemoryStorage;

    /// A sink that gives every delivery the same answer.
    struct Scripted {
        /// The sink's name.
        name: &'static str,
        /// What each delivery answers.
        answer: Result<(), SinkError>,
        /// The seqs of each delivery tried, in order.
        tried: Mutex<Vec<Vec<u64>>>,
    }

    impl Scripted {
        fn new(name: &'static str, answer: Result<(), SinkError>) -> Arc<Self> {
            Arc::new(Scripted {
                name,
                answer,
                tried: Mutex::new(Vec::new()),
            })
        }

        fn tried(&self) -> Vec<Vec<u64>> {
            self.tried.lock().unwrap().clone()
        }
    }

    impl Sink for Scripted {
        fn name(&self) -> &str {
            self.name
        }

        fn deliver<'a>(&'a self, events: &'a [Queued]) -> Delivery<'a> {
            Box::pin(async move {
                let seqs = events.iter().map(|q| q.seq).collect();
                self.tried.lock().unwrap().push(seqs);
                self.answer.clone()
            })
        }
    }

    fn queued(seq: u64, only_sink: Option<&str>) -> Queued {
        Queued {
            seq,
            record: WalRecord {
                source: "default".into(),
                key: format!("k{seq}"),
                event_type: "signup".into(),
                received_at_ms: 0,
                occurred_at_ms: 0,
                only_sink: only_sink.map(Into::into),
                body: "{}".into(),
            },
        }
    }

    fn context(config: &Config) -> Context {
        Context::new(
            Live::new(config.clone(), Some(Vec::new())),
            Arc::new(MemoryStorage::new()),
        )
    }

    /// An outcome as the tests compare it: the sink, the seqs, and the
    /// error and attempts if it failed.
    type Seen<'a> = (&'a str, Vec<u64>, Option<(&'a str, u32)>);

    fn summary(outcomes: &[Outcome]) -> Vec<Seen<'_>> {
        outcomes
            .iter()
            .map(|o| {
                let seqs = o.events.iter().map(|q| q.seq).collect();
                let failed = o.result.as_ref().err();
                let failed = failed.map(|f| (f.error.as_str(), f.attempts));
                (o.sink.name(), seqs, failed)
            })
            .collect()
    }

    #[tokio::test]
    async fn a_sink_that_fails_a_micro_batch_is_not_tried_with_the_rest() {
        let config = Config {
            batch_size: 2,
            max_retries: 0,
            ..Config::default()
        };
        let failing = Scripted::new("dashboard", Err(SinkError::Permanent("400".into())));
        let healthy = Scripted::new("warehouse", Ok(()));
        let plan: Vec<(Arc<dyn Sink>, Decision)> = vec![
            (failing.clone(), Decision::Deliver),
            (healthy.clone(), Decision::Deliver),
        ];
        // Seq 3 is a DLQ replay addressed to the warehouse only.
        let records: Vec<Queued> = (1..=5)
            .map(|seq| queued(seq, (seq == 3).then_some("warehouse")))
            .collect();

        let outcomes = fan_out(&records, &plan, &config, &context(&config)).await;

        assert_eq!(failing.tried(), vec![vec![1, 2]]);
        assert_eq!(healthy.tried(), vec![vec![1, 2], vec![3, 4], vec![5]]);
        assert_eq!(
            summary(&outcomes),
            vec![
                ("dashboard", vec![1, 2], Some(("400", 1))),
                ("dashboard", vec![4, 5], Some(("400", 1))),
                ("warehouse", vec![1, 2], None),
                ("warehouse", vec![3, 4], None),
                ("warehouse", vec![5], None),
            ]
        );
        let dead: Vec<(u64, String)> = outcomes
            .iter()
            .flat_map(Outcome::dead_letters)
            .map(|(q, f)| (q.seq, f.sink))
            .collect();
        let dashboard = |seq| (seq, "dashboard".to_owned());
        assert_eq!(dead, [1, 2, 4, 5].map(dashboard));
    }

    #[tokio::test]
    async fn an_open_circuit_under_steady_traffic_is_probed_after_its_cool_down() {
        let config = Config {
            max_retries: 0,
            ..Config::default()
        };
        let policy = Policy {
            failures: 1,
            cooldown: Duration::from_secs(10),
        };
        let context = context(&config);
        let sink = Scripted::new("dashboard", Err(SinkError::Permanent("500".into())));
        let records: Vec<Queued> = (1..=2).map(|seq| queued(seq, None)).collect();
        let mut breaker = Breaker::new();
        let batch = async |breaker: &mut Breaker| {
            let plan: Vec<(Arc<dyn Sink>, Decision)> =
                vec![(sink.clone(), breaker.allow("dashboard", Instant::now()))];
            let outcomes = fan_out(&records, &plan, &config, &context).await;
            settle(breaker, &outcomes, policy, &context.names);
            plan[0].1
        };

        assert_eq!(batch(&mut breaker).await, Decision::Deliver);
        // The circuit opened no later than now, so it ends by `cool_down_over`.
        let cool_down_over = Instant::now() + policy.cooldown + Duration::from_millis(1);
        // Batches keep coming while it is open, each skipped: none may push
        // its end further out (each is at least 5 ms later than the failure).
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(5)).await;
            assert_eq!(
                batch(&mut breaker).await,
                Decision::Skip { failures: 1 },
                "the failure count stays that of the batches tried"
            );
        }
        assert_eq!(breaker.allow("dashboard", cool_down_over), Decision::Probe);
        assert_eq!(sink.tried().len(), 1, "the open circuit called nothing");
    }

    #[tokio::test]
    async fn an_open_circuit_sends_nothing_and_a_probe_is_not_retried() {
        let config = Config {
            batch_size: 2,
            max_retries: 2,
            retry_base_ms: 1,
            retry_max_ms: 1,
            ..Config::default()
        };
        let busy = || {
            Err(SinkError::Retryable {
                message: "503".into(),
                retry_after: None,
            })
        };
        let closed = Scripted::new("closed", busy());
        let probed = Scripted::new("probed", busy());
        let open = Scripted::new("open", Ok(()));
        let plan: Vec<(Arc<dyn Sink>, Decision)> = vec![
            (closed.clone(), Decision::Deliver),
            (probed.clone(), Decision::Probe),
            (open.clone(), Decision::Skip { failures: 4 }),
        ];
        let records: Vec<Queued> = (1..=3).map(|seq| queued(seq, None)).collect();

        let outcomes = fan_out(&records, &plan, &config, &context(&config)).await;

        assert_eq!(closed.tried(), vec![vec![1, 2]; 3], "max_retries = 2");
        assert_eq!(probed.tried(), vec![vec![1, 2]], "one probe");
        assert_eq!(open.tried(), Vec::<Vec<u64>>::new());
        let skipped = "circuit open after 4 failed batches";
        assert_eq!(
            summary(&outcomes),
            vec![
                ("closed", vec![1, 2], Some(("503", 3))),
                ("closed", vec![3], Some(("503", 3))),
                ("probed", vec![1, 2], Some(("503", 1))),
                ("probed", vec![3], Some(("503", 1))),
                ("open", vec![1, 2], Some((skipped, 0))),
                ("open", vec![3], Some((skipped, 0))),
            ]
        );
        let Err(failure) = &outcomes[4].result else {
            panic!("skipped, not delivered");
        };
        assert_eq!(failure.first_failed_ms, failure.last_failed_ms);
    }

    #[test]
    fn an_event_for_a_sink_no_longer_configured_fails_untried() {
        let dashboard: Arc<dyn Sink> = Scripted::new("dashboard", Ok(()));
        let records = [
            queued(1, None),
            queued(2, Some("dashboard")),
            queued(3, Some("gone")),
        ];
        let dead = unroutable(&records, &[dashboard], 77);
        assert_eq!(
            dead,
            vec![(
                &records[2],
                SinkFailure {
                    sink: "gone".into(),
                    error: "sink `gone` is not configured".into(),
                    attempts: 0,
                    first_failed_ms: 77,
                    last_failed_ms: 77,
                }
            )]
        );
    }

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
