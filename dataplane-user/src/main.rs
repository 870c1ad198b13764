//! `dataplane`: the command line of host admins and migration scripts.
//!
//! `daemon` runs the daemon; `load`, `unload`, `gate` and `capture` work on
//! the pinned dataplane directly; every other command asks the daemon over
//! its control socket. Exit codes: 0 done, 1 the daemon answered with an
//! error, 2 bad usage, 3 the daemon cannot be reached, 4 a local failure,
//! 5 a migration failed (the source keeps serving).
mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli::run(cli::Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("{failure}");
            ExitCode::from(failure.exit_code())
        }
    }
}
