//! Where the rules come from (`CONFIG_TYPE`) and, for rules over xDS, how to reach the
//! management server: the reference's settings, names and defaults (its `settings.go`).

use std::time::Duration;

use clap::{builder::BoolishValueParser, ArgAction, Args};

use super::values::{duration, Bound, HOUR};

/// `CONFIG_TYPE`: the source of the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigType {
    /// Files under `RUNTIME_ROOT` (or `RATELIMITD_CONFIG`), reloaded when they change.
    File,
    /// `RateLimitConfig` resources over an ADS state-of-the-world stream.
    GrpcXdsSotw,
}

/// `CONFIG_TYPE`, spelled exactly as the reference compares it.
fn parse_config_type(s: &str) -> Result<ConfigType, String> {
    match s {
        "FILE" => Ok(ConfigType::File),
        "GRPC_XDS_SOTW" => Ok(ConfigType::GrpcXdsSotw),
        _ => Err(format!(
            "CONFIG_TYPE '{s}' is not supported (expected FILE or GRPC_XDS_SOTW)"
        )),
    }
}

/// `XDS_CLIENT_MAX_MSG_SIZE_IN_BYTES`: empty or 0 keeps the gRPC default (4 MiB).
fn parse_max_msg_size(s: &str) -> Result<usize, String> {
    if s.trim().is_empty() {
        return Ok(0);
    }
    s.trim().parse().map_err(|_| {
        format!("XDS_CLIENT_MAX_MSG_SIZE_IN_BYTES must be a whole number of bytes, got '{s}'")
    })
}

/// `XDS_CLIENT_BACKOFF_RANDOM_FACTOR`: a non-negative number.
fn parse_factor(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!(
            "XDS_CLIENT_BACKOFF_RANDOM_FACTOR must be a number of at least 0, got '{s}'"
        )),
    }
}

/// The rules' source and the xDS client's settings.
#[derive(Debug, Clone, Args)]
pub struct XdsArgs {
    /// FILE (rule files, the default) or GRPC_XDS_SOTW (RateLimitConfig resources from an xDS
    /// management server, over ADS).
    #[arg(long, env = "CONFIG_TYPE", default_value = "FILE", value_parser = parse_config_type)]
    pub config_type: ConfigType,
    /// GRPC_XDS_SOTW: serve before the first config arrives (calls fail until it does);
    /// false waits for the management server's first answer before listening.
    #[arg(long, env = "FORCE_START_WITHOUT_INITIAL_CONFIG", default_value = "false", action = ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub force_start_without_initial_config: bool,
    /// The node id sent to the management server (it keys its snapshots by node).
    #[arg(long, env = "CONFIG_GRPC_XDS_NODE_ID", default_value = "default")]
    pub config_grpc_xds_node_id: String,
    /// Node metadata: `key1=value1,key2=value2` (entries without `=` are ignored).
    #[arg(long, env = "CONFIG_GRPC_XDS_NODE_METADATA", default_value = "")]
    pub config_grpc_xds_node_metadata: String,
    /// The management server, `host:port`.
    #[arg(
        long,
        env = "CONFIG_GRPC_XDS_SERVER_URL",
        default_value = "localhost:18000"
    )]
    pub config_grpc_xds_server_url: String,
    /// Wait between attempts to connect to the management server (±50% jitter; Go duration).
    #[arg(long, env = "CONFIG_GRPC_XDS_SERVER_CONNECT_RETRY_INTERVAL", default_value = "3s", value_parser = duration("CONFIG_GRPC_XDS_SERVER_CONNECT_RETRY_INTERVAL", Bound::Positive, HOUR))]
    pub config_grpc_xds_server_connect_retry_interval: Duration,
    /// gRPC metadata sent on the stream: `key1:value1,key2:value2`.
    #[arg(
        long,
        env = "CONFIG_GRPC_XDS_CLIENT_ADDITIONAL_HEADERS",
        default_value = "",
        hide_env_values = true
    )]
    pub config_grpc_xds_client_additional_headers: String,
    /// TLS to the management server.
    #[arg(long, env = "CONFIG_GRPC_XDS_SERVER_USE_TLS", default_value = "false", action = ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub config_grpc_xds_server_use_tls: bool,
    /// Client certificate (PEM) for mTLS to the management server; used with the key.
    #[arg(long, env = "CONFIG_GRPC_XDS_CLIENT_TLS_CERT", default_value = "")]
    pub config_grpc_xds_client_tls_cert: String,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "CONFIG_GRPC_XDS_CLIENT_TLS_KEY", default_value = "")]
    pub config_grpc_xds_client_tls_key: String,
    /// CA certificate(s) (PEM) the management server's certificate must chain to; unset:
    /// the Mozilla root set.
    #[arg(long, env = "CONFIG_GRPC_XDS_SERVER_TLS_CACERT", default_value = "")]
    pub config_grpc_xds_server_tls_cacert: String,
    /// The name the management server's certificate must carry; unset: the host of
    /// CONFIG_GRPC_XDS_SERVER_URL.
    #[arg(long, env = "CONFIG_GRPC_XDS_SERVER_TLS_SAN", default_value = "")]
    pub config_grpc_xds_server_tls_san: String,
    /// First wait before reconnecting after the stream ends (Go duration).
    #[arg(long, env = "XDS_CLIENT_BACKOFF_INITIAL_INTERVAL", default_value = "10s", value_parser = duration("XDS_CLIENT_BACKOFF_INITIAL_INTERVAL", Bound::Zero, HOUR))]
    pub xds_client_backoff_initial_interval: Duration,
    /// Longest wait before reconnecting (Go duration).
    #[arg(long, env = "XDS_CLIENT_BACKOFF_MAX_INTERVAL", default_value = "60s", value_parser = duration("XDS_CLIENT_BACKOFF_MAX_INTERVAL", Bound::Zero, HOUR))]
    pub xds_client_backoff_max_interval: Duration,
    /// Growth factor of the reconnect wait per attempt, as the reference uses it (with the
    /// default 0.5 the wait stays at the initial interval).
    #[arg(long, env = "XDS_CLIENT_BACKOFF_RANDOM_FACTOR", default_value = "0.5", value_parser = parse_factor)]
    pub xds_client_backoff_random_factor: f64,
    /// Randomise each reconnect wait between the initial interval and its computed value.
    #[arg(long, env = "XDS_CLIENT_BACKOFF_JITTER", default_value = "true", action = ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub xds_client_backoff_jitter: bool,
    /// Largest DiscoveryResponse accepted, in bytes; empty or 0: 4 MiB.
    #[arg(long, env = "XDS_CLIENT_MAX_MSG_SIZE_IN_BYTES", default_value = "", value_parser = parse_max_msg_size)]
    pub xds_client_max_msg_size_in_bytes: usize,
}

impl XdsArgs {
    /// Whether both the client certificate and its key are set (the reference ignores one
    /// without the other).
    pub fn has_client_identity(&self) -> bool {
        !self.config_grpc_xds_client_tls_cert.is_empty()
            && !self.config_grpc_xds_client_tls_key.is_empty()
    }
}

/// `CONFIG_GRPC_XDS_NODE_METADATA` as the reference reads it: entries split on `,`, each
/// `key=value` split at its first `=`; entries without `=` are skipped; values are strings.
pub fn parse_node_metadata(s: &str) -> Vec<(String, String)> {
    s.split(',')
        .filter_map(|entry| entry.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// `CONFIG_GRPC_XDS_CLIENT_ADDITIONAL_HEADERS` as the reference's settings library reads a
/// map: blank is none; otherwise pairs split on `,`, each exactly `key:value` (a second `:`
/// is an error, as there).
pub fn parse_additional_headers(s: &str) -> Result<Vec<(String, String)>, String> {
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    s.split(',')
        .map(|pair| {
            let mut parts = pair.split(':');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(k), Some(v), None) => Ok((k.to_owned(), v.to_owned())),
                _ => Err(format!(
                    "CONFIG_GRPC_XDS_CLIENT_ADDITIONAL_HEADERS: invalid map item: \"{pair}\" (expected key:value)"
                )),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_metadata_is_read_as_the_reference_reads_it() {
        assert_eq!(
            parse_node_metadata("a=1,b=x=y,nokey,c="),
            vec![
                ("a".to_owned(), "1".to_owned()),
                ("b".to_owned(), "x=y".to_owned()),
                ("c".to_owned(), String::new()),
            ]
        );
        assert!(parse_node_metadata("").is_empty());
    }

    #[test]
    fn additional_headers_are_read_as_envconfig_reads_a_map() {
        assert_eq!(parse_additional_headers("  "), Ok(vec![]));
        assert_eq!(
            parse_additional_headers("x-a:1,x-b:two"),
            Ok(vec![
                ("x-a".to_owned(), "1".to_owned()),
                ("x-b".to_owned(), "two".to_owned())
            ])
        );
        let e = parse_additional_headers("x-a:1,x-url:http://h").unwrap_err();
        assert!(e.contains("invalid map item: \"x-url:http://h\""), "{e}");
        assert!(parse_additional_headers("x-a").is_err());
    }

    #[test]
    fn config_type_and_message_size_are_checked() {
        assert_eq!(parse_config_type("FILE"), Ok(ConfigType::File));
        assert_eq!(
            parse_config_type("GRPC_XDS_SOTW"),
            Ok(ConfigType::GrpcXdsSotw)
        );
        let e = parse_config_type("file").unwrap_err();
        assert!(e.starts_with("CONFIG_TYPE 'file' is not supported"), "{e}");
        assert_eq!(parse_max_msg_size(""), Ok(0));
        assert_eq!(parse_max_msg_size("1048576"), Ok(1_048_576));
        assert!(parse_max_msg_size("1MB").is_err());
        assert!(parse_factor("-1").is_err());
    }
}
