//! Zipkin's B3 headers, read so that spans join a trace Envoy's Zipkin tracer started: the
//! single `b3` header and the multiple `x-b3-*` headers (single wins, as in the reference's
//! `b3.New()`). Written back as the single header. Our own, not `opentelemetry-zipkin`'s:
//! that crate brings a Zipkin exporter and an HTTP client we do not use.

use opentelemetry::{
    propagation::{text_map_propagator::FieldIter, Extractor, Injector, TextMapPropagator},
    trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState},
    Context,
};

const SINGLE: &str = "b3";
const TRACE_ID: &str = "x-b3-traceid";
const SPAN_ID: &str = "x-b3-spanid";
const SAMPLED: &str = "x-b3-sampled";
const FLAGS: &str = "x-b3-flags";

/// The B3 propagator (see the module doc).
#[derive(Debug)]
pub struct B3 {
    /// The header names, for [`TextMapPropagator::fields`].
    fields: [String; 5],
}

impl Default for B3 {
    fn default() -> Self {
        Self {
            fields: [SINGLE, TRACE_ID, SPAN_ID, SAMPLED, FLAGS].map(str::to_owned),
        }
    }
}

impl TextMapPropagator for B3 {
    fn inject_context(&self, cx: &Context, injector: &mut dyn Injector) {
        let span = cx.span();
        let sc = span.span_context();
        if sc.is_valid() {
            let sampled = if sc.is_sampled() { "1" } else { "0" };
            injector.set(
                SINGLE,
                format!("{}-{}-{sampled}", sc.trace_id(), sc.span_id()),
            );
        }
    }

    fn extract_with_context(&self, cx: &Context, extractor: &dyn Extractor) -> Context {
        let found = match extractor.get(SINGLE) {
            Some(single) => single_header(single),
            None => multiple_headers(extractor),
        };
        match found {
            Some(sc) => cx.with_remote_span_context(sc),
            None => cx.clone(),
        }
    }

    fn fields(&self) -> FieldIter<'_> {
        FieldIter::new(&self.fields)
    }
}

/// `{trace id}-{span id}[-{sampling}[-{parent span id}]]`; a lone sampling state carries no
/// parent and is ignored.
fn single_header(value: &str) -> Option<SpanContext> {
    let mut parts = value.trim().split('-');
    let trace_id = trace_id(parts.next()?)?;
    let span_id = span_id(parts.next()?)?;
    let flags = match parts.next() {
        None => deferred(),
        Some(s) => sampling(s)?,
    };
    if let Some(parent) = parts.next() {
        span_id_checked(parent)?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(remote(trace_id, span_id, flags))
}

fn multiple_headers(extractor: &dyn Extractor) -> Option<SpanContext> {
    let trace_id = trace_id(extractor.get(TRACE_ID)?.trim())?;
    let span_id = span_id(extractor.get(SPAN_ID)?.trim())?;
    // `x-b3-flags: 1` is debug, which implies sampled.
    let flags = if extractor.get(FLAGS).map(str::trim) == Some("1") {
        TraceFlags::SAMPLED
    } else {
        match extractor.get(SAMPLED).map(str::trim) {
            None => deferred(),
            Some("true") => TraceFlags::SAMPLED,
            Some("false") => TraceFlags::default(),
            Some(s) => sampling(s)?,
        }
    };
    Some(remote(trace_id, span_id, flags))
}

/// No sampling state: the caller left the decision to us. A span context carries no
/// "deferred" flag, so this reads as not sampled, as in the reference's propagator.
fn deferred() -> TraceFlags {
    TraceFlags::default()
}

fn sampling(s: &str) -> Option<TraceFlags> {
    match s {
        "1" | "d" => Some(TraceFlags::SAMPLED),
        "0" => Some(TraceFlags::default()),
        _ => None,
    }
}

fn remote(trace_id: TraceId, span_id: SpanId, flags: TraceFlags) -> SpanContext {
    SpanContext::new(trace_id, span_id, flags, true, TraceState::default())
}

fn is_hex(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// 16 or 32 hex digits (a 64-bit id is the low half of a 128-bit one), not all zero.
fn trace_id(s: &str) -> Option<TraceId> {
    if !(s.len() == 16 || s.len() == 32) || !is_hex(s) {
        return None;
    }
    TraceId::from_hex(s)
        .ok()
        .filter(|id| *id != TraceId::INVALID)
}

fn span_id_checked(s: &str) -> Option<SpanId> {
    if s.len() != 16 || !is_hex(s) {
        return None;
    }
    SpanId::from_hex(s).ok()
}

fn span_id(s: &str) -> Option<SpanId> {
    span_id_checked(s).filter(|id| *id != SpanId::INVALID)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn extract(headers: &[(&str, &str)]) -> Option<SpanContext> {
        let map: HashMap<String, String> = headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let cx = B3::default().extract_with_context(&Context::new(), &map);
        let span = cx.span();
        let sc = span.span_context().clone();
        sc.is_valid().then_some(sc)
    }

    const TRACE: &str = "80f198ee56343ba864fe8b2a57d3eff7";
    const SPAN: &str = "e457b5a2e4d86bd1";

    #[test]
    fn single_header_forms() {
        let sc = extract(&[("b3", &format!("{TRACE}-{SPAN}-1-05e3ac9a4f6e3b90"))]).unwrap();
        assert_eq!(sc.trace_id().to_string(), TRACE);
        assert_eq!(sc.span_id().to_string(), SPAN);
        assert!(sc.is_sampled() && sc.is_remote());
        assert!(!extract(&[("b3", &format!("{TRACE}-{SPAN}-0"))])
            .unwrap()
            .is_sampled());
        assert!(extract(&[("b3", &format!("{TRACE}-{SPAN}-d"))])
            .unwrap()
            .is_sampled());
        assert!(!extract(&[("b3", &format!("{TRACE}-{SPAN}"))])
            .unwrap()
            .is_sampled());
        // A 64-bit trace id is the low half.
        let short = extract(&[("b3", &format!("64fe8b2a57d3eff7-{SPAN}-1"))]).unwrap();
        assert_eq!(
            short.trace_id().to_string(),
            "000000000000000064fe8b2a57d3eff7"
        );
        for bad in [
            "0",
            "1",
            "",
            &format!("{TRACE}-{SPAN}-x"),
            &format!("{TRACE}-+457b5a2e4d86bd1-1"),
            &format!("{TRACE}-{SPAN}-1-short"),
            &format!("{TRACE}-{SPAN}-1-05e3ac9a4f6e3b90-extra"),
            &format!("{}-{SPAN}-1", "0".repeat(32)),
            &format!("{TRACE}-{}-1", "0".repeat(16)),
        ] {
            assert!(extract(&[("b3", bad)]).is_none(), "{bad}");
        }
    }

    #[test]
    fn multiple_headers_and_precedence() {
        let sc = extract(&[
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", SPAN),
            ("x-b3-sampled", "1"),
        ])
        .unwrap();
        assert_eq!(sc.trace_id().to_string(), TRACE);
        assert!(sc.is_sampled());
        let debug = extract(&[
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", SPAN),
            ("x-b3-flags", "1"),
        ]);
        assert!(debug.unwrap().is_sampled());
        assert!(extract(&[("x-b3-traceid", TRACE)]).is_none());
        // The single header wins.
        let other = "0af7651916cd43dd8448eb211c80319c";
        let sc = extract(&[
            ("b3", &format!("{other}-{SPAN}-1")),
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", SPAN),
        ])
        .unwrap();
        assert_eq!(sc.trace_id().to_string(), other);
    }

    #[test]
    fn injects_the_single_header() {
        let sc = remote(
            TraceId::from_hex(TRACE).unwrap(),
            SpanId::from_hex(SPAN).unwrap(),
            TraceFlags::SAMPLED,
        );
        let cx = Context::new().with_remote_span_context(sc);
        let mut out: HashMap<String, String> = HashMap::new();
        B3::default().inject_context(&cx, &mut out);
        assert_eq!(out.get("b3").unwrap(), &format!("{TRACE}-{SPAN}-1"));
    }
}
