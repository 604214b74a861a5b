//! What the reference's YAML library, yaml.v2 (YAML 1.1), makes of a rule file where
//! serde_norway (YAML 1.2) differs, so ours reads and reports it alike: rule strings as
//! written, YAML 1.1's boolean words ([`yaml11_bool`]), and values printed as Go prints them
//! in the reference's errors ([`go_value`]).
//!
//! Rule strings as written: yaml.v2 gives a Go string field a plain scalar's own text even
//! where YAML reads a number or a boolean: `value: 0x1F` is `0x1F`, `+5` is `+5`, `True` is
//! `True`. serde_norway's `Value` keeps only the number or
//! the boolean (`31`, `5`, `true`), so a rule would match, key and name differently than the
//! reference's. The file is therefore read a second time into this mirror of the string
//! fields that reach matching, counter keys or answers (`domain`, `key`, `value`, a rate
//! limit's `name` and `replaces` names), asking serde_norway for strings, which it gives as
//! written. A file the mirror cannot read (a field of the wrong shape) has errors the main
//! parse reports; the mirror is then not needed.

use serde::{de, Deserialize, Deserializer};
use serde_norway::Value;

/// A string field as written; `None` when absent. Consulted only where the main parse read
/// a number or a boolean (a null is `~` here, and absent there).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Text(pub Option<String>);

impl Text {
    pub fn get(&self) -> Option<&str> {
        self.0.as_deref()
    }
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = Text;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a scalar")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Text, E> {
                Ok(Text(Some(s.to_owned())))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Text, E> {
                Ok(Text(None))
            }
        }
        d.deserialize_str(Visitor)
    }
}

/// A rule file's string fields as written.
#[derive(Debug, Default, Deserialize)]
pub struct FileText {
    #[serde(default)]
    pub domain: Text,
    #[serde(default)]
    pub descriptors: Option<Vec<DescriptorText>>,
}

/// A descriptor's string fields as written.
#[derive(Debug, Default, Deserialize)]
pub struct DescriptorText {
    #[serde(default)]
    pub key: Text,
    #[serde(default)]
    pub value: Text,
    #[serde(default)]
    pub rate_limit: Option<RateLimitText>,
    #[serde(default)]
    pub descriptors: Option<Vec<DescriptorText>>,
}

/// A `rate_limit` block's names as written.
#[derive(Debug, Default, Deserialize)]
pub struct RateLimitText {
    #[serde(default)]
    pub name: Text,
    #[serde(default)]
    pub replaces: Option<Vec<NameText>>,
}

/// A `replaces` item as written.
#[derive(Debug, Default, Deserialize)]
pub struct NameText {
    #[serde(default)]
    pub name: Text,
}

/// The mirror of `text`, or `None` when it does not fit the rule shape.
pub fn read(text: &str) -> Option<FileText> {
    serde_norway::from_str(text).ok()
}

/// The `i`th descriptor of an optional mirror list.
pub fn nth(list: Option<&[DescriptorText]>, i: usize) -> Option<&DescriptorText> {
    list.and_then(|l| l.get(i))
}

/// A YAML 1.1 boolean word (yaml.v2's table) that YAML 1.2 reads as a string.
pub fn yaml11_bool(s: &str) -> Option<bool> {
    match s {
        "y" | "Y" | "yes" | "Yes" | "YES" | "on" | "On" | "ON" => Some(true),
        "n" | "N" | "no" | "No" | "NO" | "off" | "Off" | "OFF" => Some(false),
        _ => None,
    }
}

/// What `v` is, for error messages.
pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

/// `v` as the reference's error texts print it (Go's `%v` of what yaml.v2 decodes): scalars
/// as written, `<nil>`, `[a b]` for a list, `map[k:v]` (keys sorted) for a mapping.
pub fn go_value(v: &Value) -> String {
    match v {
        Value::Null => "<nil>".to_owned(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        Value::Sequence(items) => {
            let items: Vec<String> = items.iter().map(go_value).collect();
            format!("[{}]", items.join(" "))
        }
        Value::Mapping(m) => {
            let mut pairs: Vec<(String, String)> =
                m.iter().map(|(k, v)| (go_value(k), go_value(v))).collect();
            pairs.sort();
            let pairs: Vec<String> = pairs.into_iter().map(|(k, v)| format!("{k}:{v}")).collect();
            format!("map[{}]", pairs.join(" "))
        }
        Value::Tagged(t) => go_value(&t.value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars_read_as_numbers_or_booleans_keep_their_text() {
        let f = read(
            "domain: 0x10\ndescriptors:\n  - key: +5\n    value: True\n    rate_limit: {name: 0o17, unit: minute, requests_per_unit: 1, replaces: [{name: 1_0}]}\n  - key: k\n    descriptors: [{key: '007', value: 1e3}]\n",
        )
        .unwrap();
        assert_eq!(f.domain.get(), Some("0x10"));
        let d = f.descriptors.unwrap();
        assert_eq!(d[0].key.get(), Some("+5"));
        assert_eq!(d[0].value.get(), Some("True"));
        let rl = d[0].rate_limit.as_ref().unwrap();
        assert_eq!(rl.name.get(), Some("0o17"));
        assert_eq!(rl.replaces.as_ref().unwrap()[0].name.get(), Some("1_0"));
        let inner = d[1].descriptors.as_ref().unwrap();
        assert_eq!(inner[0].key.get(), Some("007"));
        assert_eq!(inner[0].value.get(), Some("1e3"));
    }

    #[test]
    fn a_file_of_another_shape_has_no_mirror() {
        assert!(read("domain: {a: b}\n").is_none());
        assert!(read("descriptors: 5\n").is_none());
    }
}
