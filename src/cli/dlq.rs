//! `inletd dlq list|show|replay|purge`: a running daemon's dead-letter
//! queue through its admin API (`/admin/dlq…`), as tables by default or as
//! the daemon's JSON with `--json`.
//!
//! Exit codes: 0 done; 1 nothing to act on (a named entry is not in the DLQ,
//! or replay/purge found it empty); 2 the daemon could not be asked or
//! refused (401/403, with its detail), or a whole-DLQ purge was not confirmed.

use std::collections::BTreeSet;
use std::io::{self, BufRead as _, IsTerminal as _, Write as _};

use serde_json::{Value, json};

use super::Outcome;
use super::client::{Answer, Client, ClientError, DaemonArgs};
use crate::config::Config;

/// Most ids sent in one replay request (the daemon takes at most 1000).
const REPLAY_CHUNK: usize = 1000;
/// Widest error text in the list table; `dlq show` prints it whole.
const ERROR_WIDTH: usize = 60;
/// Widest sink, event type or key in the list table.
const FIELD_WIDTH: usize = 36;

/// `inletd dlq` flags.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "\
Events land in the dead-letter queue (DLQ) when a sink kept failing them
(after max_retries, or at once for a permanent 4xx). Each entry belongs to
one sink; replaying it delivers it to that sink only, and the built-in
counters do not count it twice.

The commands use the admin API of the daemon at the config's bind (or --url)
with the config's admin_token. Exit status: 0 done; 1 nothing to act on (an
id not in the DLQ, or nothing to replay or purge); 2 the daemon could not be
reached or refused (401/403: check admin_token), or purge was not confirmed.")]
pub struct Args {
    /// What to do with the DLQ.
    #[command(subcommand)]
    pub action: Action,
}

/// The `dlq` subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Action {
    /// List entries, oldest first: id, sink, attempts, last failure, event, error.
    #[command(after_help = "\
Shows up to --limit entries with ids above --after; when the page is full, the
last line says which --after to pass next. Exit status: 0 listed (also when
the DLQ is empty); 2 the daemon could not be asked.")]
    List(ListArgs),
    /// Show one entry in full: the failure and the event as it was accepted.
    #[command(after_help = "\
Exit status: 0 shown; 1 no entry with that id; 2 the daemon could not be asked.")]
    Show(ShowArgs),
    /// Put entries back into the queue, each for the sink that failed it only.
    #[command(after_help = "\
With ids, replays those entries; without, the oldest --limit (default 100).
Replayed events go to the sink that failed them and nowhere else; they are not
counted again. An event that fails again comes back with a new id. Exit status:
0 replayed; 1 the DLQ was empty, or some ids were not in it; 2 the daemon could
not be asked.")]
    Replay(ReplayArgs),
    /// Delete entries by id, or every entry (with --yes, or after a prompt).
    #[command(after_help = "\
With ids, deletes those entries. Without ids, deletes every entry: that needs
--yes, or a `y` at the prompt when stdin is a terminal (without a terminal,
--yes is required). Deleted events are gone for the sinks that failed them;
the built-in counters keep them. Exit status: 0 deleted; 1 some ids were not
in the DLQ, or it was already empty, or the prompt was declined; 2 the daemon
could not be asked, or --yes was missing without a terminal.")]
    Purge(PurgeArgs),
}

/// `inletd dlq list` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ListArgs {
    /// List entries with ids above this one (the last id of the previous page).
    #[arg(long, value_name = "ID")]
    pub after: Option<u64>,
    /// Entries to list at most (1-1000).
    #[arg(long, value_name = "N", default_value_t = 100,
          value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub limit: u16,
    /// Print the daemon's JSON as it came: {"entries":[…],"next_after":ID}.
    #[arg(long)]
    pub json: bool,
    /// Where the daemon is.
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

/// `inletd dlq show` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ShowArgs {
    /// The entry's id (from `inletd dlq list`).
    #[arg(value_name = "ID")]
    pub id: u64,
    /// Print the daemon's JSON as it came (the event is JSON text in record.body).
    #[arg(long)]
    pub json: bool,
    /// Where the daemon is.
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

/// `inletd dlq replay` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    /// Entries to replay; none: the oldest --limit entries.
    #[arg(value_name = "ID")]
    pub ids: Vec<u64>,
    /// Without ids: replay at most this many of the oldest entries (1-1000).
    #[arg(long, value_name = "N", default_value_t = 100, conflicts_with = "ids",
          value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub limit: u16,
    /// Print {"replayed":n,"remaining":n} as JSON.
    #[arg(long)]
    pub json: bool,
    /// Where the daemon is.
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

/// `inletd dlq purge` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct PurgeArgs {
    /// Entries to delete; none: every entry (needs --yes or a confirmed prompt).
    #[arg(value_name = "ID")]
    pub ids: Vec<u64>,
    /// Delete every entry without asking (needed when stdin is not a terminal).
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Print the result as JSON: `removed` (how many) and `missing` (ids not found).
    #[arg(long)]
    pub json: bool,
    /// Where the daemon is.
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

/// Why a `dlq` command could not do its work (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    /// Talking to the daemon failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The daemon answered with an error.
    #[error("{request} answered {status}: {detail}{hint}")]
    Refused {
        /// Method and path, e.g. `GET /admin/dlq`.
        request: String,
        /// HTTP status.
        status: u16,
        /// The daemon's `error: detail`.
        detail: String,
        /// What to check, for the statuses that have an obvious cause.
        hint: &'static str,
    },
    /// A whole-DLQ purge without `--yes` and no terminal to ask at.
    #[error(
        "refusing to delete every DLQ entry without --yes (stdin is not a terminal to ask at); nothing was deleted"
    )]
    Unconfirmed,
    /// Stdout, stderr or the prompt failed.
    #[error("writing the output: {0}")]
    Output(io::Error),
}

/// Runs one `dlq` subcommand.
pub async fn run(config: &Config, args: &Args) -> Result<Outcome, DlqError> {
    match &args.action {
        Action::List(a) => list(&Client::new(config, a.daemon.url.as_deref())?, a).await,
        Action::Show(a) => show(&Client::new(config, a.daemon.url.as_deref())?, a).await,
        Action::Replay(a) => replay(&Client::new(config, a.daemon.url.as_deref())?, a).await,
        Action::Purge(a) => purge(&Client::new(config, a.daemon.url.as_deref())?, a).await,
    }
}

async fn list(client: &Client, args: &ListArgs) -> Result<Outcome, DlqError> {
    let mut path = format!("/admin/dlq?limit={}", args.limit);
    if let Some(after) = args.after {
        path.push_str(&format!("&after={after}"));
    }
    let answer = success(client.get(&path).await?)?;
    if args.json {
        print(&raw(&answer))?;
    } else {
        print(&render_list(&answer.json()?, args).map_err(|reason| answer.bad(reason))?)?;
    }
    Ok(Outcome::Clean)
}

async fn show(client: &Client, args: &ShowArgs) -> Result<Outcome, DlqError> {
    let answer = client.get(&format!("/admin/dlq/{}", args.id)).await?;
    if answer.status.as_u16() == 404 {
        say(&format!("inletd: no DLQ entry {}\n", args.id))?;
        return Ok(Outcome::NothingDone);
    }
    let answer = success(answer)?;
    if args.json {
        print(&raw(&answer))?;
    } else {
        print(&render_entry(&answer.json()?))?;
    }
    Ok(Outcome::Clean)
}

async fn replay(client: &Client, args: &ReplayArgs) -> Result<Outcome, DlqError> {
    let ids: Vec<u64> = args
        .ids
        .iter()
        .copied()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut replayed = 0;
    let mut remaining = 0;
    if ids.is_empty() {
        let answer = client
            .post_json(
                &format!("/admin/dlq/replay?limit={}", args.limit),
                Vec::new(),
            )
            .await?;
        (replayed, remaining) = replay_report(&success(answer)?)?;
    } else {
        for chunk in ids.chunks(REPLAY_CHUNK) {
            let body = json!({ "ids": chunk }).to_string().into_bytes();
            let answer = client
                .post_json(&format!("/admin/dlq/replay?limit={}", chunk.len()), body)
                .await?;
            let (n, left) = replay_report(&success(answer)?)?;
            replayed += n;
            remaining = left;
        }
    }
    let missing = ids
        .len()
        .saturating_sub(usize::try_from(replayed).unwrap_or(usize::MAX));
    if args.json {
        print(&format!(
            "{}\n",
            json!({"replayed": replayed, "remaining": remaining})
        ))?;
    } else {
        print(&format!(
            "replayed {replayed} {} into the queue (each for the sink that failed it); {remaining} {} in the DLQ\n",
            entries(replayed),
            if remaining == 1 { "remains" } else { "remain" },
        ))?;
    }
    if ids.is_empty() && replayed == 0 {
        say("inletd: nothing to replay: the DLQ is empty\n")?;
        return Ok(Outcome::NothingDone);
    }
    if missing > 0 {
        say(&format!(
            "inletd: {missing} of the {} ids given {} not in the DLQ\n",
            ids.len(),
            if missing == 1 { "was" } else { "were" }
        ))?;
        return Ok(Outcome::NothingDone);
    }
    Ok(Outcome::Clean)
}

/// `(replayed, remaining)` from a replay answer.
fn replay_report(answer: &Answer) -> Result<(u64, u64), DlqError> {
    let v = answer.json()?;
    match (v["replayed"].as_u64(), v["remaining"].as_u64()) {
        (Some(replayed), Some(remaining)) => Ok((replayed, remaining)),
        _ => Err(answer.bad("no replayed/remaining counts").into()),
    }
}

async fn purge(client: &Client, args: &PurgeArgs) -> Result<Outcome, DlqError> {
    if args.ids.is_empty() {
        return purge_all(client, args).await;
    }
    let ids: BTreeSet<u64> = args.ids.iter().copied().collect();
    let mut removed = 0u64;
    let mut missing = Vec::new();
    for id in ids {
        let answer = client.delete(&format!("/admin/dlq/{id}")).await?;
        if answer.status.as_u16() == 404 {
            missing.push(id);
            continue;
        }
        removed += removed_count(&success(answer)?)?;
    }
    if args.json {
        print(&format!(
            "{}\n",
            json!({"removed": removed, "missing": missing})
        ))?;
    } else {
        print(&format!("removed {removed} {}\n", entries(removed)))?;
    }
    if missing.is_empty() {
        return Ok(Outcome::Clean);
    }
    let list: Vec<String> = missing.iter().map(u64::to_string).collect();
    say(&format!("inletd: not in the DLQ: {}\n", list.join(", ")))?;
    Ok(Outcome::NothingDone)
}

async fn purge_all(client: &Client, args: &PurgeArgs) -> Result<Outcome, DlqError> {
    if !args.yes {
        if !io::stdin().is_terminal() {
            return Err(DlqError::Unconfirmed);
        }
        let answer = success(client.get("/admin/queue").await?)?;
        let size = answer.json()?["dlq_size"]
            .as_u64()
            .ok_or_else(|| answer.bad("no dlq_size"))?;
        if size == 0 {
            say("inletd: the DLQ is empty; nothing to purge\n")?;
            return Ok(Outcome::NothingDone);
        }
        say(&format!(
            "Delete all {size} {} of the DLQ at {}? They cannot be replayed afterwards. [y/N] ",
            entries(size),
            client.base()
        ))?;
        let mut reply = String::new();
        io::stdin()
            .lock()
            .read_line(&mut reply)
            .map_err(DlqError::Output)?;
        if !matches!(reply.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
            say("inletd: not confirmed; nothing was deleted\n")?;
            return Ok(Outcome::NothingDone);
        }
    }
    let answer = success(client.delete("/admin/dlq").await?)?;
    let removed = removed_count(&answer)?;
    if args.json {
        print(&format!("{}\n", json!({"removed": removed, "missing": []})))?;
    } else {
        print(&format!("removed {removed} {}\n", entries(removed)))?;
    }
    if removed == 0 {
        say("inletd: the DLQ was already empty\n")?;
        return Ok(Outcome::NothingDone);
    }
    Ok(Outcome::Clean)
}

/// `removed` from a delete answer.
fn removed_count(answer: &Answer) -> Result<u64, DlqError> {
    answer.json()?["removed"]
        .as_u64()
        .ok_or_else(|| answer.bad("no removed count").into())
}

/// The answer when it is a success, else why not.
fn success(answer: Answer) -> Result<Answer, DlqError> {
    if answer.status.is_success() {
        return Ok(answer);
    }
    let path = answer
        .url
        .find("/admin")
        .map_or(answer.url.as_str(), |at| &answer.url[at..]);
    let hint = match answer.status.as_u16() {
        401 => {
            " (the CLI sends the config's admin_token: pass the daemon's --config FILE, \
             or run as a user who can read /etc/inletd/inletd.toml)"
        }
        403 => {
            " (with no admin_token the daemon answers loopback callers only: \
             set admin_token in both configs, or run this on the daemon's host)"
        }
        _ => "",
    };
    Err(DlqError::Refused {
        request: format!("{} {path}", answer.method),
        status: answer.status.as_u16(),
        detail: answer.error_text(),
        hint,
    })
}

/// The body as it came, ending in one newline.
fn raw(answer: &Answer) -> String {
    let mut text = String::from_utf8_lossy(&answer.body).trim_end().to_owned();
    text.push('\n');
    text
}

/// Writes to stdout.
fn print(text: &str) -> Result<(), DlqError> {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(DlqError::Output)
}

/// Writes to stderr (notes and the prompt).
fn say(text: &str) -> Result<(), DlqError> {
    let mut err = io::stderr().lock();
    err.write_all(text.as_bytes())
        .and_then(|()| err.flush())
        .map_err(DlqError::Output)
}

/// "entry" or "entries".
fn entries(n: u64) -> &'static str {
    if n == 1 { "entry" } else { "entries" }
}

/// The list answer as a table, with a pointer to the next page when the
/// page was full.
pub fn render_list(page: &Value, args: &ListArgs) -> Result<String, String> {
    let items = page["entries"]
        .as_array()
        .ok_or("no `entries` array in the answer")?;
    if items.is_empty() {
        return Ok(match args.after {
            Some(after) => format!("no DLQ entries after id {after}\n"),
            None => "the DLQ is empty\n".to_owned(),
        });
    }
    let header = [
        "ID",
        "SINK",
        "TRIES",
        "LAST FAILED (UTC)",
        "EVENT TYPE",
        "EVENT",
        "ERROR",
    ];
    let mut rows: Vec<[String; 7]> = Vec::with_capacity(items.len());
    for item in items {
        let record = &item["record"];
        rows.push([
            text(&item["id"]),
            clip(&text(&item["sink"]), FIELD_WIDTH),
            text(&item["attempts"]),
            item["last_failed_ms"]
                .as_i64()
                .map_or_else(|| "-".into(), utc),
            clip(&text(&record["event_type"]), FIELD_WIDTH),
            clip(&text(&record["key"]), FIELD_WIDTH),
            clip(&text(&item["error"]), ERROR_WIDTH),
        ]);
    }
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: &[&str]| {
        let mut text = String::new();
        for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else if i == 2 {
                text.push_str(&format!("{cell:>width$}  "));
            } else {
                text.push_str(&format!("{cell:<width$}  "));
            }
        }
        format!("{}\n", text.trim_end())
    };
    let mut out = line(&header);
    for row in &rows {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        out.push_str(&line(&cells));
    }
    if items.len() >= usize::from(args.limit)
        && let Some(next) = page["next_after"].as_u64()
    {
        out.push_str(&format!(
            "(page full: more may follow with `inletd dlq list --after {next}`)\n"
        ));
    }
    Ok(out)
}

/// One entry as `name value` lines, then the event pretty-printed.
pub fn render_entry(item: &Value) -> String {
    let record = &item["record"];
    let time = |v: &Value| v.as_i64().map_or_else(|| "-".into(), utc);
    let mut rows = vec![
        ("id", text(&item["id"])),
        ("sink", text(&item["sink"])),
        ("attempts", text(&item["attempts"])),
        ("first failed", time(&item["first_failed_ms"])),
        ("last failed", time(&item["last_failed_ms"])),
        ("error", text(&item["error"])),
        ("source", text(&record["source"])),
        ("event", text(&record["key"])),
        ("event type", text(&record["event_type"])),
        ("received", time(&record["received_at_ms"])),
        ("occurred", time(&record["occurred_at_ms"])),
    ];
    if let Some(sink) = record["only_sink"].as_str() {
        rows.push((
            "replay of",
            format!("an earlier DLQ entry (for {sink} only)"),
        ));
    }
    let mut out = String::new();
    for (name, value) in rows {
        out.push_str(&format!("{name:<13} {value}\n"));
    }
    let body = record["body"].as_str().unwrap_or_default();
    let event = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or_else(|| body.to_owned());
    out.push_str("\nevent as accepted:\n");
    out.push_str(&event);
    out.push('\n');
    out
}

/// A scalar as text: strings without quotes, absent or empty as `-`.
fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(s) if s.is_empty() => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// At most `width` characters on one line, with `…` where it was cut.
fn clip(text: &str, width: usize) -> String {
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() <= width {
        return flat;
    }
    let mut cut: String = flat.chars().take(width.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// Milliseconds since the epoch as `YYYY-MM-DD HH:MM:SS` (UTC).
fn utc(ms: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => ms.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: u64, error: &str) -> Value {
        json!({
            "id": id, "sink": "dashboard", "error": error, "attempts": 4,
            "first_failed_ms": 1_765_879_200_000_i64, "last_failed_ms": 1_765_879_201_000_i64,
            "record": {"source": "", "key": "evt_1", "event_type": "signup",
                       "received_at_ms": 1_765_879_199_000_i64, "occurred_at_ms": 0,
                       "only_sink": null, "body": "{\"event_id\":\"evt_1\",\"event_type\":\"signup\"}"}
        })
    }

    fn list_args(limit: u16) -> ListArgs {
        ListArgs {
            after: None,
            limit,
            json: false,
            daemon: DaemonArgs::default(),
        }
    }

    #[test]
    fn the_list_is_a_table_with_a_next_page_hint_when_full() {
        let page =
            json!({"entries": [item(3, "HTTP 500"), item(12, &"x".repeat(200))], "next_after": 12});
        let text = render_list(&page, &list_args(2)).expect("renders");
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("ID  SINK"), "{text}");
        assert!(
            lines[1].starts_with("3   dashboard      4  2025-12-16 10:00:01  signup"),
            "{text}"
        );
        assert!(lines[2].ends_with('…'), "{text}");
        assert!(text.contains("--after 12"), "{text}");
        let text = render_list(&page, &list_args(100)).expect("renders");
        assert!(!text.contains("--after"), "{text}");
        assert_eq!(
            render_list(&json!({"entries": []}), &list_args(5)).as_deref(),
            Ok("the DLQ is empty\n")
        );
        assert!(render_list(&json!({}), &list_args(5)).is_err());
    }

    #[test]
    fn an_entry_shows_the_failure_and_the_event() {
        let text = render_entry(&item(7, "HTTP 500 from http://x"));
        assert!(text.contains("id            7\n"), "{text}");
        assert!(text.contains("source        -\n"), "{text}");
        assert!(
            text.contains("first failed  2025-12-16 10:00:00\n"),
            "{text}"
        );
        assert!(text.contains("\"event_id\": \"evt_1\""), "{text}");
    }
}
