//! Reads one YAML file of the reference's format into plain structs, collecting every problem.
//!
//! We walk a generic YAML tree instead of deriving `Deserialize`: serde stops at the first
//! error and knows nothing of descriptor paths, while users need all errors at once, each
//! pointing at `domain > key=value > key` and the field.

use serde_norway::{Mapping, Value};

use super::{
    depth,
    error::{self, ConfigError, CHECKING, LOADING},
    yaml_v2::{self as text, go_value, kind, yaml11_bool, DescriptorText, FileText, RateLimitText},
};

/// One file: a domain and its descriptor tree.
#[derive(Debug, Clone, PartialEq)]
pub struct RawFile {
    pub domain: String,
    pub descriptors: Vec<RawDescriptor>,
}

/// One `descriptors:` entry.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RawDescriptor {
    pub key: String,
    /// `None` when absent or empty (the reference treats both as key-only).
    pub value: Option<String>,
    pub rate_limit: Option<RawRateLimit>,
    /// A `rate_limits:` list (ours, not the reference's): `None` when absent, empty when
    /// written as `[]` (refused when compiled).
    pub rate_limits: Option<Vec<RawRateLimit>>,
    pub shadow_mode: bool,
    pub quota_mode: bool,
    pub detailed_metric: bool,
    pub value_to_metric: bool,
    pub share_threshold: bool,
    /// `metadata:` as a Struct (`None` when absent or empty), for RESPONSE_DYNAMIC_METADATA.
    pub metadata: Option<prost_types::Struct>,
    pub descriptors: Vec<RawDescriptor>,
    /// Human path of this descriptor, for errors raised after parsing.
    pub path: String,
}

/// A `rate_limit:` block, or one item of a `rate_limits:` list (which has no `unlimited`,
/// `name` or `replaces`: those stay false and empty).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RawRateLimit {
    /// `None` when absent.
    pub unit: Option<String>,
    pub requests_per_unit: Option<u32>,
    /// `unit_multiplier`: `None` when absent (one unit).
    pub unit_multiplier: Option<u32>,
    /// `algorithm`, as written: `None` when absent (`DEFAULT_ALGORITHM` applies).
    pub algorithm: Option<String>,
    /// `burst`: `None` when absent.
    pub burst: Option<u32>,
    pub unlimited: bool,
    pub name: Option<String>,
    pub replaces: Vec<String>,
    /// Some field of this block was invalid and already reported; later checks must not
    /// report it again as missing.
    pub had_errors: bool,
}

const ROOT_FIELDS: &[&str] = &["domain", "descriptors"];
const DESCRIPTOR_FIELDS: &[&str] = &[
    "key",
    "value",
    "rate_limit",
    "rate_limits",
    "descriptors",
    "shadow_mode",
    "quota_mode",
    "detailed_metric",
    "value_to_metric",
    "share_threshold",
    "metadata",
];
const RATE_LIMIT_FIELDS: &[&str] = &[
    "unit",
    "requests_per_unit",
    "unit_multiplier",
    "algorithm",
    "burst",
    "unlimited",
    "name",
    "replaces",
];
/// An item of `rate_limits`: a limit only; naming, replacing and `unlimited` belong to a
/// descriptor's single `rate_limit`.
const LIMIT_ITEM_FIELDS: &[&str] = &[
    "unit",
    "requests_per_unit",
    "unit_multiplier",
    "algorithm",
    "burst",
];
const REPLACES_FIELDS: &[&str] = &["name"];

/// Parses `text` (the contents of `file`); returns the file or every error found in it.
pub fn parse(file: &str, text: &str) -> Result<RawFile, Vec<ConfigError>> {
    match parse_lenient(file, text) {
        (Some(raw), errors) if errors.is_empty() => Ok(raw),
        (_, errors) => Err(errors),
    }
}

/// Like [`parse`], but also returns what could be read of a file with errors, so the
/// compile-stage checks can report that file's remaining problems in the same run.
///
/// One leading byte order mark is dropped, as Go's YAML reader (the reference's) drops it;
/// serde_norway would count it as a column of the first line and report the next line as a
/// second document. Text nested deeper than [`depth::MAX_DEPTH`] is refused before
/// serde_norway, which is slow over it.
pub fn parse_lenient(file: &str, text: &str) -> (Option<RawFile>, Vec<ConfigError>) {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if let Err(at) = depth::check(text) {
        let message = format!(
            "{LOADING}: invalid YAML: nesting deeper than {} levels at line {} column {}",
            depth::MAX_DEPTH,
            at.line,
            at.column
        );
        return (None, vec![ConfigError::new(file, "", "", message)]);
    }
    let mut p = Parser {
        file,
        errors: Vec::new(),
    };
    let root: Value = match serde_norway::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            let err = ConfigError::new(file, "", "", format!("{LOADING}: invalid YAML: {e}"));
            return (None, vec![err]);
        }
    };
    let written = text::read(text);
    let parsed = p.root(&root, written.as_ref());
    (parsed, p.errors)
}

struct Parser<'f> {
    file: &'f str,
    errors: Vec<ConfigError>,
}

impl Parser<'_> {
    fn err(&mut self, path: &str, field: &str, message: impl Into<String>) {
        self.errors
            .push(ConfigError::new(self.file, path, field, message));
    }

    /// `value` has the wrong type for `field` (`detail` says how), in the reference's words:
    /// its typed `yaml.Unmarshal` fails ([`LOADING`]), unless the value is a number Go reads as
    /// neither `int` nor a string, which its key check refuses first ([`CHECKING`]).
    fn type_error(&mut self, path: &str, field: &str, value: &Value, detail: String) {
        let message = match value {
            Value::Number(n) if !n.is_i64() => format!("{CHECKING} ({detail})"),
            _ => format!("{LOADING}: {detail}"),
        };
        self.err(path, field, message);
    }

    fn root(&mut self, root: &Value, written: Option<&FileText>) -> Option<RawFile> {
        let map = match root {
            Value::Mapping(m) => m,
            Value::Null => {
                self.err("", "domain", "config file cannot have empty domain");
                return None;
            }
            other => {
                self.err(
                    "",
                    "",
                    format!(
                        "{LOADING}: expected a mapping at the top level, found {}",
                        kind(other)
                    ),
                );
                return None;
            }
        };
        self.check_fields(map, ROOT_FIELDS, "", "");
        let domain = match map.get("domain") {
            None | Some(Value::Null) => String::new(),
            Some(v) => {
                let as_written = written.and_then(|w| w.domain.get());
                self.scalar_string(v, as_written, "", "domain")
                    .unwrap_or_default()
            }
        };
        if domain.is_empty() {
            self.err("", "domain", "config file cannot have empty domain");
        }
        let path = if domain.is_empty() {
            "<no domain>".to_owned()
        } else {
            domain.clone()
        };
        let descriptors = self.descriptor_list(
            map.get("descriptors"),
            &path,
            "descriptors",
            written.and_then(|w| w.descriptors.as_deref()),
        );
        Some(RawFile {
            domain,
            descriptors,
        })
    }

    fn descriptor_list(
        &mut self,
        v: Option<&Value>,
        parent: &str,
        field: &str,
        written: Option<&[DescriptorText]>,
    ) -> Vec<RawDescriptor> {
        let items = match v {
            None | Some(Value::Null) => return Vec::new(),
            Some(Value::Sequence(items)) => items,
            Some(other) => {
                self.type_error(
                    parent,
                    field,
                    other,
                    format!("expected a list of descriptors, found {}", kind(other)),
                );
                return Vec::new();
            }
        };
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            match item {
                Value::Mapping(m) => {
                    out.push(self.descriptor(m, parent, i, text::nth(written, i)));
                }
                other => self.err(
                    parent,
                    &format!("{field}[{i}]"),
                    format!(
                        "{} (expected a descriptor mapping, found {})",
                        error::list_item_not_map(&go_value(other)),
                        kind(other)
                    ),
                ),
            }
        }
        out
    }

    fn descriptor(
        &mut self,
        m: &Mapping,
        parent: &str,
        index: usize,
        written: Option<&DescriptorText>,
    ) -> RawDescriptor {
        let key = match m.get("key") {
            None | Some(Value::Null) => String::new(),
            Some(v) => self
                .scalar_string(v, written.and_then(|w| w.key.get()), parent, "key")
                .unwrap_or_default(),
        };
        let value = match m.get("value") {
            None | Some(Value::Null) => None,
            Some(v) => {
                let at = match key.as_str() {
                    "" => format!("{parent} > descriptors[{index}]"),
                    k => format!("{parent} > {k}"),
                };
                self.scalar_string(v, written.and_then(|w| w.value.get()), &at, "value")
            }
        }
        .filter(|v| !v.is_empty());
        let path = match (&key, &value) {
            (k, _) if k.is_empty() => format!("{parent} > descriptors[{index}]"),
            (k, Some(v)) => format!("{parent} > {k}={v}"),
            (k, None) => format!("{parent} > {k}"),
        };
        if key.is_empty() {
            self.err(&path, "key", "descriptor has empty key");
        }
        self.check_fields(m, DESCRIPTOR_FIELDS, &path, "");
        let metadata = m.get("metadata").and_then(crate::metadata::from_yaml);
        if let Some(meta) = m.get("metadata") {
            if !matches!(meta, Value::Mapping(_) | Value::Null) {
                self.type_error(
                    &path,
                    "metadata",
                    meta,
                    format!("expected a mapping, found {}", kind(meta)),
                );
            }
        }
        let rate_limit = match m.get("rate_limit") {
            None | Some(Value::Null) => None,
            Some(Value::Mapping(rl)) => {
                Some(self.rate_limit(rl, &path, written.and_then(|w| w.rate_limit.as_ref())))
            }
            Some(other) => {
                self.type_error(
                    &path,
                    "rate_limit",
                    other,
                    format!("expected a mapping, found {}", kind(other)),
                );
                None
            }
        };
        let rate_limits = match m.get("rate_limits") {
            None | Some(Value::Null) => None,
            Some(Value::Sequence(items)) => Some(self.rate_limits(items, &path)),
            Some(other) => {
                self.type_error(
                    &path,
                    "rate_limits",
                    other,
                    format!("expected a list of limits, found {}", kind(other)),
                );
                None
            }
        };
        let descriptors = self.descriptor_list(
            m.get("descriptors"),
            &path,
            "descriptors",
            written.and_then(|w| w.descriptors.as_deref()),
        );
        RawDescriptor {
            metadata,
            shadow_mode: self.flag(m, &path, "shadow_mode", "shadow_mode"),
            quota_mode: self.flag(m, &path, "quota_mode", "quota_mode"),
            detailed_metric: self.flag(m, &path, "detailed_metric", "detailed_metric"),
            value_to_metric: self.flag(m, &path, "value_to_metric", "value_to_metric"),
            share_threshold: self.flag(m, &path, "share_threshold", "share_threshold"),
            key,
            value,
            rate_limit,
            rate_limits,
            descriptors,
            path,
        }
    }

    /// The items of a `rate_limits:` list; an item that is not a mapping is reported and
    /// left out.
    fn rate_limits(&mut self, items: &[Value], path: &str) -> Vec<RawRateLimit> {
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let field = format!("rate_limits[{i}]");
            match item {
                Value::Mapping(m) => {
                    let errors_before = self.errors.len();
                    self.check_fields(m, LIMIT_ITEM_FIELDS, path, &format!("{field}."));
                    let mut rl = self.limit_fields(m, path, &field);
                    rl.had_errors = self.errors.len() > errors_before;
                    out.push(rl);
                }
                other => self.err(
                    path,
                    &field,
                    format!(
                        "{} (expected a mapping, found {})",
                        error::list_item_not_map(&go_value(other)),
                        kind(other)
                    ),
                ),
            }
        }
        out
    }

    fn rate_limit(
        &mut self,
        m: &Mapping,
        path: &str,
        written: Option<&RateLimitText>,
    ) -> RawRateLimit {
        let errors_before = self.errors.len();
        self.check_fields(m, RATE_LIMIT_FIELDS, path, "rate_limit.");
        let mut rl = self.limit_fields(m, path, "rate_limit");
        rl.name = match m.get("name") {
            None | Some(Value::Null) => None,
            Some(v) => self.scalar_string(
                v,
                written.and_then(|w| w.name.get()),
                path,
                "rate_limit.name",
            ),
        };
        rl.unlimited = self.flag(m, path, "unlimited", "rate_limit.unlimited");
        rl.replaces = match m.get("replaces") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Sequence(items)) => items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    let as_written = written
                        .and_then(|w| w.replaces.as_deref())
                        .and_then(|r| r.get(i))
                        .and_then(|n| n.name.get());
                    self.replaces_entry(item, as_written, path, i)
                })
                .collect(),
            Some(other) => {
                self.type_error(
                    path,
                    "rate_limit.replaces",
                    other,
                    format!("expected a list of {{name: ...}}, found {}", kind(other)),
                );
                Vec::new()
            }
        };
        rl.had_errors = self.errors.len() > errors_before;
        rl
    }

    /// The fields a `rate_limit` block and a `rate_limits` item share; `field` (`rate_limit`
    /// or `rate_limits[i]`) prefixes their names in errors.
    fn limit_fields(&mut self, m: &Mapping, path: &str, field: &str) -> RawRateLimit {
        let string = |p: &mut Self, name: &str| match m.get(name) {
            None | Some(Value::Null) => None,
            Some(v) => p.scalar_string(v, None, path, &format!("{field}.{name}")),
        };
        let number = |p: &mut Self, name: &str| match m.get(name) {
            None | Some(Value::Null) => None,
            Some(v) => p.whole_number(v, path, &format!("{field}.{name}")),
        };
        RawRateLimit {
            unit: string(self, "unit"),
            requests_per_unit: number(self, "requests_per_unit"),
            unit_multiplier: number(self, "unit_multiplier"),
            algorithm: string(self, "algorithm"),
            burst: number(self, "burst"),
            ..RawRateLimit::default()
        }
    }

    fn replaces_entry(
        &mut self,
        item: &Value,
        written: Option<&str>,
        path: &str,
        i: usize,
    ) -> String {
        let field = format!("rate_limit.replaces[{i}]");
        match item {
            Value::Mapping(m) => {
                self.check_fields(m, REPLACES_FIELDS, path, &format!("{field}."));
                match m.get("name") {
                    None | Some(Value::Null) => String::new(),
                    Some(v) => self
                        .scalar_string(v, written, path, &format!("{field}.name"))
                        .unwrap_or_default(),
                }
            }
            other => {
                self.err(
                    path,
                    &field,
                    format!(
                        "{} (expected {{name: ...}}, found {})",
                        error::list_item_not_map(&go_value(other)),
                        kind(other)
                    ),
                );
                String::new()
            }
        }
    }

    /// A whole number from 0 to `u32::MAX` (`requests_per_unit`, `unit_multiplier`, `burst`).
    fn whole_number(&mut self, v: &Value, path: &str, field: &str) -> Option<u32> {
        let n = match v {
            Value::Number(n) => n,
            other => {
                self.type_error(
                    path,
                    field,
                    other,
                    format!("expected a whole number, found {}", kind(other)),
                );
                return None;
            }
        };
        match n.as_u64() {
            Some(u) => match u32::try_from(u) {
                Ok(u) => Some(u),
                Err(_) => {
                    self.type_error(path, field, v, format!("{u} is larger than {}", u32::MAX));
                    None
                }
            },
            None if n.is_i64() => {
                self.type_error(path, field, v, format!("must not be negative, found {n}"));
                None
            }
            None => {
                self.type_error(path, field, v, format!("must be a whole number, found {n}"));
                None
            }
        }
    }

    /// A boolean `name` in `m`, reported as `field` when it is not one. YAML 1.1's words
    /// (`yes`, `on`, `y`, ...) are booleans too, as yaml.v2 (the reference's) reads them.
    fn flag(&mut self, m: &Mapping, path: &str, name: &str, field: &str) -> bool {
        let v = match m.get(name) {
            None | Some(Value::Null) => return false,
            Some(Value::Bool(b)) => return *b,
            Some(v) => v,
        };
        if let Some(b) = v.as_str().and_then(yaml11_bool) {
            return b;
        }
        self.type_error(
            path,
            field,
            v,
            format!("expected true or false, found {}", kind(v)),
        );
        false
    }

    /// Strings, and whole numbers or booleans as `written` in the file (as yaml.v2 gives a Go
    /// string field their text; see [`text`]). Other numbers (fractions, integers beyond
    /// `i64`) are refused, as the reference's key check refuses them.
    fn scalar_string(
        &mut self,
        v: &Value,
        written: Option<&str>,
        path: &str,
        field: &str,
    ) -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) if !n.is_i64() => {
                self.type_error(
                    path,
                    field,
                    v,
                    format!("expected a string, found the number {n}"),
                );
                None
            }
            Value::Number(n) => Some(written.map_or_else(|| n.to_string(), str::to_owned)),
            Value::Bool(b) => Some(written.map_or_else(|| b.to_string(), str::to_owned)),
            other => {
                self.type_error(
                    path,
                    field,
                    other,
                    format!("expected a string, found {}", kind(other)),
                );
                None
            }
        }
    }

    fn check_fields(&mut self, m: &Mapping, allowed: &[&str], path: &str, prefix: &str) {
        for k in m.keys() {
            match k {
                Value::String(s) if allowed.contains(&s.as_str()) => {}
                Value::String(s) => self.err(
                    path,
                    &format!("{prefix}{s}"),
                    format!(
                        "{} (expected one of: {})",
                        error::unknown_key(s),
                        allowed.join(", ")
                    ),
                ),
                other => self.err(
                    path,
                    prefix.trim_end_matches('.'),
                    format!(
                        "{} (field names must be strings)",
                        error::key_not_string(&go_value(other))
                    ),
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{parse, parse_lenient, RawRateLimit};

    fn messages(text: &str) -> Vec<String> {
        parse("t.yaml", text)
            .expect_err("errors")
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn algorithm_burst_unit_multiplier_and_rate_limits_are_read() {
        let raw = parse(
            "t.yaml",
            "domain: d
descriptors:
  - key: a
    rate_limit: {unit: minute, requests_per_unit: 100, algorithm: token_bucket, burst: 20, unit_multiplier: 2}
  - key: b
    rate_limits:
      - {unit: minute, requests_per_unit: 10}
      - {unit: day, requests_per_unit: 500, algorithm: sliding_window, unit_multiplier: 7}
  - key: c
    rate_limits: []
  - key: e
    rate_limits: ~
",
        )
        .unwrap();
        let d = &raw.descriptors;
        assert_eq!(
            d[0].rate_limit,
            Some(RawRateLimit {
                unit: Some("minute".into()),
                requests_per_unit: Some(100),
                unit_multiplier: Some(2),
                algorithm: Some("token_bucket".into()),
                burst: Some(20),
                ..RawRateLimit::default()
            })
        );
        assert_eq!(d[0].rate_limits, None);
        assert_eq!(d[1].rate_limit, None);
        assert_eq!(
            d[1].rate_limits,
            Some(vec![
                RawRateLimit {
                    unit: Some("minute".into()),
                    requests_per_unit: Some(10),
                    ..RawRateLimit::default()
                },
                RawRateLimit {
                    unit: Some("day".into()),
                    requests_per_unit: Some(500),
                    unit_multiplier: Some(7),
                    algorithm: Some("sliding_window".into()),
                    ..RawRateLimit::default()
                },
            ])
        );
        assert_eq!(
            d[2].rate_limits,
            Some(vec![]),
            "an empty list is kept, to be refused"
        );
        assert_eq!(d[3].rate_limits, None, "null is absent, as for rate_limit");
    }

    #[test]
    fn the_new_fields_report_type_errors_with_their_paths() {
        assert_eq!(
            messages(
                "domain: d
descriptors:
  - key: a
    rate_limit: {unit: minute, requests_per_unit: 1, unit_multiplier: -1, algorithm: [x], burst: 4294967296}
  - key: b
    rate_limits:
      - {unit: minute, requests_per_unit: 1, burst: 1.5, unit_multiplier: two}
      - {unit: hour, requests_per_unit: 1, unlimited: true, name: n, replaces: []}
      - 7
"
            ),
            [
                "t.yaml: d > a: rate_limit.unit_multiplier: error loading config file: must not be negative, found -1",
                "t.yaml: d > a: rate_limit.algorithm: error loading config file: expected a string, found a list",
                "t.yaml: d > a: rate_limit.burst: error loading config file: 4294967296 is larger than 4294967295",
                "t.yaml: d > b: rate_limits[0].unit_multiplier: error loading config file: expected a whole number, found a string",
                "t.yaml: d > b: rate_limits[0].burst: error checking config (must be a whole number, found 1.5)",
                "t.yaml: d > b: rate_limits[1].unlimited: config error, unknown key 'unlimited' (expected one of: unit, requests_per_unit, unit_multiplier, algorithm, burst)",
                "t.yaml: d > b: rate_limits[1].name: config error, unknown key 'name' (expected one of: unit, requests_per_unit, unit_multiplier, algorithm, burst)",
                "t.yaml: d > b: rate_limits[1].replaces: config error, unknown key 'replaces' (expected one of: unit, requests_per_unit, unit_multiplier, algorithm, burst)",
                "t.yaml: d > b: rate_limits[2]: config error, yaml file contains list of type other than map: 7 (expected a mapping, found a number)",
            ]
        );
    }

    /// Each kind of error starts with the reference's words for it (see `error.rs`), with
    /// the reference's rendering of the offending value where its text has one.
    #[test]
    fn errors_start_with_the_reference_wording() {
        assert_eq!(
            messages(
                "domain: d
descriptors:
  - 7
  - [a, {b: 1, a: ~}]
  - key: a
    metadata: [x]
    shadow_mode: 1.5
    quota_mode: 18446744073709551615
    ~: x
    true: y
    [l]: z
  - key: b
    rate_limit: {unit: second, requests_per_unit: 1, replaces: [x, {name: n}]}
  - key: c
    rate_limit: minute
    value: {x: 1}
  - key: e
    rate_limit: {unit: second, requests_per_unit: 1, replaces: {name: n}}
    descriptors: 5
"
            ),
            [
                "t.yaml: d: descriptors[0]: config error, yaml file contains list of type other than map: 7 (expected a descriptor mapping, found a number)",
                "t.yaml: d: descriptors[1]: config error, yaml file contains list of type other than map: [a map[a:<nil> b:1]] (expected a descriptor mapping, found a list)",
                "t.yaml: d > a: config error, key is not of type string: <nil> (field names must be strings)",
                "t.yaml: d > a: config error, key is not of type string: true (field names must be strings)",
                "t.yaml: d > a: config error, key is not of type string: [l] (field names must be strings)",
                "t.yaml: d > a: metadata: error loading config file: expected a mapping, found a list",
                "t.yaml: d > a: shadow_mode: error checking config (expected true or false, found a number)",
                "t.yaml: d > a: quota_mode: error checking config (expected true or false, found a number)",
                "t.yaml: d > b: rate_limit.replaces[0]: config error, yaml file contains list of type other than map: x (expected {name: ...}, found a string)",
                "t.yaml: d > c: value: error loading config file: expected a string, found a mapping",
                "t.yaml: d > c: rate_limit: error loading config file: expected a mapping, found a string",
                "t.yaml: d > e: rate_limit.replaces: error loading config file: expected a list of {name: ...}, found a mapping",
                "t.yaml: d > e: descriptors: error loading config file: expected a list of descriptors, found a number",
            ]
        );
        assert_eq!(
            messages("- domain: d\n"),
            ["t.yaml: error loading config file: expected a mapping at the top level, found a list"]
        );
    }

    /// Hot reload no longer wraps loading in `catch_unwind`; this is the evidence that the
    /// YAML parser (serde_norway) and our walk of its tree answer every input with errors,
    /// not a panic: random rule-file-shaped text, with anchors, aliases, merge keys, tags and
    /// odd scalars mixed in.
    #[test]
    fn random_rule_text_never_panics() {
        const TOKENS: &[&str] = &[
            "domain",
            "descriptors",
            "key",
            "value",
            "rate_limit",
            "rate_limits",
            "unit",
            "requests_per_unit",
            "unit_multiplier",
            "algorithm",
            "token_bucket",
            "burst",
            "unlimited",
            "shadow_mode",
            "replaces",
            "name",
            "detailed_metric",
            "second",
            "hour",
            "1",
            "-1",
            "0x10",
            "1e99",
            "18446744073709551616",
            "~",
            "null",
            "true",
            ".nan",
            ":",
            ": ",
            "- ",
            "? ",
            ",",
            "[",
            "]",
            "{",
            "}",
            "&a ",
            "*a",
            "<<: ",
            "!!binary ",
            "!x ",
            "\"",
            "'",
            "|",
            ">",
            "#",
            "\n",
            "\n  ",
            "\n    ",
            "\t",
            "\r",
            "---",
            "...",
            "%YAML 1.2",
            "\u{feff}",
            "\u{85}",
            "\0",
            "é",
        ];
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut below = |n: usize| {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
        };
        for _ in 0..20_000 {
            let len = below(40);
            let text: String = (0..len).map(|_| TOKENS[below(TOKENS.len())]).collect();
            let _ = parse_lenient("fuzz.yaml", &text);
        }
    }
}
