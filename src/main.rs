//! The `inletd` command line: parse, load the config, run.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use inletd::config::Config;

/// Durable webhook intake: dedupe, write-ahead queue, micro-batches, DLQ.
#[derive(Debug, Parser)]
#[command(name = "inletd", version, about)]
struct Cli {
    /// TOML configuration file (every key has a default; none is needed).
    #[arg(long, global = true, env = "INLETD_CONFIG")]
    config: Option<PathBuf>,
    /// Listen address, e.g. 127.0.0.1:5015 (beats INLETD_BIND and the file).
    #[arg(long, global = true)]
    bind: Option<String>,
    /// Data directory (beats INLETD_DATA_DIR and the file).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon (the default).
    Run,
    /// Load and validate the configuration; print it; exit non-zero if bad.
    CheckConfig,
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
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("inletd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let config = cli.config()?;
    match cli.command.unwrap_or(Command::Run) {
        Command::CheckConfig => {
            print!(
                "{}",
                toml::to_string(&config).context("printing the config")?
            );
            eprintln!("inletd: configuration is valid");
            Ok(())
        }
        Command::Run => {
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(async {
                let signal = inletd::shutdown::on_signal().context("installing signal handlers")?;
                inletd::app::run(config, async {
                    let _ = signal.await;
                })
                .await?;
                Ok(())
            })
        }
    }
}
