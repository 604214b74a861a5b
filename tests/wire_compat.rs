#![allow(clippy::unwrap_used)]
//! Wire compatibility with Envoy's own protos: an independent client (Python grpcio plus the
//! PyPI `xds-protos` package, i.e. Envoy's generated code) encodes requests we decode, decodes
//! responses we encode, and talks gRPC to the real `ratelimitd` binary. Nothing is mocked and
//! nothing is skipped: a missing venv fails the test with the command that creates it.
mod support;
use support::*;

use std::{
    io::Write,
    path::PathBuf,
    process::{Command, Stdio},
    sync::OnceLock,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use prost::Message;
use ratelimitd::proto::envoy::{
    config::core::v3::HeaderValue,
    extensions::common::ratelimit::v3::{
        rate_limit_descriptor::{Entry, RateLimitOverride},
        RateLimitDescriptor,
    },
    r#type::v3::RateLimitUnit,
    service::ratelimit::v3::{
        rate_limit_response::{
            quota::ExpirationSpecifier, rate_limit::Unit, Code, DescriptorStatus, Quota, RateLimit,
        },
        RateLimitRequest, RateLimitResponse,
    },
};
use serde_json::{json, Value};

const VENV_MISSING: &str = "Python grpcio/xds-protos venv missing: run ./scripts/test.sh (it creates .venv from tests/py/requirements.txt)";

/// The venv's python, checked once to import grpcio and Envoy's generated RLS protos.
fn python() -> &'static PathBuf {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        let py = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
        if !py.is_file() {
            panic!("{VENV_MISSING}\n(no interpreter at {})", py.display());
        }
        let out = Command::new(&py)
            .args(["-c", "import grpc, envoy.service.ratelimit.v3.rls_pb2"])
            .output()
            .unwrap_or_else(|e| panic!("{VENV_MISSING}\n(cannot run {}: {e})", py.display()));
        if !out.status.success() {
            panic!(
                "{VENV_MISSING}\n(import failed: {})",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        py
    })
}

fn client_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/py/rls_client.py")
}

/// Runs `rls_client.py ARGS` with `stdin`; returns its stdout, panicking on a non-zero exit.
fn run_client(args: &[&str], stdin: &str) -> String {
    let mut child = Command::new(python())
        .arg(client_script())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start rls_client.py");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "rls_client.py {args:?} failed with {}\nstdin: {stdin}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// ShouldRateLimit through the Python client; its one JSON line (`{"ok": ..}` or `{"error": ..}`).
fn py_call(target: &str, request: Value) -> Value {
    let stdin = json!({ "request": request }).to_string();
    let out = run_client(&[target], &stdin);
    let mut lines = out.lines();
    let line = lines.next().expect("rls_client.py printed nothing");
    assert!(lines.next().is_none(), "expected one JSON line, got: {out}");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

fn ok(answer: Value) -> Value {
    match answer {
        Value::Object(mut m) if m.len() == 1 && m.contains_key("ok") => m.remove("ok").unwrap(),
        other => panic!("expected {{\"ok\": ..}}, got {other}"),
    }
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(s: &str) -> Vec<u8> {
    let s = s.trim();
    assert!(s.len().is_multiple_of(2), "odd-length hex: {s:?}");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// The request JSON serialized by Envoy's protos, decoded by ours; also returns the raw bytes.
fn python_request_bytes(request: Value) -> (Vec<u8>, RateLimitRequest) {
    let stdin = json!({ "request": request }).to_string();
    let bytes = hex_decode(&run_client(&["--raw-request-hex"], &stdin));
    let decoded = RateLimitRequest::decode(bytes.as_slice())
        .unwrap_or_else(|e| panic!("prost cannot decode Envoy's bytes {bytes:02x?}: {e}"));
    (bytes, decoded)
}

fn entry(k: &str, v: &str) -> Entry {
    Entry {
        key: k.into(),
        value: v.into(),
    }
}

#[test]
fn request_encoded_by_envoy_protos_decodes_field_for_field() {
    let (bytes, decoded) = python_request_bytes(json!({
        "domain": "wire-domain",
        "descriptors": [
            {
                "entries": [
                    {"key": "remote_address", "value": "10.0.0.1"},
                    {"key": "path", "value": "/api/v1"},
                    {"key": "method", "value": "GET"}
                ],
                "limit": {"requests_per_unit": 5, "unit": "MINUTE"},
                "hits_addend": "3"
            },
            {
                "entries": [
                    {"key": "tenant", "value": "acme"},
                    {"key": "plan", "value": "gold"}
                ],
                "hits_addend": "0"
            }
        ],
        "hits_addend": 2
    }));
    let expected = RateLimitRequest {
        domain: "wire-domain".into(),
        descriptors: vec![
            RateLimitDescriptor {
                entries: vec![
                    entry("remote_address", "10.0.0.1"),
                    entry("path", "/api/v1"),
                    entry("method", "GET"),
                ],
                limit: Some(RateLimitOverride {
                    requests_per_unit: 5,
                    unit: RateLimitUnit::Minute as i32,
                }),
                hits_addend: Some(3),
            },
            RateLimitDescriptor {
                entries: vec![entry("tenant", "acme"), entry("plan", "gold")],
                limit: None,
                // An explicit 0 is a present wrapper, distinct from an absent one.
                hits_addend: Some(0),
            },
        ],
        hits_addend: 2,
    };
    assert_eq!(decoded.domain, expected.domain);
    assert_eq!(decoded.hits_addend, 2);
    assert_eq!(decoded.descriptors.len(), 2);
    assert_eq!(
        decoded.descriptors[0].entries,
        expected.descriptors[0].entries
    );
    assert_eq!(decoded.descriptors[0].limit, expected.descriptors[0].limit);
    assert_eq!(
        decoded.descriptors[0].limit.unwrap().unit,
        2,
        "MINUTE is 2 in envoy.type.v3.RateLimitUnit"
    );
    assert_eq!(decoded.descriptors[0].hits_addend, Some(3));
    assert_eq!(
        decoded.descriptors[1].entries,
        expected.descriptors[1].entries
    );
    assert_eq!(decoded.descriptors[1].limit, None);
    assert_eq!(decoded.descriptors[1].hits_addend, Some(0));
    assert_eq!(decoded, expected);
    // Same field numbers and types both ways: our encoding is byte-identical to Envoy's.
    assert_eq!(hex_encode(&expected.encode_to_vec()), hex_encode(&bytes));
}

#[test]
fn request_extreme_values_survive_envoy_encoding() {
    // hits_addend is a UInt64Value per descriptor and a uint32 on the request: full ranges.
    let (bytes, decoded) = python_request_bytes(json!({
        "domain": "d",
        "descriptors": [{
            "entries": [{"key": "k", "value": "v"}],
            "limit": {"requests_per_unit": 4294967295u64, "unit": "YEAR"},
            "hits_addend": "18446744073709551615"
        }],
        "hits_addend": 4294967295u64
    }));
    let expected = RateLimitRequest {
        domain: "d".into(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![entry("k", "v")],
            limit: Some(RateLimitOverride {
                requests_per_unit: u32::MAX,
                unit: RateLimitUnit::Year as i32,
            }),
            hits_addend: Some(u64::MAX),
        }],
        hits_addend: u32::MAX,
    };
    assert_eq!(decoded, expected);
    assert_eq!(hex_encode(&expected.encode_to_vec()), hex_encode(&bytes));
}

#[test]
fn response_encoded_by_us_decodes_in_envoy_protos() {
    let response = RateLimitResponse {
        overall_code: Code::OverLimit as i32,
        statuses: vec![
            DescriptorStatus {
                code: Code::OverLimit as i32,
                current_limit: Some(RateLimit {
                    name: "per-week".into(),
                    requests_per_unit: 10,
                    unit: Unit::Week as i32,
                }),
                limit_remaining: 3,
                duration_until_reset: Some(prost_types::Duration {
                    seconds: 42,
                    nanos: 0,
                }),
                quota: Some(Quota {
                    requests: 9,
                    id: "q1".into(),
                    expiration_specifier: Some(ExpirationSpecifier::ValidUntil(
                        prost_types::Timestamp {
                            seconds: 1_700_000_000,
                            nanos: 0,
                        },
                    )),
                }),
            },
            DescriptorStatus {
                code: Code::Ok as i32,
                current_limit: Some(RateLimit {
                    name: "second".into(),
                    requests_per_unit: 100,
                    unit: Unit::Week as i32,
                }),
                limit_remaining: u32::MAX,
                duration_until_reset: Some(prost_types::Duration {
                    seconds: 3600,
                    nanos: 0,
                }),
                quota: None,
            },
        ],
        response_headers_to_add: vec![
            HeaderValue {
                key: "Retry-After".into(),
                value: "42".into(),
                raw_value: Vec::new(),
            },
            HeaderValue {
                key: "x-raw".into(),
                value: String::new(),
                raw_value: b"\x00\xffraw".to_vec(),
            },
        ],
        request_headers_to_add: vec![HeaderValue {
            key: "x-ratelimited".into(),
            value: "true".into(),
            raw_value: Vec::new(),
        }],
        raw_body: b"{\"error\":\"over limit\"}\n".to_vec(),
        dynamic_metadata: Some(prost_types::Struct {
            fields: [
                (
                    "a".to_owned(),
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::StringValue("b".into())),
                    },
                ),
                (
                    "n".to_owned(),
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::NumberValue(1.5)),
                    },
                ),
            ]
            .into_iter()
            .collect(),
        }),
        quota: Some(Quota {
            requests: 5,
            id: "top".into(),
            expiration_specifier: None,
        }),
    };
    assert_eq!(Unit::Week as i32, 7);
    let hex = hex_encode(&response.encode_to_vec());
    let out = run_client(&["--decode-response-hex", &hex], "");
    let got: Value = serde_json::from_str(out.trim()).unwrap();
    let expected = json!({
        "overall_code": "OVER_LIMIT",
        "statuses": [
            {
                "code": "OVER_LIMIT",
                "current_limit": {"name": "per-week", "requests_per_unit": 10, "unit": "WEEK"},
                "limit_remaining": 3,
                "duration_until_reset": "42s",
                "quota": {"requests": 9, "valid_until": "2023-11-14T22:13:20Z", "id": "q1"}
            },
            {
                "code": "OK",
                "current_limit": {"name": "second", "requests_per_unit": 100, "unit": "WEEK"},
                "limit_remaining": 4294967295u64,
                "duration_until_reset": "3600s"
            }
        ],
        "response_headers_to_add": [
            {"key": "Retry-After", "value": "42", "raw_value": ""},
            {"key": "x-raw", "value": "", "raw_value": "AP9yYXc="}
        ],
        "request_headers_to_add": [
            {"key": "x-ratelimited", "value": "true", "raw_value": ""}
        ],
        "raw_body": "eyJlcnJvciI6Im92ZXIgbGltaXQifQo=",
        "dynamic_metadata": {"a": "b", "n": 1.5},
        "quota": {"requests": 5, "id": "top"}
    });
    assert_eq!(got, expected, "Envoy's protos read our bytes as:\n{out}");
}

// ---- end to end over gRPC against the real binary ----

const CONFIG: &str = "domain: wire\ndescriptors:\n  - key: k\n    rate_limit:\n      unit: minute\n      requests_per_unit: 2\n";

/// Seconds in a proto3 JSON Duration ("42s", "41.500s").
fn duration_secs(v: &Value) -> f64 {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("duration is not a string: {v}"));
    s.strip_suffix('s')
        .and_then(|n| n.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("not a proto3 JSON duration: {s:?}"))
}

/// Removes `statuses[i].duration_until_reset` and returns it in seconds, so the rest of the
/// response can be compared exactly.
fn take_duration(resp: &mut Value, i: usize) -> f64 {
    let d = resp["statuses"][i]
        .as_object_mut()
        .unwrap()
        .remove("duration_until_reset")
        .unwrap_or_else(|| panic!("status {i} has no duration_until_reset"));
    duration_secs(&d)
}

/// Waits for the next minute if fewer than 3 s are left in this one.
fn avoid_minute_rollover() {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let left = 60.0 - now.as_secs_f64() % 60.0;
    if left < 3.0 {
        std::thread::sleep(Duration::from_secs_f64(left) + Duration::from_millis(100));
    }
}

fn kv_request(domain: &str, value: &str) -> Value {
    json!({"domain": domain, "descriptors": [{"entries": [{"key": "k", "value": value}]}]})
}

#[test]
fn grpc_end_to_end_counts_and_over_limit_through_envoy_client() {
    let dir = config_dir(&[("rl.yaml", CONFIG)]);
    let rl = Ratelimitd::builder(dir.path()).start();
    avoid_minute_rollover();

    let limit = json!({"name": "", "requests_per_unit": 2, "unit": "MINUTE"});
    for (n, remaining) in [(1, 1), (2, 0)] {
        let mut resp = ok(py_call(&rl.grpc, kv_request("wire", "v")));
        let secs = take_duration(&mut resp, 0);
        assert!(
            (1.0..=60.0).contains(&secs),
            "call {n}: duration_until_reset {secs}s not in 1..=60 s"
        );
        assert_eq!(
            resp,
            json!({
                "overall_code": "OK",
                "statuses": [{"code": "OK", "current_limit": limit, "limit_remaining": remaining}],
                "response_headers_to_add": [],
                "request_headers_to_add": [],
                "raw_body": ""
            }),
            "call {n}"
        );
    }

    let mut resp = ok(py_call(&rl.grpc, kv_request("wire", "v")));
    let secs = take_duration(&mut resp, 0);
    assert!(
        (1.0..=60.0).contains(&secs),
        "call 3: duration_until_reset {secs}s not in 1..=60 s"
    );
    assert_eq!(resp["overall_code"], "OVER_LIMIT", "call 3: {resp}");
    assert_eq!(
        resp["statuses"],
        json!([{"code": "OVER_LIMIT", "current_limit": limit, "limit_remaining": 0}]),
        "call 3"
    );
    let headers = resp["response_headers_to_add"].as_array().unwrap();
    let retry: Vec<&Value> = headers
        .iter()
        .filter(|h| h["key"] == "Retry-After")
        .collect();
    assert_eq!(
        retry.len(),
        1,
        "call 3: want one Retry-After header: {headers:?}"
    );
    let value = retry[0]["value"].as_str().unwrap();
    let after: u64 = value
        .parse()
        .unwrap_or_else(|_| panic!("Retry-After {value:?} is not whole seconds"));
    assert!(
        (1..=60).contains(&after),
        "Retry-After {after} not in 1..=60"
    );
    assert_eq!(
        after,
        secs.ceil() as u64,
        "Retry-After should be the time until the window resets"
    );
    assert_eq!(retry[0]["raw_value"], "", "call 3: {headers:?}");
}

#[test]
fn grpc_empty_domain_is_invalid_argument_for_envoy_client() {
    let dir = config_dir(&[("rl.yaml", CONFIG)]);
    let rl = Ratelimitd::builder(dir.path()).start();
    let answer = py_call(&rl.grpc, kv_request("", "v"));
    let err = answer
        .get("error")
        .unwrap_or_else(|| panic!("expected an error, got {answer}"));
    assert_eq!(err["code"], "INVALID_ARGUMENT", "{answer}");
    let details = err["details"].as_str().unwrap();
    assert!(!details.is_empty(), "empty details: {answer}");
}

#[test]
fn grpc_limit_override_from_envoy_client() {
    let dir = config_dir(&[("rl.yaml", CONFIG)]);
    let rl = Ratelimitd::builder(dir.path()).start();
    let mut resp = ok(py_call(
        &rl.grpc,
        json!({"domain": "wire", "descriptors": [{
            "entries": [{"key": "k", "value": "override"}],
            "limit": {"requests_per_unit": 5, "unit": "HOUR"}
        }]}),
    ));
    let secs = take_duration(&mut resp, 0);
    assert!(
        (1.0..=3600.0).contains(&secs),
        "duration_until_reset {secs}s not in 1..=3600 s"
    );
    assert_eq!(
        resp,
        json!({
            "overall_code": "OK",
            "statuses": [{
                "code": "OK",
                "current_limit": {"name": "", "requests_per_unit": 5, "unit": "HOUR"},
                "limit_remaining": 4
            }],
            "response_headers_to_add": [],
            "request_headers_to_add": [],
            "raw_body": ""
        })
    );
}

/// ShouldRateLimit `n` times on one channel of the Python client; one answer per call.
fn py_calls(target: &str, request: Value, n: usize, extra: &[&str]) -> Vec<Value> {
    let stdin = json!({ "request": request }).to_string();
    let repeat = n.to_string();
    let mut args = vec![target, "--repeat", &repeat];
    args.extend_from_slice(extra);
    let out = run_client(&args, &stdin);
    let answers: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert_eq!(answers.len(), n, "one line per call: {out}");
    answers
}

const UDS_CONFIG: &str = "domain: uds\ndescriptors:\n  - key: k\n    rate_limit:\n      unit: minute\n      requests_per_unit: 3\n";

/// What C-core clients send as `:authority` on `unix:/tmp/run/rls.sock`.
const PERCENT_AUTHORITY: &str = "tmp%2Frun%2Frls.sock";

/// gRPC C-core clients (grpcio here) send the socket path, percent-encoded, as `:authority` on
/// a Unix socket, which h2 alone rejects (src/h2_authority.rs). Four calls on one channel, so
/// the later calls' headers are references into the client's HPACK dynamic table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_on_the_unix_socket_from_a_c_core_client_on_one_channel() {
    let dir = config_dir(&[("rl.yaml", UDS_CONFIG)]);
    let sock_dir = tempfile::TempDir::new().unwrap();
    let sock = sock_dir.path().join("rls.sock");
    let rl = Ratelimitd::builder(dir.path())
        .env("GRPC_UDS", sock.to_str().unwrap())
        .start();
    assert_eq!(rl.grpc, format!("unix:{}", sock.display()));
    avoid_minute_rollover();

    let limit = json!({"name": "", "requests_per_unit": 3, "unit": "MINUTE"});
    let answers = py_calls(&rl.grpc, kv_request("uds", "py"), 4, &[]);
    let expected = [("OK", 2), ("OK", 1), ("OK", 0), ("OVER_LIMIT", 0)];
    for (n, (answer, (code, remaining))) in answers.into_iter().zip(expected).enumerate() {
        let mut resp = ok(answer);
        let secs = take_duration(&mut resp, 0);
        assert!((1.0..=60.0).contains(&secs), "call {n}: {secs}s");
        assert_eq!(resp["overall_code"], code, "call {n}: {resp}");
        assert_eq!(
            resp["statuses"],
            json!([{"code": code, "current_limit": limit, "limit_remaining": remaining}]),
            "call {n}"
        );
    }

    // The same with the authority C-core sends for the path above, set explicitly.
    let answers = py_calls(
        &rl.grpc,
        kv_request("uds", "explicit"),
        2,
        &["--authority", PERCENT_AUTHORITY],
    );
    let remaining: Vec<Value> = answers
        .into_iter()
        .map(|a| ok(a)["statuses"][0]["limit_remaining"].clone())
        .collect();
    assert_eq!(remaining, [json!(2), json!(1)]);

    // A tonic client over the same socket is unaffected.
    let r = rl
        .client()
        .await
        .should_rate_limit(request("uds", &[&[("k", "rust")]]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.statuses[0].limit_remaining, 2);
}

/// Only the Unix socket is lenient: on TCP, h2 still resets a stream whose `:authority` is
/// not a valid authority, and the client sees INTERNAL.
#[test]
fn grpc_on_tcp_still_rejects_an_invalid_authority() {
    let dir = config_dir(&[("rl.yaml", UDS_CONFIG)]);
    let rl = Ratelimitd::builder(dir.path()).start();
    let answers = py_calls(
        &rl.grpc,
        kv_request("uds", "tcp"),
        1,
        &["--authority", PERCENT_AUTHORITY],
    );
    assert_eq!(answers[0]["error"]["code"], "INTERNAL", "{}", answers[0]);
    let answers = py_calls(&rl.grpc, kv_request("uds", "tcp"), 1, &[]);
    assert_eq!(ok(answers[0].clone())["statuses"][0]["limit_remaining"], 2);
}
