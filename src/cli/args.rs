//! The command line's shape (clap): the flags every subcommand takes and
//! the subcommands. `src/main.rs` parses it and dispatches; `inletd
//! generate-assets` renders the man pages and shell completions from these
//! same definitions, so `--help`, `man inletd` and tab completion agree.

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};

use super::{demo, dlq, import, stats};
use crate::config::{Config, ConfigError};

/// The configuration file the packages install; client subcommands read it
/// (for `bind` and `admin_token`) when no `--config` is given.
pub const PACKAGED_CONFIG: &str = "/etc/inletd/inletd.toml";

/// Durable webhook intake: dedupe, write-ahead queue, micro-batches, DLQ.
#[derive(Debug, Parser)]
#[command(
    name = "inletd",
    version,
    about,
    long_about = "\
Durable webhook intake: dedupe, write-ahead queue, micro-batches, DLQ.

inletd takes events over HTTP, drops duplicates by idempotency key, writes
every accepted event to a write-ahead queue on disk before it answers 202,
processes them in micro-batches into forwarding sinks (HTTP, file) and a
built-in counter, retries with backoff, parks what keeps failing in a
dead-letter queue (DLQ), and drains without loss on SIGTERM.

With no subcommand (or `run`) it runs the daemon. The other subcommands
talk to a running daemon over HTTP at the configured `bind` (or --url),
sending the config's admin_token where one is set.",
    after_help = "\
Every setting has a default, so no file is needed; precedence is flags, then
INLETD_<KEY> environment variables, then the --config file. Client
subcommands and check-config read /etc/inletd/inletd.toml when no --config
is given and that file is readable. SIGHUP reloads the configuration; SIGTERM drains and exits."
)]
pub struct Cli {
    /// TOML configuration file (every key has a default; none is needed).
    #[arg(long, global = true, env = "INLETD_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Listen address, e.g. 127.0.0.1:5015 (beats INLETD_BIND and the file);
    /// import, stats, dlq and demo send to it unless --url is given.
    #[arg(long, global = true, value_name = "ADDR")]
    pub bind: Option<String>,
    /// Data directory (beats INLETD_DATA_DIR and the file).
    #[arg(long, global = true, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// What to do (default: run the daemon).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (the default).
    #[command(after_help = "\
Ready (and READY=1 to systemd) once the store is open and the listener bound.
SIGHUP reloads the configuration (keys marked restart-only keep their value);
SIGTERM or SIGINT drains: intake answers 503, the queue is processed for up to
drain_timeout_secs, then the process exits 0. A second signal exits at once
(130); the write-ahead queue still holds everything accepted.")]
    Run,
    /// Load and validate the configuration; print it; exit non-zero if bad.
    #[command(after_help = "\
Prints the effective configuration as TOML (secrets masked) and exits 0, or
lists every problem (with its line and column in the file, or the variable or
flag that set it) and exits 1. Without --config it checks
/etc/inletd/inletd.toml when that file is readable, and says which file it
checked. The systemd unit runs it (with --quiet) before each start and each
reload, so that `systemctl reload` fails on a bad file.")]
    CheckConfig {
        /// Print only the verdict, not the configuration (for the systemd unit).
        #[arg(long, short)]
        quiet: bool,
    },
    /// Import events from a CSV or JSON-lines file into a running daemon.
    Import(import::Args),
    /// Show a running daemon's totals, events by type, queue, DLQ and latency.
    Stats(stats::Args),
    /// List, show, replay or purge a running daemon's dead-letter queue.
    Dlq(dlq::Args),
    /// Send sample traffic (basic, idempotency, burst, batch) to a running daemon.
    Demo(demo::Args),
    /// Write the man pages and shell completions into a directory (for packaging).
    #[command(hide = true)]
    GenerateAssets(AssetsArgs),
}

/// `inletd generate-assets` arguments. They live here, not in `assets`,
/// because assets renders these definitions: assets depends on args, never
/// the other way.
#[derive(Debug, Clone, clap::Args)]
pub struct AssetsArgs {
    /// Directory to write the man pages and completions into (created if missing).
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
}

impl Command {
    /// Whether this subcommand is a client of a running daemon (exit 2 on a fatal error).
    pub fn is_client(&self) -> bool {
        matches!(
            self,
            Command::Import(_) | Command::Stats(_) | Command::Dlq(_) | Command::Demo(_)
        )
    }
}

impl Cli {
    /// The configuration file read: `--config`, else (for a client
    /// subcommand or `check-config`) the packaged config when it is
    /// readable, else none (defaults and the environment only).
    pub fn config_file(&self) -> Option<&Path> {
        let packaged = Path::new(PACKAGED_CONFIG);
        let reads_packaged = match &self.command {
            Some(Command::CheckConfig { .. }) => true,
            Some(c) => c.is_client(),
            None => false,
        };
        match &self.config {
            Some(file) => Some(file.as_path()),
            None if reads_packaged && std::fs::File::open(packaged).is_ok() => Some(packaged),
            None => None,
        }
    }

    /// Loads the configuration: [`Cli::config_file`], the environment, then
    /// `--bind` and `--data-dir`.
    pub fn config(&self) -> Result<Config, ConfigError> {
        let mut overrides = Vec::new();
        if let Some(b) = &self.bind {
            overrides.push(("bind", b.clone()));
        }
        if let Some(d) = &self.data_dir {
            overrides.push(("data_dir", d.display().to_string()));
        }
        Config::load(self.config_file(), &overrides)
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn the_definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn dlq_subcommands_parse() {
        let cli = Cli::try_parse_from(["inletd", "dlq", "replay", "3", "4", "--json"])
            .expect("dlq replay parses");
        assert!(cli.command.as_ref().is_some_and(Command::is_client));
        assert!(Cli::try_parse_from(["inletd", "dlq", "show"]).is_err());
        assert!(Cli::try_parse_from(["inletd", "dlq", "list", "--limit", "0"]).is_err());
        assert!(Cli::try_parse_from(["inletd", "generate-assets", "/tmp/x"]).is_ok());
    }
}
