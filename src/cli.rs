//! What the subcommands do, kept out of `main` so `main` only dispatches and exits.

use std::{process::ExitCode, sync::Arc};

use arc_swap::ArcSwap;

use crate::{
    admin::State,
    config::{load_dir_or_file, ConfigSource, ReloadOutcome, Reloader, RuleTree},
    health::{Component, Health},
    limiter::SystemClock,
    server,
    service::{HeaderNames, RateLimiter, ServiceSettings},
    settings::{ServeArgs, DEFAULT_REDIS_URL},
    store::{AnyStore, Backend, RedisSettings},
};

/// `check-config`: every error and exit 1, or a summary and exit 0.
pub fn check_config(source: &ConfigSource) -> ExitCode {
    match load_dir_or_file(source) {
        Ok(tree) => {
            println!("{}", summary(&tree));
            for rule in tree.rules() {
                println!("  {}", rule.dump_line());
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
            print!(
                "{}",
                crate::explain::explain(&tree, &keys, &args.domain, &descriptors, now)
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors.0 {
                println!("error: {e}");
            }
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

/// Sets up `tracing` from `LOG_LEVEL` (the reference's DEBUG/INFO/WARN/ERROR, or a filter)
/// and `LOG_FORMAT` (text or json).
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
        crate::settings::LogFormat::Json => builder.json().init(),
        crate::settings::LogFormat::Text => builder.init(),
    }
    Ok(())
}

/// Why `serve` stopped before serving, or failed while serving. Each wraps the part that
/// failed; `main` prints it and exits non-zero.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("invalid config in {path}; not starting\n{errors}")]
    Config {
        path: String,
        errors: crate::config::ConfigErrors,
    },
    #[error(transparent)]
    HashSecret(#[from] crate::settings::SecretFileError),
    #[error(transparent)]
    Recorder(#[from] crate::metrics::RecorderError),
    /// `USE_STATSD` settings the StatsD sink refused (its own message).
    #[error("{0}")]
    Statsd(String),
    #[error("cannot handle {0}: {1}")]
    Signal(&'static str, #[source] std::io::Error),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Bind(#[from] server::BindError),
    #[error("cannot read the gRPC listener's address: {0}")]
    LocalAddr(#[source] std::io::Error),
    #[error("server failed: {0}")]
    Server(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// `serve`: load rules (refusing to start on any error), connect the store, listen, and run
/// until SIGTERM or SIGINT; reload the rules on file changes and SIGHUP.
pub async fn serve(args: Arc<ServeArgs>) -> Result<(), ServeError> {
    let shutdown = shutdown_signal()?;
    // Read before anything else starts, so a bad secret file stops start-up at once.
    let keys = args.cache_key.builder()?;
    if keys.hashes_values() {
        tracing::warn!("counter keys hold keyed hashes of descriptor values (CACHE_KEY_HASH_SECRET_FILE); they differ from the reference's keys");
    }
    for name in &args.unsupported_set {
        tracing::warn!(
            setting = name,
            "setting is not supported yet and is ignored"
        );
    }
    let prometheus = crate::metrics::install_prometheus()?;
    let _upkeep = crate::metrics::spawn_upkeep(prometheus.clone());
    let statsd = start_statsd(&args)?;
    // Config loads, counted in Prometheus and (with USE_STATSD) under the reference's names.
    let count_load = {
        let statsd = statsd.clone();
        move |ok: bool| {
            let (metric, stat) = if ok {
                (
                    crate::metrics::CONFIG_LOAD_SUCCESS,
                    "ratelimit.service.config_load_success",
                )
            } else {
                (
                    crate::metrics::CONFIG_LOAD_ERROR,
                    "ratelimit.service.config_load_error",
                )
            };
            metrics::counter!(metric).increment(1);
            if let Some(s) = &statsd {
                s.counter(stat, 1);
            }
        }
    };
    let source = args.config.source();
    // One read: the hash is of the bytes the tree is built from (see Reloader::with_hash).
    let (loaded_hash, loaded) = crate::config::load_hashed(&source);
    let tree = loaded.map_err(|errors| ServeError::Config {
        path: source.path.display().to_string(),
        errors,
    })?;
    count_load(true);
    tracing::info!(path = %source.path.display(), "{}", summary(&tree));
    let has_domains = !tree.domains.is_empty();
    let rules = Arc::new(ArcSwap::from_pointee(tree));

    let (reporter, health_service) = tonic_health::server::health_reporter();
    let mut tracked = Vec::new();
    if args.healthy_with_at_least_one_config_loaded {
        tracked.push(Component::Config);
    }
    let backend = args.backend();
    if args.redis_health_check_active_connection && backend == Backend::Redis {
        tracked.push(Component::Backend);
    }
    let health = Arc::new(Health::new(
        reporter,
        &tracked,
        vec!["", crate::server::RLS_SERVICE],
    ));
    health.set(Component::Config, has_domains);

    // Hot reload: file changes (debounced) and SIGHUP; only a fully valid config is swapped in.
    let reload_health = health.clone();
    let config_metrics = Arc::new(ConfigMetrics::default());
    let observer_metrics = config_metrics.clone();
    let reloader = Reloader::with_hash(
        source.clone(),
        rules.clone(),
        Arc::new(move |outcome: &ReloadOutcome| match outcome {
            ReloadOutcome::Loaded {
                generation,
                hash,
                domains,
                ..
            } => {
                count_load(true);
                observer_metrics.publish(*generation, *hash);
                reload_health.set(Component::Config, *domains > 0);
            }
            ReloadOutcome::Failed(_) => count_load(false),
            ReloadOutcome::Unchanged { .. } => {}
        }),
        loaded_hash,
    );
    config_metrics.publish(reloader.generation(), reloader.hash());
    let _watch = reloader.spawn_watch(args.reload_debounce);
    let _sighup = reloader
        .spawn_sighup()
        .map_err(|e| ServeError::Signal("SIGHUP", e))?;

    let redis = RedisSettings {
        url: args
            .redis_url
            .clone()
            .unwrap_or_else(|| DEFAULT_REDIS_URL.to_owned()),
        socket_type: args.redis_socket_type,
        auth: args.redis_auth.clone(),
        tls: args.redis_tls,
        pool_size: args.redis_pool_size,
        timeout: args.redis_timeout,
    };
    let clock: Arc<dyn crate::limiter::Clock> = Arc::new(SystemClock);
    let store = Arc::new(AnyStore::new(
        backend,
        &redis,
        args.memory_max_counters,
        clock.clone(),
    )?);
    if let AnyStore::Redis(r) = &*store {
        metrics::gauge!(crate::metrics::BACKEND_CONNECTIONS).set(r.connections() as f64);
        match r.ping().await {
            Ok(()) => {
                health.set(Component::Backend, true);
                tracing::info!(url = %mask(&redis.url), connections = r.connections(), "connected to redis");
            }
            Err(e) => {
                tracing::error!(url = %mask(&redis.url), error = %e, "redis not reachable yet; answering UNAVAILABLE until it is")
            }
        }
        if args.redis_health_check_active_connection {
            spawn_backend_probe(store.clone(), health.clone());
        }
    } else {
        tracing::info!(
            max_counters = args.memory_max_counters,
            "using the in-memory backend (single instance; set REDIS_URL to share counters)"
        );
    }

    let limiter = Arc::new(RateLimiter::new(
        rules.clone(),
        store,
        clock.clone(),
        service_settings(&args, keys.clone()),
        statsd.clone(),
    ));
    let _rule_metrics_upkeep = limiter.spawn_metrics_upkeep();

    let (grpc, grpc_addr, http, debug_listener, prometheus_listener) =
        bind_listeners(&args).await?;
    let local =
        |l: &tokio::net::TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
    // WARN, as the reference logs "Listening for gRPC on": the one routine line that shows
    // at the default LOG_LEVEL (WARN), so an operator sees the service came up and where.
    tracing::warn!(
        grpc = %grpc_addr,
        http = %local(&http),
        debug = %local(&debug_listener),
        prometheus = %prometheus_listener.as_ref().map(|(l, p)| format!("{}{p}", local(l))).unwrap_or_default(),
        backend = ?backend,
        "ratelimitd listening"
    );
    let state = Arc::new(State {
        rules,
        limiter,
        health,
        prometheus: Some(prometheus),
        keys,
        clock,
        json: crate::json::Codec::new(),
    });
    let listeners = server::Listeners {
        grpc,
        http,
        debug: debug_listener,
        prometheus: prometheus_listener,
        max_connection_age: args.grpc_max_connection_age,
        max_connection_age_grace: args.grpc_max_connection_age_grace,
        drain_timeout: args.drain_timeout,
        max_concurrent_streams: args.grpc_max_concurrent_streams,
        opening_timeout: args.connection_opening_timeout,
        header_read_timeout: args.http_header_read_timeout,
    };
    server::run(listeners, state, health_service, shutdown)
        .await
        .map_err(ServeError::Server)?;
    if let Some(s) = &statsd {
        s.flush_now();
    }
    tracing::info!("ratelimitd stopped");
    Ok(())
}

/// `USE_STATSD`: the StatsD sink with the reference's stat names, or none.
fn start_statsd(args: &ServeArgs) -> Result<Option<Arc<crate::statsd::Statsd>>, ServeError> {
    if !args.use_statsd {
        return Ok(None);
    }
    let settings = crate::statsd::StatsdSettings {
        host: args.statsd_host.clone(),
        port: args.statsd_port,
        flush_interval: args.stats_flush_interval,
        extra_tags: crate::statsd::parse_extra_tags(&args.extra_tags)
            .map_err(ServeError::Statsd)?,
    };
    let sink = crate::statsd::Statsd::start_with_protocol(settings, args.statsd_protocol)
        .map_err(ServeError::Statsd)?;
    tracing::info!(host = %args.statsd_host, port = args.statsd_port, protocol = ?args.statsd_protocol, "sending stats to statsd");
    Ok(Some(sink))
}

/// The service's switches, from the settings.
fn service_settings(
    args: &ServeArgs,
    cache_keys: crate::limiter::CacheKeyBuilder,
) -> ServiceSettings {
    ServiceSettings {
        cache_keys,
        global_shadow_mode: args.shadow_mode,
        global_quota_mode: args.quota_mode,
        response_headers: args.limit_response_headers_enabled.then(|| HeaderNames {
            limit: args.limit_limit_header.clone(),
            remaining: args.limit_remaining_header.clone(),
            reset: args.limit_reset_header.clone(),
        }),
        expiration_jitter_max_seconds: args.expiration_jitter_max_seconds,
        near_limit_ratio: args.near_limit_ratio,
        rule_header: args.limit_rule_header.clone().filter(|h| !h.is_empty()),
        max_concurrent_calls: args.max_concurrent_calls,
        metrics: crate::metrics::StatsSettings {
            max_dynamic_keys: args.metrics_max_dynamic_keys,
            idle_timeout: args.metrics_idle_timeout,
        },
    }
}

/// The listeners bound by `serve`: gRPC (and how it is reached, for the log), admin HTTP,
/// debug HTTP, and the optional Prometheus listener with its path.
type Bound = (
    server::GrpcListener,
    String,
    tokio::net::TcpListener,
    tokio::net::TcpListener,
    Option<(tokio::net::TcpListener, String)>,
);

/// Binds every listener before anything is served, so a taken port stops start-up.
async fn bind_listeners(args: &ServeArgs) -> Result<Bound, ServeError> {
    let grpc = match &args.grpc_uds {
        Some(path) => server::bind_uds(path)?,
        None => server::GrpcListener::Tcp(server::bind(&args.grpc_host, args.grpc_port).await?),
    };
    let grpc_addr = match &grpc {
        server::GrpcListener::Tcp(l) => l.local_addr().map_err(ServeError::LocalAddr)?.to_string(),
        server::GrpcListener::Unix(_, p) => format!("unix:{}", p.display()),
    };
    let http = server::bind(&args.host, args.port).await?;
    let debug_listener = server::bind(&args.debug_host, args.debug_port).await?;
    let prometheus_listener = if args.use_prometheus {
        Some((
            server::bind_addr(&args.prometheus_addr).await?,
            args.prometheus_path.clone(),
        ))
    } else {
        None
    };
    Ok((grpc, grpc_addr, http, debug_listener, prometheus_listener))
}

/// Publishes the generation gauge and the hash info series of the config in force; the
/// previous hash's series drops to 0.
#[derive(Default)]
struct ConfigMetrics {
    /// A std Mutex: held for a swap, never across an await.
    last_hash: std::sync::Mutex<Option<String>>,
}

impl ConfigMetrics {
    fn publish(&self, generation: u64, hash: u64) {
        metrics::gauge!(crate::metrics::CONFIG_GENERATION).set(generation as f64);
        let hash = format!("{hash:016x}");
        let mut last = match self.last_hash.lock() {
            Ok(l) => l,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(old) = last.replace(hash.clone()) {
            if old != hash {
                metrics::gauge!(crate::metrics::CONFIG_INFO, "hash" => old).set(0.0);
            }
        }
        metrics::gauge!(crate::metrics::CONFIG_INFO, "hash" => hash).set(1.0);
    }
}

/// `REDIS_HEALTH_CHECK_ACTIVE_CONNECTION`: PING every second; the backend component follows.
fn spawn_backend_probe(store: Arc<crate::store::AnyStore>, health: Arc<Health>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tick.tick().await;
            if let AnyStore::Redis(r) = &*store {
                health.set(Component::Backend, r.ping().await.is_ok());
            }
        }
    });
}

/// Registers SIGTERM and SIGINT handlers now (so a signal arriving right after start-up is
/// never fatal) and returns a future that resolves on either.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()> + Send + 'static, ServeError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(|e| ServeError::Signal("SIGTERM", e))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| ServeError::Signal("SIGINT", e))?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        tracing::info!("shutdown signal received; draining");
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
