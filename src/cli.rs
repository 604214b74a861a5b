//! What `check-config` and `explain` do, and logging set-up, kept out of `main` so `main` only
//! dispatches and exits (`serve` has its own module).

use std::{io::Write, process::ExitCode};

/// `print!` that stops quietly when stdout is gone (`ratelimitd check-config | head`): a
/// closed pipe is the reader's choice, not an error worth a panic and a backtrace.
macro_rules! out {
    ($($arg:tt)*) => {{
        let _ = write!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// `println!`, quietly as [`out!`].
macro_rules! outln {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

use crate::{
    config::{load_dir_or_file, ConfigSource, RuleTree},
    limiter::SystemClock,
};

/// `check-config`: every error and exit 1, or a summary and exit 0.
pub fn check_config(source: &ConfigSource) -> ExitCode {
    match load_dir_or_file(source) {
        Ok(tree) => {
            outln!("{}", summary(&tree));
            for rule in tree.rules() {
                outln!("  {}", rule.dump_line());
            }
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors.0 {
                outln!("error: {e}");
            }
            outln!("{} error(s) in {}", errors.0.len(), source.path.display());
            ExitCode::FAILURE
        }
    }
}

/// `explain`: loads the rules and explains the descriptors given on the command line.
pub fn explain(args: &crate::settings::ExplainArgs) -> ExitCode {
    let keys = match args.cache_key.builder() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("ratelimitd: {e}");
            return ExitCode::FAILURE;
        }
    };
    let source = args.config.source();
    match load_dir_or_file(&source) {
        Ok(tree) => {
            let descriptors = crate::settings::parse_descriptors(&args.entries);
            let now = crate::limiter::Clock::now_unix(&SystemClock);
            out!(
                "{}",
                crate::explain::explain(&tree, &keys, &args.domain, &descriptors, now)
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors.0 {
                outln!("error: {e}");
            }
            ExitCode::FAILURE
        }
    }
}

/// `usage`: asks a running instance for its usage view and prints it.
pub fn usage(args: &crate::settings::UsageArgs) -> ExitCode {
    let descriptors: Vec<String> = crate::settings::parse_descriptors(&args.entries)
        .iter()
        .map(|d| {
            d.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ratelimitd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let fetched = runtime.block_on(async {
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            crate::usage::fetch(&args.admin, &args.domain, &descriptors),
        )
        .await
    });
    match fetched {
        Ok(Ok(body)) => {
            out!("{body}");
            ExitCode::SUCCESS
        }
        Ok(Err(e)) => {
            eprintln!("ratelimitd: {e}");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("ratelimitd: {} did not answer within 10 s", args.admin);
            ExitCode::FAILURE
        }
    }
}

/// One line: files, domains and rules of a tree (`check-config`, and `serve` at start-up).
pub fn summary(tree: &RuleTree) -> String {
    let mut domains: Vec<&str> = tree.domains.keys().map(String::as_str).collect();
    domains.sort_unstable();
    format!(
        "config OK: {} file(s), {} domain(s) [{}], {} rule(s)",
        tree.files.len(),
        domains.len(),
        domains.join(", "),
        tree.rule_count()
    )
}

/// Sets up `tracing` from `LOG_LEVEL` (the reference's DEBUG/INFO/WARN/ERROR, or a filter)
/// and `LOG_FORMAT` (text, or json with the reference's keys: see [`crate::log_json`]).
pub fn init_logging(level: &str, format: crate::settings::LogFormat) -> Result<(), String> {
    let directive = match level.to_ascii_lowercase().as_str() {
        "warning" => "warn".to_owned(),
        "fatal" | "panic" => "error".to_owned(),
        other => other.to_owned(),
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&directive)
        .map_err(|e| format!("invalid LOG_LEVEL '{level}': {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        crate::settings::LogFormat::Json => {
            builder.event_format(crate::log_json::LogrusJson).init()
        }
        crate::settings::LogFormat::Text => builder.init(),
    }
    Ok(())
}
