//! The `ratelimitd` binary (also installed as `ratelimit`, the reference's name; with no
//! command it serves): parses the command line, wires the library's parts and is the only
//! place that exits.

use std::{process::ExitCode, sync::Arc};

use clap::Parser;
use ratelimitd::settings::{Cli, Command};

/// mimalloc rather than glibc's malloc (feature `mimalloc`, on by default): a call allocates
/// and frees some forty small blocks (tonic, h2, prost), and under load glibc's malloc spent
/// a fifth of the server's CPU on them, trimming and faulting pages back in
/// (docs/benchmarks.md, "The allocator").
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let command = match Cli::parse().into_command() {
        Ok(command) => command,
        Err(e) => e.exit(),
    };
    match command {
        Command::CheckConfig(args) => ratelimitd::cli::check_config(&args.source()),
        Command::Explain(args) => ratelimitd::cli::explain(&args),
        Command::Usage(args) => ratelimitd::cli::usage(&args),
        Command::Serve(mut args) => {
            args.unsupported_set = ratelimitd::settings::UNSUPPORTED_ENV
                .iter()
                .copied()
                .filter(|name| std::env::var_os(name).is_some())
                .collect();
            if let Err(e) = ratelimitd::cli::init_logging(&args.log_level, args.log_format) {
                eprintln!("ratelimitd: {e}");
                return ExitCode::from(2);
            }
            let runtime = match ratelimitd::serve::runtime(&args) {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("ratelimitd: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let served = runtime.block_on(async {
                let shutdown = ratelimitd::serve::shutdown_signal()?;
                ratelimitd::serve::serve(Arc::new(*args), shutdown).await
            });
            match served {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    eprintln!("ratelimitd: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
