//! Client subcommands: they talk to a running daemon over HTTP.
//!
//! | module     | subcommand |
//! |------------|------------|
//! | [`client`] | the shared HTTP client (address from `bind` or `--url`, admin token) |
//! | [`import`] | `inletd import FILE`: CSV or JSON lines, in batches, with a progress bar |
//! | [`stats`]  | `inletd stats`: `/stats/summary` as a table or JSON |
//! | [`demo`]   | `inletd demo basic\|idempotency\|burst\|batch`: sample traffic |
//!
//! Exit codes are the same for all of them: 0 when every event was taken
//! (accepted or a duplicate), 1 when some were rejected, [`EXIT_FATAL`] when
//! the work could not be done (file unreadable, daemon unreachable).

pub mod client;
pub mod demo;
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
}

impl Outcome {
    /// The process exit code for this outcome.
    pub fn exit_code(self) -> u8 {
        match self {
            Outcome::Clean => 0,
            Outcome::Rejections => 1,
        }
    }
}
