//! `inletd demo SCENARIO`: four sample-traffic scenarios against a running
//! daemon, each printing what was accepted and what was a duplicate.
//!
//! Event ids carry a run id (time and randomness), so a demo run twice
//! still shows accepts; only `idempotency` repeats an id, on purpose.

use std::io::{self, Write as _};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::Outcome;
use super::client::{Client, ClientError, DaemonArgs};
use crate::config::Config;

/// Events in the `burst` scenario, all in flight at once.
const BURST_EVENTS: usize = 200;
/// Events in the `batch` scenario's one request.
const BATCH_EVENTS: usize = 20;
/// Sends of the same event in the `idempotency` scenario.
const IDEMPOTENCY_SENDS: usize = 3;
/// Event types the demos cycle through (signup, subscription, usage and more).
const EVENT_TYPES: [&str; 5] = [
    "user_signup",
    "subscription_created",
    "feature_usage",
    "page_view",
    "subscription_cancelled",
];

/// `inletd demo` arguments.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "\
Event ids are new on every run, so a demo can be repeated (idempotency repeats
one id within its run, on purpose). Exit status: 0 every answer was the
expected one; 1 some event was rejected, or the idempotency demo did not see 1
accept and the rest duplicates; 2 the daemon could not be reached.")]
pub struct Args {
    /// Which scenario to run.
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// Where the daemon is.
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

/// The sample-traffic scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Three events of different types (signup, subscription, usage), one request each.
    Basic,
    /// The same event_id sent several times: one accept, the rest duplicates.
    Idempotency,
    /// 200 events sent concurrently, with the time they took.
    Burst,
    /// One batch request of 20 events.
    Batch,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Basic => "basic",
            Scenario::Idempotency => "idempotency",
            Scenario::Burst => "burst",
            Scenario::Batch => "batch",
        }
    }
}

/// Why a demo could not run (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// Talking to the daemon failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The daemon refused the whole batch request.
    #[error("POST /webhook/batch answered {status}: {detail}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The daemon's `error: detail`.
        detail: String,
    },
    /// Stdout could not be written.
    #[error("writing the demo's output: {0}")]
    Output(io::Error),
}

/// What the daemon said about one event.
#[derive(Debug, Clone, PartialEq)]
enum Verdict {
    /// New: stored and queued.
    Accepted,
    /// Its id was seen before.
    Duplicate,
    /// Refused, with the reason.
    Rejected(String),
}

impl Verdict {
    fn label(&self) -> &str {
        match self {
            Verdict::Accepted => "accepted",
            Verdict::Duplicate => "duplicate",
            Verdict::Rejected(why) => why,
        }
    }
}

/// Counts over a scenario.
#[derive(Debug, Clone, Default, PartialEq)]
struct Tally {
    /// Events accepted.
    accepted: usize,
    /// Events answered as duplicates.
    duplicates: usize,
    /// Events refused, with why.
    rejected: Vec<String>,
}

impl Tally {
    fn add(&mut self, verdict: &Verdict) {
        match verdict {
            Verdict::Accepted => self.accepted += 1,
            Verdict::Duplicate => self.duplicates += 1,
            Verdict::Rejected(why) => self.rejected.push(why.clone()),
        }
    }
}

/// Runs one scenario; prints each answer and a summary line on stdout.
pub async fn run(config: &Config, args: &Args) -> Result<Outcome, DemoError> {
    let client = Client::new(config, args.daemon.url.as_deref())?;
    // Fail fast (exit 2) when nothing is listening, before any output.
    client.get("/health").await?;
    let run_id = run_id();
    let mut out = String::new();
    let tally = match args.scenario {
        Scenario::Basic => basic(&client, &run_id, &mut out).await?,
        Scenario::Idempotency => idempotency(&client, &run_id, &mut out).await?,
        Scenario::Burst => burst(&client, &run_id, &mut out).await,
        Scenario::Batch => batch(&client, &run_id, &mut out).await?,
    };
    let expected_dups = if args.scenario == Scenario::Idempotency {
        IDEMPOTENCY_SENDS - 1
    } else {
        0
    };
    out.push_str(&format!(
        "demo {}: {} accepted, {} duplicates, {} rejected{}\n",
        args.scenario.name(),
        tally.accepted,
        tally.duplicates,
        tally.rejected.len(),
        if args.scenario == Scenario::Idempotency {
            format!(" (expected 1 accepted, {expected_dups} duplicates)")
        } else {
            String::new()
        }
    ));
    let mut stdout = io::stdout().lock();
    stdout
        .write_all(out.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(DemoError::Output)?;
    let as_expected = tally.rejected.is_empty()
        && tally.duplicates == expected_dups
        && (args.scenario != Scenario::Idempotency || tally.accepted == 1);
    Ok(if as_expected {
        Outcome::Clean
    } else {
        Outcome::Rejections
    })
}

/// A few events of different types, one request each.
async fn basic(client: &Client, run_id: &str, out: &mut String) -> Result<Tally, DemoError> {
    out.push_str(&format!(
        "demo basic: one event of each of 3 types to POST {}/webhook/events\n",
        client.base()
    ));
    let mut tally = Tally::default();
    for (i, event_type) in EVENT_TYPES.iter().take(3).enumerate() {
        let event = sample_event(&format!("evt_{run_id}_{i}"), event_type, i);
        let verdict = send_one(client, &event).await?;
        out.push_str(&format!(
            "  {:<10} {} ({event_type})\n",
            verdict.label(),
            event["event_id"].as_str().unwrap_or_default()
        ));
        tally.add(&verdict);
    }
    Ok(tally)
}

/// One event sent several times with the same id.
async fn idempotency(client: &Client, run_id: &str, out: &mut String) -> Result<Tally, DemoError> {
    let event = sample_event(&format!("evt_{run_id}_same"), "user_signup", 0);
    out.push_str(&format!(
        "demo idempotency: event {} sent {IDEMPOTENCY_SENDS} times to POST {}/webhook/events\n",
        event["event_id"].as_str().unwrap_or_default(),
        client.base()
    ));
    let mut tally = Tally::default();
    for send in 1..=IDEMPOTENCY_SENDS {
        let verdict = send_one(client, &event).await?;
        out.push_str(&format!("  send {send}: {}\n", verdict.label()));
        tally.add(&verdict);
    }
    Ok(tally)
}

/// Many events at once; a connection that fails counts as rejected.
async fn burst(client: &Client, run_id: &str, out: &mut String) -> Tally {
    out.push_str(&format!(
        "demo burst: {BURST_EVENTS} events sent concurrently to POST {}/webhook/events\n",
        client.base()
    ));
    let events: Vec<Value> = (0..BURST_EVENTS)
        .map(|i| {
            let event_type = EVENT_TYPES[fastrand::usize(..EVENT_TYPES.len())];
            sample_event(
                &format!("evt_{run_id}_{i}"),
                event_type,
                fastrand::usize(..50),
            )
        })
        .collect();
    let started = Instant::now();
    let verdicts = futures_util::future::join_all(events.iter().map(|event| async move {
        send_one(client, event)
            .await
            .unwrap_or_else(|e| Verdict::Rejected(e.to_string()))
    }))
    .await;
    let took = started.elapsed().as_secs_f64();
    out.push_str(&format!(
        "  {} answers in {took:.2} s ({:.0} events/s)\n",
        verdicts.len(),
        verdicts.len() as f64 / took.max(1e-6)
    ));
    let mut tally = Tally::default();
    for (event, verdict) in events.iter().zip(&verdicts) {
        if let Verdict::Rejected(why) = verdict {
            out.push_str(&format!(
                "  rejected {}: {why}\n",
                event["event_id"].as_str().unwrap_or_default()
            ));
        }
        tally.add(verdict);
    }
    tally
}

/// One batch request.
async fn batch(client: &Client, run_id: &str, out: &mut String) -> Result<Tally, DemoError> {
    out.push_str(&format!(
        "demo batch: {BATCH_EVENTS} events in one POST {}/webhook/batch\n",
        client.base()
    ));
    let events: Vec<Value> = (0..BATCH_EVENTS)
        .map(|i| {
            sample_event(
                &format!("evt_{run_id}_{i}"),
                EVENT_TYPES[i % EVENT_TYPES.len()],
                i,
            )
        })
        .collect();
    let body = json!({ "events": events }).to_string().into_bytes();
    let answer = client.post_json("/webhook/batch", body).await?;
    if !answer.status.is_success() {
        return Err(DemoError::Refused {
            status: answer.status.as_u16(),
            detail: answer.error_text(),
        });
    }
    let body = answer.json()?;
    let verdicts = batch_verdicts(&body, events.len());
    let mut tally = Tally::default();
    for (i, (event, verdict)) in events.iter().zip(&verdicts).enumerate() {
        out.push_str(&format!(
            "  {i:>2} {:<10} {} ({})\n",
            verdict.label(),
            event["event_id"].as_str().unwrap_or_default(),
            event["event_type"].as_str().unwrap_or_default()
        ));
        tally.add(verdict);
    }
    Ok(tally)
}

/// Each event's verdict from a batch answer: `results[i].status` where the
/// daemon sends it, `rejected[].index` for the rejected ones.
fn batch_verdicts(body: &Value, len: usize) -> Vec<Verdict> {
    let mut verdicts: Vec<Verdict> = (0..len)
        .map(|i| match body["results"][i]["status"].as_str() {
            Some("duplicate") => Verdict::Duplicate,
            Some("accepted") | None => Verdict::Accepted,
            Some(other) => Verdict::Rejected(other.to_owned()),
        })
        .collect();
    for item in body["rejected"].as_array().into_iter().flatten() {
        let index = item["index"].as_u64().and_then(|i| usize::try_from(i).ok());
        if let Some(slot) = index.and_then(|i| verdicts.get_mut(i)) {
            let field = item["field"].as_str().unwrap_or_default();
            let detail = item["detail"].as_str().unwrap_or("rejected");
            *slot = Verdict::Rejected(if field.is_empty() {
                detail.to_owned()
            } else {
                format!("{field}: {detail}")
            });
        }
    }
    verdicts
}

/// POSTs one event to `/webhook/events`: 202 accepted, 200 duplicate.
async fn send_one(client: &Client, event: &Value) -> Result<Verdict, ClientError> {
    let answer = client
        .post_json("/webhook/events", event.to_string().into_bytes())
        .await?;
    if !answer.status.is_success() {
        return Ok(Verdict::Rejected(format!(
            "{} {}",
            answer.status.as_u16(),
            answer.error_text()
        )));
    }
    let body = answer.json().ok();
    Ok(match body.as_ref().and_then(|v| v["status"].as_str()) {
        Some("duplicate") => Verdict::Duplicate,
        Some("accepted") => Verdict::Accepted,
        _ if answer.status.as_u16() == 200 => Verdict::Duplicate,
        _ => Verdict::Accepted,
    })
}

/// A sample event: id, type, user, time now, metadata.
fn sample_event(event_id: &str, event_type: &str, n: usize) -> Value {
    let mut event = json!({
        "event_id": event_id,
        "event_type": event_type,
        "user_id": format!("user_demo_{n:03}"),
        "metadata": metadata(event_type, n),
    });
    if let Ok(now) = OffsetDateTime::now_utc().format(&Rfc3339) {
        event["timestamp"] = Value::String(now);
    }
    event
}

/// Plausible metadata for an event type.
fn metadata(event_type: &str, n: usize) -> Value {
    let pick = |options: [&'static str; 3]| options[n % 3];
    match event_type {
        "user_signup" => json!({"source": "organic", "email": format!("demo{n}@example.com")}),
        "subscription_created" | "subscription_cancelled" => {
            json!({"plan": pick(["starter", "pro", "team"]), "amount": (n % 3) * 45 + 9})
        }
        "page_view" => json!({"page": pick(["/home", "/pricing", "/docs"])}),
        _ => json!({"feature": pick(["export", "search", "share"])}),
    }
}

/// Unique per run: milliseconds since the epoch and 16 random bits, in hex.
fn run_id() -> String {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!("demo_{ms:x}{:04x}", fastrand::u16(..))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_answers_map_to_each_event() {
        let body = json!({
            "accepted": 1, "duplicates": 1,
            "rejected": [{"index": 2, "error": "schema_violation", "field": "event_type", "detail": "is required"}],
            "results": [{"status": "accepted"}, {"status": "duplicate"}, {"status": "rejected"}]
        });
        assert_eq!(
            batch_verdicts(&body, 3),
            vec![
                Verdict::Accepted,
                Verdict::Duplicate,
                Verdict::Rejected("event_type: is required".into())
            ]
        );
    }

    #[test]
    fn run_ids_are_usable_in_event_ids() {
        let id = run_id();
        assert!(id.starts_with("demo_") && id.len() > 10, "{id}");
        assert!(id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
    }

    #[test]
    fn sample_events_have_the_seed_shape() {
        let event = sample_event("e", "page_view", 1);
        assert_eq!(event["metadata"]["page"], "/pricing");
        assert!(event["timestamp"].is_string());
    }
}
