//! `profiler`: an eBPF sampling profiler for Linux.

mod attach;
mod cli;
mod compare;
mod daemon;
mod diff;
mod event_loop;
mod mappings;
mod output;
mod perf_map;
mod procfs;
mod profile;
mod sampler;
mod symbolize;
#[cfg_attr(
    not(test),
    expect(
        dead_code,
        reason = "the in-kernel unwinder that reads these tables is not wired in yet"
    )
)]
mod unwind;

use std::process::ExitCode;

use clap::Parser as _;

use crate::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let quiet_level = match cli.command {
        // A service logs its lifecycle.
        Command::Daemon(_) => log::LevelFilter::Info,
        _ => log::LevelFilter::Warn,
    };
    let level = match cli.verbose {
        0 => quiet_level,
        1 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    env_logger::Builder::new()
        .filter_level(level)
        .filter_module("blazesym", log::LevelFilter::Warn.min(level))
        .format_timestamp(None)
        .parse_env("PROFILER_LOG")
        .init();

    let result = match cli.command {
        Command::Attach(args) => attach::run(args),
        Command::Diff(args) => diff::run_diff(&args),
        Command::Report(args) => diff::run_report(&args),
        Command::Daemon(args) => daemon::run(*args),
    };
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}
