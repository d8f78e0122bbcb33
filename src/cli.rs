//! Command line: `buffergate serve`, `consume`, `migrate`, `check`, `drain` and `replay`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::check;
use crate::clickhouse::{fleet, migrate};
use crate::config::{self, Config, LogFormat};
use crate::replay;
use crate::server;
use crate::shutdown::Shutdown;

#[derive(Debug, Parser)]
#[command(name = "buffergate", version, about = "HTTP ingestion gateway for ClickHouse Buffer tables")]
pub struct Cli {
    /// TOML configuration file; `BUFFERGATE_*` environment variables override it.
    #[arg(long, global = true, env = "BUFFERGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// `migrate`, `check` and `drain`: only this stream (default: every stream); `replay`:
    /// the stream to replay (default: `default`).
    #[arg(long, global = true)]
    pub stream: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP gateway.
    Serve,
    /// Run the gateway with its Kafka consumer: `kafka_topics` read into the Buffer
    /// (docs/kafka.md); the HTTP API answers too (health, readiness, metrics, events).
    Consume,
    /// Create the database, the destination table and the Buffer table (idempotent); when the
    /// destination gained columns, drain and recreate the Buffer with them.
    Migrate,
    /// Check the Buffer's tuning against the live server and this configuration; exit 1 on
    /// warnings or errors.
    Check {
        #[arg(long, value_enum, default_value = "text")]
        format: OutputFormat,
        /// Expected rows per second into the Buffer (default: measured, server-wide, over 1 s).
        #[arg(long)]
        rate: Option<f64>,
        /// The server's RAM in bytes, where the server does not report it.
        #[arg(long)]
        server_memory: Option<u64>,
    },
    /// Flush the Buffer (and the quarantine's) into its destination (OPTIMIZE TABLE), wait
    /// until it is empty, print the rows moved.
    Drain,
    /// Send a stream's quarantined events again, through a running gateway (its admin API):
    /// what now fits is stored once and marked replayed; the rest stays with its new reason.
    Replay {
        /// Only events quarantined for this reason (malformed, not_an_event, unknown_field,
        /// invalid_value, out_of_window, unwritable_column).
        #[arg(long)]
        reason: Option<String>,
        /// Only events received at or after this time: RFC 3339, or seconds since the epoch.
        #[arg(long)]
        since: Option<String>,
        /// The gateway's URL (default: its `listen` address on this host).
        #[arg(long)]
        gateway: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

/// Parses the command line, runs the command, and turns its outcome into an exit code.
#[allow(clippy::print_stdout)] // check and drain report on stdout
pub async fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("buffergate: {e}");
            return ExitCode::from(2);
        }
    };
    init_tracing(config.http.log_format);
    for name in config::unknown_env_vars() {
        tracing::warn!(variable = %name, "ignoring an environment variable that names no configuration key");
    }
    let streams: Vec<Arc<Config>> = match &cli.stream {
        None => config.streams(),
        Some(name) => match config.streams().into_iter().find(|s| s.stream.as_str() == name) {
            Some(stream) => vec![stream],
            None => {
                eprintln!("buffergate: no stream is named {name:?}; configured: {}", config.stream_names().join(", "));
                return ExitCode::from(2);
            }
        },
    };
    let several = !config.streams.is_empty();
    match cli.command {
        Command::Serve => run_server(config, server::Role::Serve).await,
        Command::Consume if config.kafka_topics().is_empty() => {
            eprintln!("buffergate consume: set BUFFERGATE_KAFKA_BROKERS and BUFFERGATE_KAFKA_TOPICS");
            ExitCode::from(2)
        }
        Command::Consume => run_server(config, server::Role::Consume).await,
        Command::Check { format, rate, server_memory } => {
            let options = check::Options { rate, server_memory };
            let findings = match fleet::resolve(&config).await {
                Ok(topology) => check::run_streams(&streams, several, &topology, options).await,
                Err(e) => Err(e.to_string()),
            };
            match findings {
                Ok(findings) => {
                    let text = match format {
                        OutputFormat::Text => check::render_text(&findings),
                        OutputFormat::Json => {
                            let report = serde_json::json!({"ok": !check::failed(&findings), "findings": findings});
                            format!("{report:#}\n")
                        }
                    };
                    print!("{text}");
                    if check::failed(&findings) { ExitCode::FAILURE } else { ExitCode::SUCCESS }
                }
                Err(e) => {
                    eprintln!("buffergate check: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Replay { reason, since, gateway } => {
            let stream = cli.stream.as_deref().unwrap_or(config::DEFAULT_STREAM);
            let ask = replay::client::Ask {
                stream,
                reason: reason.as_deref(),
                since: since.as_deref(),
                gateway: gateway.as_deref(),
            };
            match replay::client::ask(&config, &ask).await {
                Ok(answer) => {
                    println!("{}", answer.trim_end());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("buffergate replay: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Drain => {
            let mut ok = true;
            for stream in &streams {
                ok &= drain_every_node(stream).await;
                // The quarantine's Buffer too: `drain` empties every Buffer the stream writes.
                if let Some(quarantine) = stream.quarantine_stream() {
                    ok &= drain_every_node(&quarantine).await;
                }
            }
            if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
        Command::Migrate => {
            for stream in &streams {
                match migrate_every_node(stream).await {
                    Ok(report) => {
                        for line in report.lines {
                            if several {
                                eprintln!("[{}] {line}", stream.stream);
                            } else {
                                eprintln!("{line}");
                            }
                        }
                    }
                    Err(e) => {
                        eprintln!("buffergate migrate: stream {}: {e}", stream.stream);
                        return ExitCode::FAILURE;
                    }
                }
            }
            eprintln!("migrate: done");
            ExitCode::SUCCESS
        }
    }
}

async fn migrate_every_node(config: &Config) -> Result<migrate::Report, migrate::MigrateError> {
    let topology = fleet::resolve(config).await?;
    fleet::migrate_all(config, &topology).await
}

/// Drains one stream's Buffer on every node; `false` when any failed.
#[allow(clippy::print_stdout)] // drain reports on stdout
async fn drain_every_node(config: &Config) -> bool {
    let topology = match fleet::resolve(config).await {
        Ok(topology) => topology,
        Err(e) => {
            eprintln!("buffergate drain: {e}");
            return false;
        }
    };
    let several = topology.nodes() > 1;
    let mut ok = true;
    for (node, outcome) in fleet::drain_all(config, &topology).await {
        let on = if several { format!(" on {node}") } else { String::new() };
        match outcome {
            Ok(rows) => println!(
                "drained{on}: {rows} rows moved to {}.{}",
                config.table.database, config.table.destination_table
            ),
            Err(e) => {
                ok = false;
                eprintln!("buffergate drain{on}: {e}");
            }
        }
    }
    ok
}

async fn run_server(config: Config, role: server::Role) -> ExitCode {
    let shutdown = Shutdown::new();
    shutdown.on_signals();
    match server::serve(config, shutdown, role).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "buffergate stopped");
            ExitCode::FAILURE
        }
    }
}

/// The log filter when `RUST_LOG` is unset.
const DEFAULT_LOG_FILTER: &str = "info,clickhouse=warn";

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    // The ClickHouse client opens `info` spans around every INSERT and query; an enabled span's
    // fields are formatted and stored when it opens, though nothing logs inside it (measured:
    // ~13k instructions per INSERT). Its warnings and errors still show.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
