//! The command line: its definitions, and the client subcommands that talk
//! to a running daemon over HTTP.
//!
//! | module     | subcommand |
//! |------------|------------|
//! | [`args`]   | the clap definitions (`Cli`, `Command`, `AssetsArgs`) that `main.rs` parses |
//! | [`client`] | the shared HTTP client (address from `bind` or `--url`, admin token) |
//! | [`import`] | `inletd import FILE`: CSV or JSON lines, in batches, with a progress bar |
//! | [`stats`]  | `inletd stats`: `/stats/summary` as a table or JSON |
//! | [`dlq`]    | `inletd dlq list\|show\|replay\|purge`: the dead-letter queue via `/admin/dlq` |
//! | [`demo`]   | `inletd demo basic\|idempotency\|burst\|batch`: sample traffic |
//! | [`assets`] | `inletd generate-assets DIR` (hidden): man pages and shell completions, rendered from [`args`] (assets uses args, never the reverse) |
//!
//! Exit codes are the same for all of them: 0 when the work was done (every
//! event taken, accepted or a duplicate), 1 when some events were rejected
//! or there was nothing to act on (an unknown DLQ id), [`EXIT_FATAL`] when
//! the work could not be done (file unreadable, daemon unreachable or
//! refusing).

pub mod args;
pub mod assets;
pub mod client;
pub mod demo;
pub mod dlq;
pub mod import;
pub mod stats;

/// Exit code of a client subcommand that could not do its work.
pub const EXIT_FATAL: u8 = 2;

/// How a client subcommand that ran to its end went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Everything was taken: exit 0.
    Clean,
    /// Some events were rejected or refused (each was named): exit 1.
    Rejections,
    /// There was nothing to act on (a DLQ id that is not there, an empty DLQ): exit 1.
    NothingDone,
}

impl Outcome {
    /// The process exit code for this outcome.
    pub fn exit_code(self) -> u8 {
        match self {
            Outcome::Clean => 0,
            Outcome::Rejections | Outcome::NothingDone => 1,
        }
    }
}
