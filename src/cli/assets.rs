//! `inletd generate-assets DIR` (hidden; for packaging): writes the man
//! pages and the shell completions, rendered from the clap definitions in
//! [`super::args`] so they always match `--help`.
//!
//! Into DIR: `inletd.1` (the whole story: options, subcommands,
//! configuration keys with their defaults, files, environment, signals, exit
//! status), one page per subcommand (`inletd-dlq-list.1`, …), and the
//! completions `inletd.bash`, `_inletd` (zsh) and `inletd.fish`.

use std::io;
use std::path::{Path, PathBuf};

use clap::CommandFactory as _;
use clap_complete::Shell;
use clap_mangen::Man;

use super::args::{AssetsArgs, Cli, PACKAGED_CONFIG};
use crate::config::Config;

/// Why the assets could not be written.
#[derive(Debug, thiserror::Error)]
#[error("writing {path}: {source}")]
pub struct AssetsError {
    /// The file or directory being written.
    path: String,
    /// The I/O error.
    source: io::Error,
}

/// Every top-level configuration key: what it is for, and whether a SIGHUP
/// leaves it alone (it needs a restart). The defaults come from
/// [`Config::default`]; a test checks this list against it.
const KEYS: &[(&str, &str, bool)] = &[
    (
        "bind",
        "Listen address (port 0: any free port). Keep it on loopback behind a proxy.",
        true,
    ),
    (
        "data_dir",
        "The sled store: write-ahead queue, idempotency keys, counters, DLQ. The packaged config sets /var/lib/inletd.",
        true,
    ),
    (
        "durability",
        "fsync: answer 202 after the group's flush and sync to disk (survives a power cut); interval: after the write, synced every flush_interval_ms (a power cut or kill -9 can lose that window plus two flush times).",
        true,
    ),
    (
        "flush_interval_ms",
        "Flush period, and loss window, for durability = \"interval\".",
        true,
    ),
    ("batch_size", "Events per micro-batch.", false),
    (
        "batch_timeout_ms",
        "Longest wait before a partial batch is processed.",
        false,
    ),
    (
        "max_retries",
        "Retries per sink and batch before the events go to the DLQ.",
        false,
    ),
    (
        "retry_base_ms",
        "First retry delay; doubles each attempt, with jitter.",
        false,
    ),
    (
        "retry_max_ms",
        "Longest retry delay; also caps a sink's Retry-After.",
        false,
    ),
    (
        "breaker_failures",
        "Failed batches in a row after which a sink is skipped (its events go to the DLQ) for the cooldown.",
        false,
    ),
    (
        "breaker_cooldown_ms",
        "How long a tripped sink is skipped before it is probed again.",
        false,
    ),
    (
        "idempotency_ttl_hours",
        "How long an idempotency key is remembered, per source.",
        false,
    ),
    (
        "drain_timeout_secs",
        "Longest drain on SIGTERM; keep it below the unit's TimeoutStopSec (40 s).",
        false,
    ),
    ("max_body_bytes", "Largest request body (413 above).", false),
    (
        "max_batch_events",
        "Most events in one batch request (413 above).",
        false,
    ),
    (
        "max_queue_events",
        "Queue high-water mark: intake answers 503 above it.",
        false,
    ),
    (
        "max_queue_bytes",
        "The same in bytes of stored records; 0: no byte limit.",
        false,
    ),
    (
        "admin_token",
        "Bearer token for /admin and the dlq subcommands; empty: loopback callers only.",
        false,
    ),
    (
        "stats_token",
        "Bearer token for /stats/* and the dashboard's figures (admin_token also works); empty: open.",
        false,
    ),
    (
        "log_format",
        "auto (JSON under systemd, text at a terminal), text or json.",
        true,
    ),
    (
        "log_level",
        "A tracing filter, e.g. info or info,inletd=debug.",
        false,
    ),
    ("cache_capacity_mb", "sled's page cache in MiB.", true),
    (
        "header_read_timeout_secs",
        "How long a client may take to send its headers.",
        true,
    ),
    (
        "request_timeout_secs",
        "How long a client may take to send its body (408 after).",
        false,
    ),
    (
        "max_connections",
        "Open connections at most; more wait in the listen backlog.",
        true,
    ),
    (
        "max_restarts_per_minute",
        "Actor restarts tolerated per minute before the daemon exits non-zero (for systemd to restart it).",
        false,
    ),
    (
        "store_stall_secs",
        "Seconds a storage write may take before the daemon logs what hung and exits non-zero (for systemd to restart it).",
        false,
    ),
];

/// Writes every asset into `args.dir`; returns the files written.
pub fn run(args: &AssetsArgs) -> Result<Vec<PathBuf>, AssetsError> {
    let dir = &args.dir;
    std::fs::create_dir_all(dir).map_err(|source| AssetsError {
        path: dir.display().to_string(),
        source,
    })?;
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let mut written = Vec::new();
    let main = dir.join("inletd.1");
    write(&main, main_page(&cmd))?;
    written.push(main);
    for sub in pages(&cmd) {
        let name = sub.get_display_name().unwrap_or(sub.get_name()).to_owned();
        let path = dir.join(format!("{name}.1"));
        write(&path, sub_page(sub))?;
        written.push(path);
    }
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let mut cmd = completion_command();
        let path =
            clap_complete::generate_to(shell, &mut cmd, "inletd", dir).map_err(|source| {
                AssetsError {
                    path: format!("{} ({shell} completions)", dir.display()),
                    source,
                }
            })?;
        written.push(path);
    }
    Ok(written)
}

/// The command line without its hidden subcommands (clap_complete would
/// offer them).
fn completion_command() -> clap::Command {
    let full = Cli::command();
    let visible: Vec<clap::Command> = full
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .cloned()
        .collect();
    clap::Command::new("inletd")
        .version(env!("CARGO_PKG_VERSION"))
        .about(full.get_about().cloned().unwrap_or_default())
        .args(full.get_arguments().cloned())
        .subcommands(visible)
}

fn write(path: &Path, text: String) -> Result<(), AssetsError> {
    std::fs::write(path, text).map_err(|source| AssetsError {
        path: path.display().to_string(),
        source,
    })
}

/// The visible subcommands at every depth (not `help`, not hidden ones).
fn pages(cmd: &clap::Command) -> Vec<&clap::Command> {
    let mut out = Vec::new();
    for sub in cmd.get_subcommands() {
        if sub.is_hide_set() || sub.get_name() == "help" {
            continue;
        }
        out.push(sub);
        out.extend(pages(sub));
    }
    out
}

/// Renders the parts of a page clap_mangen knows (it cannot fail on a Vec).
fn rendered(man: &Man, cmd: &clap::Command) -> String {
    let mut out = Vec::new();
    let _ = man.render_title(&mut out);
    let _ = man.render_name_section(&mut out);
    let _ = man.render_synopsis_section(&mut out);
    let _ = man.render_description_section(&mut out);
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        let _ = man.render_options_section(&mut out);
    }
    if cmd
        .get_subcommands()
        .any(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        let _ = man.render_subcommands_section(&mut out);
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn man(cmd: &clap::Command) -> Man {
    Man::new(cmd.clone())
        .manual("inletd manual")
        .source(format!("inletd {}", env!("CARGO_PKG_VERSION")))
}

/// A subcommand's page: clap's sections, its after-help as NOTES, SEE ALSO.
fn sub_page(cmd: &clap::Command) -> String {
    let mut page = rendered(&man(cmd), cmd);
    if let Some(notes) = cmd.get_after_long_help().or(cmd.get_after_help()) {
        page.push_str(".SH NOTES\n");
        for paragraph in notes.to_string().split("\n\n") {
            page.push_str(&format!(".PP\n{}\n", escape(&paragraph.replace('\n', " "))));
        }
    }
    page.push_str(".SH \"SEE ALSO\"\n\\fBinletd\\fR(1)\n");
    page
}

/// `inletd.1`: clap's sections plus configuration, files, environment,
/// signals, exit status, examples.
fn main_page(cmd: &clap::Command) -> String {
    let mut page = rendered(&man(cmd), cmd);
    let mut r = Roff(String::new());

    r.section("CONFIGURATION");
    r.para(&format!(
        "A TOML file given with --config (or INLETD_CONFIG); the packages install {PACKAGED_CONFIG} \
         with every key commented out at its default. Every key has a default, so no file is needed. \
         Each top-level key can also be set as INLETD_<KEY> in the environment; --bind and --data-dir \
         beat the environment, which beats the file. `inletd check-config` validates a file and names \
         every bad key. SIGHUP (systemctl reload inletd) reads the file again; keys marked (restart) \
         keep their old value until a restart."
    ));
    let defaults = toml::Table::try_from(Config::default()).unwrap_or_default();
    for (key, what, restart) in KEYS {
        let default = defaults
            .get(*key)
            .map_or_else(|| "-".to_owned(), toml::Value::to_string);
        let restart = if *restart { " (restart)" } else { "" };
        r.item(&format!("{key} = {default}"), &format!("{what}{restart}"));
    }
    r.item(
        "sum_fields = []",
        "Numeric fields, as dotted paths (properties.amount), summed per day and event type for \
         GET /stats/trends?sum= and /stats/top-events?by=sum; at most 16. Sums count from when a \
         field is added.",
    );
    r.item(
        "[[windows]]",
        "name, minutes (1 to 1440), event_types (optional), group_by (a dotted path), sum \
         (optional dotted path): a rolling window ending now, GET /stats/windows/NAME ranks its \
         groups by count, or by the sum.",
    );
    r.item(
        "[[enrichment]]",
        "name, file (a CSV with a header row), key_column, match (a dotted path): each processed \
         event whose match value is a key gains enriched.NAME.COLUMN. Read at start and on SIGHUP.",
    );
    r.item(
        "[[derive]]",
        "field (a dotted path) and one of divide, multiply, add, subtract = [a, b], each a dotted \
         path or a number: computed on each processed event after enrichment; null when an \
         operand is missing.",
    );
    r.item(
        "[[sources]]",
        "name, verify (none, standard-webhooks, github, stripe), secret or secret_file, \
         rate_limit_per_sec: POST /webhook/NAME/events and /webhook/NAME/batch with their own \
         idempotency scope, signature check and token bucket.",
    );
    r.item(
        "[[sinks]]",
        "name, type = \"http\" (url, timeout_ms) or \"file\" (path): where processed batches are \
         forwarded. None: events are only counted by the built-in analytics.",
    );

    r.section("HTTP API");
    r.para(
        "POST /webhook/events and /webhook/batch (or /webhook/SOURCE/…) take events (202 once on \
         disk, 200 for a duplicate); GET /health, /ready, /metrics (Prometheus); GET /stats/summary, \
         /stats/dau, /stats/top-events, /stats/retention, /stats/windows, /stats/trends, \
         /stats/rate; GET / (the live dashboard); GET /admin/queue; GET, POST replay and \
         DELETE /admin/dlq (what inletd dlq uses).",
    );

    r.section("FILES");
    r.item(
        PACKAGED_CONFIG,
        "The configuration (a conffile of the packages).",
    );
    r.item(
        "/var/lib/inletd",
        "The packaged data directory, owned by the inletd system user. Kept when the package is \
         removed, deleted when it is purged.",
    );
    r.item(
        "/usr/lib/systemd/system/inletd.service",
        "The systemd unit: Type=notify, check-config before each start, reload by SIGHUP, \
         a drain within TimeoutStopSec, sandboxed.",
    );

    r.section("ENVIRONMENT");
    r.item("INLETD_CONFIG", "The configuration file, as --config.");
    r.item(
        "INLETD_<KEY>",
        "Any top-level configuration key, e.g. INLETD_BIND=0.0.0.0:5015 or INLETD_BATCH_SIZE=50.",
    );

    r.section("SIGNALS");
    r.item(
        "SIGHUP",
        "Reload the configuration; a broken file is refused and the old one kept.",
    );
    r.item(
        "SIGTERM, SIGINT",
        "Drain: /ready and intake answer 503, requests already taken finish, the queue is \
         processed for up to drain_timeout_secs, then exit 0. What is left stays on disk for the \
         next start. A second signal exits at once (130).",
    );

    r.section("EXIT STATUS");
    r.item(
        "run",
        "0 after a drain; 1 when the configuration or the store cannot be used; non-zero when \
         actors kept failing (more than max_restarts_per_minute) or a storage write hung \
         (longer than store_stall_secs); 130 on a second signal.",
    );
    r.item("check-config", "0 valid; 1 invalid (every bad key named).");
    r.item(
        "import, stats, dlq, demo",
        "0 done; 1 some events rejected, or nothing to act on (an id not in the DLQ); 2 the \
         daemon could not be reached or refused (401/403), or the input could not be read.",
    );

    r.section("EXAMPLES");
    r.example(&[
        "curl \\-X POST http://127.0.0.1:5015/webhook/events \\e",
        "  \\-H 'Content\\-Type: application/json' \\e",
        "  \\-d '{\"event_id\":\"evt_1\",\"event_type\":\"user_signup\"}'",
        "inletd stats",
        "inletd dlq list",
        "inletd dlq replay            # the oldest 100 entries",
        "inletd dlq purge 12 13",
        "sudoedit /etc/inletd/inletd.toml && inletd \\-\\-config /etc/inletd/inletd.toml check\\-config \\e",
        "  && systemctl reload inletd",
    ]);

    r.section("SEE ALSO");
    let mut see: Vec<String> = pages(cmd)
        .iter()
        .map(|c| format!("\\fB{}\\fR(1)", escape(c.get_display_name().unwrap_or(""))))
        .collect();
    see.extend([
        "\\fBsystemctl\\fR(1)".to_owned(),
        "\\fBsystemd.exec\\fR(5)".to_owned(),
    ]);
    r.0.push_str(&see.join(", "));
    r.0.push('\n');

    page.push_str(&r.0);
    let mut tail = Vec::new();
    let _ = man(cmd).render_version_section(&mut tail);
    page.push_str(&String::from_utf8_lossy(&tail));
    page
}

/// A little roff writer for the hand-written sections.
struct Roff(String);

impl Roff {
    /// `.SH NAME`.
    fn section(&mut self, name: &str) {
        self.0.push_str(&format!(".SH \"{name}\"\n"));
    }

    /// A paragraph of plain text.
    fn para(&mut self, text: &str) {
        self.0.push_str(&format!(".PP\n{}\n", escape(text)));
    }

    /// A tagged paragraph: the term in bold, then its text.
    fn item(&mut self, term: &str, text: &str) {
        self.0.push_str(&format!(
            ".TP\n\\fB{}\\fR\n{}\n",
            escape(term),
            escape(text)
        ));
    }

    /// Lines shown as typed (already escaped).
    fn example(&mut self, lines: &[&str]) {
        self.0.push_str(".PP\n.nf\n.RS 4\n");
        for line in lines {
            self.0.push_str(line);
            self.0.push('\n');
        }
        self.0.push_str(".RE\n.fi\n");
    }
}

/// Plain text as roff: backslashes and hyphens escaped, no line starting
/// with a control character.
fn escape(text: &str) -> String {
    let text = text.replace('\\', "\\e").replace('-', "\\-");
    text.lines()
        .map(|line| {
            if line.starts_with('.') || line.starts_with('\'') {
                format!("\\&{line}")
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// The man page lists every scalar key of the configuration, no more.
    #[test]
    fn the_man_page_covers_every_config_key() {
        let defaults = toml::Table::try_from(Config::default()).expect("defaults serialise");
        let scalar: BTreeSet<&str> = defaults
            .iter()
            .filter(|(_, v)| !matches!(v, toml::Value::Array(_) | toml::Value::Table(_)))
            .map(|(k, _)| k.as_str())
            .collect();
        let listed: BTreeSet<&str> = KEYS.iter().map(|(k, _, _)| *k).collect();
        assert_eq!(scalar, listed);
    }

    /// The packaged config names every key, and uncommenting every
    /// `# key = value` line gives exactly the defaults (plus its data_dir).
    #[test]
    fn the_packaged_config_has_every_key_at_its_default() {
        let text = include_str!("../../packaging/inletd.toml");
        let mut uncommented = String::new();
        for line in text.lines() {
            let line = line.trim_start_matches("# ");
            if line.starts_with('[') {
                break;
            }
            if line
                .split_once('=')
                .is_some_and(|(k, _)| !k.trim().is_empty() && !k.trim().contains(' '))
            {
                uncommented.push_str(line);
                uncommented.push('\n');
            }
        }
        let table: toml::Table = toml::from_str(&uncommented).expect("the keys parse");
        for (key, _, _) in KEYS {
            assert!(
                table.contains_key(*key),
                "packaging/inletd.toml lacks {key}"
            );
        }
        let config = Config::from_parts(&uncommented, &[], &[]).expect("valid");
        assert_eq!(
            config,
            Config {
                data_dir: "/var/lib/inletd".into(),
                ..Config::default()
            }
        );
        assert!(Config::from_parts(text, &[], &[]).is_ok());
    }

    #[test]
    fn roff_text_is_escaped() {
        assert_eq!(escape(".x -y \\z"), "\\&.x \\-y \\ez");
    }

    #[test]
    fn every_asset_is_written() {
        let dir = std::env::temp_dir().join(format!("inletd-assets-{}", std::process::id()));
        let written = run(&AssetsArgs { dir: dir.clone() }).expect("assets");
        let names: BTreeSet<String> = written
            .iter()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        for name in [
            "inletd.1",
            "inletd-dlq-list.1",
            "inletd-check-config.1",
            "inletd.bash",
            "_inletd",
            "inletd.fish",
        ] {
            assert!(names.contains(name), "{name} not in {names:?}");
        }
        assert!(!names.iter().any(|n| n.contains("generate")), "{names:?}");
        for name in ["inletd.bash", "_inletd", "inletd.fish"] {
            let text = std::fs::read_to_string(dir.join(name)).expect("completions");
            assert!(text.contains("dlq"), "{name}");
            assert!(
                !text.contains("generate-assets"),
                "{name} offers a hidden subcommand"
            );
        }
        let page = std::fs::read_to_string(dir.join("inletd.1")).expect("page");
        assert!(page.contains("drain_timeout_secs = 25"), "{page}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
