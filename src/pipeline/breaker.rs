//! The circuit breaker: one circuit per sink, so that a sink that keeps
//! failing is isolated (its batches go to the DLQ untried) instead of
//! holding every batch through its retries.
//!
//! A circuit is *closed* while its sink's batches are delivered. After
//! `breaker_failures` failed batches in a row it *opens* for
//! `breaker_cooldown_ms`; once the cool-down is over it lets one probe
//! through (*half-open*, no retries). A delivered batch closes it; a failed
//! one opens it again for another cool-down.
//!
//! The breaker reads no clock: every call that depends on time is given it,
//! so that the tests below can walk a circuit through its states.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::messages::{SinkHealth, SinkState};
use crate::config::Config;

/// When a circuit opens and for how long; read from the config for each
/// batch, so that a reload applies to the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Failed batches in a row that open a circuit (`breaker_failures`).
    pub failures: u32,
    /// How long an open circuit skips its sink (`breaker_cooldown_ms`).
    pub cooldown: Duration,
}

impl Policy {
    /// The policy `config` sets.
    pub fn of(config: &Config) -> Self {
        Policy {
            failures: config.breaker_failures,
            cooldown: Duration::from_millis(config.breaker_cooldown_ms),
        }
    }
}

/// What the breaker lets a sink do with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The circuit is closed: deliver, with the configured retries.
    Deliver,
    /// The cool-down is over: one probe, no retries.
    Probe,
    /// The circuit is open: do not try the sink.
    Skip {
        /// The batches in a row the sink failed, for the DLQ entry's error.
        failures: u32,
    },
}

/// The circuit of every sink that a batch has reached since the
/// Processor started.
#[derive(Debug, Default)]
pub struct Breaker {
    /// Each sink's circuit, by sink name.
    circuits: HashMap<String, Circuit>,
}

/// One sink's circuit.
#[derive(Debug, Default, Clone)]
struct Circuit {
    /// Batches in a row that this sink failed.
    consecutive_failures: u32,
    /// Set once the circuit opened: until then the sink is skipped, after
    /// it probed (half-open). Cleared by a success.
    open_until: Option<Instant>,
    /// The error of the last failed batch, for `/stats/summary`.
    last_error: Option<String>,
}

impl Breaker {
    /// A breaker with every circuit closed.
    pub fn new() -> Self {
        Breaker::default()
    }

    /// What `sink` may do with a batch at `now`.
    pub fn allow(&self, sink: &str, now: Instant) -> Decision {
        let Some(circuit) = self.circuits.get(sink) else {
            return Decision::Deliver;
        };
        match circuit.open_until {
            Some(until) if until > now => Decision::Skip {
                failures: circuit.consecutive_failures,
            },
            Some(_) => Decision::Probe,
            None => Decision::Deliver,
        }
    }

    /// `sink` delivered a batch: its circuit closes and forgets its failures.
    pub fn record_success(&mut self, sink: &str) {
        let circuit = self.circuits.entry(sink.to_owned()).or_default();
        if circuit.consecutive_failures > 0 || circuit.open_until.is_some() {
            tracing::info!(sink, "sink recovered; circuit closed");
        }
        *circuit = Circuit::default();
    }

    /// `sink` was tried with a batch at `now` and failed with `error` (a
    /// batch its open circuit skipped is not a failure: it would push the
    /// circuit's end forward, and a sink under steady traffic would never
    /// be probed again). Once it has failed `policy.failures` in a row, its
    /// circuit opens (again) until `now + policy.cooldown`.
    pub fn record_failure(&mut self, sink: &str, error: &str, policy: Policy, now: Instant) {
        let circuit = self.circuits.entry(sink.to_owned()).or_default();
        circuit.consecutive_failures += 1;
        if circuit.consecutive_failures >= policy.failures {
            circuit.open_until = Some(now + policy.cooldown);
            tracing::warn!(
                sink,
                failures = circuit.consecutive_failures,
                cooldown_ms = policy.cooldown.as_millis() as u64,
                "circuit open: sink isolated"
            );
        }
        circuit.last_error = Some(error.to_owned());
    }

    /// How `/stats/summary` and the dashboard show `sink`'s circuit, at
    /// `now` on the monotonic clock and `now_ms` on the wall clock; `None`
    /// until a batch reached the sink.
    pub fn health(&self, sink: &str, now: Instant, now_ms: i64) -> Option<SinkHealth> {
        let circuit = self.circuits.get(sink)?;
        let open_until_ms = circuit.open_until.map(|until| {
            let left = until.saturating_duration_since(now);
            now_ms + left.as_millis() as i64
        });
        Some(SinkHealth {
            name: sink.to_owned(),
            state: match (open_until_ms, circuit.consecutive_failures) {
                (Some(_), _) => SinkState::Open,
                (None, 0) => SinkState::Ok,
                (None, _) => SinkState::Retrying,
            },
            consecutive_failures: circuit.consecutive_failures,
            last_error: circuit.last_error.clone(),
            open_until_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy = Policy {
        failures: 3,
        cooldown: Duration::from_millis(500),
    };
    /// A wall-clock time for `health` (ms since epoch).
    const WALL_MS: i64 = 1_700_000_000_000;

    fn fail(breaker: &mut Breaker, times: u32, now: Instant) {
        for i in 0..times {
            breaker.record_failure("dashboard", &format!("503 #{i}"), POLICY, now);
        }
    }

    #[test]
    fn a_sink_never_seen_is_delivered_to_and_has_no_health() {
        let breaker = Breaker::new();
        assert_eq!(
            breaker.allow("dashboard", Instant::now()),
            Decision::Deliver
        );
        assert_eq!(breaker.health("dashboard", Instant::now(), WALL_MS), None);
    }

    #[test]
    fn opens_after_the_configured_failures_in_a_row() {
        let mut breaker = Breaker::new();
        let t0 = Instant::now();
        fail(&mut breaker, 2, t0);
        assert_eq!(breaker.allow("dashboard", t0), Decision::Deliver);
        let health = breaker.health("dashboard", t0, WALL_MS).expect("seen");
        assert_eq!(health.state, SinkState::Retrying);
        assert_eq!(health.consecutive_failures, 2);
        assert_eq!(health.last_error.as_deref(), Some("503 #1"));
        assert_eq!(health.open_until_ms, None);

        fail(&mut breaker, 1, t0);
        assert_eq!(
            breaker.allow("dashboard", t0),
            Decision::Skip { failures: 3 }
        );
        assert_eq!(
            breaker.health("dashboard", t0, WALL_MS),
            Some(SinkHealth {
                name: "dashboard".into(),
                state: SinkState::Open,
                consecutive_failures: 3,
                last_error: Some("503 #0".into()),
                open_until_ms: Some(WALL_MS + 500),
            })
        );
    }

    #[test]
    fn a_success_between_failures_starts_the_count_again() {
        let mut breaker = Breaker::new();
        let t0 = Instant::now();
        fail(&mut breaker, 2, t0);
        breaker.record_success("dashboard");
        fail(&mut breaker, 2, t0);
        assert_eq!(breaker.allow("dashboard", t0), Decision::Deliver);
        let health = breaker.health("dashboard", t0, WALL_MS).expect("seen");
        assert_eq!(health.consecutive_failures, 2);
    }

    #[test]
    fn probes_once_the_cool_down_is_over() {
        let mut breaker = Breaker::new();
        let t0 = Instant::now();
        fail(&mut breaker, 3, t0);
        let almost = t0 + Duration::from_millis(499);
        assert_eq!(
            breaker.allow("dashboard", almost),
            Decision::Skip { failures: 3 }
        );
        let health = breaker.health("dashboard", almost, WALL_MS).expect("seen");
        assert_eq!(health.open_until_ms, Some(WALL_MS + 1));
        let over = t0 + POLICY.cooldown;
        assert_eq!(breaker.allow("dashboard", over), Decision::Probe);
        // Half-open still shows as open, due now.
        let health = breaker.health("dashboard", over, WALL_MS).expect("seen");
        assert_eq!(health.state, SinkState::Open);
        assert_eq!(health.open_until_ms, Some(WALL_MS));
    }

    #[test]
    fn a_failed_probe_opens_the_circuit_for_another_cool_down() {
        let mut breaker = Breaker::new();
        let t0 = Instant::now();
        fail(&mut breaker, 3, t0);
        let probe = t0 + Duration::from_millis(600);
        assert_eq!(breaker.allow("dashboard", probe), Decision::Probe);
        breaker.record_failure("dashboard", "still 503", POLICY, probe);
        assert_eq!(
            breaker.allow("dashboard", probe + Duration::from_millis(499)),
            Decision::Skip { failures: 4 }
        );
        assert_eq!(
            breaker.allow("dashboard", probe + POLICY.cooldown),
            Decision::Probe
        );
    }

    #[test]
    fn a_success_closes_the_circuit_and_clears_its_health() {
        let mut breaker = Breaker::new();
        let t0 = Instant::now();
        fail(&mut breaker, 3, t0);
        breaker.record_success("dashboard");
        let later = t0 + Duration::from_millis(1);
        assert_eq!(breaker.allow("dashboard", later), Decision::Deliver);
        assert_eq!(
            breaker.health("dashboard", later, WALL_MS),
            Some(SinkHealth::ok("dashboard"))
        );
    }

    #[test]
    fn each_sink_has_its_own_circuit() {
        let mut breaker = Breaker::new();
        let t0 = Instant::now();
        fail(&mut breaker, 3, t0);
        breaker.record_success("warehouse");
        assert_eq!(
            breaker.allow("dashboard", t0),
            Decision::Skip { failures: 3 }
        );
        assert_eq!(breaker.allow("warehouse", t0), Decision::Deliver);
        assert_eq!(
            breaker.health("warehouse", t0, WALL_MS),
            Some(SinkHealth::ok("warehouse"))
        );
    }

    #[test]
    fn the_policy_comes_from_the_breaker_keys() {
        let config = Config {
            breaker_failures: 2,
            breaker_cooldown_ms: 300,
            ..Config::default()
        };
        assert_eq!(
            Policy::of(&config),
            Policy {
                failures: 2,
                cooldown: Duration::from_millis(300),
            }
        );
    }
}
