//! Config errors: every one names the file, the descriptor path and the field, so a user can
//! go straight to the line that is wrong.

use std::fmt;

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
