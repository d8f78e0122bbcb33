//! Command line: `buffergate serve` and `buffergate migrate`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::clickhouse::{ClickHouse, migrate};
use crate::config::{self, Config, LogFormat};
use crate::server;
use crate::shutdown::Shutdown;

#[derive(Debug, Parser)]
#[command(name = "buffergate", version, about = "HTTP ingestion gateway for ClickHouse Buffer tables")]
pub struct Cli {
    /// TOML configuration file; `BUFFERGATE_*` environment variables override it.
    #[arg(long, global = true, env = "BUFFERGATE_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP gateway.
    Serve,
    /// Create the database, the destination table and the Buffer table (idempotent).
    Migrate,
}

/// Parses the command line, runs the command, and turns its outcome into an exit code.
pub async fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("buffergate: {e}");
            return ExitCode::from(2);
        }
    };
    init_tracing(config.log_format);
    for name in config::unknown_env_vars() {
        tracing::warn!(variable = %name, "ignoring an environment variable that names no configuration key");
    }
    match cli.command {
        Command::Serve => {
            let shutdown = Shutdown::new();
            shutdown.on_signals();
            match server::serve(config, shutdown).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "buffergate stopped");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Migrate => match migrate::migrate(&ClickHouse::new(&config), &config).await {
            Ok(report) => {
                for line in report.lines {
                    eprintln!("{line}");
                }
                eprintln!("migrate: done");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("buffergate migrate: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
