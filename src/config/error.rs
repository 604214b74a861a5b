//! Config errors: every one names the file, the descriptor path and the field, so a user can
//! go straight to the line that is wrong.
//!
//! After that location, a message whose error the reference (envoyproxy/ratelimit,
//! `src/config/config_impl.go`) also reports starts with the reference's own words for it, so
//! that alerts and log searches written for the reference keep matching; our details follow in
//! parentheses (`config error, unknown key 'shadowmode' (expected one of: ...)`), or, where the
//! reference's text ends in a YAML library's message (`error loading config file: ...`), take
//! that message's place. Errors the reference has no counterpart for are in our words only.

use std::fmt;

/// The reference's words for the errors of a file it cannot load: a YAML syntax error, or a
/// value of the wrong type (its second, typed `yaml.Unmarshal`).
pub(crate) const LOADING: &str = "error loading config file";

/// The reference's words for a value that is neither a string, a whole number fitting Go's
/// `int`, a boolean, a list nor a mapping (a fraction, say), found by its `validateYamlKeys`.
pub(crate) const CHECKING: &str = "error checking config";

/// The reference's words for a field name it does not know; `name` as written.
pub(crate) fn unknown_key(name: &str) -> String {
    format!("config error, unknown key '{name}'")
}

/// The reference's words for a field name that is not a string; `key` as Go's `%v` prints it.
pub(crate) fn key_not_string(key: &str) -> String {
    format!("config error, key is not of type string: {key}")
}

/// The reference's words for a list item that is not a mapping; `item` as Go's `%v` prints it.
pub(crate) fn list_item_not_map(item: &str) -> String {
    format!("config error, yaml file contains list of type other than map: {item}")
}

/// One problem in one config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file, as the user named it (relative to the config directory's parent when loaded
    /// from a directory).
    pub file: String,
    /// Descriptor path such as `messaging > message_type=marketing > to_number`; empty for
    /// problems with the file as a whole.
    pub path: String,
    /// The offending field, e.g. `rate_limit.unit`; empty when the problem is not one field.
    pub field: String,
    /// What is wrong, for people.
    pub message: String,
}

impl ConfigError {
    pub fn new(
        file: &str,
        path: &str,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            file: file.to_owned(),
            path: path.to_owned(),
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if !self.path.is_empty() {
            write!(f, ": {}", self.path)?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// All problems found in a config set; a config with any is never used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(f, "{n} config error{}", if n == 1 { "" } else { "s" })?;
        for e in &self.0 {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}
