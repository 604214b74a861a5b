//! The usage view: for a domain and descriptors, every limit with what is used, what is left
//! and when it resets, charging nothing. Served as JSON on the admin port (`GET /usage`) and
//! printed by `ratelimitd usage`, which asks a running instance over HTTP (its counters may
//! be in its own memory, so asking it is the one view that works with every backend).

use serde_json::{json, Value};

use crate::service::Usage;

/// The usage of each descriptor as JSON: `{"domain": .., "descriptors": [{"entries": [[k, v],
/// ..], "rule": .., "limits": [{"requests_per_unit", "unit", "unit_multiplier", "algorithm",
/// "capacity", "used", "remaining", "reset_seconds", "over_limit"}]}]}`. A descriptor no rule
/// matches has `"rule": null` and no limits; an unlimited one `"unlimited": true`.
pub fn to_json(domain: &str, descriptors: &[Vec<(String, String)>], usage: &[Usage]) -> Value {
    let items: Vec<Value> = descriptors
        .iter()
        .zip(usage)
        .map(|(entries, u)| {
            let entries: Vec<Value> = entries.iter().map(|(k, v)| json!([k, v])).collect();
            match u {
                Usage::NoRule => json!({"entries": entries, "rule": null, "limits": []}),
                Usage::Unlimited => {
                    json!({"entries": entries, "unlimited": true, "limits": []})
                }
                Usage::Limited { rule, limits } => {
                    let limits: Vec<Value> = limits
                        .iter()
                        .map(|(l, v)| {
                            let q = l.quota();
                            json!({
                                "requests_per_unit": l.requests_per_unit,
                                "unit": l.unit.name(),
                                "unit_multiplier": l.multiplier,
                                "algorithm": l.algorithm.name(),
                                "capacity": q.capacity,
                                "used": if v.allowed {
                                    q.capacity.saturating_sub(v.remaining)
                                } else {
                                    v.used
                                },
                                "remaining": v.remaining,
                                "reset_seconds": v.reset_ms as f64 / 1000.0,
                                "over_limit": !v.allowed,
                            })
                        })
                        .collect();
                    json!({"entries": entries, "rule": rule, "limits": limits})
                }
            }
        })
        .collect();
    json!({"domain": domain, "descriptors": items})
}

/// Parses `k1=v1,k2=v2` (a key alone means an empty value), as `/explain` and `/usage` take a
/// descriptor.
pub fn parse_descriptor(text: &str) -> Vec<(String, String)> {
    text.split(',')
        .filter(|e| !e.is_empty())
        .map(|e| match e.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (e.to_owned(), String::new()),
        })
        .collect()
}

/// Why `ratelimitd usage` got no answer.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP error talking to {addr}: {source}")]
    Http {
        addr: String,
        #[source]
        source: hyper::Error,
    },
    #[error("invalid request: {0}")]
    Request(#[from] hyper::http::Error),
    #[error("{addr} answered {status}: {body}")]
    Status {
        addr: String,
        status: u16,
        body: String,
    },
}

/// `GET /usage` on the instance at `addr` (`host:port` of its admin listener), returning the
/// JSON body. Query values are percent-encoded.
pub async fn fetch(addr: &str, domain: &str, descriptors: &[String]) -> Result<String, FetchError> {
    use http_body_util::{BodyExt, Empty};
    let mut query = format!("domain={}", encode(domain));
    for d in descriptors {
        query.push_str("&descriptor=");
        query.push_str(&encode(d));
    }
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|source| FetchError::Connect {
            addr: addr.to_owned(),
            source,
        })?;
    let http = |source| FetchError::Http {
        addr: addr.to_owned(),
        source,
    };
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(http)?;
    let driver = tokio::spawn(conn);
    let req = hyper::Request::get(format!("/usage?{query}"))
        .header(hyper::header::HOST, addr)
        .body(Empty::<bytes::Bytes>::new())?;
    let resp = sender.send_request(req).await.map_err(http)?;
    let status = resp.status();
    let body = resp.into_body().collect().await.map_err(http)?.to_bytes();
    driver.abort();
    let body = String::from_utf8_lossy(&body).into_owned();
    if status.is_success() {
        Ok(body)
    } else {
        Err(FetchError::Status {
            addr: addr.to_owned(),
            status: status.as_u16(),
            body: body.trim_end().to_owned(),
        })
    }
}

/// Percent-encodes everything but unreserved characters and the `=` and `,` of descriptors.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'=' | b',' => {
                out.push(char::from(b))
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::Limit,
        limiter::{algorithm::Verdict, Unit},
    };

    #[test]
    fn usage_renders_every_limit_and_the_unmatched() {
        let limit = Limit::fixed(10, Unit::Minute);
        let verdict = Verdict {
            allowed: true,
            remaining: 7,
            reset_ms: 42_500,
            retry_ms: 0,
            used: 3,
        };
        let descriptors = vec![
            vec![("user".to_owned(), "alice".to_owned())],
            vec![("other".to_owned(), String::new())],
        ];
        let usage = [
            Usage::Limited {
                rule: "d > user".to_owned(),
                limits: vec![(limit, verdict)],
            },
            Usage::NoRule,
        ];
        let v = to_json("d", &descriptors, &usage);
        assert_eq!(
            v,
            json!({"domain": "d", "descriptors": [
                {"entries": [["user", "alice"]], "rule": "d > user", "limits": [{
                    "requests_per_unit": 10, "unit": "minute", "unit_multiplier": 1,
                    "algorithm": "fixed_window", "capacity": 10, "used": 3, "remaining": 7,
                    "reset_seconds": 42.5, "over_limit": false}]},
                {"entries": [["other", ""]], "rule": null, "limits": []}
            ]})
        );
    }

    #[test]
    fn descriptors_parse_and_encode_for_the_query() {
        assert_eq!(
            parse_descriptor("a=1,b,c=x=y"),
            [
                ("a".to_owned(), "1".to_owned()),
                ("b".to_owned(), String::new()),
                ("c".to_owned(), "x=y".to_owned())
            ]
        );
        assert_eq!(encode("k=a b&c,é"), "k=a%20b%26c,%C3%A9");
    }
}
