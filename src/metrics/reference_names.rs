//! The reference's StatsD name for each of our metric events, in one place: the StatsD
//! exporter sends under these names, and `PROMETHEUS_MAPPER_YAML` mappings match them, as
//! statsd_exporter matches the reference's (see [`super::mapper`]).

use metrics::Key;

/// The reference's stat name for a counter event, or `None` for events it does not send.
pub fn counter_name(key: &Key) -> Option<String> {
    let label = |name: &str| key.labels().find(|l| l.key() == name).map(|l| l.value());
    Some(match key.name() {
        super::TOTAL_REQUESTS => {
            format!("ratelimit_server.{}.total_requests", label("grpc_method")?)
        }
        super::SHOULD_RATE_LIMIT_ERROR => format!(
            "ratelimit.service.call.should_rate_limit.{}",
            label("err_type")?
        ),
        super::GLOBAL_SHADOW_MODE => "ratelimit.service.global_shadow_mode".to_owned(),
        super::CONFIG_LOAD_SUCCESS => "ratelimit.service.config_load_success".to_owned(),
        super::CONFIG_LOAD_ERROR => "ratelimit.service.config_load_error".to_owned(),
        super::DOMAIN_NOT_FOUND => format!(
            "ratelimit.service.rate_limit.{}.domain_not_found",
            label(super::STATS_KEY_LABEL)?
        ),
        name => {
            let stat = match name {
                super::TOTAL_HITS => "total_hits",
                super::OVER_LIMIT => "over_limit",
                super::NEAR_LIMIT => "near_limit",
                super::WITHIN_LIMIT => "within_limit",
                super::SHADOW_MODE => "shadow_mode",
                super::OVER_LIMIT_WITH_LOCAL_CACHE => "over_limit_with_local_cache",
                _ => return None,
            };
            format!(
                "ratelimit.service.rate_limit.{}.{stat}",
                label(super::STATS_KEY_LABEL)?
            )
        }
    })
}

/// The reference's stat name for a timing (histogram) event, or `None`.
pub fn timer_name(key: &Key) -> Option<String> {
    let method = key.labels().find(|l| l.key() == "grpc_method")?;
    (key.name() == super::RESPONSE_TIME)
        .then(|| format!("ratelimit_server.{}.response_time", method.value()))
}
