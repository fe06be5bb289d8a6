//! Metrics: every actor reports observations here; `/metrics` renders them
//! in the Prometheus text format (with the queue and DLQ gauges read at
//! render time).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use ractor::{Actor, ActorProcessingErr, ActorRef};

use super::messages::{
    LatencySummary, LiveFigures, MetricsMsg, Observation, RATE_SECONDS, RateSeries, SinkHealth,
    SinkState,
};
use super::{Context, blocking};
use crate::event::now_ms;

/// The Metrics actor.
pub struct Metrics;

/// Upper bounds (seconds) of the latency histogram buckets.
const BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// A cumulative latency histogram.
#[derive(Debug, Default, Clone)]
pub struct Histogram {
    /// Observations at or below each bound of `BUCKETS`.
    counts: [u64; BUCKETS.len()],
    /// All observations.
    count: u64,
    /// Their sum in seconds.
    sum: f64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&mut self, seconds: f64) {
        for (bound, count) in BUCKETS.iter().zip(self.counts.iter_mut()) {
            if seconds <= *bound {
                *count += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }

    /// The `q` quantile in seconds, interpolated within its bucket; 0 when empty.
    pub fn quantile(&self, q: f64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let rank = q * self.count as f64;
        let mut lower = (0.0, 0u64);
        for (bound, count) in BUCKETS.iter().zip(self.counts.iter()) {
            if *count as f64 >= rank {
                let in_bucket = (*count - lower.1).max(1) as f64;
                return lower.0
                    + (bound - lower.0) * ((rank - lower.1 as f64) / in_bucket).clamp(0.0, 1.0);
            }
            lower = (*bound, *count);
        }
        BUCKETS[BUCKETS.len() - 1]
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, count) in BUCKETS.iter().zip(self.counts.iter()) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", self.sum, self.count);
    }
}

/// Metrics state.
pub struct State {
    /// Status and storage for the gauges.
    context: Arc<Context>,
    /// (metric, label pair or "") → value.
    counters: BTreeMap<(&'static str, String), u64>,
    /// receipt→accepted, per request.
    ack_latency: Histogram,
    /// receipt→processed, per event.
    process_latency: Histogram,
    /// Each sink's breaker state, as the Processor last reported it.
    sinks: BTreeMap<String, SinkHealth>,
    /// Events accepted and processed per second: the dashboard's chart.
    rate: Rate,
}

/// Per-second counts in a ring: slot `s % len` holds unix second `s`, for
/// the [`RATE_SECONDS`] seconds before `newest` and `newest` itself (the
/// second in progress, not reported until it is whole).
#[derive(Debug)]
struct Rate {
    /// The unix second of the newest slot.
    newest: i64,
    /// Events accepted, per slot.
    accepted: Vec<u64>,
    /// Events processed, per slot.
    processed: Vec<u64>,
}

impl Default for Rate {
    fn default() -> Self {
        Rate {
            newest: 0,
            accepted: vec![0; RATE_SECONDS + 1],
            processed: vec![0; RATE_SECONDS + 1],
        }
    }
}

impl Rate {
    fn slot(second: i64) -> usize {
        second.rem_euclid(RATE_SECONDS as i64 + 1) as usize
    }

    /// Moves the ring on to `second`, emptying the slots it passes.
    fn advance(&mut self, second: i64) {
        let steps = (second - self.newest).clamp(0, RATE_SECONDS as i64 + 1);
        for s in second - steps + 1..=second {
            self.accepted[Self::slot(s)] = 0;
            self.processed[Self::slot(s)] = 0;
        }
        self.newest = self.newest.max(second);
    }

    /// Counts events at `at_ms` (a time the ring has passed is dropped).
    fn add(&mut self, at_ms: i64, accepted: u64, processed: u64) {
        let second = at_ms.div_euclid(1000);
        self.advance(second);
        if second <= self.newest - RATE_SECONDS as i64 {
            return;
        }
        self.accepted[Self::slot(second)] += accepted;
        self.processed[Self::slot(second)] += processed;
    }

    /// The whole seconds before `now_ms`, oldest first.
    fn series(&mut self, now_ms: i64) -> RateSeries {
        let now = now_ms.div_euclid(1000);
        self.advance(now);
        let seconds = now - RATE_SECONDS as i64..now;
        RateSeries {
            end_ms: now * 1000,
            accepted: seconds
                .clone()
                .map(|s| self.accepted[Self::slot(s)])
                .collect(),
            processed: seconds.map(|s| self.processed[Self::slot(s)]).collect(),
        }
    }
}

/// The Metrics actor starts from the pipeline context.
pub type Arguments = Arc<Context>;

/// Every counter: name, help text, and whether it carries a label (a
/// labelled counter has no line until its first event).
const COUNTERS: &[(&str, &str, bool)] = &[
    (
        "inletd_events_accepted_total",
        "Events stored in the write-ahead queue.",
        false,
    ),
    (
        "inletd_events_duplicate_total",
        "Events dropped as duplicates of a known idempotency key.",
        false,
    ),
    (
        "inletd_rejected_total",
        "Requests or events refused, by reason.",
        true,
    ),
    ("inletd_batches_total", "Micro-batches processed.", false),
    (
        "inletd_events_processed_total",
        "Events processed (acknowledged in the WAL).",
        false,
    ),
    (
        "inletd_events_failed_total",
        "Event deliveries parked in the DLQ.",
        false,
    ),
    (
        "inletd_sink_delivered_total",
        "Events delivered, by sink.",
        true,
    ),
    (
        "inletd_sink_retries_total",
        "Delivery retries, by sink.",
        true,
    ),
    (
        "inletd_dlq_events_total",
        "Events parked in the DLQ, by sink.",
        true,
    ),
    (
        "inletd_quarantined_total",
        "Damaged WAL records moved to quarantine (their positions are logged).",
        false,
    ),
    (
        "inletd_actor_restarts_total",
        "Actor restarts by the supervisor, by actor.",
        true,
    ),
];

impl State {
    fn add(&mut self, metric: &'static str, label: String, n: u64) {
        *self.counters.entry((metric, label)).or_default() += n;
    }

    /// The exposition; `dlq` is the DLQ's size, read off the runtime.
    fn render(&self, dlq: u64, missing: u64) -> String {
        let mut out = String::new();
        for (metric, help, labelled) in COUNTERS {
            let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} counter");
            let mut any = false;
            for ((m, label), value) in self.counters.range((*metric, String::new())..) {
                if m != metric {
                    break;
                }
                any = true;
                if label.is_empty() {
                    let _ = writeln!(out, "{metric} {value}");
                } else {
                    let _ = writeln!(out, "{metric}{{{label}}} {value}");
                }
            }
            if !any && !labelled {
                let _ = writeln!(out, "{metric} 0");
            }
        }
        self.ack_latency.render(
            &mut out,
            "inletd_ack_latency_seconds",
            "Receipt to durable answer, per request.",
        );
        self.process_latency.render(
            &mut out,
            "inletd_processing_latency_seconds",
            "Receipt to processed, per event.",
        );
        let status = &self.context.status;
        let gauges = [
            (
                "inletd_queue_depth",
                "Events waiting in the write-ahead queue.",
                status.queue_depth(),
            ),
            ("inletd_dlq_size", "Entries in the dead-letter queue.", dlq),
            (
                "inletd_draining",
                "1 while draining after SIGTERM.",
                u64::from(status.draining.load(Ordering::Relaxed)),
            ),
            (
                "inletd_storage_failed",
                "1 after a failed commit, until one succeeds.",
                u64::from(status.storage_failed.load(Ordering::Relaxed)),
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
        let open = "inletd_sink_circuit_open";
        let _ = writeln!(
            out,
            "# HELP {open} 1 while a sink's circuit breaker isolates it, by sink.\n# TYPE {open} gauge"
        );
        for (name, health) in &self.sinks {
            let value = u8::from(health.state == SinkState::Open);
            let _ = writeln!(out, "{open}{{{}}} {value}", label("sink", name));
        }
        let _ = writeln!(
            out,
            "# HELP inletd_store_missing_reports_total Times the store was found holding less than it had acknowledged (logged as: acknowledged events are missing).\n\
             # TYPE inletd_store_missing_reports_total counter\n\
             inletd_store_missing_reports_total {missing}"
        );
        if let Some(mirror) = &self.context.mirror {
            mirror.render_metrics(&mut out);
        }
        crate::process::ProcessFigures::read().render(&mut out);
        crate::process::render_build_info(&mut out);
        out
    }
}

fn label(key: &str, value: &str) -> String {
    let escaped = value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    format!("{key}=\"{escaped}\"")
}

impl Actor for Metrics {
    type Msg = MetricsMsg;
    type State = State;
    type Arguments = Arguments;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        context: Arguments,
    ) -> Result<State, ActorProcessingErr> {
        Ok(State {
            context,
            counters: BTreeMap::new(),
            ack_latency: Histogram::default(),
            process_latency: Histogram::default(),
            sinks: BTreeMap::new(),
            rate: Rate::default(),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            MetricsMsg::Render(reply) => {
                let (dlq, missing) = blocking(&state.context.storage, |s| {
                    Ok((s.dlq_len()?, s.missing_reports()))
                })
                .await
                .unwrap_or((0, 0));
                let _ = reply.send(state.render(dlq, missing));
            }
            MetricsMsg::Live(reply) => {
                let ms = |h: &Histogram, q| (h.quantile(q) * 1000.0 * 100.0).round() / 100.0;
                let _ = reply.send(LiveFigures {
                    latency: LatencySummary {
                        p50: ms(&state.process_latency, 0.5),
                        p99: ms(&state.process_latency, 0.99),
                        ack_p50: ms(&state.ack_latency, 0.5),
                        ack_p99: ms(&state.ack_latency, 0.99),
                    },
                    sinks: state.sinks.values().cloned().collect(),
                    rate: state.rate.series(now_ms()),
                });
            }
            MetricsMsg::Observe(o) => match o {
                Observation::Ingested {
                    accepted,
                    duplicates,
                    latencies,
                } => {
                    state.add("inletd_events_accepted_total", String::new(), accepted);
                    state.add("inletd_events_duplicate_total", String::new(), duplicates);
                    for seconds in latencies {
                        state.ack_latency.observe(seconds);
                    }
                    state.rate.add(now_ms(), accepted, 0);
                }
                Observation::Rejected { reason, count } => {
                    state.add("inletd_rejected_total", label("reason", reason), count)
                }
                Observation::Batch {
                    events,
                    failed,
                    latencies,
                } => {
                    state.add("inletd_batches_total", String::new(), 1);
                    state.add("inletd_events_processed_total", String::new(), events);
                    state.add("inletd_events_failed_total", String::new(), failed);
                    state.rate.add(now_ms(), 0, events);
                    for l in latencies {
                        state.process_latency.observe(l);
                    }
                }
                Observation::Retry { sink, error } => {
                    state.add("inletd_sink_retries_total", label("sink", &sink), 1);
                    let health = state
                        .sinks
                        .entry(sink)
                        .or_insert_with_key(|name| SinkHealth::ok(name));
                    if health.state != SinkState::Open {
                        health.state = SinkState::Retrying;
                    }
                    health.last_error = Some(error);
                }
                Observation::Sink(health) => {
                    state.sinks.insert(health.name.clone(), health);
                }
                Observation::DeadLettered { sink, count } => {
                    state.add("inletd_dlq_events_total", label("sink", &sink), count)
                }
                Observation::Delivered { sink, count } => {
                    state.add("inletd_sink_delivered_total", label("sink", &sink), count)
                }
                Observation::Quarantined { count } => {
                    state.add("inletd_quarantined_total", String::new(), count)
                }
                Observation::Restart { actor } => {
                    state.add("inletd_actor_restarts_total", label("actor", actor), 1)
                }
            },
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = Histogram::default();
        h.observe(0.003);
        h.observe(2.0);
        assert_eq!(h.count, 2);
        assert_eq!(h.counts[2], 0); // le 0.0025
        assert_eq!(h.counts[3], 1); // le 0.005
        assert_eq!(h.counts[BUCKETS.len() - 1], 2);
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 2"), "{out}");
        let p50 = h.quantile(0.5);
        assert!(p50 > 0.0025 && p50 <= 0.005, "{p50}");
        assert!(h.quantile(0.99) > 1.0 && h.quantile(0.99) <= 2.5);
        assert_eq!(Histogram::default().quantile(0.5), 0.0);
    }

    #[test]
    fn the_rate_reports_whole_seconds_and_forgets_old_ones() {
        let mut rate = Rate::default();
        let t0 = 1_700_000_000_000;
        rate.add(t0, 5, 0);
        rate.add(t0 + 999, 2, 3);
        rate.add(t0 + 2_000, 1, 0);
        // The second in progress is not reported yet.
        let series = rate.series(t0 + 2_500);
        assert_eq!(series.accepted.len(), RATE_SECONDS);
        assert_eq!(series.end_ms, t0 + 2_000);
        assert_eq!(&series.accepted[RATE_SECONDS - 2..], &[7, 0]);
        assert_eq!(&series.processed[RATE_SECONDS - 2..], &[3, 0]);
        let series = rate.series(t0 + 3_000);
        assert_eq!(&series.accepted[RATE_SECONDS - 3..], &[7, 0, 1]);
        // Five minutes on, the first second has left the window; a late
        // count for it is dropped rather than counted as a new second.
        let later = t0 + 1_000 * RATE_SECONDS as i64;
        rate.add(t0, 9, 0);
        let series = rate.series(later + 1_000);
        assert_eq!(
            series.accepted.iter().sum::<u64>(),
            1,
            "{:?}",
            series.accepted
        );
        rate.add(t0, 9, 0);
        assert_eq!(rate.series(later + 1_000).accepted.iter().sum::<u64>(), 1);
        // After a long pause the ring is empty, not stale.
        assert!(
            rate.series(later + 3_600_000)
                .accepted
                .iter()
                .all(|n| *n == 0)
        );
    }
}
