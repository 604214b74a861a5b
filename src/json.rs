//! proto3 JSON for `POST /json`: the reference parses the body with Go's
//! `protojson.Unmarshal` into a `RateLimitRequest` and answers with
//! `protojson.Marshal` of the `RateLimitResponse`; this module does the same.
//!
//! The mapping is prost-reflect's, over the descriptor set already embedded for gRPC
//! reflection ([`crate::proto::FILE_DESCRIPTOR_SET`]): prost has none, and `pbjson` would
//! generate serde code for every message and replace `prost-types` crate-wide. The request is
//! read into a `DynamicMessage` and transcoded into the prost type; the response goes the
//! other way. What is ours, each piece where protojson and prost-reflect differ:
//! - reading: the JSON reader under prost-reflect ([`reader`]), Go's tokenizer, for Go's
//!   syntax errors, Go's numbers, duplicate fields and errors that never echo a
//!   descriptor value (the cases are listed there);
//! - writing: members in declaration order ([`write_ordered`]), doubles as Go writes them
//!   ([`GoFloats`]), and NaN or infinity in `dynamic_metadata` as `null`
//!   ([`null_for_non_finite`]).

mod reader;

use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, SerializeOptions};
use serde::Serialize as _;

use crate::proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};

/// Why a `POST /json` body is not a `RateLimitRequest`; the message is meant for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    /// Not JSON, as Go's protojson reader sees it. Line and column count from 1, the
    /// column in characters.
    #[error("invalid JSON at line {line} column {column}: {reason}")]
    Syntax {
        line: usize,
        column: usize,
        reason: String,
    },
    /// JSON, but not a `RateLimitRequest`. `path` locates the value, e.g.
    /// `descriptors[0].limit.unit`; it is empty for the top level.
    #[error("{}{reason}", if .path.is_empty() { String::new() } else { format!("{}: ", .path) })]
    Invalid { path: String, reason: String },
}

/// Why a `RateLimitResponse` has no proto3 JSON form: as with protojson, a Duration or
/// Timestamp out of its range (the reference answers 500 then, and so does `/json`).
#[derive(Debug, thiserror::Error)]
#[error("cannot write the response as proto3 JSON: {0}")]
pub struct RenderError(String);

/// The proto3 JSON codec of `/json`: the descriptors of its two messages, decoded once at
/// start-up from the descriptor set compiled into the binary.
#[derive(Debug, Clone)]
pub struct Codec {
    request: MessageDescriptor,
    response: MessageDescriptor,
}

impl Default for Codec {
    fn default() -> Self {
        Self::new()
    }
}

impl Codec {
    pub fn new() -> Self {
        let pool = DescriptorPool::decode(crate::proto::FILE_DESCRIPTOR_SET)
            .expect("build.rs writes the descriptor set protox compiled from proto/");
        let message = |name: &str| {
            pool.get_message_by_name(name)
                .expect("proto/ defines the RLS v3 messages")
        };
        Self {
            request: message("envoy.service.ratelimit.v3.RateLimitRequest"),
            response: message("envoy.service.ratelimit.v3.RateLimitResponse"),
        }
    }

    /// Parses a `RateLimitRequest` from proto3 JSON as Go's `protojson.Unmarshal` accepts it.
    pub fn parse_request(&self, body: &[u8]) -> Result<RateLimitRequest, JsonError> {
        let msg = reader::message(body, &self.request)?;
        msg.transcode_to()
            .map_err(|e| invalid("", format!("not a RateLimitRequest: {e}")))
    }

    /// Renders a `RateLimitResponse` as proto3 JSON as Go's `protojson.Marshal` writes it:
    /// lowerCamelCase names in declaration order, default values left out, compact.
    pub fn render_response(&self, resp: &RateLimitResponse) -> Result<String, RenderError> {
        let finite = resp.dynamic_metadata.as_ref().map(|m| RateLimitResponse {
            dynamic_metadata: Some(null_for_non_finite(m.clone())),
            ..resp.clone()
        });
        let mut msg = DynamicMessage::new(self.response.clone());
        msg.transcode_from(finite.as_ref().unwrap_or(resp))
            .map_err(|e| RenderError(e.to_string()))?;
        let error = |e: serde_json::Error| RenderError(e.to_string());
        let json = msg
            .serialize_with_options(serde_json::value::Serializer, &SerializeOptions::new())
            .map_err(error)?;
        let mut out = Vec::with_capacity(256);
        write_ordered(&mut out, &json, Some(&self.response)).map_err(error)?;
        String::from_utf8(out).map_err(|e| RenderError(e.to_string()))
    }
}

fn invalid(path: &str, reason: String) -> JsonError {
    JsonError::Invalid {
        path: path.to_owned(),
        reason,
    }
}

/// "RateLimitDescriptor.Entry" for `envoy.extensions.common.ratelimit.v3.RateLimitDescriptor.Entry`.
fn short_name(m: &MessageDescriptor) -> &str {
    let full = m.full_name();
    full.strip_prefix(m.package_name())
        .and_then(|s| s.strip_prefix('.'))
        .unwrap_or(full)
}

/// Writes prost-reflect's JSON for a message of `msg` (or for a list of them) with each
/// object's members in declaration order, as protojson does (its encoder ranges over
/// `order.IndexOrder`); prost-reflect writes field-number order, which differs for
/// `RateLimit` (`name` is declared first but numbered 3). Values that are not messages of
/// ours (scalars, well-known types) are written as they are.
fn write_ordered(
    out: &mut Vec<u8>,
    json: &serde_json::Value,
    msg: Option<&MessageDescriptor>,
) -> serde_json::Result<()> {
    use serde_json::Value as J;
    match (json, msg) {
        (J::Array(items), Some(msg)) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_ordered(out, item, Some(msg))?;
            }
            out.push(b']');
        }
        (J::Object(members), Some(msg)) => {
            out.push(b'{');
            let declared = msg.descriptor_proto().field.iter();
            let fields = declared.filter_map(|f| msg.get_field_by_name(f.name()));
            let present = fields.filter_map(|f| Some((members.get(f.json_name())?, f)));
            for (i, (value, field)) in present.enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, field.json_name())?;
                out.push(b':');
                let kind = field.kind();
                let ours = kind
                    .as_message()
                    .filter(|m| !m.full_name().starts_with("google.protobuf."));
                write_ordered(out, value, ours)?;
            }
            out.push(b'}');
        }
        (json, _) => json.serialize(&mut serde_json::Serializer::with_formatter(
            &mut *out, GoFloats,
        ))?,
    }
    Ok(())
}

/// serde_json's writer with doubles as Go's protojson writes them (only `dynamic_metadata`
/// has any): shortest round-trip digits, plain notation for 1e-6 <= |n| < 1e21, else
/// `1e+21` / `1e-7`, where serde_json would write `3.0` and `1e21`.
struct GoFloats;

impl serde_json::ser::Formatter for GoFloats {
    fn write_f64<W: ?Sized + std::io::Write>(&mut self, w: &mut W, n: f64) -> std::io::Result<()> {
        if n == 0.0 || (1e-6..1e21).contains(&n.abs()) {
            write!(w, "{n}")
        } else {
            let text = format!("{n:e}");
            match text.split_once('e') {
                Some((mantissa, exp)) if !exp.starts_with('-') => write!(w, "{mantissa}e+{exp}"),
                _ => w.write_all(text.as_bytes()),
            }
        }
    }
}

/// NaN and infinities in `dynamic_metadata` as `null`: protojson refuses to marshal them in
/// a `google.protobuf.Value`, and so does prost-reflect (failing the whole response);
/// `null` is the closest JSON, and the rest of the answer still reaches the client.
fn null_for_non_finite(mut s: prost_types::Struct) -> prost_types::Struct {
    use prost_types::value::Kind;
    fn value(v: &mut prost_types::Value) {
        match &mut v.kind {
            Some(Kind::NumberValue(n)) if !n.is_finite() => v.kind = Some(Kind::NullValue(0)),
            Some(Kind::StructValue(s)) => s.fields.values_mut().for_each(value),
            Some(Kind::ListValue(l)) => l.values.iter_mut().for_each(value),
            _ => {}
        }
    }
    s.fields.values_mut().for_each(value);
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::envoy::config::core::v3::HeaderValue;
    use crate::proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
    use crate::proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
    use crate::proto::envoy::r#type::v3::RateLimitUnit;
    use crate::proto::envoy::service::ratelimit::v3::rate_limit_response::{
        quota, rate_limit::Unit, Code, DescriptorStatus, Quota, RateLimit,
    };
    use prost_types::value::Kind;

    type Result<T> = std::result::Result<T, JsonError>;

    fn parse_request(body: &[u8]) -> Result<RateLimitRequest> {
        Codec::new().parse_request(body)
    }

    fn render_response(resp: &RateLimitResponse) -> String {
        match Codec::new().render_response(resp) {
            Ok(json) => json,
            Err(e) => panic!("{e}"),
        }
    }

    fn parse(s: &str) -> RateLimitRequest {
        match parse_request(s.as_bytes()) {
            Ok(r) => r,
            Err(e) => panic!("{s}: {e}"),
        }
    }

    fn error(s: &str) -> String {
        match parse_request(s.as_bytes()) {
            Ok(r) => panic!("{s}: parsed as {r:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn hits(s: &str) -> Result<u32> {
        parse_request(format!(r#"{{"hitsAddend":{s}}}"#).as_bytes()).map(|r| r.hits_addend)
    }

    fn unit(s: &str) -> Result<i32> {
        let body = format!(r#"{{"descriptors":[{{"limit":{{"unit":{s}}}}}]}}"#);
        parse_request(body.as_bytes()).map(|r| r.descriptors[0].limit.unwrap().unit)
    }

    #[test]
    fn parses_both_field_names() {
        let req = parse(
            r#" {"domain":"d","descriptors":[{"entries":[{"key":"k","value":"v"},{}],
            "limit":{"requests_per_unit":"10","unit":"MINUTE"},"hits_addend":"18446744073709551615"},
            {"hitsAddend":0,"limit":{"requestsPerUnit":1}}],"hits_addend":3} "#,
        );
        assert_eq!(req.domain, "d");
        assert_eq!(req.hits_addend, 3);
        let d = &req.descriptors[0];
        assert_eq!(d.entries.len(), 2);
        assert_eq!(
            (d.entries[0].key.as_str(), d.entries[0].value.as_str()),
            ("k", "v")
        );
        assert_eq!(d.entries[1], Entry::default());
        let limit = d.limit.unwrap();
        assert_eq!(
            (limit.requests_per_unit, limit.unit),
            (10, RateLimitUnit::Minute as i32)
        );
        assert_eq!(d.hits_addend, Some(u64::MAX));
        // An explicit 0 in the wrapper is present; an empty object is a present message.
        assert_eq!(req.descriptors[1].hits_addend, Some(0));
        assert_eq!(req.descriptors[1].limit.unwrap().unit, 0);
    }

    #[test]
    fn null_means_default() {
        assert_eq!(
            parse(r#"{"domain":null,"descriptors":null,"hitsAddend":null}"#),
            RateLimitRequest::default()
        );
        let req = parse(r#"{"descriptors":[{"hitsAddend":null,"limit":null,"entries":[]}]}"#);
        assert_eq!(req.descriptors, vec![RateLimitDescriptor::default()]);
        assert_eq!(parse("{}"), RateLimitRequest::default());
        assert!(
            error(r#"{"descriptors":[null]}"#).starts_with("descriptors[0]: expected an object")
        );
    }

    #[test]
    fn integers_as_protojson_reads_them() {
        for (text, want) in [
            ("0", 0),
            ("-0", 0),
            ("4294967295", u32::MAX),
            ("1.0", 1),
            ("1e2", 100),
            ("1.5e1", 15),
            ("100e-2", 1),
            ("0.05e2", 5),
            (r#""7""#, 7),
            (r#""1e2""#, 100),
            (r#""1.0""#, 1),
            // Go's number reader lets an exponent have no digits before a delimiter.
            ("1e ", 1),
        ] {
            assert_eq!(hits(text).unwrap(), want, "{text}");
        }
        for text in [
            "4294967296",
            "-1",
            "1.5",
            "1e-1",
            "1e30",
            r#"" 1""#,
            r#""1 ""#,
            r#""1 2""#,
            r#""""#,
            r#""0x1""#,
            r#""-1""#,
            "true",
            "[]",
            "{}",
            r#""1e""#,
            // Go's reader takes "1e+" as a number token, which is then not an integer.
            "1e+",
        ] {
            let e = hits(text).unwrap_err().to_string();
            assert!(
                e.starts_with("hitsAddend: expected an unsigned 32-bit integer, got"),
                "{text}: {e}"
            );
        }
        let req = parse(r#"{"descriptors":[{"hits_addend":18446744073709551615}]}"#);
        assert_eq!(req.descriptors[0].hits_addend, Some(u64::MAX));
        assert_eq!(
            error(r#"{"descriptors":[{"hits_addend":18446744073709551616}]}"#),
            "descriptors[0].hits_addend: expected an unsigned 64-bit integer, got the number 18446744073709551616"
        );
    }

    #[test]
    fn enums_by_name_or_number() {
        assert_eq!(unit(r#""HOUR""#).unwrap(), 3);
        assert_eq!(unit("7").unwrap(), 7);
        assert_eq!(unit("-3").unwrap(), -3);
        assert_eq!(unit("2.0").unwrap(), 2);
        assert_eq!(
            unit(r#""FORTNIGHT""#).unwrap_err().to_string(),
            r#"descriptors[0].limit.unit: unknown enum value "FORTNIGHT""#
        );
        // RateLimitUnit (the request's enum) has no WEEK, and numbers in strings are names.
        assert!(unit(r#""WEEK""#).is_err());
        assert!(unit(r#""2""#).is_err());
        assert!(unit("2147483648").is_err());
        assert!(unit("true").is_err());
    }

    #[test]
    fn rejects_what_protojson_rejects() {
        assert_eq!(
            error(r#"{"domian":"a"}"#),
            r#"unknown field "domian" in RateLimitRequest"#
        );
        assert_eq!(
            error(r#"{"descriptors":[{"entries":[{"key":"a","Value":"b"}]}]}"#),
            r#"descriptors[0].entries[0]: unknown field "Value" in RateLimitDescriptor.Entry"#
        );
        assert_eq!(
            error(r#"{"hitsAddend":1,"hits_addend":2}"#),
            r#"duplicate field "hits_addend" in RateLimitRequest"#
        );
        assert_eq!(
            error(r#"{"domain":"a","domain":null}"#),
            r#"duplicate field "domain" in RateLimitRequest"#
        );
        assert_eq!(
            error(r#"{"domain":5}"#),
            "domain: expected a string, got the number 5"
        );
        assert_eq!(
            error(r#"{"domain":["a"]}"#),
            "domain: expected a string, got an array"
        );
        assert_eq!(
            error(r#"{"descriptors":{}}"#),
            "descriptors: expected an array, got an object"
        );
        assert_eq!(
            error("[]"),
            "expected an object (RateLimitRequest), got an array"
        );
        assert_eq!(
            error(r#""x""#),
            r#"expected an object (RateLimitRequest), got the string "x""#
        );
    }

    #[test]
    fn descriptor_values_are_not_echoed_in_errors() {
        for (body, want) in [
            (
                r#"{"descriptors":[{"entries":[{"key":"api_key","value":12345678901234}]}]}"#,
                "descriptors[0].entries[0].value: expected a string, got a number (not shown: it may be a descriptor value)",
            ),
            (
                r#"{"descriptors":[{"entries":[{"key":"k","value":"v"},"sk_live_SECRET123"]}]}"#,
                "descriptors[0].entries[1]: expected an object (RateLimitDescriptor.Entry), got a string (not shown: it may be a descriptor value)",
            ),
            (
                r#"{"descriptors":[{"entries":"sk_live_SECRET123"}]}"#,
                "descriptors[0].entries: expected an array, got a string (not shown: it may be a descriptor value)",
            ),
            (
                r#"{"descriptors":[{"entries":[]},"sk_live_SECRET123"]}"#,
                "descriptors[1]: expected an object (RateLimitDescriptor), got a string (not shown: it may be a descriptor value)",
            ),
            (
                r#"{"descriptors":[{"hitsAddend":"sk_live_SECRET123"}]}"#,
                "descriptors[0].hitsAddend: expected an unsigned 64-bit integer, got a string (not shown: it may be a descriptor value)",
            ),
            (
                r#"{"descriptors":[{"entries":[{"key":"api_key","value":["sk_live_SECRET123"]}]}]}"#,
                "descriptors[0].entries[0].value: expected a string, got an array",
            ),
        ] {
            let e = error(body);
            assert_eq!(e, want, "{body}");
            assert!(!e.contains("SECRET123") && !e.contains("12345678901234"), "{e}");
        }
        // Outside descriptors the offending text is still quoted, to help find it.
        assert_eq!(
            error(r#"{"hitsAddend":"many"}"#),
            r#"hitsAddend: expected an unsigned 32-bit integer, got the string "many""#
        );
    }

    #[test]
    fn syntax_errors_with_positions() {
        assert_eq!(
            error(""),
            "invalid JSON at line 1 column 1: unexpected end of input, expected a value"
        );
        assert_eq!(
            error("{} {}"),
            "invalid JSON at line 1 column 4: unexpected content after the top-level object"
        );
        assert_eq!(
            error("{\n  \"domain\" \"a\"}"),
            r#"invalid JSON at line 2 column 12: expected ':' after the field name, found '"'"#
        );
        assert_eq!(
            error(r#"{"domain":tru}"#),
            "invalid JSON at line 1 column 11: expected a value, found 't'"
        );
        assert_eq!(
            error(r#"{"domain":"é",x}"#),
            "invalid JSON at line 1 column 15: expected a field name in double quotes, found 'x'"
        );
        for bad in [
            "{",
            r#"{"domain":"a",}"#,
            r#"{,}"#,
            r#"{"descriptors":[{},]}"#,
            r#"{"descriptors":[,]}"#,
            r#"{"domain":"a" "b"}"#,
            "{'domain':'a'}",
            r#"{"domain":"a"}x"#,
            r#"{"domain":"\ud83d"}"#,
            r#"{"domain":"\ude00\ud83d"}"#,
            r#"{"domain":"\x"}"#,
            "{\"domain\":\"\t\"}",
            r#"{"hitsAddend":01}"#,
            r#"{"hitsAddend":1.}"#,
            r#"{"hitsAddend":-}"#,
            r#"{"domain":nul}"#,
            r#"{"domain":nullx}"#,
            r#"{"domain":"a"#,
        ] {
            assert!(
                matches!(parse_request(bad.as_bytes()), Err(JsonError::Syntax { .. })),
                "{bad}"
            );
        }
        let invalid_utf8 = parse_request(b"{\"domain\":\"\xff\"}").unwrap_err();
        assert_eq!(
            invalid_utf8.to_string(),
            "invalid JSON at line 1 column 11: invalid string: invalid unicode code point"
        );
    }

    #[test]
    fn string_errors() {
        for (body, want) in [
            (r#"{"domain":"\ud83d"}"#, "hex escape"),
            (r#"{"domain":"\ud83dx"}"#, "hex escape"),
            (r#"{"domain":"\ude00"}"#, "hex escape"),
            (r#"{"domain":"\ud83d\ud83d"}"#, "hex escape"),
            ("{\"domain\":\"\t\"}", "control character"),
            (r#"{"domain":"\x"}"#, "invalid escape"),
        ] {
            let e = error(body);
            assert!(
                e.starts_with("invalid JSON at line 1 column 11: invalid string: "),
                "{e}"
            );
            assert!(e.contains(want), "{body}: {e}");
        }
        assert_eq!(
            error(r#"{"domain":"a\"}"#),
            "invalid JSON at line 1 column 11: unterminated string"
        );
    }

    #[test]
    fn strings_unescaped() {
        let req = parse(r#"{"domain":"\ud83d\ude00 \u00e9\/\"\\\b\f\n\r\t\u0000é"}"#);
        assert_eq!(req.domain, "\u{1f600} \u{e9}/\"\\\u{8}\u{c}\n\r\t\u{0}é");
    }

    #[test]
    fn deep_nesting_stops_at_the_first_unexpected_bracket() {
        let body = format!(
            r#"{{"domain":{}{}}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert_eq!(error(&body), "domain: expected a string, got an array");
    }

    fn header(key: &str, value: &str) -> HeaderValue {
        HeaderValue {
            key: key.into(),
            value: value.into(),
            raw_value: Vec::new(),
        }
    }

    #[test]
    fn renders_the_brief_example() {
        let resp = RateLimitResponse {
            overall_code: Code::OverLimit as i32,
            statuses: vec![DescriptorStatus {
                code: Code::OverLimit as i32,
                current_limit: Some(RateLimit {
                    name: String::new(),
                    requests_per_unit: 5,
                    unit: Unit::Minute as i32,
                }),
                limit_remaining: 0,
                duration_until_reset: Some(prost_types::Duration {
                    seconds: 42,
                    nanos: 0,
                }),
                quota: None,
            }],
            response_headers_to_add: vec![header("Retry-After", "42")],
            ..Default::default()
        };
        assert_eq!(
            render_response(&resp),
            r#"{"overallCode":"OVER_LIMIT","statuses":[{"code":"OVER_LIMIT","currentLimit":{"requestsPerUnit":5,"unit":"MINUTE"},"durationUntilReset":"42s"}],"responseHeadersToAdd":[{"key":"Retry-After","value":"42"}]}"#
        );
        assert_eq!(render_response(&RateLimitResponse::default()), "{}");
    }

    fn value(kind: Kind) -> prost_types::Value {
        prost_types::Value { kind: Some(kind) }
    }

    /// Cross-checked with Python's json_format (same mapping; it orders fields by
    /// number and formats doubles differently, so the values were compared, not bytes).
    #[test]
    fn renders_every_field_like_protojson() {
        let status = |code: i32| DescriptorStatus {
            code,
            ..Default::default()
        };
        let metadata = prost_types::Struct {
            fields: [
                ("b", value(Kind::NumberValue(1.5))),
                ("int", value(Kind::NumberValue(3.0))),
                ("big", value(Kind::NumberValue(1e21))),
                ("small", value(Kind::NumberValue(1e-7))),
                ("neg", value(Kind::NumberValue(-0.0))),
                ("nan", value(Kind::NumberValue(f64::NAN))),
                ("unset", prost_types::Value { kind: None }),
                (
                    "a",
                    value(Kind::ListValue(prost_types::ListValue {
                        values: vec![
                            value(Kind::NumberValue(1.0)),
                            value(Kind::StringValue("x".into())),
                            value(Kind::NullValue(0)),
                            value(Kind::BoolValue(true)),
                            value(Kind::StructValue(prost_types::Struct {
                                fields: [(
                                    "z".to_owned(),
                                    value(Kind::StructValue(prost_types::Struct::default())),
                                )]
                                .into(),
                            })),
                        ],
                    })),
                ),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
        };
        let resp = RateLimitResponse {
            overall_code: 7,
            statuses: vec![
                status(0),
                DescriptorStatus {
                    code: Code::Ok as i32,
                    current_limit: Some(RateLimit {
                        name: "n\"\\\u{1}\u{e9}<\u{7f}".into(),
                        requests_per_unit: 0,
                        unit: 99,
                    }),
                    limit_remaining: 3,
                    duration_until_reset: Some(prost_types::Duration {
                        seconds: 0,
                        nanos: 500_000_000,
                    }),
                    quota: Some(Quota {
                        requests: 4,
                        id: "q".into(),
                        expiration_specifier: Some(quota::ExpirationSpecifier::ValidUntil(
                            prost_types::Timestamp::default(),
                        )),
                    }),
                },
                DescriptorStatus {
                    current_limit: Some(RateLimit::default()),
                    duration_until_reset: Some(prost_types::Duration {
                        seconds: -2,
                        nanos: -1000,
                    }),
                    ..status(0)
                },
            ],
            response_headers_to_add: Vec::new(),
            request_headers_to_add: vec![
                HeaderValue {
                    key: "k".into(),
                    value: String::new(),
                    raw_value: vec![0xff, 0, b'a'],
                },
                HeaderValue::default(),
            ],
            raw_body: b"hello".to_vec(),
            dynamic_metadata: Some(metadata),
            quota: Some(Quota {
                expiration_specifier: Some(quota::ExpirationSpecifier::ValidUntil(
                    prost_types::Timestamp {
                        seconds: 1_795_352_400,
                        nanos: 120_000,
                    },
                )),
                ..Default::default()
            }),
        };
        assert_eq!(
            render_response(&resp),
            concat!(
                r#"{"overallCode":7,"statuses":[{},{"code":"OK","currentLimit":{"name":"n\"\\\u0001é<"#,
                "\u{7f}",
                r#"","unit":99},"limitRemaining":3,"durationUntilReset":"0.500s","#,
                r#""quota":{"requests":4,"validUntil":"1970-01-01T00:00:00Z","id":"q"}},"#,
                r#"{"currentLimit":{},"durationUntilReset":"-2.000001s"}],"#,
                r#""requestHeadersToAdd":[{"key":"k","rawValue":"/wBh"},{}],"rawBody":"aGVsbG8=","#,
                r#""dynamicMetadata":{"a":[1,"x",null,true,{"z":{}}],"b":1.5,"big":1e+21,"int":3,"nan":null,"#,
                r#""neg":-0,"small":1e-7,"unset":null},"quota":{"validUntil":"2026-11-22T13:00:00.000120Z"}}"#
            )
        );
    }

    /// Renders `resp` and returns what stands between `prefix` and `suffix` (the whole
    /// output if it is not framed so, which then fails the comparison).
    fn framed(resp: &RateLimitResponse, prefix: &str, suffix: &str) -> String {
        let json = render_response(resp);
        let inner = json
            .strip_prefix(prefix)
            .and_then(|s| s.strip_suffix(suffix));
        inner.unwrap_or(&json).to_owned()
    }

    #[test]
    fn durations_timestamps_and_bytes() {
        let d = |seconds, nanos| {
            let status = DescriptorStatus {
                duration_until_reset: Some(prost_types::Duration { seconds, nanos }),
                ..Default::default()
            };
            let resp = RateLimitResponse {
                statuses: vec![status],
                ..Default::default()
            };
            framed(&resp, r#"{"statuses":[{"durationUntilReset":"#, "}]}")
        };
        assert_eq!(d(1, 0), r#""1s""#);
        assert_eq!(d(1, 500_000_000), r#""1.500s""#);
        assert_eq!(d(0, 1), r#""0.000000001s""#);
        assert_eq!(d(0, 1_000), r#""0.000001s""#);
        assert_eq!(d(0, -500_000_000), r#""-0.500s""#);
        assert_eq!(d(0, 0), r#""0s""#);
        let t = |seconds, nanos| {
            let valid_until = prost_types::Timestamp { seconds, nanos };
            let resp = RateLimitResponse {
                quota: Some(Quota {
                    expiration_specifier: Some(quota::ExpirationSpecifier::ValidUntil(valid_until)),
                    ..Default::default()
                }),
                ..Default::default()
            };
            framed(&resp, r#"{"quota":{"validUntil":"#, "}}")
        };
        assert_eq!(t(1_795_352_400, 0), r#""2026-11-22T13:00:00Z""#);
        assert_eq!(t(951_782_400, 7_000_000), r#""2000-02-29T00:00:00.007Z""#);
        assert_eq!(t(-1, 999_999_999), r#""1969-12-31T23:59:59.999999999Z""#);
        assert_eq!(t(253_402_300_799, 0), r#""9999-12-31T23:59:59Z""#);
        assert_eq!(t(-62_135_596_800, 0), r#""0001-01-01T00:00:00Z""#);
        let b = |bytes: &[u8]| {
            let resp = RateLimitResponse {
                raw_body: bytes.to_vec(),
                ..Default::default()
            };
            framed(&resp, r#"{"rawBody":"#, "}")
        };
        // Empty bytes are a default value, left out.
        assert_eq!(b(b""), "{}");
        for (bytes, want) in [
            (&b"f"[..], r#""Zg==""#),
            (b"fo", r#""Zm8=""#),
            (b"foo", r#""Zm9v""#),
            (b"\xfb\xff", r#""+/8=""#),
        ] {
            assert_eq!(b(bytes), want);
        }
    }

    #[test]
    fn out_of_range_times_are_refused_as_protojson_refuses_them() {
        let status = DescriptorStatus {
            duration_until_reset: Some(prost_types::Duration {
                seconds: 315_576_000_001,
                nanos: 0,
            }),
            ..Default::default()
        };
        let resp = RateLimitResponse {
            statuses: vec![status],
            ..Default::default()
        };
        let e = Codec::new().render_response(&resp).unwrap_err();
        assert!(e.to_string().contains("out of range"), "{e}");
    }

    #[test]
    fn doubles_like_go() {
        for (n, want) in [
            (0.1, "0.1"),
            (1e20, "100000000000000000000"),
            (1e-6, "0.000001"),
            (9.99e-7, "9.99e-7"),
            (-1.5e-10, "-1.5e-10"),
            (f64::MAX, "1.7976931348623157e+308"),
            (f64::INFINITY, "null"),
            (f64::NEG_INFINITY, "null"),
        ] {
            let resp = RateLimitResponse {
                dynamic_metadata: Some(prost_types::Struct {
                    fields: [("n".to_owned(), value(Kind::NumberValue(n)))].into(),
                }),
                ..Default::default()
            };
            assert_eq!(framed(&resp, r#"{"dynamicMetadata":{"n":"#, "}}"), want);
        }
    }
}
