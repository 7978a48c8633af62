//! The `sluice` binary: parses the command line, starts logging, and hands over to the library.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use sluice::commands::{self, DumpFrom};
use sluice::config::Config;
use sluice::query::Format;

/// mimalloc rather than glibc's malloc: the profile stage allocates and frees small objects per
/// message (step 19 in the history of docs/performance.md: `git log -p docs/performance.md`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Customer data platform and event router"
)]
struct Cli {
    /// The config file; relative paths in it resolve from its folder.
    #[arg(long, global = true, default_value = "sluice.toml")]
    config: PathBuf,
    /// How log lines look.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (the default).
    Serve,
    /// Check the config and print every problem as file:line:col: message.
    Check,
    /// Run SQL over the lake (tables `events` and `quarantine`, partitioned by `date`).
    Query {
        sql: String,
        #[arg(long, value_enum, default_value_t = QueryFormat::Table)]
        format: QueryFormat,
    },
    /// Put messages that were set aside back on their way (the server must be running).
    Replay {
        #[command(subcommand)]
        command: ReplayCommand,
    },
    /// Work with the intake log.
    Log {
        #[command(subcommand)]
        command: LogCommand,
    },
    /// A webhook receiver for trying destinations out: answers every POST with 200 and prints
    /// each message it carries as a line of JSON (no config needed).
    Receive {
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: std::net::SocketAddr,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum QueryFormat {
    Table,
    Json,
    Csv,
}

#[derive(Subcommand)]
enum ReplayCommand {
    /// Re-admit quarantined messages that the tracking plan now lets through.
    Quarantine {
        /// Only this event (track) or name (page/screen).
        #[arg(long)]
        event: Option<String>,
        /// Only messages received at or after this time (RFC 3339).
        #[arg(long)]
        since: Option<String>,
    },
    /// `sluice replay <destination>`: deliver that destination's dead-lettered messages again.
    #[command(external_subcommand)]
    Destination(Vec<String>),
}

#[derive(Subcommand)]
enum LogCommand {
    /// Print the log's messages as JSON lines.
    Dump {
        /// Start at this offset (default: the oldest held).
        #[arg(long, conflicts_with = "cursor")]
        from: Option<u64>,
        /// Start at this consumer's durable cursor.
        #[arg(long)]
        cursor: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let command = cli.command.unwrap_or(Command::Serve);
    if let Command::Check = command {
        // `check` reports a broken config itself, with everything else that is wrong.
        return match commands::check(&cli.config, &mut std::io::stdout()) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => fail(e.into()),
        };
    }
    if let Command::Receive { listen } = command {
        let outcome = tokio::runtime::Runtime::new()
            .map_err(anyhow::Error::from)
            .and_then(|runtime| runtime.block_on(commands::receive(listen, shutdown_signal())));
        return match outcome {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e),
        };
    }
    if let Command::Replay {
        command: ReplayCommand::Destination(args),
    } = &command
    {
        if args.len() != 1 {
            eprintln!("usage: sluice replay <destination> | sluice replay quarantine [--event E] [--since T]");
            return ExitCode::from(2);
        }
    }
    if let Command::Serve = command {
        // A write past a file size limit should fail with EFBIG, which the intake log handles
        // like a full disk, instead of killing the process.
        // SAFETY: setting a signal's disposition to "ignore" before any thread starts.
        unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    }
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(problems) => {
            eprintln!("{problems}");
            return ExitCode::FAILURE;
        }
    };
    match run(command, config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

/// Runs every command but `check`, on the loaded config.
fn run(command: Command, config: Config) -> anyhow::Result<()> {
    let mut out = std::io::stdout();
    match command {
        Command::Check | Command::Receive { .. } => {
            unreachable!("run before the config is loaded")
        }
        Command::Serve => serve(config),
        Command::Query { sql, format } => {
            let format = match format {
                QueryFormat::Table => Format::Table,
                QueryFormat::Json => Format::Json,
                QueryFormat::Csv => Format::Csv,
            };
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(commands::query(&config, &sql, format, &mut out.lock()))
        }
        Command::Replay {
            command: ReplayCommand::Quarantine { event, since },
        } => {
            let request = sluice::replay::ReplayRequest { event, since };
            commands::replay_quarantine(&config, &request, &mut out)
        }
        Command::Replay {
            command: ReplayCommand::Destination(args),
        } => commands::replay_destination(&config, &args[0], &mut out),
        Command::Log {
            command: LogCommand::Dump { from, cursor },
        } => {
            let from = match (from, cursor) {
                (Some(n), _) => DumpFrom::Offset(n),
                (None, Some(name)) => DumpFrom::Cursor(name),
                (None, None) => DumpFrom::Oldest,
            };
            commands::log_dump(&config.log.dir, from, &mut out).map(drop)
        }
    }
}

fn serve(config: Config) -> anyhow::Result<()> {
    let listener = TcpListener::bind(config.server.listen)
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.server.listen))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(sluice::app::run(config, listener, shutdown_signal()))
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn fail(e: anyhow::Error) -> ExitCode {
    eprintln!("error: {e:#}");
    ExitCode::FAILURE
}
