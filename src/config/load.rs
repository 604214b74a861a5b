//! Finds and reads config files: every `*.yaml`/`*.yml` under a directory (recursively, in
//! path order), or one file.

use std::path::{Path, PathBuf};

use super::{compile_with, error::LOADING, parse_lenient, ConfigError, ConfigErrors, RuleTree};
use crate::limiter::Algorithm;

/// Where rules come from and how to read them.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    /// A directory (searched recursively) or a single file.
    pub path: PathBuf,
    /// Skip files and directories whose name starts with `.` (`RUNTIME_IGNOREDOTFILES`).
    pub ignore_dotfiles: bool,
    /// Merge files that name the same domain (`MERGE_DOMAIN_CONFIG`).
    pub merge_domains: bool,
    /// The algorithm of limits that name none (`DEFAULT_ALGORITHM`).
    pub default_algorithm: Algorithm,
}

/// The rule files at `source`, in load order: every `*.yaml`/`*.yml` under a directory
/// (recursively, sorted by path), or the one file. Hot reload hashes the same list.
pub(crate) fn list_files(source: &ConfigSource) -> std::io::Result<Vec<PathBuf>> {
    if source.path.is_dir() {
        let mut files = Vec::new();
        collect(&source.path, source.ignore_dotfiles, &mut files)?;
        files.sort();
        Ok(files)
    } else if source.path.is_file() {
        Ok(vec![source.path.clone()])
    } else {
        Err(std::io::Error::from(std::io::ErrorKind::NotFound))
    }
}

/// Reads, validates and compiles everything at `source`.
pub fn load_dir_or_file(source: &ConfigSource) -> Result<RuleTree, ConfigErrors> {
    Snapshot::read(source).compile(source)
}

/// Reads everything at `source` once, and returns the [`content_hash`] of those bytes along
/// with the tree compiled from the very same bytes, so the hash always describes the tree.
pub fn load_hashed(source: &ConfigSource) -> (u64, Result<RuleTree, ConfigErrors>) {
    let snapshot = Snapshot::read(source);
    (snapshot.content_hash(source), snapshot.compile(source))
}

/// Hash of the files' (path relative to the source, contents) in load order; see `Fnv` for
/// why it is stable. Reads every file once.
pub fn content_hash(source: &ConfigSource) -> u64 {
    Snapshot::read(source).content_hash(source)
}

/// The config files at one moment: every file's bytes (or why it could not be read), in load
/// order. Hot reload hashes and compiles the same snapshot, so each file is read exactly once
/// per attempt and the hash it keeps is the hash of the bytes it compiled.
pub(crate) struct Snapshot {
    /// The listing, or why the path could not be listed.
    files: std::io::Result<Vec<(PathBuf, std::io::Result<Vec<u8>>)>>,
}

impl Snapshot {
    /// Lists the files at `source` and reads each one.
    pub(crate) fn read(source: &ConfigSource) -> Self {
        let files = list_files(source).map(|files| {
            files
                .into_iter()
                .map(|f| {
                    let bytes = std::fs::read(&f);
                    (f, bytes)
                })
                .collect()
        });
        Self { files }
    }

    /// [`content_hash`] of these bytes.
    pub(crate) fn content_hash(&self, source: &ConfigSource) -> u64 {
        let mut h = Fnv::new();
        match &self.files {
            Ok(files) => {
                for (file, bytes) in files {
                    let rel = file.strip_prefix(&source.path).unwrap_or(file);
                    h.field(rel.as_os_str().as_encoded_bytes());
                    match bytes {
                        Ok(bytes) => h.field(b"ok").field(bytes),
                        Err(e) => h.field(b"err").field(e.to_string().as_bytes()),
                    };
                }
            }
            Err(e) => {
                h.field(b"unreadable").field(e.to_string().as_bytes());
            }
        }
        h.0
    }

    /// Validates and compiles these bytes.
    pub(crate) fn compile(&self, source: &ConfigSource) -> Result<RuleTree, ConfigErrors> {
        let shown = source.path.display().to_string();
        let files = match &self.files {
            Ok(files) => files,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !source.path.exists() => {
                return Err(one(&shown, "no such file or directory".to_owned()))
            }
            Err(e) => return Err(one(&shown, format!("cannot read directory: {e}"))),
        };
        let mut parsed = Vec::with_capacity(files.len());
        let mut errors = Vec::new();
        for (f, bytes) in files {
            let name = f.display().to_string();
            // Bytes that are not UTF-8 get the message `std::fs::read_to_string` gives for them,
            // after the reference's words (its YAML reader refuses them).
            let text = bytes
                .as_ref()
                .map_err(|e| format!("cannot read: {e}"))
                .and_then(|b| {
                    std::str::from_utf8(b)
                        .map_err(|_| format!("{LOADING}: stream did not contain valid UTF-8"))
                });
            match text {
                Ok(text) => {
                    let (raw, mut e) = parse_lenient(&name, text);
                    errors.append(&mut e);
                    if let Some(raw) = raw {
                        parsed.push((name, raw));
                    }
                }
                Err(message) => errors.push(ConfigError::new(&name, "", "", message)),
            }
        }
        match compile_with(&parsed, source.merge_domains, source.default_algorithm) {
            Ok(tree) if errors.is_empty() => Ok(tree),
            Ok(_) => Err(ConfigErrors(errors)),
            Err(ConfigErrors(mut more)) => {
                errors.append(&mut more);
                Err(ConfigErrors(errors))
            }
        }
    }
}

/// FNV-1a, 64 bits. The content hash is published as the `ratelimitd_config_info{hash}`
/// label and compared across reloads, restarts and instances ("are all replicas on the same
/// config?"), so it must be the same for the same bytes in every process and every build:
/// `std`'s `DefaultHasher` promises neither (its algorithm may change between Rust releases).
/// Speed is no concern (a few kilobytes per reload) and the hash guards against nobody, so
/// a dependency for a stronger one is not worth it.
pub(crate) struct Fnv(pub(crate) u64);

impl Fnv {
    pub(crate) fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
    pub(crate) fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        self
    }
    /// A length-prefixed field, so ("ab", "c") and ("a", "bc") differ.
    pub(crate) fn field(&mut self, bytes: &[u8]) -> &mut Self {
        self.bytes(&(bytes.len() as u64).to_le_bytes()).bytes(bytes)
    }
}

fn one(file: &str, message: String) -> ConfigErrors {
    ConfigErrors(vec![ConfigError::new(file, "", "", message)])
}

fn collect(dir: &Path, ignore_dotfiles: bool, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if ignore_dotfiles && name.to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        // Like the reference (Go's filepath.Walk), descend into real directories only, so a
        // symlinked directory is never read twice or looped through; symlinked files are read.
        let file_type = entry.file_type()?;
        if file_type.is_dir() {
            collect(&path, ignore_dotfiles, out)?;
        } else if path.is_file() && is_yaml(&path) {
            out.push(path);
        }
    }
    Ok(())
}

fn is_yaml(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    )
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::config::test_support::{dir_with, rules_yaml};

    #[test]
    fn content_hash_covers_relative_paths_and_contents() {
        let source = |d: &tempfile::TempDir| ConfigSource {
            path: d.path().to_owned(),
            ignore_dotfiles: false,
            merge_domains: false,
            default_algorithm: Algorithm::FixedWindow,
        };
        let a = dir_with(&[("r.yaml", rules_yaml("d", 1))]);
        let b = dir_with(&[("r.yaml", rules_yaml("d", 1))]);
        let c = dir_with(&[("s.yaml", rules_yaml("d", 1))]);
        let d = dir_with(&[("r.yaml", rules_yaml("d", 2))]);
        assert_eq!(content_hash(&source(&a)), content_hash(&source(&b)));
        assert_ne!(content_hash(&source(&a)), content_hash(&source(&c)));
        assert_ne!(content_hash(&source(&a)), content_hash(&source(&d)));
        // Not yaml: not part of the config.
        fs::write(a.path().join("notes.txt"), "x").unwrap();
        assert_eq!(content_hash(&source(&a)), content_hash(&source(&b)));
        let mut fnv = Fnv::new();
        fnv.bytes(b"a");
        assert_eq!(fnv.0, 0xaf63_dc4c_8601_ec8c, "FNV-1a test vector");
    }

    #[test]
    fn unreadable_bytes_are_reported_as_read_to_string_reports_them() {
        let dir = dir_with(&[("r.yaml", rules_yaml("d", 1))]);
        let file = dir.path().join("r.yaml");
        fs::write(&file, b"domain: \xff\n").unwrap();
        let source = ConfigSource {
            path: dir.path().to_owned(),
            ignore_dotfiles: false,
            merge_domains: false,
            default_algorithm: Algorithm::FixedWindow,
        };
        let errors = load_dir_or_file(&source).expect_err("invalid UTF-8");
        let std_error = fs::read_to_string(&file).expect_err("invalid UTF-8");
        assert_eq!(
            errors.0[0].message,
            format!("error loading config file: {std_error}")
        );
    }

    #[test]
    fn load_hashed_hashes_the_bytes_it_compiles() {
        let dir = dir_with(&[("r.yaml", rules_yaml("d", 1))]);
        let source = ConfigSource {
            path: dir.path().to_owned(),
            ignore_dotfiles: false,
            merge_domains: false,
            default_algorithm: Algorithm::FixedWindow,
        };
        let (hash, tree) = load_hashed(&source);
        assert_eq!(hash, content_hash(&source));
        assert_eq!(tree.expect("valid").domains.len(), 1);
    }
}
