//! `PROMETHEUS_MAPPER_YAML`: a statsd_exporter mapping file, applied to our Prometheus series.
//!
//! The reference exports Prometheus through an embedded statsd_exporter: its StatsD names
//! (`ratelimit.service.rate_limit.<key>.over_limit`, ...) go through a mapping file, its
//! built-in one by default. Our series are named natively as that built-in file names them,
//! so without the setting nothing is mapped. With it, each series' reference StatsD name
//! ([`super::reference_names`]) goes through the user's file as statsd_exporter would take it:
//! the first mapping that matches, in file order, names the series and its labels; `action:
//! drop` removes it; a name no mapping matches gets statsd_exporter's escaped name and no
//! labels. Series the reference does not have (ours, `ratelimitd_*`, process metrics) are
//! left as they are.
//!
//! Honoured: `mappings[].match` (glob: `*` is one dot-free part of the name, matched whole;
//! or `match_type: regex`, unanchored, as statsd_exporter compiles it), `name` and `labels`
//! with `$1`/`${1}`/`$name` expansions, `action` (`map`, `drop`), `match_metric_type`
//! (`counter`, `gauge`, `observer`), and `defaults.match_type`. Read and ignored (their effect
//! is fixed here): `help`, `timer_type`/`observer_type`, `buckets`, `quantiles`, `scale`,
//! `ttl`, `summary_options`, `histogram_options` and `defaults`' other fields. Unknown fields
//! are refused, so a typo does not silently change nothing.

use std::{collections::BTreeMap, path::Path, sync::Arc};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use regex::Regex;
use serde::Deserialize;

use super::{
    domains::escape_metric_name,
    reference_names::{counter_name, timer_name},
};

/// Why a mapping file cannot be used (at start-up: ratelimitd refuses to start).
#[derive(Debug, thiserror::Error)]
pub enum MapperError {
    #[error("PROMETHEUS_MAPPER_YAML {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("PROMETHEUS_MAPPER_YAML {path}: invalid mapping file: {message}")]
    Invalid { path: String, message: String },
}

/// The kind of metric a mapping may be limited to (`match_metric_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Counter,
    Gauge,
    /// Timers and histograms.
    Observer,
}

/// What a mapping file makes of one series.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mapped {
    /// Exported under this name and these labels.
    Series {
        name: String,
        labels: Vec<(String, String)>,
    },
    /// `action: drop`: not exported.
    Drop,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    defaults: Defaults,
    #[serde(default)]
    mappings: Vec<RawMapping>,
}

#[derive(Debug, Default, Deserialize)]
struct Defaults {
    #[serde(default)]
    match_type: Option<MatchType>,
    /// Fields read and ignored (checked against [`IGNORED_DEFAULTS`]).
    #[serde(flatten)]
    ignored: BTreeMap<String, serde_norway::Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum MatchType {
    Glob,
    Regex,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Action {
    #[default]
    Map,
    Drop,
}

#[derive(Debug, Deserialize)]
struct RawMapping {
    #[serde(rename = "match")]
    pattern: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    action: Action,
    #[serde(default)]
    match_type: Option<MatchType>,
    #[serde(default)]
    match_metric_type: Option<Kind>,
    /// Fields read and ignored (checked against [`IGNORED_MAPPING`]).
    #[serde(flatten)]
    ignored: BTreeMap<String, serde_norway::Value>,
}

/// statsd_exporter fields with no effect here (see the module documentation).
const IGNORED_MAPPING: &[&str] = &[
    "help",
    "timer_type",
    "observer_type",
    "buckets",
    "quantiles",
    "scale",
    "ttl",
    "summary_options",
    "histogram_options",
];
const IGNORED_DEFAULTS: &[&str] = &[
    "timer_type",
    "observer_type",
    "buckets",
    "quantiles",
    "ttl",
    "glob_disable_ordering",
    "summary_options",
    "histogram_options",
];

/// The first field of `ignored` not in `known`.
fn unknown<'a>(
    ignored: &'a BTreeMap<String, serde_norway::Value>,
    known: &[&str],
) -> Option<&'a str> {
    ignored
        .keys()
        .map(String::as_str)
        .find(|k| !known.contains(k))
}

#[derive(Debug)]
struct Mapping {
    regex: Regex,
    name: String,
    labels: Vec<(String, String)>,
    drop: bool,
    kind: Option<Kind>,
}

/// A loaded mapping file.
#[derive(Debug)]
pub struct Mapper {
    mappings: Vec<Mapping>,
}

impl Mapper {
    /// Reads and checks the mapping file at `path`.
    pub fn load(path: &Path) -> Result<Self, MapperError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| MapperError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text).map_err(|message| MapperError::Invalid {
            path: shown,
            message,
        })
    }

    /// Parses a mapping file's text; the error says which mapping is wrong and why.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: File = serde_norway::from_str(text).map_err(|e| e.to_string())?;
        if let Some(field) = unknown(&file.defaults.ignored, IGNORED_DEFAULTS) {
            return Err(format!("defaults: unknown field `{field}`"));
        }
        let default_type = file.defaults.match_type.unwrap_or(MatchType::Glob);
        let mappings = file
            .mappings
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                let at = |why: String| format!("mappings[{i}] (match {:?}): {why}", m.pattern);
                if let Some(field) = unknown(&m.ignored, IGNORED_MAPPING) {
                    return Err(at(format!("unknown field `{field}`")));
                }
                let regex = match m.match_type.unwrap_or(default_type) {
                    MatchType::Glob => glob_regex(&m.pattern).map_err(at)?,
                    MatchType::Regex => Regex::new(&m.pattern).map_err(|e| at(e.to_string()))?,
                };
                let drop = m.action == Action::Drop;
                let name = match (m.name, drop) {
                    (Some(name), _) => name,
                    (None, true) => String::new(),
                    (None, false) => return Err(at("a mapping needs a name".to_owned())),
                };
                let labels = m.labels.into_iter().collect();
                Ok(Mapping {
                    regex,
                    name,
                    labels,
                    drop,
                    kind: m.match_metric_type,
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(Self { mappings })
    }

    /// The series for the reference StatsD name `statsd` of a metric of `kind`.
    pub fn map(&self, statsd: &str, kind: Kind) -> Mapped {
        let found = self
            .mappings
            .iter()
            .filter(|m| m.kind.is_none_or(|k| k == kind))
            .find_map(|m| m.regex.captures(statsd).map(|c| (m, c)));
        let Some((m, caps)) = found else {
            return Mapped::Series {
                name: escape_metric_name(statsd),
                labels: Vec::new(),
            };
        };
        if m.drop {
            return Mapped::Drop;
        }
        let expand = |template: &str| {
            let mut out = String::new();
            caps.expand(template, &mut out);
            out
        };
        let name = expand(&m.name);
        let name = if valid_name(&name) {
            name
        } else {
            escape_metric_name(&name)
        };
        Mapped::Series {
            name,
            labels: m
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), expand(v)))
                .collect(),
        }
    }
}

impl Mapped {
    /// Registers the series with `register`, or a no-op for a dropped one.
    pub fn register<T>(self, register: impl FnOnce(&Key) -> T, noop: impl FnOnce() -> T) -> T {
        match self {
            Mapped::Series { name, labels } => {
                let labels: Vec<metrics::Label> = labels
                    .into_iter()
                    .map(|(k, v)| metrics::Label::new(k, v))
                    .collect();
                register(&Key::from_parts(name, labels))
            }
            Mapped::Drop => noop(),
        }
    }
}

/// A recorder whose series of the reference are renamed by a [`Mapper`] on their way to
/// `inner` (the global Prometheus recorder).
pub struct MappedRecorder<R> {
    inner: R,
    mapper: Arc<Mapper>,
}

impl<R> MappedRecorder<R> {
    pub fn new(inner: R, mapper: Arc<Mapper>) -> Self {
        Self { inner, mapper }
    }
}

impl<R: Recorder> Recorder for MappedRecorder<R> {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, help: SharedString) {
        self.inner.describe_counter(key, unit, help);
    }
    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, help: SharedString) {
        self.inner.describe_gauge(key, unit, help);
    }
    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, help: SharedString) {
        self.inner.describe_histogram(key, unit, help);
    }
    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        match counter_name(key) {
            Some(statsd) => self
                .mapper
                .map(&statsd, Kind::Counter)
                .register(|k| self.inner.register_counter(k, metadata), Counter::noop),
            None => self.inner.register_counter(key, metadata),
        }
    }
    /// The reference sends no gauges: ours are not its series.
    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        self.inner.register_gauge(key, metadata)
    }
    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        match timer_name(key) {
            Some(statsd) => self.mapper.map(&statsd, Kind::Observer).register(
                |k| self.inner.register_histogram(k, metadata),
                Histogram::noop,
            ),
            None => self.inner.register_histogram(key, metadata),
        }
    }
}

/// statsd_exporter's glob: `*` matches a run of characters other than `.`, and the pattern
/// matches the whole name.
fn glob_regex(pattern: &str) -> Result<Regex, String> {
    let parts: Vec<String> = pattern.split('*').map(regex::escape).collect();
    Regex::new(&format!("^{}$", parts.join("([^.]*)"))).map_err(|e| e.to_string())
}

/// A Prometheus metric name: `[a-zA-Z_:][a-zA-Z0-9_:]*`.
fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(name: &str, labels: &[(&str, &str)]) -> Mapped {
        Mapped::Series {
            name: name.to_owned(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    const FILE: &str = r#"
defaults:
  timer_type: histogram
mappings:
  - match: "ratelimit.service.rate_limit.*.*.over_limit"
    name: "rl_over"
    timer_type: histogram
    labels: {domain: "$1", key1: "$2"}
  - match: 'ratelimit\.service\.rate_limit\.([^.]*)\.([^.]*)\.([^.]*)\.total_hits'
    match_type: regex
    name: "rl_hits_${1}"
    labels: {key: "$2/$3"}
  - match: "ratelimit.service.rate_limit.*.*.near_limit"
    action: drop
  - match: "ratelimit_server.*.response_time"
    match_metric_type: counter
    name: "never_for_an_observer"
"#;

    #[test]
    fn first_matching_mapping_names_the_series() {
        let m = Mapper::parse(FILE).unwrap();
        assert_eq!(
            m.map(
                "ratelimit.service.rate_limit.d.k_v.over_limit",
                Kind::Counter
            ),
            series("rl_over", &[("domain", "d"), ("key1", "k_v")])
        );
        assert_eq!(
            m.map(
                "ratelimit.service.rate_limit.d.a.b.total_hits",
                Kind::Counter
            ),
            series("rl_hits_d", &[("key", "a/b")])
        );
        assert_eq!(
            m.map("ratelimit.service.rate_limit.d.k.near_limit", Kind::Counter),
            Mapped::Drop
        );
    }

    #[test]
    fn globs_match_whole_names_one_part_per_star() {
        let m = Mapper::parse(FILE).unwrap();
        // Three parts where the glob has two: unmapped, statsd_exporter's escaped name.
        assert_eq!(
            m.map(
                "ratelimit.service.rate_limit.d.a.b.over_limit",
                Kind::Counter
            ),
            series("ratelimit_service_rate_limit_d_a_b_over_limit", &[])
        );
        assert_eq!(
            m.map(
                "ratelimit_server.ShouldRateLimit.response_time",
                Kind::Observer
            ),
            series("ratelimit_server_ShouldRateLimit_response_time", &[]),
            "match_metric_type limits a mapping to its kind"
        );
    }

    #[test]
    fn bad_files_are_refused_with_the_mapping_named() {
        let err =
            Mapper::parse("mappings:\n  - match: 'a.(*'\n    match_type: regex\n    name: x\n")
                .unwrap_err();
        assert!(err.starts_with("mappings[0] (match \"a.(*\"): "), "{err}");
        let err = Mapper::parse("mappings:\n  - match: a.*\n").unwrap_err();
        assert!(err.contains("a mapping needs a name"), "{err}");
        let err = Mapper::parse("mappings:\n  - match: a.*\n    nmae: x\n").unwrap_err();
        assert!(err.contains("unknown field `nmae`"), "{err}");
    }

    #[test]
    fn a_name_that_is_not_a_metric_name_is_escaped() {
        let m = Mapper::parse("mappings:\n  - match: a.*\n    name: 'x-$1'\n").unwrap();
        assert_eq!(m.map("a.b", Kind::Counter), series("x_b", &[]));
    }
}
