//! What the subcommands do, kept out of `main` so `main` only dispatches and exits.

use std::{process::ExitCode, sync::Arc};

use arc_swap::ArcSwap;

use crate::{
    config::{load_dir_or_file, ConfigSource, RuleTree},
    limiter::SystemClock,
    server::{self, State},
    service::{HeaderNames, RateLimiter, ServiceSettings},
    settings::{Backend, ServeArgs, DEFAULT_REDIS_URL, UNSUPPORTED_ENV},
    store::RedisSettings,
};

/// `check-config`: every error and exit 1, or a summary and exit 0.
pub fn check_config(source: &ConfigSource) -> ExitCode {
    match load_dir_or_file(source) {
        Ok(tree) => {
            println!("{}", summary(&tree));
            for rule in tree.rules() {
                println!("  {}", describe(rule));
            }
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors.0 {
                println!("error: {e}");
            }
            println!("{} error(s) in {}", errors.0.len(), source.path.display());
            ExitCode::FAILURE
        }
    }
}

fn summary(tree: &RuleTree) -> String {
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

/// One line per rule, like the reference's config dump.
pub fn describe(rule: &crate::config::Rule) -> String {
    let mut s = match rule.limit {
        Some(l) => format!(
            "{}: unit={} requests_per_unit={}",
            rule.full_key,
            l.unit.name().to_uppercase(),
            l.requests_per_unit
        ),
        None => format!("{}: unlimited", rule.full_key),
    };
    if !rule.name.is_empty() {
        s.push_str(&format!(", name={}", rule.name));
    }
    if !rule.replaces.is_empty() {
        s.push_str(&format!(", replaces=[{}]", rule.replaces.join(", ")));
    }
    s.push_str(&format!(
        ", shadow_mode: {}, quota_mode: {}",
        rule.shadow_mode, rule.quota_mode
    ));
    s
}

/// Sets up `tracing` from `LOG_LEVEL` (the reference's DEBUG/INFO/WARN/ERROR, or a filter)
/// and `LOG_FORMAT` (text or json).
pub fn init_logging(level: &str, format: &str) -> Result<(), String> {
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
    match format.to_ascii_lowercase().as_str() {
        "json" => builder.json().init(),
        "text" | "" => builder.init(),
        other => {
            return Err(format!(
                "invalid LOG_FORMAT '{other}' (expected text or json)"
            ))
        }
    }
    Ok(())
}

/// `serve`: load rules (refusing to start on any error), connect the store, listen, and run
/// until SIGTERM or SIGINT.
pub async fn serve(args: Arc<ServeArgs>) -> Result<(), String> {
    for name in UNSUPPORTED_ENV {
        if std::env::var_os(name).is_some() {
            tracing::warn!(
                setting = name,
                "setting is not supported yet and is ignored"
            );
        }
    }
    let shutdown = shutdown_signal()?;
    let source = args.config.source();
    let tree = load_dir_or_file(&source).map_err(|e| {
        format!(
            "invalid config in {}; not starting\n{e}",
            source.path.display()
        )
    })?;
    tracing::warn!(path = %source.path.display(), "{}", summary(&tree));
    let rules = Arc::new(ArcSwap::from_pointee(tree));

    let backend = args.backend()?;
    let redis = RedisSettings {
        url: args
            .redis_url
            .clone()
            .unwrap_or_else(|| DEFAULT_REDIS_URL.to_owned()),
        socket_type: args.redis_socket_type.clone(),
        auth: args.redis_auth.clone(),
        tls: args.redis_tls,
        pool_size: args.redis_pool_size,
        timeout: args.redis_timeout,
    };
    let clock = Arc::new(SystemClock);
    let store = server::build_store(backend, &redis, clock.clone()).map_err(|e| e.to_string())?;
    if let crate::store::AnyStore::Redis(r) = &store {
        match r.ping().await {
            Ok(()) => {
                tracing::warn!(url = %mask(&redis.url), pool_size = redis.pool_size, "connected to redis")
            }
            Err(e) => {
                tracing::error!(url = %mask(&redis.url), error = %e, "redis not reachable yet; answering UNAVAILABLE until it is")
            }
        }
    } else if backend == Backend::Memory {
        tracing::warn!(
            "using the in-memory backend (single instance; set REDIS_URL to share counters)"
        );
    }

    let settings = ServiceSettings {
        cache_key_prefix: args.cache_key_prefix.clone(),
        global_shadow_mode: args.shadow_mode,
        global_quota_mode: args.quota_mode,
        response_headers: args.limit_response_headers_enabled.then(|| HeaderNames {
            limit: args.limit_limit_header.clone(),
            remaining: args.limit_remaining_header.clone(),
            reset: args.limit_reset_header.clone(),
        }),
        expiration_jitter_max_seconds: args.expiration_jitter_max_seconds,
    };
    let limiter = Arc::new(RateLimiter::new(
        rules.clone(),
        Arc::new(store),
        clock,
        settings,
    ));
    let grpc = server::bind(&args.grpc_host, args.grpc_port).await?;
    let http = server::bind(&args.host, args.port).await?;
    tracing::warn!(
        grpc = %grpc.local_addr().map_err(|e| e.to_string())?,
        http = %http.local_addr().map_err(|e| e.to_string())?,
        backend = ?backend,
        "ratelimitd listening"
    );
    let state = Arc::new(State { rules, limiter });
    server::run(grpc, http, state, shutdown)
        .await
        .map_err(|e| e.to_string())?;
    tracing::warn!("ratelimitd stopped");
    Ok(())
}

/// Registers SIGTERM and SIGINT handlers now (so a signal arriving right after start-up is
/// never fatal) and returns a future that resolves on either.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()> + Send + 'static, String> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term =
        signal(SignalKind::terminate()).map_err(|e| format!("cannot handle SIGTERM: {e}"))?;
    let mut int =
        signal(SignalKind::interrupt()).map_err(|e| format!("cannot handle SIGINT: {e}"))?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        tracing::warn!("shutdown signal received; draining");
    })
}

/// Hides credentials in a Redis URL for logs.
fn mask(url: &str) -> String {
    match (url.split_once("://"), url.rsplit_once('@')) {
        (Some((scheme, rest)), Some((_, host))) if rest.contains('@') => {
            format!("{scheme}://*****@{host}")
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn credentials_are_masked_in_logged_urls() {
        assert_eq!(
            super::mask("redis://:pw@h:6379/0"),
            "redis://*****@h:6379/0"
        );
        assert_eq!(super::mask("redis://u:p@ss@h:1"), "redis://*****@h:1");
        assert_eq!(super::mask("127.0.0.1:6379"), "127.0.0.1:6379");
        assert_eq!(super::mask("/var/run/redis.sock"), "/var/run/redis.sock");
    }
}
