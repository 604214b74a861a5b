//! proto3 JSON for `POST /json`: the reference parses the body with Go's
//! `protojson.Unmarshal` into a `RateLimitRequest` and answers with
//! `protojson.Marshal` of the `RateLimitResponse`; this module does the same.
//!
//! prost has no proto3 JSON mapping. `pbjson` would add one, but only by
//! generating serde code for every message and replacing `prost-types` with its
//! own well-known types crate-wide; a hand-written mapping for the six messages
//! this endpoint touches is smaller and copies protojson's corners exactly (both
//! field names, duplicate and unknown fields rejected, numbers in strings,
//! declaration-order output).
//!
//! Parsing is a pull parser driven by the message schema, like protojson's: it
//! builds no JSON tree, stops at the first error in document order and recurses
//! only as deep as the messages nest, so hostile nesting costs nothing.

use std::fmt::Write as _;

use crate::proto::envoy::config::core::v3::HeaderValue;
use crate::proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{
    Entry, RateLimitOverride,
};
use crate::proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use crate::proto::envoy::r#type::v3::RateLimitUnit;
use crate::proto::envoy::service::ratelimit::v3::rate_limit_response::{
    quota::ExpirationSpecifier, rate_limit::Unit, Code, DescriptorStatus, Quota, RateLimit,
};
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

type Result<T> = std::result::Result<T, JsonError>;

/// Parses a `RateLimitRequest` from proto3 JSON as Go's `protojson.Unmarshal` accepts it.
pub fn parse_request(body: &[u8]) -> Result<RateLimitRequest> {
    let mut r = Reader { src: body, pos: 0 };
    let mut req = RateLimitRequest::default();
    message(&mut r, "", &REQUEST, |r, field, path| {
        match field {
            0 => req.domain = string(r, path)?,
            1 => req.descriptors = array(r, path, descriptor)?,
            _ => req.hits_addend = unsigned(r, path, U32)?,
        }
        Ok(())
    })?;
    match r.peek() {
        None => Ok(req),
        Some(_) => Err(r.syntax(r.pos, "unexpected content after the top-level object")),
    }
}

/// A message's name and its fields' `(json_name, proto name)` in declaration order.
struct Schema(&'static str, &'static [(&'static str, &'static str)]);

const REQUEST: Schema = Schema(
    "RateLimitRequest",
    &[
        ("domain", "domain"),
        ("descriptors", "descriptors"),
        ("hitsAddend", "hits_addend"),
    ],
);
const DESCRIPTOR: Schema = Schema(
    "RateLimitDescriptor",
    &[
        ("entries", "entries"),
        ("limit", "limit"),
        ("hitsAddend", "hits_addend"),
    ],
);
const ENTRY: Schema = Schema(
    "RateLimitDescriptor.Entry",
    &[("key", "key"), ("value", "value")],
);
const OVERRIDE: Schema = Schema(
    "RateLimitDescriptor.RateLimitOverride",
    &[("requestsPerUnit", "requests_per_unit"), ("unit", "unit")],
);
const U32: &str = "an unsigned 32-bit integer";
const U64: &str = "an unsigned 64-bit integer";

fn descriptor(r: &mut Reader<'_>, path: &str) -> Result<RateLimitDescriptor> {
    let mut d = RateLimitDescriptor::default();
    message(r, path, &DESCRIPTOR, |r, field, path| {
        match field {
            0 => d.entries = array(r, path, entry)?,
            1 => d.limit = Some(limit_override(r, path)?),
            // google.protobuf.UInt64Value: its JSON form is the bare uint64.
            _ => d.hits_addend = Some(unsigned(r, path, U64)?),
        }
        Ok(())
    })?;
    Ok(d)
}

fn entry(r: &mut Reader<'_>, path: &str) -> Result<Entry> {
    let mut e = Entry::default();
    message(r, path, &ENTRY, |r, field, path| {
        match field {
            0 => e.key = string(r, path)?,
            _ => e.value = string(r, path)?,
        }
        Ok(())
    })?;
    Ok(e)
}

fn limit_override(r: &mut Reader<'_>, path: &str) -> Result<RateLimitOverride> {
    let mut o = RateLimitOverride::default();
    message(r, path, &OVERRIDE, |r, field, path| {
        match field {
            0 => o.requests_per_unit = unsigned(r, path, U32)?,
            _ => {
                o.unit = enumeration(r, path, |s| {
                    RateLimitUnit::from_str_name(s).map(|u| u as i32)
                })?
            }
        }
        Ok(())
    })?;
    Ok(o)
}

fn invalid(path: &str, reason: String) -> JsonError {
    JsonError::Invalid {
        path: path.to_owned(),
        reason,
    }
}

/// "expected X, got Y" at `path`. Descriptor values can be secrets (API keys, user ids) and
/// error bodies go back to clients and into their logs, so a misplaced value is described,
/// not quoted: under `descriptors` no string is shown, and under `entries` no number either
/// (there a number can only be a value sent with the wrong type). The path names the
/// descriptor and entry.
fn mismatch(path: &str, expected: &str, got: &Token<'_>) -> JsonError {
    const HIDDEN: &str = "(not shown: it may be a descriptor value)";
    let in_descriptors = path.starts_with("descriptors");
    let in_entries = in_descriptors && path.contains(".entries");
    let got = match got {
        Token::Object => "an object".to_owned(),
        Token::Array => "an array".to_owned(),
        Token::Str(_) if in_descriptors => format!("a string {HIDDEN}"),
        Token::Num(_) if in_entries => format!("a number {HIDDEN}"),
        Token::Str(s) => format!("the string {}", quoted(s)),
        Token::Num(raw) => format!("the number {}", truncated(raw)),
        Token::Bool(b) => b.to_string(),
        Token::Null => "null".to_owned(),
    };
    invalid(path, format!("expected {expected}, got {got}"))
}

/// Reads one object of `schema`, calling `field` with each member's field index and
/// path. As in protojson: either field name works, a field given twice (under either
/// name) is an error, so is an unknown field, and `null` leaves the default.
fn message<'a>(
    r: &mut Reader<'a>,
    path: &str,
    Schema(name, fields): &Schema,
    mut field: impl FnMut(&mut Reader<'a>, usize, &str) -> Result<()>,
) -> Result<()> {
    let tok = r.token()?;
    if !matches!(tok, Token::Object) {
        return Err(mismatch(path, &format!("an object ({name})"), &tok));
    }
    let (mut seen, mut first) = (0u32, true);
    loop {
        match r.peek() {
            Some(b'}') => {
                r.pos += 1;
                return Ok(());
            }
            Some(b',') if !first => r.pos += 1,
            _ if !first => return Err(r.expected("',' or '}' after an object member")),
            _ => {}
        }
        first = false;
        if r.peek() != Some(b'"') {
            return Err(r.expected("a field name in double quotes"));
        }
        let key = r.string()?;
        if r.peek() != Some(b':') {
            return Err(r.expected("':' after the field name"));
        }
        r.pos += 1;
        let Some(index) = fields
            .iter()
            .position(|&(json, proto)| key == json || key == proto)
        else {
            return Err(invalid(
                path,
                format!("unknown field {} in {name}", quoted(&key)),
            ));
        };
        if seen & (1 << index) != 0 {
            return Err(invalid(
                path,
                format!("duplicate field {} in {name}", quoted(&key)),
            ));
        }
        seen |= 1 << index;
        if r.null_next() {
            continue;
        }
        let sub = if path.is_empty() {
            key
        } else {
            format!("{path}.{key}")
        };
        field(r, index, &sub)?;
    }
}

/// Reads an array, calling `element` for each item with its path (`path[i]`); a `null`
/// element is an error, as in protojson.
fn array<'a, T>(
    r: &mut Reader<'a>,
    path: &str,
    mut element: impl FnMut(&mut Reader<'a>, &str) -> Result<T>,
) -> Result<Vec<T>> {
    let tok = r.token()?;
    if !matches!(tok, Token::Array) {
        return Err(mismatch(path, "an array", &tok));
    }
    let mut out = Vec::new();
    loop {
        match r.peek() {
            Some(b']') => {
                r.pos += 1;
                return Ok(out);
            }
            Some(b',') if !out.is_empty() => r.pos += 1,
            _ if !out.is_empty() => return Err(r.expected("',' or ']' after an array element")),
            _ => {}
        }
        let item = format!("{path}[{}]", out.len());
        out.push(element(r, &item)?);
    }
}

fn string(r: &mut Reader<'_>, path: &str) -> Result<String> {
    match r.token()? {
        Token::Str(s) => Ok(s),
        tok => Err(mismatch(path, "a string", &tok)),
    }
}

/// uint32/uint64: a JSON number, or a string holding exactly one, that is integral
/// once fraction and exponent are applied ("1.0", "1e3" and "-0" are fine).
fn unsigned<T: std::str::FromStr>(r: &mut Reader<'_>, path: &str, what: &str) -> Result<T> {
    let tok = r.token()?;
    let digits = match &tok {
        Token::Num(raw) => integer(raw),
        Token::Str(s) if number_len(s.as_bytes()) == Some(s.len()) => integer(s),
        _ => None,
    };
    digits
        .and_then(|d| d.parse().ok())
        .ok_or_else(|| mismatch(path, what, &tok))
}

/// An enum: a value name, or any integer that fits an int32 (unknown numbers are kept).
fn enumeration(r: &mut Reader<'_>, path: &str, by_name: fn(&str) -> Option<i32>) -> Result<i32> {
    let tok = r.token()?;
    let value = match &tok {
        Token::Str(s) => {
            let unknown = || invalid(path, format!("unknown enum value {}", quoted(s)));
            return by_name(s).ok_or_else(unknown);
        }
        Token::Num(raw) => integer(raw).and_then(|d| d.parse().ok()),
        _ => None,
    };
    value.ok_or_else(|| mismatch(path, "an enum name or a 32-bit integer", &tok))
}

/// A JSON-quoted copy of `s`, cut to 40 characters for messages.
fn quoted(s: &str) -> String {
    let mut out = String::new();
    write_str(&mut out, &truncated(s));
    out
}

fn truncated(s: &str) -> String {
    match s.char_indices().nth(40) {
        Some((end, _)) => format!("{}...", s.get(..end).unwrap_or_default()),
        None => s.to_owned(),
    }
}

/// Go's JSON tokenizer (`internal/encoding/json`), as far as protojson uses it.
struct Reader<'a> {
    src: &'a [u8],
    pos: usize,
}

enum Token<'a> {
    Object,
    Array,
    Str(String),
    Num(&'a str),
    Bool(bool),
    Null,
}

impl<'a> Reader<'a> {
    fn syntax(&self, pos: usize, reason: impl Into<String>) -> JsonError {
        let before = self.src.get(..pos).unwrap_or(self.src);
        let line_start = before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        let line_bytes = before.get(line_start..).unwrap_or_default();
        JsonError::Syntax {
            line: before.iter().filter(|&&b| b == b'\n').count() + 1,
            column: line_bytes.iter().filter(|&&b| b & 0xC0 != 0x80).count() + 1,
            reason: reason.into(),
        }
    }

    fn expected(&self, what: &str) -> JsonError {
        let reason = match self.found() {
            None => format!("unexpected end of input, expected {what}"),
            Some(c) => format!("expected {what}, found {c:?}"),
        };
        self.syntax(self.pos, reason)
    }

    fn found(&self) -> Option<char> {
        let rest = self.rest();
        String::from_utf8_lossy(rest.get(..rest.len().min(4)).unwrap_or_default())
            .chars()
            .next()
    }

    fn rest(&self) -> &'a [u8] {
        self.src.get(self.pos..).unwrap_or_default()
    }

    /// Skips whitespace and returns the next byte.
    fn peek(&mut self) -> Option<u8> {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.src.get(self.pos) {
            self.pos += 1;
        }
        self.src.get(self.pos).copied()
    }

    /// Consumes a `null` literal if one comes next.
    fn null_next(&mut self) -> bool {
        self.peek();
        let found = literal(self.rest(), "null");
        if found {
            self.pos += 4;
        }
        found
    }

    /// Reads one value token; of an object or array only the opening bracket.
    fn token(&mut self) -> Result<Token<'a>> {
        let Some(c) = self.peek() else {
            return Err(self.expected("a value"));
        };
        let rest = self.rest();
        let (tok, len) = match c {
            b'{' => (Token::Object, 1),
            b'[' => (Token::Array, 1),
            b'"' => return self.string().map(Token::Str),
            b'n' if literal(rest, "null") => (Token::Null, 4),
            b't' if literal(rest, "true") => (Token::Bool(true), 4),
            b'f' if literal(rest, "false") => (Token::Bool(false), 5),
            b'-' | b'0'..=b'9' => match number_len(rest) {
                // The token is ASCII.
                Some(n) => (Token::Num(ascii(rest.get(..n).unwrap_or_default())), n),
                None => return Err(self.syntax(self.pos, "invalid number")),
            },
            _ => return Err(self.expected("a value")),
        };
        self.pos += len;
        Ok(tok)
    }

    /// Reads a string from its opening quote. serde_json decodes it, with the rules
    /// Go's reader has too: valid UTF-8, no raw control characters, surrogates paired.
    fn string(&mut self) -> Result<String> {
        let start = self.pos;
        let mut end = start + 1;
        loop {
            match self.src.get(end) {
                None => return Err(self.syntax(start, "unterminated string")),
                Some(b'"') => break,
                Some(b'\\') => end += 2,
                Some(_) => end += 1,
            }
        }
        self.pos = end + 1;
        let quoted = self.src.get(start..=end).unwrap_or_default();
        serde_json::from_slice(quoted).map_err(|e| {
            let reason = e.to_string();
            let reason = reason.split(" at line ").next().unwrap_or_default();
            self.syntax(start, format!("invalid string: {reason}"))
        })
    }
}

fn ascii(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).unwrap_or_default()
}

/// Go's delimiter rule: a literal or number may not run into these bytes.
fn is_not_delim(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'+' | b'.' | b'_')
}

fn literal(rest: &[u8], word: &str) -> bool {
    rest.starts_with(word.as_bytes()) && !rest.get(word.len()).is_some_and(|&b| is_not_delim(b))
}

/// Length of the number token at the start of `s`, by Go's `parseNumber` (which, unlike
/// RFC 8259, lets an exponent have no digits when a delimiter follows: `1e}`).
fn number_len(s: &[u8]) -> Option<usize> {
    let digits = |mut i: usize| {
        while s.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        i
    };
    let mut n = usize::from(s.first() == Some(&b'-'));
    n = match s.get(n)? {
        b'0' => n + 1,
        b'1'..=b'9' => digits(n),
        _ => return None,
    };
    if s.get(n) == Some(&b'.') && s.get(n + 1).is_some_and(u8::is_ascii_digit) {
        n = digits(n + 1);
    }
    if matches!(s.get(n), Some(b'e' | b'E')) && s.len() >= n + 2 {
        n += 1;
        if matches!(s.get(n), Some(b'+' | b'-')) {
            n += 1;
            s.get(n)?;
        }
        n = digits(n);
    }
    match s.get(n) {
        Some(&b) if is_not_delim(b) => None,
        _ => Some(n),
    }
}

/// The integer a number token (one `number_len` accepted) denotes, as decimal digits
/// with an optional `-`, or `None` if it is not one: Go's `parseNumberParts` and
/// `normalizeToIntString`, which allow at most 20 digits before any exponent shifting
/// fraction digits in.
fn integer(raw: &str) -> Option<String> {
    let (neg, body) = match raw.strip_prefix('-') {
        Some(body) => (true, body),
        None => (false, raw),
    };
    let (mantissa, exp) = body.split_once(['e', 'E']).unwrap_or((body, ""));
    if exp == "+" || exp == "-" {
        return None;
    }
    let (intp, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let (intp, frac) = (intp.trim_start_matches('0'), frac.trim_end_matches('0'));
    if intp.is_empty() && frac.is_empty() {
        return Some("0".to_owned());
    }
    let exp: i32 = if exp.is_empty() { 0 } else { exp.parse().ok()? };
    let digits = match usize::try_from(exp) {
        Ok(exp) if frac.len() <= exp && intp.len() + exp <= 20 => {
            format!("{intp}{frac}{}", "0".repeat(exp - frac.len()))
        }
        Ok(_) => return None,
        Err(_) => {
            let index = intp
                .len()
                .checked_sub(usize::try_from(exp.unsigned_abs()).ok()?)?;
            let (keep, shifted_out) = intp.split_at_checked(index)?;
            if !frac.is_empty() || shifted_out.bytes().any(|b| b != b'0') {
                return None;
            }
            keep.to_owned()
        }
    };
    Some(if neg { format!("-{digits}") } else { digits })
}

/// Renders a `RateLimitResponse` as proto3 JSON as Go's `protojson.Marshal` writes it:
/// lowerCamelCase names in declaration order, default values left out, compact.
pub fn render_response(resp: &RateLimitResponse) -> String {
    let mut out = String::with_capacity(256);
    let mut f = Fields::open(&mut out);
    f.enumeration("overallCode", resp.overall_code, code_name);
    f.list("statuses", &resp.statuses, status);
    f.list(
        "responseHeadersToAdd",
        &resp.response_headers_to_add,
        header,
    );
    f.list("requestHeadersToAdd", &resp.request_headers_to_add, header);
    f.bytes("rawBody", &resp.raw_body);
    f.message(
        "dynamicMetadata",
        resp.dynamic_metadata.as_ref(),
        json_struct,
    );
    f.message("quota", resp.quota.as_ref(), quota);
    f.close();
    out
}

fn status(out: &mut String, s: &DescriptorStatus) {
    let mut f = Fields::open(out);
    f.enumeration("code", s.code, code_name);
    f.message("currentLimit", s.current_limit.as_ref(), rate_limit);
    f.uint("limitRemaining", s.limit_remaining);
    f.message(
        "durationUntilReset",
        s.duration_until_reset.as_ref(),
        duration,
    );
    f.message("quota", s.quota.as_ref(), quota);
    f.close();
}

fn rate_limit(out: &mut String, l: &RateLimit) {
    let mut f = Fields::open(out);
    f.string("name", &l.name);
    f.uint("requestsPerUnit", l.requests_per_unit);
    f.enumeration("unit", l.unit, |n| {
        Unit::try_from(n).ok().map(|u| u.as_str_name())
    });
    f.close();
}

fn quota(out: &mut String, q: &Quota) {
    let mut f = Fields::open(out);
    f.uint("requests", q.requests);
    // A oneof member is written whenever it is set, even to its default.
    let valid_until = q
        .expiration_specifier
        .as_ref()
        .map(|ExpirationSpecifier::ValidUntil(t)| t);
    f.message("validUntil", valid_until, timestamp);
    f.string("id", &q.id);
    f.close();
}

fn header(out: &mut String, h: &HeaderValue) {
    let mut f = Fields::open(out);
    f.string("key", &h.key);
    f.string("value", &h.value);
    f.bytes("rawValue", &h.raw_value);
    f.close();
}

fn code_name(n: i32) -> Option<&'static str> {
    Code::try_from(n).ok().map(|c| c.as_str_name())
}

/// Writes one JSON object's members, commas included; the typed helpers leave out
/// default values, as protojson does for proto3 fields without presence.
struct Fields<'o> {
    out: &'o mut String,
    empty: bool,
}

impl<'o> Fields<'o> {
    fn open(out: &'o mut String) -> Self {
        out.push('{');
        Self { out, empty: true }
    }

    fn name(&mut self, name: &str) -> &mut String {
        if !self.empty {
            self.out.push(',');
        }
        self.empty = false;
        write_str(self.out, name);
        self.out.push(':');
        self.out
    }

    fn uint(&mut self, name: &str, n: u32) {
        if n != 0 {
            let _ = write!(self.name(name), "{n}");
        }
    }

    fn string(&mut self, name: &str, s: &str) {
        if !s.is_empty() {
            write_str(self.name(name), s);
        }
    }

    fn bytes(&mut self, name: &str, b: &[u8]) {
        if !b.is_empty() {
            base64(self.name(name), b);
        }
    }

    /// Known numbers as their names, unknown ones as numbers.
    fn enumeration(&mut self, name: &str, n: i32, names: fn(i32) -> Option<&'static str>) {
        match (n, names(n)) {
            (0, _) => {}
            (_, Some(s)) => write_str(self.name(name), s),
            (_, None) => {
                let _ = write!(self.name(name), "{n}");
            }
        }
    }

    /// A message field with presence: written (`{}` if empty) whenever it is set.
    fn message<T>(&mut self, name: &str, m: Option<&T>, write: fn(&mut String, &T)) {
        if let Some(m) = m {
            write(self.name(name), m);
        }
    }

    fn list<T>(&mut self, name: &str, items: &[T], write: fn(&mut String, &T)) {
        if !items.is_empty() {
            list(self.name(name), items, write);
        }
    }

    fn close(self) {
        self.out.push('}');
    }
}

fn list<T>(out: &mut String, items: &[T], write: fn(&mut String, &T)) {
    out.push('[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write(out, item);
    }
    out.push(']');
}

/// A JSON string as Go writes it: only `"`, `\` and control characters escaped.
fn write_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c < ' ' => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Standard base64 with padding.
fn base64(out: &mut String, bytes: &[u8]) {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    out.push('"');
    for chunk in bytes.chunks(3) {
        let byte = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let n = (byte(0) << 16) | (byte(1) << 8) | byte(2);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out.push('"');
}

/// Writes `text` ("….000000000") with the fraction cut to 0, 3, 6 or 9 digits and `suffix`.
fn write_nanos(out: &mut String, mut text: String, suffix: char) {
    for _ in 0..2 {
        if text.ends_with("000") {
            text.truncate(text.len() - 3);
        }
    }
    if text.ends_with(".000") {
        text.truncate(text.len() - 4);
    }
    text.push(suffix);
    write_str(out, &text);
}

/// Seconds with 0, 3, 6 or 9 fractional digits and an `s`, e.g. "1.500s".
fn duration(out: &mut String, d: &prost_types::Duration) {
    let sign = if d.seconds < 0 || d.nanos < 0 {
        "-"
    } else {
        ""
    };
    let (secs, nanos) = (d.seconds.unsigned_abs(), d.nanos.unsigned_abs());
    write_nanos(out, format!("{sign}{secs}.{nanos:09}"), 's');
}

/// RFC 3339 in UTC with 0, 3, 6 or 9 fractional digits, e.g. "2026-11-22T13:00:00Z".
fn timestamp(out: &mut String, t: &prost_types::Timestamp) {
    let (days, secs) = (t.seconds.div_euclid(86_400), t.seconds.rem_euclid(86_400));
    // Days to civil date (Howard Hinnant's algorithm), proleptic Gregorian.
    let z = days + 719_468;
    let (era, doe) = (z.div_euclid(146_097), z.rem_euclid(146_097));
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    let nanos = t.nanos.clamp(0, 999_999_999);
    let text = format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{nanos:09}");
    write_nanos(out, text, 'Z');
}

/// google.protobuf.Struct as a plain object, keys in byte order as Go sorts them.
fn json_struct(out: &mut String, s: &prost_types::Struct) {
    let mut f = Fields::open(out);
    for (key, value) in &s.fields {
        json_value(f.name(key), value);
    }
    f.close();
}

fn json_value(out: &mut String, v: &prost_types::Value) {
    use prost_types::value::Kind;
    match &v.kind {
        // protojson refuses to marshal an unset kind; null is the closest JSON.
        None | Some(Kind::NullValue(_)) => out.push_str("null"),
        Some(Kind::NumberValue(n)) => number(out, *n),
        Some(Kind::StringValue(s)) => write_str(out, s),
        Some(Kind::BoolValue(b)) => out.push_str(if *b { "true" } else { "false" }),
        Some(Kind::StructValue(s)) => json_struct(out, s),
        Some(Kind::ListValue(l)) => list(out, &l.values, json_value),
    }
}

/// A double as Go's protojson writes it: shortest round-trip digits, plain notation for
/// 1e-6 <= |n| < 1e21, else `1e+21` / `1e-7`. NaN and infinities, which protojson
/// refuses to marshal in a Value, become null.
fn number(out: &mut String, n: f64) {
    if !n.is_finite() {
        out.push_str("null");
    } else if n == 0.0 || (1e-6..1e21).contains(&n.abs()) {
        let _ = write!(out, "{n}");
    } else {
        let text = format!("{n:e}");
        match text.split_once('e') {
            Some((mantissa, exp)) if !exp.starts_with('-') => {
                let _ = write!(out, "{mantissa}e+{exp}");
            }
            _ => out.push_str(&text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::envoy::service::ratelimit::v3::rate_limit_response::quota;
    use prost_types::value::Kind;

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

    #[test]
    fn durations_timestamps_and_bytes() {
        let d = |seconds, nanos| {
            let mut out = String::new();
            duration(&mut out, &prost_types::Duration { seconds, nanos });
            out
        };
        assert_eq!(d(1, 0), r#""1s""#);
        assert_eq!(d(1, 500_000_000), r#""1.500s""#);
        assert_eq!(d(0, 1), r#""0.000000001s""#);
        assert_eq!(d(0, 1_000), r#""0.000001s""#);
        assert_eq!(d(0, -500_000_000), r#""-0.500s""#);
        assert_eq!(d(0, 0), r#""0s""#);
        let t = |seconds, nanos| {
            let mut out = String::new();
            timestamp(&mut out, &prost_types::Timestamp { seconds, nanos });
            out
        };
        assert_eq!(t(1_795_352_400, 0), r#""2026-11-22T13:00:00Z""#);
        assert_eq!(t(951_782_400, 7_000_000), r#""2000-02-29T00:00:00.007Z""#);
        assert_eq!(t(-1, 999_999_999), r#""1969-12-31T23:59:59.999999999Z""#);
        assert_eq!(t(253_402_300_799, 0), r#""9999-12-31T23:59:59Z""#);
        assert_eq!(t(-62_135_596_800, 0), r#""0001-01-01T00:00:00Z""#);
        for (bytes, want) in [
            (&b""[..], r#""""#),
            (b"f", r#""Zg==""#),
            (b"fo", r#""Zm8=""#),
            (b"foo", r#""Zm9v""#),
            (b"\xfb\xff", r#""+/8=""#),
        ] {
            let mut out = String::new();
            base64(&mut out, bytes);
            assert_eq!(out, want);
        }
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
        ] {
            let mut out = String::new();
            number(&mut out, n);
            assert_eq!(out, want);
        }
    }
}
