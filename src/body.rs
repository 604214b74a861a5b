//! The body of an OVER_LIMIT answer (`LIMIT_RESPONSE_BODY`): none (as the reference), an
//! RFC 9457 problem-details JSON, or a template file. Envoy sends the response's `raw_body`
//! as the 429's body and the `content-type` given in `response_headers_to_add`.
//!
//! Every value put into a body comes from the config, never from a request: the rule is a
//! rule's `name` or its descriptor path (keys and values as written in the config), or the
//! fixed words `limit override` for a limit Envoy sent; the limit, window and wait are
//! numbers.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::config::Limit;
use crate::limiter::Unit;

/// The content type of the problem-details body.
pub const PROBLEM_JSON: &str = "application/problem+json";
/// The content type of a template's body unless `LIMIT_RESPONSE_BODY_CONTENT_TYPE` says.
pub const TEMPLATE_CONTENT_TYPE: &str = "text/plain";

/// What an OVER_LIMIT answer carries as its body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum LimitBody {
    /// No body: Envoy's own 429 (the reference's answer).
    #[default]
    None,
    /// `problem-json`: RFC 9457 problem details.
    ProblemJson,
    /// `template`: the file's text with its placeholders filled in.
    Template(Template),
}

/// `LIMIT_RESPONSE_BODY`: which body, before any file is read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BodyMode {
    #[default]
    None,
    ProblemJson,
    Template,
}

impl BodyMode {
    pub fn name(self) -> &'static str {
        match self {
            BodyMode::None => "none",
            BodyMode::ProblemJson => "problem-json",
            BodyMode::Template => "template",
        }
    }
}

impl std::str::FromStr for BodyMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [BodyMode::None, BodyMode::ProblemJson, BodyMode::Template]
            .into_iter()
            .find(|m| m.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                format!("LIMIT_RESPONSE_BODY: {s:?} is not one of none, problem-json, template")
            })
    }
}

impl LimitBody {
    /// The body the settings ask for, reading the template file now (once, at start-up).
    pub fn from_settings(
        mode: BodyMode,
        template: Option<&Path>,
        content_type: &str,
    ) -> Result<Self, BodyError> {
        match (mode, template) {
            (BodyMode::Template, Some(path)) => Ok(LimitBody::Template(Template::read(
                path,
                content_type.to_owned(),
            )?)),
            (BodyMode::Template, None) => Err(BodyError::NoTemplate),
            (mode, Some(_)) => Err(BodyError::TemplateUnused(mode.name())),
            (BodyMode::None, None) => Ok(LimitBody::None),
            (BodyMode::ProblemJson, None) => Ok(LimitBody::ProblemJson),
        }
    }
}

/// What fired: the values a body describes.
#[derive(Debug, Clone, Copy)]
pub struct Fired<'a> {
    /// The rule's name, else its descriptor path, or `limit override`.
    pub rule: &'a str,
    /// The limit it is over.
    pub limit: Limit,
    /// Seconds, as in the Retry-After header.
    pub retry_after: u64,
}

impl LimitBody {
    /// The body and its content type for `fired`; `None` when no body is configured.
    pub fn render(&self, fired: &Fired<'_>) -> Option<(Vec<u8>, &str)> {
        match self {
            LimitBody::None => None,
            LimitBody::ProblemJson => Some((problem_json(fired), PROBLEM_JSON)),
            LimitBody::Template(t) => Some((t.render(fired).into_bytes(), &t.content_type)),
        }
    }
}

/// The problem details of a 429, fields in this order.
#[derive(serde::Serialize)]
struct Problem<'a> {
    r#type: &'static str,
    title: &'static str,
    status: u16,
    detail: String,
    rule: &'a str,
    limit: u32,
    window: String,
    retry_after: u64,
}

fn problem_json(fired: &Fired<'_>) -> Vec<u8> {
    let window = window(fired.limit);
    let problem = Problem {
        r#type: "about:blank",
        title: "Too Many Requests",
        status: 429,
        detail: format!(
            "rate limit of {} requests per {window} exceeded (rule {}); retry after {} s",
            fired.limit.requests_per_unit, fired.rule, fired.retry_after
        ),
        rule: fired.rule,
        limit: fired.limit.requests_per_unit,
        window,
        retry_after: fired.retry_after,
    };
    // Strings, integers and a derived Serialize: writing into a Vec cannot fail.
    serde_json::to_vec(&problem).expect("a struct of strings and integers serializes")
}

/// The window as `unit_multiplier` and a unit letter: `1m`, `5s`, `1h`, `1d`, `1w`, `1mo`, `1y`.
pub fn window(limit: Limit) -> String {
    let unit = match limit.unit {
        Unit::Second => "s",
        Unit::Minute => "m",
        Unit::Hour => "h",
        Unit::Day => "d",
        Unit::Week => "w",
        Unit::Month => "mo",
        Unit::Year => "y",
    };
    format!("{}{unit}", limit.multiplier.max(1))
}

/// A template file split once, at start-up, into text and placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
    content_type: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Rule,
    Limit,
    Window,
    RetryAfter,
}

const PLACEHOLDERS: [(&str, Part); 4] = [
    ("{rule}", Part::Rule),
    ("{limit}", Part::Limit),
    ("{window}", Part::Window),
    ("{retry_after}", Part::RetryAfter),
];

impl Template {
    /// Splits `text` at `{rule}`, `{limit}`, `{window}` and `{retry_after}`; any other text,
    /// braces included, is kept as written. Values go in as they are, not escaped.
    pub fn parse(text: &str, content_type: String) -> Self {
        let mut parts = Vec::new();
        let mut rest = text;
        let mut literal = String::new();
        while !rest.is_empty() {
            match PLACEHOLDERS.iter().find(|(p, _)| rest.starts_with(p)) {
                Some((p, part)) => {
                    if !literal.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut literal)));
                    }
                    parts.push(part.clone());
                    rest = &rest[p.len()..];
                }
                None => {
                    let mut chars = rest.chars();
                    literal.extend(chars.next());
                    rest = chars.as_str();
                }
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Text(literal));
        }
        Template {
            parts,
            content_type,
        }
    }

    /// Reads and parses the template at `path`.
    pub fn read(path: &Path, content_type: String) -> Result<Self, BodyError> {
        let text = std::fs::read_to_string(path).map_err(|error| BodyError::Unreadable {
            path: path.to_owned(),
            error,
        })?;
        Ok(Template::parse(&text, content_type))
    }

    fn render(&self, fired: &Fired<'_>) -> String {
        let mut out = String::new();
        for part in &self.parts {
            // Writing into a String cannot fail.
            let _ = match part {
                Part::Text(t) => out.write_str(t),
                Part::Rule => out.write_str(fired.rule),
                Part::Limit => write!(out, "{}", fired.limit.requests_per_unit),
                Part::Window => out.write_str(&window(fired.limit)),
                Part::RetryAfter => write!(out, "{}", fired.retry_after),
            };
        }
        out
    }
}

/// Why the `LIMIT_RESPONSE_BODY` settings cannot be used; ratelimitd does not start then.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("LIMIT_RESPONSE_BODY_TEMPLATE: cannot read {}: {error}", path.display())]
    Unreadable {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("LIMIT_RESPONSE_BODY=template needs LIMIT_RESPONSE_BODY_TEMPLATE (the template file)")]
    NoTemplate,
    #[error("LIMIT_RESPONSE_BODY_TEMPLATE is set but LIMIT_RESPONSE_BODY is {0}; set LIMIT_RESPONSE_BODY=template to use it")]
    TemplateUnused(&'static str),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fired(rule: &str) -> Fired<'_> {
        Fired {
            rule,
            limit: Limit::fixed(100, Unit::Minute),
            retry_after: 42,
        }
    }

    #[test]
    fn problem_json_is_rfc_9457_with_the_rule_limit_window_and_wait() {
        let (body, ct) = LimitBody::ProblemJson.render(&fired("per-user")).unwrap();
        assert_eq!(ct, "application/problem+json");
        assert_eq!(
            String::from_utf8(body).unwrap(),
            r#"{"type":"about:blank","title":"Too Many Requests","status":429,"detail":"rate limit of 100 requests per 1m exceeded (rule per-user); retry after 42 s","rule":"per-user","limit":100,"window":"1m","retry_after":42}"#
        );
    }

    #[test]
    fn problem_json_escapes_a_path_with_quotes() {
        let (body, _) = LimitBody::ProblemJson
            .render(&fired(r#"d > k="v" > x"#))
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["rule"], r#"d > k="v" > x"#);
    }

    #[test]
    fn no_body_by_default() {
        assert_eq!(LimitBody::default().render(&fired("r")), None);
    }

    #[test]
    fn windows_carry_the_multiplier_and_unit() {
        let mut l = Limit::fixed(1, Unit::Hour);
        assert_eq!(window(l), "1h");
        l.multiplier = 5;
        l.unit = Unit::Second;
        assert_eq!(window(l), "5s");
        l.unit = Unit::Month;
        assert_eq!(window(l), "5mo");
    }

    #[test]
    fn templates_fill_each_placeholder_once_and_keep_other_braces() {
        let t = Template::parse(
            "{\"r\":\"{rule}\",\"n\":{limit},\"w\":\"{window}\",\"s\":{retry_after}} {other} {rule}",
            "application/json".into(),
        );
        // A rule whose name looks like a placeholder is not filled in again.
        let body = LimitBody::Template(t);
        let (body, ct) = body.render(&fired("{limit}")).unwrap();
        assert_eq!(ct, "application/json");
        assert_eq!(
            String::from_utf8(body).unwrap(),
            "{\"r\":\"{limit}\",\"n\":100,\"w\":\"1m\",\"s\":42} {other} {limit}"
        );
    }

    #[test]
    fn templates_keep_text_without_placeholders_and_multibyte_text() {
        let t = Template::parse("zu viele Anfragen – später", TEMPLATE_CONTENT_TYPE.into());
        let body = LimitBody::Template(t);
        let (body, ct) = body.render(&fired("r")).unwrap();
        assert_eq!(
            (body.as_slice(), ct),
            ("zu viele Anfragen – später".as_bytes(), "text/plain")
        );
    }

    #[test]
    fn settings_name_a_mode_and_refuse_a_template_left_unused() {
        assert_eq!("Problem-JSON".parse(), Ok(BodyMode::ProblemJson));
        assert!("json".parse::<BodyMode>().is_err());
        let from = |m, t: Option<&str>| LimitBody::from_settings(m, t.map(Path::new), "text/plain");
        assert_eq!(from(BodyMode::None, None).unwrap(), LimitBody::None);
        assert_eq!(
            from(BodyMode::ProblemJson, None).unwrap(),
            LimitBody::ProblemJson
        );
        assert_eq!(
            from(BodyMode::Template, None).unwrap_err().to_string(),
            "LIMIT_RESPONSE_BODY=template needs LIMIT_RESPONSE_BODY_TEMPLATE (the template file)"
        );
        assert_eq!(
            from(BodyMode::ProblemJson, Some("/t")).unwrap_err().to_string(),
            "LIMIT_RESPONSE_BODY_TEMPLATE is set but LIMIT_RESPONSE_BODY is problem-json; set LIMIT_RESPONSE_BODY=template to use it"
        );
    }

    #[test]
    fn an_unreadable_template_names_the_setting_and_file() {
        let e =
            Template::read(Path::new("/nonexistent/body.tmpl"), "text/plain".into()).unwrap_err();
        assert!(e
            .to_string()
            .starts_with("LIMIT_RESPONSE_BODY_TEMPLATE: cannot read /nonexistent/body.tmpl: "));
    }
}
