//! The JSON reader under prost-reflect for `POST /json`: Go's JSON tokenizer
//! (`internal/encoding/json`, as far as protojson uses it) as a serde `Deserializer`.
//!
//! prost-reflect's serde support decides what each value becomes (field names, enum names,
//! integer ranges, wrappers, lists, `null` as the default) and builds the message; this
//! reader hands it the tokens as Go reads them. It exists for the cases serde_json cannot
//! meet, each pinned by the tests in `json.rs`:
//! - **Go's syntax errors**: the reason and the place Go reports (a bad string at its
//!   opening quote, a bad literal at its first letter, the column in characters).
//! - **Go's numbers**: Go's token grammar (`1e}` is a number, `1e+` a number that is no
//!   integer) and protojson's exact integers (`parseNumberParts` + `normalizeToIntString`):
//!   `1.0`, `1e2` and `"1e2"` are integers, `18446744073709551616` is out of range rather
//!   than rounded to a float (serde_json would hand prost-reflect 2^64 as an f64, taken as
//!   `u64::MAX`).
//! - **Duplicate fields** are rejected under either name, as protojson does (prost-reflect
//!   keeps the last).
//! - **Errors that name the place and never echo a descriptor value**: serde's messages
//!   quote the offending value, and descriptor values can be secrets (API keys, user ids)
//!   while error bodies go back to clients and into their logs.
//!
//! It reads the schema (from the descriptors) only to word those errors and to know which
//! strings hold integers. Like protojson it stops at the first error in document order and
//! builds no JSON tree, and a value of the wrong shape is refused at its first byte, so
//! hostile nesting costs nothing.

use prost_reflect::{DynamicMessage, FieldDescriptor, Kind, MessageDescriptor};
use serde::de::{self, DeserializeSeed, IntoDeserializer, Visitor};

use super::{invalid, short_name, JsonError};

type Result<T, E = JsonError> = std::result::Result<T, E>;

/// Reads one `desc` message from `body`, which must hold nothing else.
pub(super) fn message(body: &[u8], desc: &MessageDescriptor) -> Result<DynamicMessage> {
    let mut r = Reader { src: body, pos: 0 };
    let top = Value {
        r: &mut r,
        path: String::new(),
        expect: Expect::Object(desc.clone()),
    };
    let msg = DynamicMessage::deserialize(desc.clone(), top).map_err(|e| match e {
        DeError::Json(e) => e,
        DeError::Visitor(reason) => invalid("", reason),
    })?;
    match r.peek() {
        None => Ok(msg),
        Some(_) => Err(r.syntax(r.pos, "unexpected content after the top-level object")),
    }
}

/// The reader's serde error: a [`JsonError`], or the message of a prost-reflect visitor that
/// refused the value it was given (an unknown enum name, an integer out of range), which the
/// [`Value`] that gave it rewords.
#[derive(Debug, thiserror::Error)]
enum DeError {
    #[error(transparent)]
    Json(#[from] JsonError),
    #[error("{0}")]
    Visitor(String),
}

impl de::Error for DeError {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        Self::Visitor(msg.to_string())
    }
}

/// What the schema allows at a place.
enum Expect {
    Object(MessageDescriptor),
    /// The list of a repeated field.
    Array(FieldDescriptor),
    String,
    Enum,
    /// An integer kind (or its wrapper message), in words for errors.
    Integer(&'static str),
    /// Any other kind (the request has none): a string, number or boolean is passed on as
    /// it is, an object or array refused.
    Other(Kind),
}

impl Expect {
    fn field(f: &FieldDescriptor) -> Self {
        if f.is_list() {
            Self::Array(f.clone())
        } else if f.is_map() {
            Self::Other(f.kind())
        } else {
            Self::kind(f.kind())
        }
    }

    fn kind(kind: Kind) -> Self {
        // A wrapper's JSON is its value's.
        let kind = match kind {
            Kind::Message(m) => match m.full_name() {
                "google.protobuf.UInt32Value" => Kind::Uint32,
                "google.protobuf.UInt64Value" => Kind::Uint64,
                "google.protobuf.Int32Value" => Kind::Int32,
                "google.protobuf.Int64Value" => Kind::Int64,
                _ => Kind::Message(m),
            },
            kind => kind,
        };
        match kind {
            Kind::Message(m) if !m.full_name().starts_with("google.protobuf.") => Self::Object(m),
            Kind::String => Self::String,
            Kind::Enum(_) => Self::Enum,
            Kind::Uint32 | Kind::Fixed32 => Self::Integer("an unsigned 32-bit integer"),
            Kind::Uint64 | Kind::Fixed64 => Self::Integer("an unsigned 64-bit integer"),
            Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => Self::Integer("a 32-bit integer"),
            Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => Self::Integer("a 64-bit integer"),
            kind => Self::Other(kind),
        }
    }

    fn words(&self) -> String {
        match self {
            Self::Object(m) => format!("an object ({})", short_name(m)),
            Self::Array(_) => "an array".to_owned(),
            Self::String => "a string".to_owned(),
            Self::Enum => "an enum name or a 32-bit integer".to_owned(),
            Self::Integer(words) => (*words).to_owned(),
            Self::Other(Kind::Message(m)) => format!("a {}", m.full_name()),
            Self::Other(kind) => format!("a value of type {kind:?}"),
        }
    }
}

/// One JSON value at `path` (`descriptors[0].limit.unit`; empty for the top level).
struct Value<'r, 'a> {
    r: &'r mut Reader<'a>,
    path: String,
    expect: Expect,
}

impl<'de> de::Deserializer<'de> for Value<'_, '_> {
    type Error = DeError;

    /// Every value is read here: the schema, not the serde method prost-reflect calls,
    /// decides which tokens fit.
    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let Value { r, path, expect } = self;
        let tok = r.token()?;
        let visited = match (&expect, &tok) {
            (Expect::Object(msg), Token::Object) => visitor.visit_map(Members {
                r,
                path: &path,
                msg,
                seen: Vec::new(),
                next: None,
            }),
            (Expect::Array(field), Token::Array) => visitor.visit_seq(Items {
                r,
                path: &path,
                field,
                len: 0,
            }),
            (Expect::String | Expect::Enum | Expect::Other(_), Token::Str(s)) => {
                visitor.visit_str(s)
            }
            // protojson reads an integer field's string as the number it holds.
            (Expect::Integer(_), Token::Str(s)) if number_len(s.as_bytes()) == Some(s.len()) => {
                visit_integer(s, visitor)
            }
            (Expect::Integer(_) | Expect::Enum, Token::Num(raw)) => visit_integer(raw, visitor),
            (Expect::Other(_), Token::Num(raw)) => match raw.parse() {
                Ok(n) => visitor.visit_f64(n),
                Err(e) => Err(de::Error::custom(e)),
            },
            (Expect::Other(_), Token::Bool(b)) => visitor.visit_bool(*b),
            _ => return Err(mismatch(&path, &expect, &tok).into()),
        };
        visited.map_err(|e| match e {
            DeError::Visitor(reason) => match (&expect, &tok) {
                (_, Token::Object | Token::Array) => invalid(&path, reason),
                (Expect::Enum, Token::Str(s)) => {
                    invalid(&path, format!("unknown enum value {}", quoted(s)))
                }
                _ => mismatch(&path, &expect, &tok),
            }
            .into(),
            e => e,
        })
    }

    /// prost-reflect reads every field's value as an option: `null` leaves the default.
    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        if self.r.null_next() {
            visitor.visit_none()
        } else {
            visitor.visit_some(self)
        }
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        unit unit_struct newtype_struct seq tuple tuple_struct map struct enum identifier
        ignored_any
    }
}

/// Hands a visitor the integer a number token denotes (see [`integer`]); a token that is no
/// integer, or one beyond 64 bits, is refused here rather than rounded through a float.
fn visit_integer<'de, V: Visitor<'de>>(raw: &str, visitor: V) -> Result<V::Value, DeError> {
    let digits = integer(raw).ok_or_else(|| DeError::Visitor("not an integer".to_owned()))?;
    match (digits.parse(), digits.parse()) {
        (Ok(n), _) => visitor.visit_u64(n),
        (_, Ok(n)) => visitor.visit_i64(n),
        _ => Err(DeError::Visitor("integer out of range".to_owned())),
    }
}

/// The members of one object of `msg`. As in protojson: either field name works, and a
/// field given twice (under either name, `null` included) is an error, so is an unknown one.
struct Members<'r, 'a, 'p> {
    r: &'r mut Reader<'a>,
    path: &'p str,
    msg: &'p MessageDescriptor,
    /// Numbers of the fields read so far.
    seen: Vec<u32>,
    /// The field whose value comes next, with its path.
    next: Option<(FieldDescriptor, String)>,
}

impl<'de> de::MapAccess<'de> for Members<'_, '_, '_> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        let r = &mut *self.r;
        let first = self.seen.is_empty();
        match r.peek() {
            Some(b'}') => {
                r.pos += 1;
                return Ok(None);
            }
            Some(b',') if !first => r.pos += 1,
            _ if !first => return Err(r.expected("',' or '}' after an object member").into()),
            _ => {}
        }
        if r.peek() != Some(b'"') {
            return Err(r.expected("a field name in double quotes").into());
        }
        let key = r.string()?;
        if r.peek() != Some(b':') {
            return Err(r.expected("':' after the field name").into());
        }
        r.pos += 1;
        let msg = self.msg;
        let refuse = |what: &str| {
            let reason = format!("{what} field {} in {}", quoted(&key), short_name(msg));
            invalid(self.path, reason)
        };
        let field = msg
            .get_field_by_json_name(&key)
            .or_else(|| msg.get_field_by_name(&key))
            .ok_or_else(|| refuse("unknown"))?;
        if self.seen.contains(&field.number()) {
            return Err(refuse("duplicate").into());
        }
        self.seen.push(field.number());
        let path = if self.path.is_empty() {
            key.clone()
        } else {
            format!("{}.{key}", self.path)
        };
        self.next = Some((field, path));
        seed.deserialize(key.into_deserializer()).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        let (field, path) = self.next.take().ok_or_else(|| {
            DeError::Visitor("a member's value asked for before its name".to_owned())
        })?;
        seed.deserialize(Value {
            r: &mut *self.r,
            path,
            expect: Expect::field(&field),
        })
    }
}

/// The elements of one array of `field`; a `null` element is an error, as in protojson.
struct Items<'r, 'a, 'p> {
    r: &'r mut Reader<'a>,
    path: &'p str,
    field: &'p FieldDescriptor,
    len: usize,
}

impl<'de> de::SeqAccess<'de> for Items<'_, '_, '_> {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        let r = &mut *self.r;
        match r.peek() {
            Some(b']') => {
                r.pos += 1;
                return Ok(None);
            }
            Some(b',') if self.len > 0 => r.pos += 1,
            _ if self.len > 0 => {
                return Err(r.expected("',' or ']' after an array element").into())
            }
            _ => {}
        }
        let path = format!("{}[{}]", self.path, self.len);
        self.len += 1;
        seed.deserialize(Value {
            r,
            path,
            expect: Expect::kind(self.field.kind()),
        })
        .map(Some)
    }
}

/// "expected X, got Y" at `path`. Descriptor values can be secrets (API keys, user ids) and
/// error bodies go back to clients and into their logs, so a misplaced value is described,
/// not quoted: under `descriptors` no string is shown, and under `entries` no number either
/// (there a number can only be a value sent with the wrong type). The path names the
/// descriptor and entry.
fn mismatch(path: &str, expected: &Expect, got: &Token<'_>) -> JsonError {
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
    invalid(path, format!("expected {}, got {got}", expected.words()))
}

/// A JSON-quoted copy of `s`, cut to 40 characters for messages.
fn quoted(s: &str) -> String {
    serde_json::to_string(&truncated(s)).unwrap_or_default()
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
