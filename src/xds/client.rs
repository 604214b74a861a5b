//! The ADS state-of-the-world stream: subscribe, apply each response, ACK or NACK, reconnect.
//!
//! One task owns the stream and the config state, so responses are applied one at a time in
//! the order they came, and the ACK of a response is sent only once its tree is in force.

use std::{sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    metadata::{AsciiMetadataKey, AsciiMetadataValue},
    transport::{Channel, Endpoint},
};

use super::{
    backoff::{jitter_linear, Backoff},
    convert::{compile_resources, content_hash, TYPE_URL},
};
use crate::{
    config::RuleTree,
    health::{Component, Health},
    limiter::Algorithm,
    metrics::{count_load, ConfigMetrics},
    proto::{
        envoy::{
            config::core::v3::Node,
            service::discovery::v3::{
                aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
                DiscoveryRequest, DiscoveryResponse,
            },
        },
        google::rpc::Status,
    },
};

/// `error_detail.code` of a NACK: INVALID_ARGUMENT, as the resources are what is wrong.
const NACK_CODE: i32 = 3;

/// Everything the client needs, checked at start-up.
pub struct XdsClient {
    /// `CONFIG_GRPC_XDS_SERVER_URL`, with TLS when asked for; connected anew per stream.
    pub(super) endpoint: Endpoint,
    /// The address as configured, for logs.
    pub(super) server: String,
    /// Sent in every request: `CONFIG_GRPC_XDS_NODE_ID` and `_NODE_METADATA`.
    pub(super) node: Node,
    /// `CONFIG_GRPC_XDS_CLIENT_ADDITIONAL_HEADERS`, sent on every stream; never logged.
    pub(super) headers: Vec<(AsciiMetadataKey, AsciiMetadataValue)>,
    /// `XDS_CLIENT_MAX_MSG_SIZE_IN_BYTES`; 0: tonic's default (4 MiB).
    pub(super) max_message_size: usize,
    /// `CONFIG_GRPC_XDS_SERVER_CONNECT_RETRY_INTERVAL`: between failed connection attempts.
    pub(super) connect_retry: Duration,
    /// `XDS_CLIENT_BACKOFF_*`: before reconnecting after a stream ends.
    pub(super) backoff: Backoff,
    /// `MERGE_DOMAIN_CONFIG`, as for files.
    pub(super) merge_domains: bool,
    /// `DEFAULT_ALGORITHM`, as for files.
    pub(super) default_algorithm: Algorithm,
}

/// Where accepted configs go: the tree the service reads, and the health it reports.
pub struct Target {
    /// The tree the service, `/rlconfig` and the metrics upkeep read.
    pub rules: Arc<ArcSwap<RuleTree>>,
    /// Its `config` component follows whether the config in force has a domain.
    pub health: Arc<Health>,
}

/// The config state the stream task owns.
struct State {
    target: Target,
    metrics: ConfigMetrics,
    /// 0 until the first config is accepted, then +1 per config swapped in.
    generation: u64,
    /// Content hash of the resources in force.
    hash: Option<u64>,
    /// `version_info` of the last accepted response: sent in every request, NACKs included.
    version: String,
    /// Fired once the first response has been applied or refused.
    first: Option<oneshot::Sender<()>>,
}

impl XdsClient {
    /// Runs the client until the runtime stops. The receiver resolves once the first response
    /// has been handled, accepted or not (what the reference waits for before serving when
    /// `FORCE_START_WITHOUT_INITIAL_CONFIG` is false).
    pub fn spawn(self, target: Target) -> (tokio::task::JoinHandle<()>, oneshot::Receiver<()>) {
        let (first, first_rx) = oneshot::channel();
        let state = State {
            target,
            metrics: ConfigMetrics::default(),
            generation: 0,
            hash: None,
            version: String::new(),
            first: Some(first),
        };
        (tokio::spawn(self.run(state)), first_rx)
    }

    async fn run(self, mut state: State) {
        let mut attempt = 0u32;
        let mut failing = false;
        loop {
            let channel = match self.endpoint.connect().await {
                Ok(channel) => channel,
                Err(e) => {
                    let error = super::error_chain(&e);
                    if failing {
                        tracing::debug!(server = %self.server, error, "xDS management server still not reachable");
                    } else {
                        tracing::warn!(server = %self.server, error, "xDS management server not reachable; keeping the rules in force and retrying");
                        failing = true;
                    }
                    tokio::time::sleep(jitter_linear(self.connect_retry, fastrand::f64())).await;
                    continue;
                }
            };
            failing = false;
            tracing::info!(server = %self.server, "connected to the xDS management server");
            let (responses, ended) = self.stream(channel, &mut state).await;
            match ended {
                Ok(()) => {
                    tracing::warn!(server = %self.server, "xDS stream closed by the management server; keeping the rules in force")
                }
                Err(e) => {
                    tracing::warn!(server = %self.server, code = ?e.code(), error = %e.message(), "xDS stream failed; keeping the rules in force")
                }
            }
            if responses > 0 {
                attempt = 0;
            }
            let wait = self.backoff.wait(attempt, fastrand::f64());
            attempt = attempt.saturating_add(1);
            tracing::info!(
                wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                "reconnecting to the xDS management server"
            );
            tokio::time::sleep(wait).await;
        }
    }

    /// One stream: subscribe, then apply and answer every response until it ends. Returns
    /// how many responses came, and how it ended.
    async fn stream(
        &self,
        channel: Channel,
        state: &mut State,
    ) -> (u64, Result<(), tonic::Status>) {
        let (tx, rx) = mpsc::channel(4);
        // A new stream starts with the version in force and no nonce, as Envoy's clients do.
        let subscribe = self.request(&state.version, String::new(), None);
        if tx.send(subscribe).await.is_err() {
            return (0, Ok(()));
        }
        let mut client = AggregatedDiscoveryServiceClient::new(channel);
        if self.max_message_size > 0 {
            client = client.max_decoding_message_size(self.max_message_size);
        }
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        for (key, value) in &self.headers {
            request.metadata_mut().append(key.clone(), value.clone());
        }
        let mut inbound = match client.stream_aggregated_resources(request).await {
            Ok(response) => response.into_inner(),
            Err(status) => return (0, Err(status)),
        };
        let mut responses = 0;
        loop {
            let response = match inbound.message().await {
                Ok(Some(response)) => response,
                Ok(None) => return (responses, Ok(())),
                Err(status) => return (responses, Err(status)),
            };
            responses += 1;
            let refused = state.apply(&response, self.merge_domains, self.default_algorithm);
            let answer = self.request(
                &state.version,
                response.nonce.clone(),
                refused.map(|message| Status {
                    code: NACK_CODE,
                    message,
                    details: Vec::new(),
                }),
            );
            if let Some(first) = state.first.take() {
                let _ = first.send(());
            }
            if tx.send(answer).await.is_err() {
                return (responses, Ok(()));
            }
        }
    }

    fn request(&self, version: &str, nonce: String, error: Option<Status>) -> DiscoveryRequest {
        DiscoveryRequest {
            version_info: version.to_owned(),
            node: Some(self.node.clone()),
            resource_names: Vec::new(),
            type_url: TYPE_URL.to_owned(),
            response_nonce: nonce,
            error_detail: error,
        }
    }
}

impl State {
    /// Compiles the response's resources and swaps them in; `Some(errors)` (the NACK's text)
    /// when they are refused, the config in force staying.
    fn apply(
        &mut self,
        response: &DiscoveryResponse,
        merge_domains: bool,
        default_algorithm: Algorithm,
    ) -> Option<String> {
        let version = response.version_info.as_str();
        let hash = content_hash(&response.resources);
        if self.hash == Some(hash) {
            tracing::info!(
                version,
                generation = self.generation,
                "xDS config unchanged; acknowledged"
            );
            self.version = version.to_owned();
            return None;
        }
        match compile_resources(&response.resources, merge_domains, default_algorithm) {
            Ok(tree) => {
                let (domains, rules) = (tree.domains.len(), tree.rule_count());
                self.target.rules.store(Arc::new(tree));
                self.generation += 1;
                self.hash = Some(hash);
                self.version = version.to_owned();
                count_load(true);
                self.metrics.publish(self.generation, hash);
                self.target.health.set(Component::Config, domains > 0);
                tracing::info!(
                    version,
                    generation = self.generation,
                    hash = %format!("{hash:016x}"),
                    resources = response.resources.len(),
                    domains,
                    rules,
                    "xDS config accepted (ACK)"
                );
                None
            }
            Err(errors) => {
                count_load(false);
                tracing::warn!(
                    version,
                    errors = errors.0.len(),
                    generation = self.generation,
                    "xDS config refused (NACK); keeping the last good config"
                );
                for e in &errors.0 {
                    tracing::error!(resource = %e.file, descriptor = %e.path, field = %e.field, "config error: {e}");
                }
                Some(
                    errors
                        .0
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("\n"),
                )
            }
        }
    }
}
