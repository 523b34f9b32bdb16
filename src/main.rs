//! The `ephemerald` binary: parses the command line, sets up tracing and
//! signals, runs the library, and maps the outcome to an exit code
//! (0 done, 1 failed, 64 bad configuration).
//!
//! Wiring only; the work is in the library. Must not hold logic a test
//! could not reach through [`ephemerald::run`].

use std::process::ExitCode;

use clap::Parser;
use ephemerald::config::{Cli, Command, LogFormat};
use tokio_util::sync::CancellationToken;

/// EX_USAGE from sysexits.h.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(EXIT_CONFIG),
            };
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ephemerald: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Run(args) => {
            let config = match args.validate() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("ephemerald: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            init_tracing(args.log_format, "info");
            runtime.block_on(run_agent(config))
        }
    }
}

async fn run_agent(config: ephemerald::config::Config) -> ExitCode {
    let shutdown = CancellationToken::new();
    let drain = config.shutdown_timeout;
    let signals = shutdown.clone();
    tokio::spawn(async move {
        let reason = wait_for_signal().await;
        tracing::info!("{reason}: draining (up to {drain:?}); containers keep running");
        signals.cancel();
        tokio::time::sleep(drain).await;
        tracing::error!("drain took longer than {drain:?}; exiting");
        std::process::exit(1);
    });
    match ephemerald::run(config, shutdown).await {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("{}", chain(&e));
            ExitCode::FAILURE
        }
    }
}

async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return "SIGINT";
        }
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
    }
}

/// `error: cause: cause`.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn init_tracing(format: LogFormat, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours only on a terminal: in a container stderr is the CRI log file
    // that `kubectl logs` and log collectors read.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
