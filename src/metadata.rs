//! `RESPONSE_DYNAMIC_METADATA`: the response's `dynamic_metadata`, as envoyproxy/ratelimit
//! builds it (its PRs #1027 and #1112), and the rules' `metadata:` blocks it carries.
//!
//! The Struct holds `domain` (string), `descriptors` (a list, one Struct per request
//! descriptor: `entries` as `key=value` strings, `limit` as the override's text form when
//! Envoy sent one, `hitsAddend` as a number when the descriptor set it), `hitsAddend` (a
//! number, when the request's is not 0) and `metadata`: the `metadata:` blocks of the rules
//! of the descriptors that passed (not over their limit, not `unlimited`), merged in request
//! order (the first value of a key wins; two mappings under one key are merged the same
//! way), left out when there are none.

use std::collections::BTreeMap;

use prost_types::{value::Kind, ListValue, Struct, Value};
use serde_norway::Value as Yaml;

use crate::proto::envoy::{
    extensions::common::ratelimit::v3::RateLimitDescriptor, r#type::v3::RateLimitUnit,
    service::ratelimit::v3::RateLimitRequest,
};

/// A rule's `metadata:` mapping as a Struct, as the reference converts it (numbers as
/// doubles, keys of nested mappings as text); `None` when absent or empty.
pub fn from_yaml(yaml: &Yaml) -> Option<Struct> {
    match yaml {
        Yaml::Mapping(m) if !m.is_empty() => Some(mapping(m)),
        Yaml::Tagged(t) => from_yaml(&t.value),
        _ => None,
    }
}

fn mapping(m: &serde_norway::Mapping) -> Struct {
    Struct {
        fields: m.iter().map(|(k, v)| (key_text(k), value(v))).collect(),
    }
}

/// A mapping key as Go's `%v` prints it.
fn key_text(k: &Yaml) -> String {
    match k {
        Yaml::String(s) => s.clone(),
        Yaml::Bool(b) => b.to_string(),
        Yaml::Number(n) => n.to_string(),
        Yaml::Null => "<nil>".to_owned(),
        Yaml::Tagged(t) => key_text(&t.value),
        other => serde_norway::to_string(other)
            .map(|s| s.trim_end().to_owned())
            .unwrap_or_default(),
    }
}

fn value(v: &Yaml) -> Value {
    let kind = match v {
        Yaml::Null => Kind::NullValue(0),
        Yaml::Bool(b) => Kind::BoolValue(*b),
        Yaml::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        Yaml::String(s) => Kind::StringValue(s.clone()),
        Yaml::Sequence(items) => Kind::ListValue(ListValue {
            values: items.iter().map(value).collect(),
        }),
        Yaml::Mapping(m) => Kind::StructValue(mapping(m)),
        Yaml::Tagged(t) => return value(&t.value),
    };
    Value { kind: Some(kind) }
}

/// Merges `src` into `dest`: a key already there keeps its value, unless both are Structs,
/// which are merged the same way.
pub fn merge(dest: &mut Struct, src: &Struct) {
    for (k, v) in &src.fields {
        match dest.fields.get_mut(k) {
            Some(Value {
                kind: Some(Kind::StructValue(d)),
            }) => {
                if let Some(Kind::StructValue(s)) = &v.kind {
                    merge(d, s);
                }
            }
            Some(_) => {}
            None => {
                dest.fields.insert(k.clone(), v.clone());
            }
        }
    }
}

/// The response's `dynamic_metadata` for `req`; `passed` is the merged `metadata:` of the
/// descriptors that passed.
pub fn dynamic_metadata(req: &RateLimitRequest, passed: Struct) -> Struct {
    let mut fields = BTreeMap::new();
    fields.insert("domain".to_owned(), string(req.domain.clone()));
    let descriptors = req.descriptors.iter().map(descriptor).collect();
    fields.insert(
        "descriptors".to_owned(),
        Value {
            kind: Some(Kind::ListValue(ListValue {
                values: descriptors,
            })),
        },
    );
    if req.hits_addend != 0 {
        fields.insert("hitsAddend".to_owned(), number(req.hits_addend as f64));
    }
    if !passed.fields.is_empty() {
        fields.insert(
            "metadata".to_owned(),
            Value {
                kind: Some(Kind::StructValue(passed)),
            },
        );
    }
    Struct { fields }
}

fn descriptor(d: &RateLimitDescriptor) -> Value {
    let mut fields = BTreeMap::new();
    let entries = d
        .entries
        .iter()
        .map(|e| string(format!("{}={}", e.key, e.value)))
        .collect();
    fields.insert(
        "entries".to_owned(),
        Value {
            kind: Some(Kind::ListValue(ListValue { values: entries })),
        },
    );
    if let Some(limit) = &d.limit {
        // Go's text form of the override (`requests_per_unit:10 unit:SECOND`, zero fields
        // left out); Go randomly doubles some of its spaces, we never do.
        let mut parts = Vec::new();
        if limit.requests_per_unit != 0 {
            parts.push(format!("requests_per_unit:{}", limit.requests_per_unit));
        }
        if limit.unit != 0 {
            let unit = RateLimitUnit::try_from(limit.unit)
                .map(|u| u.as_str_name().to_owned())
                .unwrap_or_else(|_| limit.unit.to_string());
            parts.push(format!("unit:{unit}"));
        }
        fields.insert("limit".to_owned(), string(parts.join(" ")));
    }
    if let Some(hits) = d.hits_addend {
        fields.insert("hitsAddend".to_owned(), number(hits as f64));
    }
    Value {
        kind: Some(Kind::StructValue(Struct { fields })),
    }
}

fn string(s: String) -> Value {
    Value {
        kind: Some(Kind::StringValue(s)),
    }
}

fn number(n: f64) -> Value {
    Value {
        kind: Some(Kind::NumberValue(n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(s: &str) -> Yaml {
        serde_norway::from_str(s).unwrap()
    }

    #[test]
    fn yaml_becomes_a_struct_and_empty_is_none() {
        assert_eq!(from_yaml(&yaml("{}")), None);
        let s = from_yaml(&yaml("a: 1\nb: [x, true]\nc: {1: null}")).unwrap();
        assert_eq!(s.fields["a"].kind, Some(Kind::NumberValue(1.0)));
        let Some(Kind::StructValue(c)) = &s.fields["c"].kind else {
            panic!("c is a struct")
        };
        assert_eq!(c.fields["1"].kind, Some(Kind::NullValue(0)));
    }

    #[test]
    fn merge_keeps_the_first_value_and_merges_structs() {
        let mut dest = from_yaml(&yaml("name: a\nnested: {x: 1}")).unwrap();
        merge(
            &mut dest,
            &from_yaml(&yaml("name: b\nother: 2\nnested: {x: 2, y: 3}")).unwrap(),
        );
        assert_eq!(
            dest,
            from_yaml(&yaml("name: a\nother: 2\nnested: {x: 1, y: 3}")).unwrap()
        );
    }
}
