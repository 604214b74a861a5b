//! `TRACING_*`: the reference's OpenTelemetry settings, same names and defaults. Where the
//! spans go (endpoint, headers, TLS, timeouts, batching) is not here: the OpenTelemetry SDK
//! reads the standard `OTEL_EXPORTER_OTLP_*` and `OTEL_BSP_*` variables itself, as the
//! reference's does.

use clap::{builder::BoolishValueParser, ArgAction, Args};

/// How spans are sent to the collector (`TRACING_EXPORTER_PROTOCOL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExporterProtocol {
    /// OTLP http/protobuf (`POST /v1/traces`), the reference's default.
    Http,
    /// OTLP over gRPC.
    Grpc,
}

/// The reference's values exactly: `http` (or empty) and `grpc`; it stops at start-up on any
/// other, and so do we.
fn parse_protocol(s: &str) -> Result<ExporterProtocol, String> {
    match s {
        "http" | "" => Ok(ExporterProtocol::Http),
        "grpc" => Ok(ExporterProtocol::Grpc),
        _ => Err(format!(
            "invalid TRACING_EXPORTER_PROTOCOL '{s}' (expected http or grpc)"
        )),
    }
}

/// A number; like the reference, anything at or above 1 samples every trace and anything at
/// or below 0 none.
fn parse_rate(s: &str) -> Result<f64, String> {
    s.trim()
        .parse::<f64>()
        .ok()
        .filter(|r| !r.is_nan())
        .ok_or_else(|| format!("invalid TRACING_SAMPLING_RATE '{s}' (expected a number)"))
}

/// OpenTelemetry tracing settings.
#[derive(Debug, Clone, Args)]
pub struct TracingArgs {
    /// Export a span for each ShouldRateLimit call and each backend call it makes, over
    /// OTLP (endpoint from OTEL_EXPORTER_OTLP_ENDPOINT and its kin).
    #[arg(long, env = "TRACING_ENABLED", default_value = "false", action = ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub tracing_enabled: bool,
    /// http (OTLP http/protobuf) or grpc.
    #[arg(long, env = "TRACING_EXPORTER_PROTOCOL", default_value = "http", value_parser = parse_protocol)]
    pub tracing_exporter_protocol: ExporterProtocol,
    /// The `service.name` resource attribute.
    #[arg(long, env = "TRACING_SERVICE_NAME", default_value = "RateLimit")]
    pub tracing_service_name: String,
    /// The `service.namespace` resource attribute.
    #[arg(long, env = "TRACING_SERVICE_NAMESPACE", default_value = "")]
    pub tracing_service_namespace: String,
    /// The `service.instance.id` resource attribute; empty means a random UUID at start-up.
    #[arg(long, env = "TRACING_SERVICE_INSTANCE_ID", default_value = "")]
    pub tracing_service_instance_id: String,
    /// Share of traces sampled when the caller sent no sampling decision (a caller's decision
    /// is followed): ParentBased(TraceIdRatioBased(rate)).
    #[arg(long, env = "TRACING_SAMPLING_RATE", default_value = "1", value_parser = parse_rate)]
    pub tracing_sampling_rate: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_as_the_reference_reads_them() {
        assert_eq!(parse_protocol(""), Ok(ExporterProtocol::Http));
        assert_eq!(parse_protocol("grpc"), Ok(ExporterProtocol::Grpc));
        assert_eq!(
            parse_protocol("GRPC"),
            Err("invalid TRACING_EXPORTER_PROTOCOL 'GRPC' (expected http or grpc)".into())
        );
        assert_eq!(parse_rate("0.25"), Ok(0.25));
        assert_eq!(parse_rate("2"), Ok(2.0));
        assert!(parse_rate("NaN").is_err());
        assert!(parse_rate("half").is_err());
    }
}
