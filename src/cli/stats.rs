//! `inletd stats`: the daemon's `/stats/summary` as a readable table
//! (totals, events by type, queue, DLQ, latency, sinks), or the JSON as it
//! came.

use std::io::{self, Write as _};

use serde_json::Value;

use super::Outcome;
use super::client::{Client, ClientError, DaemonArgs};
use crate::config::Config;

/// `inletd stats` flags.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "\
The table shows: total events processed, events by type (most first), queue
depth (accepted, not yet processed), DLQ size, and latency percentiles in ms:
receipt → processed (from the on-disk histogram) and receipt → answer (since
the daemon started), and each sink's state: ok, retrying (its last batch failed)
or circuit open (isolated until the time shown). Exit status: 0 printed; 2 the daemon could not be asked.")]
pub struct Args {
    /// Print the daemon's /stats/summary JSON as it came (for scripts and jq).
    #[arg(long)]
    pub json: bool,
    /// Where the daemon is.
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

/// Why `stats` could not print the summary (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    /// Talking to the daemon failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The daemon answered with an error.
    #[error("GET /stats/summary answered {status}: {detail}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The daemon's `error: detail`.
        detail: String,
    },
    /// Stdout could not be written.
    #[error("writing the summary: {0}")]
    Output(io::Error),
}

/// Fetches `/stats/summary` and prints it.
pub async fn run(config: &Config, args: &Args) -> Result<Outcome, StatsError> {
    let client = Client::new(config, args.daemon.url.as_deref())?;
    let answer = client.get("/stats/summary").await?;
    if !answer.status.is_success() {
        return Err(StatsError::Refused {
            status: answer.status.as_u16(),
            detail: answer.error_text(),
        });
    }
    let text = if args.json {
        let mut raw = String::from_utf8_lossy(&answer.body).trim_end().to_owned();
        raw.push('\n');
        raw
    } else {
        render(&answer.json()?)
    };
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(StatsError::Output)?;
    Ok(Outcome::Clean)
}

/// The summary as a table. Fields the daemon did not send show as `-`.
pub fn render(summary: &Value) -> String {
    let latency = &summary["latency_ms"];
    let rows = [
        ("total events", number(&summary["total_events"], "")),
        ("queue depth", number(&summary["queue_depth"], "")),
        ("DLQ size", number(&summary["dlq_size"], "")),
        ("processed p50", number(&latency["p50"], " ms")),
        ("processed p99", number(&latency["p99"], " ms")),
        ("answered p50", number(&latency["ack_p50"], " ms")),
        ("answered p99", number(&latency["ack_p99"], " ms")),
    ];
    let mut text = String::new();
    for (name, value) in rows {
        text.push_str(&format!("{name:<15} {value}\n"));
    }
    // With Redis: the totals are the deployment's; say whose they are.
    match summary["scope"].as_str() {
        Some("deployment") => {
            let instances = summary["instances"].as_array().map_or(0, Vec::len);
            text.push_str(&format!(
                "{:<15} deployment of {instances} instances; this one processed {}\n",
                "totals of",
                number(&summary["local"]["total_events"], "")
            ));
        }
        Some(scope) => {
            let why = summary["deployment_error"].as_str().unwrap_or("");
            text.push_str(&format!("{:<15} {scope} only ({why})\n", "totals of"));
        }
        None => {}
    }
    for sink in summary["sinks"].as_array().into_iter().flatten() {
        let name = format!("sink {}", sink["name"].as_str().unwrap_or("?"));
        text.push_str(&format!("{name:<15} {}\n", sink_state(sink)));
    }
    let mut by_type: Vec<(&str, u64)> = summary["by_type"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(t, n)| (t.as_str(), n.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default();
    by_type.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    text.push('\n');
    if by_type.is_empty() {
        text.push_str("no events processed yet\n");
        return text;
    }
    let type_width = by_type
        .iter()
        .map(|(t, _)| t.chars().count())
        .chain([10])
        .max()
        .unwrap_or(10);
    let count_width = by_type
        .iter()
        .map(|(_, n)| n.to_string().len())
        .chain([5])
        .max()
        .unwrap_or(5);
    text.push_str(&format!(
        "{:<type_width$}  {:>count_width$}\n",
        "event type", "count"
    ));
    for (event_type, count) in by_type {
        text.push_str(&format!(
            "{event_type:<type_width$}  {count:>count_width$}\n"
        ));
    }
    text
}

/// A sink's state in words: `ok`, or what is wrong and since how many
/// batches.
fn sink_state(sink: &Value) -> String {
    let failures = sink["consecutive_failures"].as_u64().unwrap_or(0);
    let error = sink["last_error"].as_str().unwrap_or("no error given");
    match (sink["state"].as_str(), sink["open_until_ms"].as_i64()) {
        (Some("ok"), _) => "ok".to_owned(),
        (Some("open"), Some(until)) => format!(
            "circuit open until {} after {failures} failed batches: {error}",
            crate::event::format_ms(until)
        ),
        (Some("half_open"), _) => format!(
            "circuit half-open (the next batch probes it) after {failures} failed batches: {error}"
        ),
        (Some(state), _) => format!("{state} after {failures} failed batches: {error}"),
        (None, _) => "-".to_owned(),
    }
}

/// A number as the daemon sent it (whole numbers without decimals), or `-`.
fn number(value: &Value, unit: &str) -> String {
    if let Some(n) = value.as_u64() {
        return format!("{n}{unit}");
    }
    match value.as_f64() {
        Some(x) if x.fract() == 0.0 && x.abs() < 1e15 => format!("{x:.0}{unit}"),
        Some(x) => format!("{x:.1}{unit}"),
        None => "-".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_lists_types_most_first() {
        let summary = serde_json::json!({
            "total_events": 6, "queue_depth": 0, "dlq_size": 1,
            "by_type": {"b": 1, "page_view": 3, "a": 1, "signup": 1},
            "latency_ms": {"p50": 250.0, "p99": 1000.0, "ack_p50": 1.5, "ack_p99": 4.0}
        });
        let text = render(&summary);
        assert!(text.contains("total events    6\n"), "{text}");
        assert!(!text.contains("sink"), "no sinks, no sink lines: {text}");
        assert!(text.contains("processed p50   250 ms\n"), "{text}");
        assert!(text.contains("answered p50    1.5 ms\n"), "{text}");
        let order: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.starts_with("event type"))
            .skip(1)
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        assert_eq!(order, ["page_view", "a", "b", "signup"]);
    }

    #[test]
    fn each_sink_says_its_state() {
        let summary = serde_json::json!({"sinks": [
            {"name": "archive", "state": "ok", "consecutive_failures": 0,
             "last_error": null, "open_until_ms": null},
            {"name": "dashboard", "state": "open", "consecutive_failures": 5,
             "last_error": "POST http://x/ answered 500", "open_until_ms": 1_765_879_230_000_i64},
        ]});
        let text = render(&summary);
        assert!(text.contains("sink archive    ok\n"), "{text}");
        assert!(
            text.contains(
                "sink dashboard  circuit open until 2025-12-16T10:00:30Z after 5 failed batches: \
                 POST http://x/ answered 500\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn deployment_totals_say_whose_they_are() {
        let summary = serde_json::json!({
            "total_events": 400, "scope": "deployment", "local": {"total_events": 150},
            "instances": [{"name": "a"}, {"name": "b"}, {"name": "c"}]
        });
        let text = render(&summary);
        assert!(
            text.contains("totals of       deployment of 3 instances; this one processed 150\n"),
            "{text}"
        );
        let alone = render(&serde_json::json!({
            "scope": "instance", "deployment_error": "redis is unreachable"
        }));
        assert!(
            alone.contains("totals of       instance only (redis is unreachable)\n"),
            "{alone}"
        );
    }

    #[test]
    fn missing_fields_show_as_dashes() {
        let text = render(&serde_json::json!({}));
        assert!(text.contains("DLQ size        -\n"), "{text}");
        assert!(text.contains("no events processed yet"), "{text}");
    }
}
