//! The `inletd` command line: parse, load the config, run.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use inletd::cli;
use inletd::config::Config;

/// Durable webhook intake: dedupe, write-ahead queue, micro-batches, DLQ.
#[derive(Debug, Parser)]
#[command(name = "inletd", version, about)]
struct Cli {
    /// TOML configuration file (every key has a default; none is needed).
    #[arg(long, global = true, env = "INLETD_CONFIG")]
    config: Option<PathBuf>,
    /// Listen address, e.g. 127.0.0.1:5015 (beats INLETD_BIND and the file);
    /// import, stats and demo send to it unless --url is given.
    #[arg(long, global = true)]
    bind: Option<String>,
    /// Data directory (beats INLETD_DATA_DIR and the file).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// What to do (default: run the daemon).
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon (the default).
    Run,
    /// Load and validate the configuration; print it; exit non-zero if bad.
    CheckConfig,
    /// Import events from a CSV or JSON-lines file into a running daemon.
    Import(cli::import::Args),
    /// Show a running daemon's totals, events by type, queue, DLQ and latency.
    Stats(cli::stats::Args),
    /// Send seed 000's sample traffic (basic, idempotency, burst, batch) to a running daemon.
    Demo(cli::demo::Args),
}

impl Command {
    /// Whether this subcommand is a client of a running daemon (exit 2 on a fatal error).
    fn is_client(&self) -> bool {
        matches!(
            self,
            Command::Import(_) | Command::Stats(_) | Command::Demo(_)
        )
    }
}

impl Cli {
    fn config(&self) -> anyhow::Result<Config> {
        let mut overrides = Vec::new();
        if let Some(b) = &self.bind {
            overrides.push(("bind", b.clone()));
        }
        if let Some(d) = &self.data_dir {
            overrides.push(("data_dir", d.display().to_string()));
        }
        Ok(Config::load(self.config.as_deref(), &overrides)?)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let fatal = match &cli.command {
        Some(c) if c.is_client() => cli::EXIT_FATAL,
        _ => 1,
    };
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("inletd: {e:#}");
            ExitCode::from(fatal)
        }
    }
}

/// Runs the subcommand; returns the exit code.
fn run(cli: Cli) -> anyhow::Result<u8> {
    let config = cli.config()?;
    match cli.command.unwrap_or(Command::Run) {
        Command::CheckConfig => {
            print!(
                "{}",
                toml::to_string(&config).context("printing the config")?
            );
            eprintln!("inletd: configuration is valid");
            Ok(0)
        }
        Command::Run => {
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(async {
                let signal = inletd::shutdown::on_signal().context("installing signal handlers")?;
                inletd::app::run(config, async {
                    let _ = signal.await;
                })
                .await?;
                Ok(0)
            })
        }
        Command::Import(args) => client(async {
            cli::import::run(&config, &args)
                .await
                .with_context(|| format!("import {}", args.file.display()))
        }),
        Command::Stats(args) => {
            client(async { cli::stats::run(&config, &args).await.context("stats") })
        }
        Command::Demo(args) => {
            client(async { cli::demo::run(&config, &args).await.context("demo") })
        }
    }
}

/// Runs a client subcommand on a current-thread runtime.
fn client(work: impl Future<Output = anyhow::Result<cli::Outcome>>) -> anyhow::Result<u8> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    Ok(runtime.block_on(work)?.exit_code())
}
