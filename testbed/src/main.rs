//! The lab's binary, `ephemerald-testbed`: `demo`, `bench`, `compare` and
//! `testbed up|down`. Wiring only; the work is in the library.

use std::process::ExitCode;

use clap::Parser;
use ephemerald_testbed::cli::{Cli, Command};

/// EX_USAGE from sysexits.h, as the agent's binary.
const EXIT_USAGE: u8 = 64;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(EXIT_USAGE),
            };
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ephemerald-testbed: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Demo(args) => {
            init_tracing("warn");
            report(runtime.block_on(ephemerald_testbed::demo::run(args)))
        }
        Command::Bench(args) => {
            init_tracing("warn");
            report(runtime.block_on(ephemerald_testbed::bench::run_cli(args)))
        }
        Command::Compare(args) => {
            init_tracing("warn");
            report(runtime.block_on(ephemerald_testbed::compare::run_cli(args)))
        }
        Command::Testbed(args) => {
            init_tracing("info");
            report(runtime.block_on(ephemerald_testbed::demo::testbed_cli(args)))
        }
    }
}

fn report<E: std::error::Error>(result: Result<(), E>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `error: cause: cause`.
            let mut s = e.to_string();
            let mut cur = e.source();
            while let Some(c) = cur {
                s.push_str(": ");
                s.push_str(&c.to_string());
                cur = c.source();
            }
            eprintln!("ephemerald-testbed: {s}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}
