//! The `inletd` command line: parse, load the config, dispatch. The
//! definitions live in `inletd::cli::args`.

use std::ffi::c_char;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;

use inletd::cli::{self, args::Cli, args::Command};

/// jemalloc, not glibc's malloc: less CPU per event (`inletd::allocator`).
#[global_allocator]
static ALLOCATOR: inletd::allocator::Jemalloc = inletd::allocator::Jemalloc;

/// jemalloc's settings for inletd, read before `main` from this global.
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: Option<&c_char> = inletd::allocator::MALLOC_CONF;

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
    if let Some(Command::GenerateAssets(args)) = &cli.command {
        for path in cli::assets::run(args)? {
            println!("{}", path.display());
        }
        return Ok(0);
    }
    let config = cli.config()?;
    let config_file = cli.config_file().map(|f| f.display().to_string());
    match cli.command.unwrap_or(Command::Run) {
        Command::CheckConfig { quiet } => {
            if !quiet {
                print!(
                    "{}",
                    toml::to_string(&config).context("printing the config")?
                );
            }
            match config_file {
                Some(file) => eprintln!("inletd: configuration is valid ({file})"),
                None => eprintln!(
                    "inletd: configuration is valid (no file: the defaults and INLETD_* variables)"
                ),
            }
            Ok(0)
        }
        Command::Run => {
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            let ran = runtime.block_on(async {
                let signal = inletd::shutdown::on_signal().context("installing signal handlers")?;
                inletd::app::run(config, async {
                    let _ = signal.await;
                })
                .await?;
                Ok(0)
            });
            // A store that stopped answering holds a blocking thread for good:
            // exit without waiting on it.
            runtime.shutdown_timeout(std::time::Duration::from_secs(1));
            ran
        }
        Command::Import(args) => client(async {
            // Its errors name the input themselves.
            cli::import::run(&config, &args).await.context("import")
        }),
        Command::Stats(args) => {
            client(async { cli::stats::run(&config, &args).await.context("stats") })
        }
        Command::Dlq(args) => client(async { cli::dlq::run(&config, &args).await.context("dlq") }),
        Command::Demo(args) => {
            client(async { cli::demo::run(&config, &args).await.context("demo") })
        }
        Command::GenerateAssets(_) => Ok(0),
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
