//! Rules over xDS (`CONFIG_TYPE=GRPC_XDS_SOTW`): `RateLimitConfig` resources from a management
//! server such as Envoy Gateway's, over an ADS state-of-the-world stream, as the reference
//! takes them.
//!
//! `convert` turns resources into rules with the file compiler (same checks, same errors);
//! `client` keeps the stream, swaps each accepted config in with one `ArcSwap::store` (the
//! tree the service reads), ACKs or NACKs it, and reconnects with `backoff`'s waits while the
//! last good rules keep answering. Counter keys depend only on rules and requests, so
//! counters carry over an update as they do over a file reload.

mod backoff;
mod client;
mod convert;

use std::path::PathBuf;

use prost_types::{value::Kind, Struct, Value};
use tonic::{
    metadata::{AsciiMetadataKey, AsciiMetadataValue},
    transport::{Certificate, ClientTlsConfig, Endpoint, Identity},
};

pub use backoff::Backoff;
pub use client::{Target, XdsClient};
pub use convert::{compile_resources, content_hash, to_raw, TYPE_URL};

use crate::{
    proto::envoy::config::core::v3::Node,
    settings::{parse_additional_headers, parse_node_metadata, ServeArgs},
};

/// Why the xDS client cannot be set up; ratelimitd does not start then.
#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    #[error("CONFIG_GRPC_XDS_SERVER_URL '{url}' is not a valid address: {reason}")]
    Url { url: String, reason: String },
    #[error("{setting}: cannot read {}: {error}", path.display())]
    File {
        setting: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("CONFIG_GRPC_XDS_SERVER_USE_TLS: invalid TLS settings: {0}")]
    Tls(String),
    #[error("{0}")]
    Headers(String),
}

impl XdsClient {
    /// The client as the settings describe it: TLS files read, headers and address checked.
    pub fn from_args(args: &ServeArgs) -> Result<Self, XdsError> {
        let x = &args.xds;
        let server = x.config_grpc_xds_server_url.clone();
        let tls = x.config_grpc_xds_server_use_tls;
        let uri = if server.contains("://") {
            server.clone()
        } else {
            format!("{}://{server}", if tls { "https" } else { "http" })
        };
        let url_error = |reason: String| XdsError::Url {
            url: server.clone(),
            reason,
        };
        let mut endpoint = Endpoint::from_shared(uri)
            .map_err(|e| url_error(e.to_string()))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true);
        if tls {
            endpoint = endpoint
                .tls_config(tls_config(args)?)
                .map_err(|e| XdsError::Tls(error_chain(&e)))?;
        }
        let headers = parse_additional_headers(&x.config_grpc_xds_client_additional_headers)
            .map_err(XdsError::Headers)?
            .into_iter()
            .map(|(k, v)| {
                let key = AsciiMetadataKey::from_bytes(k.to_ascii_lowercase().as_bytes())
                    .map_err(|_| {
                        XdsError::Headers(format!(
                            "CONFIG_GRPC_XDS_CLIENT_ADDITIONAL_HEADERS: '{k}' is not a valid header name"
                        ))
                    })?;
                let value = AsciiMetadataValue::try_from(v.as_str()).map_err(|_| {
                    XdsError::Headers(format!(
                        "CONFIG_GRPC_XDS_CLIENT_ADDITIONAL_HEADERS: the value of '{k}' is not a valid header value"
                    ))
                })?;
                Ok((key, value))
            })
            .collect::<Result<Vec<_>, XdsError>>()?;
        Ok(Self {
            endpoint,
            server,
            node: node(&x.config_grpc_xds_node_id, &x.config_grpc_xds_node_metadata),
            headers,
            max_message_size: x.xds_client_max_msg_size_in_bytes,
            connect_retry: x.config_grpc_xds_server_connect_retry_interval,
            backoff: Backoff {
                min: x.xds_client_backoff_initial_interval,
                max: x.xds_client_backoff_max_interval,
                factor: x.xds_client_backoff_random_factor,
                jitter: x.xds_client_backoff_jitter,
            },
            merge_domains: args.config.merge_domain_config,
            default_algorithm: args.config.default_algorithm,
        })
    }
}

/// Bound on one connection attempt (TCP and TLS handshakes).
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The node as the reference sends it: the id, and the metadata as string values.
fn node(id: &str, metadata: &str) -> Node {
    let fields = parse_node_metadata(metadata)
        .into_iter()
        .map(|(k, v)| {
            let value = Value {
                kind: Some(Kind::StringValue(v)),
            };
            (k, value)
        })
        .collect();
    Node {
        id: id.to_owned(),
        metadata: Some(Struct { fields }),
        ..Node::default()
    }
}

/// TLS to the management server: its certificate checked against
/// `CONFIG_GRPC_XDS_SERVER_TLS_CACERT` (or the Mozilla roots) under the name
/// `CONFIG_GRPC_XDS_SERVER_TLS_SAN` (or the URL's host), and our certificate when both
/// `CONFIG_GRPC_XDS_CLIENT_TLS_CERT` and `_KEY` are set.
fn tls_config(args: &ServeArgs) -> Result<ClientTlsConfig, XdsError> {
    let x = &args.xds;
    let read = |setting: &'static str, path: &str| {
        std::fs::read(path).map_err(|error| XdsError::File {
            setting,
            path: path.into(),
            error,
        })
    };
    let mut tls = ClientTlsConfig::new();
    if !x.config_grpc_xds_server_tls_san.is_empty() {
        tls = tls.domain_name(x.config_grpc_xds_server_tls_san.clone());
    }
    tls = if x.config_grpc_xds_server_tls_cacert.is_empty() {
        tls.with_webpki_roots()
    } else {
        let ca = read(
            "CONFIG_GRPC_XDS_SERVER_TLS_CACERT",
            &x.config_grpc_xds_server_tls_cacert,
        )?;
        tls.ca_certificate(Certificate::from_pem(ca))
    };
    if x.has_client_identity() {
        let cert = read(
            "CONFIG_GRPC_XDS_CLIENT_TLS_CERT",
            &x.config_grpc_xds_client_tls_cert,
        )?;
        let key = read(
            "CONFIG_GRPC_XDS_CLIENT_TLS_KEY",
            &x.config_grpc_xds_client_tls_key,
        )?;
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Ok(tls)
}

/// An error and its sources, `: `-separated.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
