//! `serve`: builds each part of the running service with its own constructor and wires them.
//!
//! Order matters and is the reason this module exists: the secret file and the config are
//! read before anything listens (a bad one stops start-up with its own error), the metrics
//! recorders exist before anything records, the store is connected before the limiter that
//! uses it, and every listener is bound before any is served (a taken port stops start-up).
//! Each constructor returns a typed error that [`ServeError`] wraps; `main` prints it and
//! exits non-zero.

use std::{future::Future, sync::Arc};

use arc_swap::ArcSwap;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::task::JoinHandle;

use crate::{
    admin::State,
    config::{ConfigSource, ReloadOutcome, Reloader, RuleTree},
    health::{Component, Health},
    limiter::{engine::Charging, CacheKeyBuilder, Clock, SystemClock},
    metrics::{count_load, ConfigMetrics, Exporter, Stats, StatsSettings},
    server,
    service::{HeaderNames, RateLimiter, ServiceSettings},
    settings::{ConfigType, RuntimeFlavor, ServeArgs, DEFAULT_REDIS_URL},
    statsd::{Statsd, StatsdError, StatsdSettings},
    store::{uses_tls, AnyStore, Backend, RedisSettings, RedisTls},
    tls::ServerTls,
    workers::Workers,
};

/// Why `serve` stopped before serving, or failed while serving. Each wraps the part that
/// failed; `main` prints it and exits non-zero.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Checked on the values, not in clap (`conflicts_with`), which refuses the two settings
    /// whenever both are *set*, even `STRICT_CHARGING=false` beside the other.
    #[error("STRICT_CHARGING and STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT cannot both be true; set one of them")]
    ChargingConflict,
    #[error("invalid config in {path}; not starting\n{errors}")]
    Config {
        path: String,
        errors: crate::config::ConfigErrors,
    },
    #[error(transparent)]
    Xds(#[from] crate::xds::XdsError),
    #[error(transparent)]
    HashSecret(#[from] crate::settings::SecretFileError),
    #[error(transparent)]
    Body(#[from] crate::body::BodyError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("GRPC_SERVER_USE_TLS with GRPC_UDS is not supported: serve TLS on GRPC_HOST:GRPC_PORT, or plaintext on the Unix socket")]
    TlsOnUds,
    #[error(transparent)]
    Recorder(#[from] crate::metrics::RecorderError),
    #[error(transparent)]
    Mapper(#[from] crate::metrics::mapper::MapperError),
    #[error(transparent)]
    Statsd(#[from] StatsdError),
    #[error("cannot handle {0}: {1}")]
    Signal(&'static str, #[source] std::io::Error),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Bind(#[from] server::BindError),
    #[error("cannot start the per-core runtimes: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("cannot read the gRPC listener's address: {0}")]
    LocalAddr(#[source] std::io::Error),
    #[error("server failed: {0}")]
    Server(#[from] server::ServerError),
    #[error(transparent)]
    Tracing(#[from] crate::otel::TracingError),
}

/// Loads the rules (refusing to start on any error), connects the store, listens, and runs
/// until `shutdown` resolves; reloads the rules on file changes and SIGHUP.
pub async fn serve(
    args: Arc<ServeArgs>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    if args.strict_charging && args.stop_cache_key_increment_when_overlimit {
        return Err(ServeError::ChargingConflict);
    }
    // Read before anything else starts, so a bad secret or template file stops start-up at
    // once.
    let keys = cache_keys(&args)?;
    let service_settings = service_settings(&args, keys.clone())?;
    let grpc_tls = grpc_tls(&args)?;
    for name in &args.unsupported_set {
        tracing::warn!(
            setting = name,
            "setting is not supported yet and is ignored"
        );
    }
    if args.local_cache_size_in_bytes > 0 && args.backend() == Backend::Memory {
        tracing::warn!("LOCAL_CACHE_SIZE_IN_BYTES is ignored: the memory backend is local already");
    }
    let telemetry = Telemetry::start(&args)?;
    let (traces, tracer) = crate::otel::Tracing::start(&args.tracing)?.unzip();
    let mut shutdown = Box::pin(shutdown);
    let (rules, health, health_service, _config_tasks) = match args.xds.config_type {
        ConfigType::File => {
            let config = LoadedConfig::load(&args)?;
            let (health, health_service) = health(&args, &config.rules);
            let tasks = Vec::from(watch_config(&args, &config, health.clone())?);
            (config.rules, health, health_service, tasks)
        }
        ConfigType::GrpcXdsSotw => {
            let rules = Arc::new(ArcSwap::from_pointee(RuleTree::awaiting_first_config()));
            let (health, health_service) = health(&args, &rules);
            let Some(tasks) = start_xds(&args, &rules, &health, &mut shutdown).await? else {
                tracing::info!("ratelimitd stopped before its first config");
                return Ok(());
            };
            (rules, health, health_service, tasks)
        }
    };
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let store = connect_store(&args, clock.clone(), &health).await?;
    let limiter = Arc::new(
        RateLimiter::new(
            rules.clone(),
            store,
            clock.clone(),
            service_settings,
            telemetry.stats.clone(),
        )
        .with_tracer(tracer),
    );
    let _rule_metrics_upkeep = limiter.spawn_metrics_upkeep();
    let mut listeners = bind_listeners(&args).await?;
    let _tls_watch = grpc_tls.as_ref().map(|tls| {
        listeners.tls = Some(Arc::clone(tls));
        tls.spawn_watch(args.reload_debounce, crate::tls::FALLBACK_INTERVAL)
    });
    let state = Arc::new(State {
        rules,
        limiter,
        health,
        prometheus: Some(telemetry.prometheus.clone()),
        keys,
        clock,
        json: crate::json::Codec::new(),
    });
    let served = server::run(listeners, state, health_service, shutdown).await;
    if let Some(s) = &telemetry.statsd {
        s.flush_now();
    }
    if let Some(traces) = traces {
        traces.shutdown().await;
    }
    served?;
    tracing::info!("ratelimitd stopped");
    Ok(())
}

/// `GRPC_SERVER_USE_TLS`: the certificate files, read and checked now.
fn grpc_tls(args: &ServeArgs) -> Result<Option<Arc<ServerTls>>, ServeError> {
    let Some(files) = args.grpc_tls.server_files()? else {
        return Ok(None);
    };
    if args.grpc_uds.is_some() {
        return Err(ServeError::TlsOnUds);
    }
    let tls = ServerTls::load(files)?;
    tracing::info!(
        cert = %tls.files().cert.display(),
        mtls = tls.files().client_ca.is_some(),
        "serving gRPC over TLS"
    );
    Ok(Some(Arc::new(tls)))
}

/// `CACHE_KEY_PREFIX` and the `CACHE_KEY_HASH_SECRET_FILE` key, read now.
fn cache_keys(args: &ServeArgs) -> Result<CacheKeyBuilder, ServeError> {
    let keys = args.cache_key.builder()?;
    if keys.hashes_values() {
        tracing::warn!("counter keys hold keyed hashes of descriptor values (CACHE_KEY_HASH_SECRET_FILE); they differ from the reference's keys");
    }
    Ok(keys)
}

/// The metrics pipeline: the StatsD exporter (`USE_STATSD`), the global recorder fanning out
/// to it, and the per-rule series.
struct Telemetry {
    prometheus: PrometheusHandle,
    statsd: Option<Arc<Statsd>>,
    stats: Arc<Stats>,
    _upkeep: JoinHandle<()>,
}

impl Telemetry {
    fn start(args: &ServeArgs) -> Result<Self, ServeError> {
        let statsd = start_statsd(args)?;
        let exporter = statsd.clone().map(|s| s as Exporter);
        let mapper = match &args.prometheus_mapper_yaml {
            Some(path) => Some(Arc::new(crate::metrics::mapper::Mapper::load(path)?)),
            None => None,
        };
        let prometheus = crate::metrics::install(exporter.clone(), mapper.clone())?;
        let stats = StatsSettings {
            max_dynamic_keys: args.metrics_max_dynamic_keys,
            idle_timeout: args.metrics_idle_timeout,
        };
        Ok(Self {
            _upkeep: crate::metrics::spawn_upkeep(prometheus.clone()),
            prometheus,
            statsd,
            stats: Arc::new(Stats::new(exporter, stats).with_mapper(mapper)),
        })
    }
}

/// `USE_STATSD`: the StatsD exporter with the reference's stat names, or none.
fn start_statsd(args: &ServeArgs) -> Result<Option<Arc<Statsd>>, StatsdError> {
    if !args.use_statsd {
        return Ok(None);
    }
    let settings = StatsdSettings {
        host: args.statsd_host.clone(),
        port: args.statsd_port,
        flush_interval: args.stats_flush_interval,
        extra_tags: crate::statsd::parse_extra_tags(&args.extra_tags)?,
    };
    let sink = Statsd::start_with_protocol(settings, args.statsd_protocol)?;
    tracing::info!(host = %args.statsd_host, port = args.statsd_port, protocol = ?args.statsd_protocol, "sending stats to statsd");
    Ok(Some(sink))
}

/// The config in force at start-up, and what a reload needs to compare against it.
struct LoadedConfig {
    source: ConfigSource,
    /// Content hash of the bytes the tree was built from.
    hash: u64,
    rules: Arc<ArcSwap<RuleTree>>,
}

impl LoadedConfig {
    /// Loads and validates every file; any error refuses the start.
    fn load(args: &ServeArgs) -> Result<Self, ServeError> {
        let source = args.config.source();
        // One read: the hash is of the bytes the tree is built from (see Reloader::with_hash).
        let (hash, loaded) = crate::config::load_hashed(&source);
        let tree = loaded.map_err(|errors| ServeError::Config {
            path: source.path.display().to_string(),
            errors,
        })?;
        count_load(true);
        tracing::info!(path = %source.path.display(), "{}", crate::cli::summary(&tree));
        Ok(Self {
            source,
            hash,
            rules: Arc::new(ArcSwap::from_pointee(tree)),
        })
    }
}

/// The health state and the `grpc.health.v1` service mirroring it: the config component
/// (`HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED`) and the backend one
/// (`REDIS_HEALTH_CHECK_ACTIVE_CONNECTION`) are tracked when asked for.
fn health(
    args: &ServeArgs,
    rules: &ArcSwap<RuleTree>,
) -> (
    Arc<Health>,
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
) {
    let (reporter, service) = tonic_health::server::health_reporter();
    let mut tracked = Vec::new();
    if args.healthy_with_at_least_one_config_loaded {
        tracked.push(Component::Config);
    }
    if args.redis_health_check_active_connection && args.backend() == Backend::Redis {
        tracked.push(Component::Backend);
    }
    let health = Arc::new(Health::new(
        reporter,
        &tracked,
        vec![
            "",
            crate::server::RLS_SERVICE,
            crate::server::REFERENCE_HEALTH_SERVICE,
        ],
    ));
    health.set(Component::Config, !rules.load().domains.is_empty());
    (health, service)
}

/// Hot reload: file changes (debounced) and SIGHUP; only a fully valid config is swapped in.
/// The tasks run while the handles are held.
fn watch_config(
    args: &ServeArgs,
    config: &LoadedConfig,
    health: Arc<Health>,
) -> Result<[JoinHandle<()>; 2], ServeError> {
    let config_metrics = Arc::new(ConfigMetrics::default());
    let observer_metrics = config_metrics.clone();
    let reloader = Reloader::with_hash(
        config.source.clone(),
        config.rules.clone(),
        Arc::new(move |outcome: &ReloadOutcome| match outcome {
            ReloadOutcome::Loaded {
                generation,
                hash,
                domains,
                ..
            } => {
                count_load(true);
                observer_metrics.publish(*generation, *hash);
                health.set(Component::Config, *domains > 0);
            }
            ReloadOutcome::Failed(_) => count_load(false),
            ReloadOutcome::Unchanged { .. } | ReloadOutcome::StillInvalid { .. } => {}
        }),
        config.hash,
    );
    config_metrics.publish(reloader.generation(), reloader.hash());
    // Both RUNTIME_WATCH_ROOT values are served by the one watcher: see its setting.
    tracing::debug!(
        runtime_watch_root = args.runtime_watch_root,
        "watching the config for symlink swaps and edits"
    );
    let watch = reloader.spawn_watch(args.reload_debounce);
    let sighup = reloader
        .spawn_sighup()
        .map_err(|e| ServeError::Signal("SIGHUP", e))?;
    Ok([watch, sighup])
}

/// Rules over xDS: the client task, and a SIGHUP handler (the reference's signal; there are no
/// files to reload). Unless `FORCE_START_WITHOUT_INITIAL_CONFIG`, waits as the reference does
/// for the management server's first response, accepted or refused, before anything listens;
/// `None` when `shutdown` comes first. File watching is not used.
async fn start_xds(
    args: &ServeArgs,
    rules: &Arc<ArcSwap<RuleTree>>,
    health: &Arc<Health>,
    shutdown: &mut (impl Future<Output = ()> + Unpin),
) -> Result<Option<Vec<JoinHandle<()>>>, ServeError> {
    let client = crate::xds::XdsClient::from_args(args)?;
    tracing::info!(
        server = %args.xds.config_grpc_xds_server_url,
        node = %args.xds.config_grpc_xds_node_id,
        tls = args.xds.config_grpc_xds_server_use_tls,
        "rules over xDS (CONFIG_TYPE=GRPC_XDS_SOTW)"
    );
    let target = crate::xds::Target {
        rules: rules.clone(),
        health: health.clone(),
    };
    let (task, first) = client.spawn(target);
    let sighup = {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = signal(SignalKind::hangup()).map_err(|e| ServeError::Signal("SIGHUP", e))?;
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP ignored: the rules come over xDS");
            }
        })
    };
    if !args.xds.force_start_without_initial_config {
        tracing::info!("waiting for the first config from the xDS management server");
        tokio::select! {
            _ = first => {}
            () = shutdown => {
                task.abort();
                sighup.abort();
                return Ok(None);
            }
        }
    }
    Ok(Some(vec![task, sighup]))
}

/// The counter store: Redis, with a second one for per-second limits under
/// `REDIS_PERSECOND=true` (checked with a PING; not reachable yet is not fatal, calls answer
/// UNAVAILABLE until it is), or the in-memory one.
async fn connect_store(
    args: &ServeArgs,
    clock: Arc<dyn Clock>,
    health: &Arc<Health>,
) -> Result<Arc<AnyStore>, ServeError> {
    let mut redis = RedisSettings {
        url: args
            .redis_url
            .clone()
            .unwrap_or_else(|| DEFAULT_REDIS_URL.to_owned()),
        socket_type: args.redis_socket_type,
        auth: args.redis_auth.clone(),
        tls: args.redis_tls,
        tls_files: RedisTls::default(),
        pool_size: pool_size(args, args.redis_pool_size),
        timeout: args.redis_timeout,
        redis_type: args.redis_type,
        sentinel_auth: args.redis_sentinel_auth.clone(),
        close_on_readonly: args.redis_close_connection_on_readonly_error,
    };
    let mut per_second = args.redis_persecond.then(|| RedisSettings {
        url: args.redis_persecond_url.clone(),
        socket_type: args.redis_persecond_socket_type,
        auth: args.redis_persecond_auth.clone(),
        tls: args.redis_persecond_tls,
        tls_files: RedisTls::default(),
        pool_size: pool_size(args, args.redis_persecond_pool_size),
        timeout: args.redis_persecond_timeout,
        redis_type: args.redis_persecond_type,
        sentinel_auth: args.redis_persecond_sentinel_auth.clone(),
        close_on_readonly: args.redis_close_connection_on_readonly_error,
    });
    // As in the reference, the REDIS_TLS_* files are read only when a connection uses TLS.
    let any_tls = uses_tls(&redis) || per_second.as_ref().is_some_and(uses_tls);
    if any_tls && args.backend() == Backend::Redis {
        let files = args.redis_tls_files.load()?;
        redis.tls_files = files.clone();
        if let Some(p) = per_second.as_mut() {
            p.tls_files = files;
        }
    } else if args.redis_tls_files.is_set() {
        tracing::warn!("REDIS_TLS_* settings are set but no Redis connection uses TLS (REDIS_TLS, REDIS_PERSECOND_TLS or a rediss:// URL); ignored");
    }
    let store = Arc::new(AnyStore::new(
        args.backend(),
        &redis,
        per_second.as_ref(),
        args.memory_max_counters,
        clock,
    )?);
    let connections = match &*store {
        AnyStore::Memory(_) => None,
        AnyStore::Redis(r) => Some(r.connections()),
        AnyStore::Split(s) => Some(s.main().connections() + s.per_second().connections()),
    };
    if let Some(connections) = connections {
        metrics::gauge!(crate::metrics::BACKEND_CONNECTIONS).set(connections as f64);
        let per_second_url = per_second
            .as_ref()
            .map(|p| tracing::field::display(mask(&p.url)));
        match store.ping().await {
            Ok(()) => {
                health.set(Component::Backend, true);
                tracing::info!(url = %mask(&redis.url), per_second_url, connections, "connected to redis");
            }
            Err(e) => {
                tracing::error!(url = %mask(&redis.url), per_second_url, error = %e, "redis not reachable yet; answering UNAVAILABLE until it is")
            }
        }
        if args.redis_health_check_active_connection {
            spawn_backend_probe(store.clone(), health.clone());
        }
        let f = &args.failure;
        tracing::info!(
            policy = f.backend_failure_policy.name(),
            expected_replicas = f.expected_replicas,
            circuit_failures = f.backend_circuit_failures,
            deadline_margin = ?f.backend_deadline_margin,
            "on backend failure (BACKEND_FAILURE_POLICY)"
        );
    } else {
        if args.redis_persecond {
            tracing::warn!(
                "REDIS_PERSECOND applies to the redis backend only; ignored by the in-memory one"
            );
        }
        tracing::info!(
            max_counters = args.memory_max_counters,
            "using the in-memory backend (single instance; set REDIS_URL to share counters)"
        );
    }
    Ok(store)
}

/// Redis connections to open (`REDIS_TYPE=single`): under `per_core` one per runtime (the
/// one that serves no calls included: its start-up and health checks), each used by its
/// runtime only (the store picks its connection by runtime); otherwise `REDIS_POOL_SIZE`,
/// capped at the cores.
fn pool_size(args: &ServeArgs, configured: usize) -> usize {
    match args.runtime_flavor {
        RuntimeFlavor::PerCore => crate::workers::count(args.worker_threads) + 1,
        _ => crate::store::connection_count(configured),
    }
}

/// The service's switches, from the settings.
fn service_settings(
    args: &ServeArgs,
    cache_keys: CacheKeyBuilder,
) -> Result<ServiceSettings, ServeError> {
    let limit_body = crate::body::LimitBody::from_settings(
        args.limit_response_body,
        args.limit_response_body_template.as_deref(),
        &args.limit_response_body_content_type,
    )?;
    Ok(ServiceSettings {
        cache_keys,
        global_shadow_mode: args.shadow_mode,
        global_quota_mode: args.quota_mode,
        dynamic_metadata: args.response_dynamic_metadata,
        response_headers: args.limit_response_headers_enabled.then(|| HeaderNames {
            limit: args.limit_limit_header.clone(),
            remaining: args.limit_remaining_header.clone(),
            reset: args.limit_reset_header.clone(),
        }),
        request_headers: args.limit_request_headers_enabled.then(|| HeaderNames {
            limit: args.limit_request_limit_header.clone(),
            remaining: args.limit_request_remaining_header.clone(),
            reset: args.limit_request_reset_header.clone(),
        }),
        expiration_jitter_max_seconds: args.expiration_jitter_max_seconds,
        near_limit_ratio: args.near_limit_ratio,
        rule_header: args.limit_rule_header.clone().filter(|h| !h.is_empty()),
        limit_body,
        max_concurrent_calls: args.max_concurrent_calls,
        charging: if args.strict_charging {
            Charging::AllOrNothing
        } else if args.stop_cache_key_increment_when_overlimit {
            Charging::StopWhenOver
        } else {
            Charging::Always
        },
        default_algorithm: args.config.default_algorithm,
        // The memory backend is local already.
        local_cache_bytes: match args.backend() {
            Backend::Redis => args.local_cache_size_in_bytes,
            Backend::Memory => 0,
        },
        failure: args.failure.settings(args.memory_max_counters),
    })
}

/// Binds every listener before anything is served, so a taken port stops start-up, and logs
/// where the service listens.
async fn bind_listeners(args: &ServeArgs) -> Result<server::Listeners, ServeError> {
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
    let workers = match args.runtime_flavor {
        RuntimeFlavor::PerCore => Some(
            Workers::start(crate::workers::count(args.worker_threads))
                .map_err(ServeError::Runtime)?,
        ),
        _ => None,
    };
    let prometheus = if args.use_prometheus {
        Some((
            server::bind_addr(&args.prometheus_addr).await?,
            args.prometheus_path.clone(),
        ))
    } else {
        None
    };
    let local =
        |l: &tokio::net::TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
    // WARN, as the reference logs "Listening for gRPC on": the one routine line that shows
    // at the default LOG_LEVEL (WARN), so an operator sees the service came up and where.
    tracing::warn!(
        grpc = %grpc_addr,
        http = %local(&http),
        debug = %local(&debug_listener),
        prometheus = %prometheus.as_ref().map(|(l, p)| format!("{}{p}", local(l))).unwrap_or_default(),
        backend = ?args.backend(),
        "ratelimitd listening"
    );
    Ok(server::Listeners {
        grpc,
        http,
        debug: debug_listener,
        prometheus,
        max_connection_age: args.grpc_max_connection_age,
        max_connection_age_grace: args.grpc_max_connection_age_grace,
        drain_timeout: args.drain_timeout,
        max_concurrent_streams: args.grpc_max_concurrent_streams,
        opening_timeout: args.connection_opening_timeout,
        header_read_timeout: args.http_header_read_timeout,
        tls: None,
        workers,
    })
}

/// `REDIS_HEALTH_CHECK_ACTIVE_CONNECTION`: PING every second; the backend component follows.
fn spawn_backend_probe(store: Arc<AnyStore>, health: Arc<Health>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tick.tick().await;
            health.set(Component::Backend, store.ping().await.is_ok());
        }
    });
}

/// The tokio runtime `serve` runs on, as `RUNTIME_FLAVOR` and `WORKER_THREADS` say; call it
/// on the thread that will run it.
pub fn runtime(args: &ServeArgs) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match args.runtime_flavor {
        RuntimeFlavor::CurrentThread => tokio::runtime::Builder::new_current_thread(),
        RuntimeFlavor::PerCore => {
            // This thread runs runtime 0 (no calls; see crate::workers); `serve` starts the
            // others.
            crate::workers::enter(0);
            tokio::runtime::Builder::new_current_thread()
        }
        RuntimeFlavor::MultiThread => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            if args.worker_threads > 0 {
                b.worker_threads(args.worker_threads);
            }
            b
        }
    };
    builder.enable_all().build()
}

/// Registers SIGTERM and SIGINT handlers now (so a signal arriving right after start-up is
/// never fatal) and returns a future that resolves on either.
pub fn shutdown_signal(
) -> Result<impl std::future::Future<Output = ()> + Send + 'static, ServeError> {
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
