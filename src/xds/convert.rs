//! `RateLimitConfig` resources to rules, as the reference's `ConfigXdsProtoToYaml` converts
//! them, then the same compiler and checks as rule files.
//!
//! We build [`RawFile`]s straight from the protos instead of rendering YAML and parsing it
//! back: the reference hands its converted structs to the loader without YAML too, so there
//! is no YAML-only check (unknown keys, scalar types) to keep, and the proto's own types
//! (enum units, uint32 counts) cannot be misread on the way. Each resource's `name` stands
//! where a file name stands in errors, as in the reference's.

use prost::Message;
use prost_types::Any;

use crate::{
    config::{compile_with, ConfigError, ConfigErrors, RawDescriptor, RawFile, RawRateLimit},
    limiter::Algorithm,
    proto::ratelimit::config::ratelimit::v3::{
        RateLimitConfig, RateLimitDescriptor, RateLimitPolicy, RateLimitUnit,
    },
};

use crate::config::RuleTree;

/// The resource type ratelimitd subscribes to.
pub const TYPE_URL: &str = "type.googleapis.com/ratelimit.config.ratelimit.v3.RateLimitConfig";

/// Decodes and compiles one response's resources (the whole state of the world, in order),
/// merging domains under `MERGE_DOMAIN_CONFIG` as files are merged.
pub fn compile_resources(
    resources: &[Any],
    merge_domains: bool,
    default_algorithm: Algorithm,
) -> Result<RuleTree, ConfigErrors> {
    let mut files = Vec::with_capacity(resources.len());
    let mut errors = Vec::new();
    for (i, any) in resources.iter().enumerate() {
        let shown = format!("resources[{i}]");
        if any.type_url != TYPE_URL {
            errors.push(ConfigError::new(
                &shown,
                "",
                "",
                format!(
                    "mismatched message type: got \"{}\", want \"{TYPE_URL}\"",
                    any.type_url
                ),
            ));
            continue;
        }
        match RateLimitConfig::decode(any.value.as_slice()) {
            Ok(conf) => {
                let name = if conf.name.is_empty() {
                    shown
                } else {
                    conf.name.clone()
                };
                let raw = to_raw(&name, &conf, &mut errors);
                files.push((name, raw));
            }
            Err(e) => errors.push(ConfigError::new(
                &shown,
                "",
                "",
                format!("cannot decode RateLimitConfig: {e}"),
            )),
        }
    }
    match compile_with(&files, merge_domains, default_algorithm) {
        Ok(tree) if errors.is_empty() => Ok(tree),
        Ok(_) => Err(ConfigErrors(errors)),
        Err(ConfigErrors(more)) => {
            errors.extend(more);
            Err(ConfigErrors(errors))
        }
    }
}

/// One resource as a rule file. The checks the YAML reader makes on what it reads (empty
/// domain, empty key) are made here, in its words; the compiler makes all the others.
pub fn to_raw(name: &str, conf: &RateLimitConfig, errors: &mut Vec<ConfigError>) -> RawFile {
    let path = if conf.domain.is_empty() {
        errors.push(ConfigError::new(
            name,
            "",
            "domain",
            "config file cannot have empty domain",
        ));
        "<no domain>".to_owned()
    } else {
        conf.domain.clone()
    };
    RawFile {
        domain: conf.domain.clone(),
        descriptors: descriptors(name, &path, &conf.descriptors, errors),
    }
}

fn descriptors(
    name: &str,
    parent: &str,
    list: &[RateLimitDescriptor],
    errors: &mut Vec<ConfigError>,
) -> Vec<RawDescriptor> {
    list.iter()
        .enumerate()
        .map(|(i, d)| {
            let value = (!d.value.is_empty()).then(|| d.value.clone());
            let path = match (&d.key, &value) {
                (k, _) if k.is_empty() => format!("{parent} > descriptors[{i}]"),
                (k, Some(v)) => format!("{parent} > {k}={v}"),
                (k, None) => format!("{parent} > {k}"),
            };
            if d.key.is_empty() {
                errors.push(ConfigError::new(
                    name,
                    &path,
                    "key",
                    "descriptor has empty key",
                ));
            }
            RawDescriptor {
                key: d.key.clone(),
                value,
                rate_limit: d.rate_limit.as_ref().map(policy),
                rate_limits: None,
                shadow_mode: d.shadow_mode,
                quota_mode: d.quota_mode,
                detailed_metric: d.detailed_metric,
                // Not in the proto: the reference's conversion leaves them false.
                value_to_metric: false,
                share_threshold: false,
                metadata: d.metadata.clone().filter(|m| !m.fields.is_empty()),
                descriptors: descriptors(name, &path, &d.descriptors, errors),
                path,
            }
        })
        .collect()
}

/// A policy as the reference reads it: the unit by its enum name (`UNKNOWN` is no unit:
/// refused unless `unlimited`, as there), `requests_per_unit` always present (proto3 has no
/// absence) except under `unlimited`, where the reference ignores it.
fn policy(p: &RateLimitPolicy) -> RawRateLimit {
    let unit = match RateLimitUnit::try_from(p.unit) {
        Ok(RateLimitUnit::Unknown) if p.unlimited => None,
        Ok(u) => Some(u.as_str_name().to_owned()),
        // Go prints an enum value it has no name for as its number.
        Err(_) => Some(p.unit.to_string()),
    };
    RawRateLimit {
        unit,
        requests_per_unit: (!p.unlimited).then_some(p.requests_per_unit),
        unlimited: p.unlimited,
        name: (!p.name.is_empty()).then(|| p.name.clone()),
        replaces: p.replaces.iter().map(|r| r.name.clone()).collect(),
        ..RawRateLimit::default()
    }
}

/// FNV-1a of the resources (type URL and bytes, in order): the content hash published for a
/// config that came over xDS, as the files' hash is for files.
pub fn content_hash(resources: &[Any]) -> u64 {
    let mut h = crate::config::load::Fnv::new();
    for r in resources {
        h.field(r.type_url.as_bytes()).field(&r.value);
    }
    h.0
}

#[cfg(test)]
mod tests {
    use prost_types::{value::Kind, Struct, Value};

    use super::*;
    use crate::proto::ratelimit::config::ratelimit::v3::RateLimitReplace;

    fn any(conf: &RateLimitConfig) -> Any {
        Any {
            type_url: TYPE_URL.to_owned(),
            value: conf.encode_to_vec(),
        }
    }

    fn desc(key: &str, value: &str, policy: Option<RateLimitPolicy>) -> RateLimitDescriptor {
        RateLimitDescriptor {
            key: key.to_owned(),
            value: value.to_owned(),
            rate_limit: policy,
            ..Default::default()
        }
    }

    fn limit(unit: RateLimitUnit, n: u32) -> RateLimitPolicy {
        RateLimitPolicy {
            unit: unit as i32,
            requests_per_unit: n,
            ..Default::default()
        }
    }

    fn compile(confs: &[RateLimitConfig]) -> Result<RuleTree, ConfigErrors> {
        let resources: Vec<Any> = confs.iter().map(any).collect();
        compile_resources(&resources, false, Algorithm::FixedWindow)
    }

    #[test]
    fn a_config_converts_as_the_reference_converts_it() {
        let mut nested = desc("k2", "", Some(limit(RateLimitUnit::Week, 7)));
        nested.shadow_mode = true;
        nested.metadata = Some(Struct {
            fields: [(
                "team".to_owned(),
                Value {
                    kind: Some(Kind::StringValue("a".to_owned())),
                },
            )]
            .into(),
        });
        let mut top = desc("k1", "v1", Some(limit(RateLimitUnit::Minute, 10)));
        top.descriptors = vec![nested];
        let unlimited = desc(
            "free",
            "",
            Some(RateLimitPolicy {
                unlimited: true,
                requests_per_unit: 5,
                ..Default::default()
            }),
        );
        let conf = RateLimitConfig {
            name: "rl".to_owned(),
            domain: "d".to_owned(),
            descriptors: vec![top, unlimited],
        };
        let tree = compile(&[conf]).expect("valid");
        let lines: Vec<String> = tree.rules().iter().map(|r| r.dump_line()).collect();
        assert_eq!(
            lines,
            vec![
                "d.free: unit=UNKNOWN requests_per_unit=0, shadow_mode: false, quota_mode: false",
                "d.k1_v1: unit=MINUTE requests_per_unit=10, shadow_mode: false, quota_mode: false",
                "d.k1_v1.k2: unit=WEEK requests_per_unit=7, shadow_mode: true, quota_mode: false",
            ]
        );
        assert_eq!(tree.files, vec!["rl".to_owned()]);
        let rule = tree.rules()[2];
        assert!(rule.metadata.is_some());
    }

    #[test]
    fn errors_name_the_resource_and_the_descriptor_in_the_reference_words() {
        let bad_unit = desc("k", "v", Some(limit(RateLimitUnit::Unknown, 1)));
        let empty_key = desc("", "", None);
        let mut replaces = limit(RateLimitUnit::Second, 1);
        replaces.name = "same".to_owned();
        replaces.replaces = vec![RateLimitReplace {
            name: "same".to_owned(),
        }];
        let conf = RateLimitConfig {
            name: "rl".to_owned(),
            domain: "d".to_owned(),
            descriptors: vec![bad_unit, empty_key, desc("r", "", Some(replaces))],
        };
        let errors = compile(&[conf]).expect_err("invalid");
        let shown: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
        assert_eq!(shown.len(), 3, "{shown:?}");
        assert!(
            shown.contains(&"rl: d > descriptors[1]: key: descriptor has empty key".to_owned()),
            "{shown:?}"
        );
        assert!(
            shown.iter().any(|e| e
                .starts_with("rl: d > k=v: rate_limit.unit: invalid rate limit unit 'UNKNOWN'")),
            "{shown:?}"
        );
        assert!(shown.iter().any(|e| e.starts_with("rl: d > r: rate_limit.replaces[0].name: replaces should not contain name of same descriptor")), "{shown:?}");
    }

    #[test]
    fn resources_are_one_config_set() {
        let a = RateLimitConfig {
            name: "a".to_owned(),
            domain: "d".to_owned(),
            descriptors: vec![desc("k", "", Some(limit(RateLimitUnit::Second, 1)))],
        };
        let b = RateLimitConfig {
            name: "b".to_owned(),
            ..a.clone()
        };
        let errors = compile(&[a.clone(), b.clone()]).expect_err("duplicate domain");
        assert!(
            errors.0[0]
                .to_string()
                .starts_with("b: d: domain: duplicate domain 'd' in config file"),
            "{errors}"
        );
        let empty = RateLimitConfig {
            name: "e".to_owned(),
            ..Default::default()
        };
        let errors = compile(&[empty]).expect_err("empty domain");
        assert_eq!(
            errors.0[0].to_string(),
            "e: domain: config file cannot have empty domain"
        );
        let wrong = Any {
            type_url: "type.googleapis.com/other".to_owned(),
            value: vec![],
        };
        let errors = compile_resources(&[wrong], false, Algorithm::FixedWindow).expect_err("type");
        assert!(
            errors.0[0].message.starts_with("mismatched message type"),
            "{errors}"
        );
        let garbage = Any {
            type_url: TYPE_URL.to_owned(),
            value: vec![0xff, 0xff],
        };
        assert!(compile_resources(&[garbage], false, Algorithm::FixedWindow).is_err());
        // No resources: a valid, empty config.
        assert!(compile(&[]).expect("empty").domains.is_empty());
        assert_ne!(content_hash(&[any(&a)]), content_hash(&[any(&b)]));
    }
}
