//! Finds and reads config files: every `*.yaml`/`*.yml` under a directory (recursively, in
//! path order), or one file.

use std::path::{Path, PathBuf};

use super::{compile, parse_lenient, ConfigError, ConfigErrors, RuleTree};

/// Where rules come from and how to read them.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    /// A directory (searched recursively) or a single file.
    pub path: PathBuf,
    /// Skip files and directories whose name starts with `.` (`RUNTIME_IGNOREDOTFILES`).
    pub ignore_dotfiles: bool,
    /// Merge files that name the same domain (`MERGE_DOMAIN_CONFIG`).
    pub merge_domains: bool,
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
    let shown = source.path.display().to_string();
    let files = match list_files(source) {
        Ok(files) => files,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !source.path.exists() => {
            return Err(one(&shown, "no such file or directory".to_owned()))
        }
        Err(e) => return Err(one(&shown, format!("cannot read directory: {e}"))),
    };
    let mut parsed = Vec::with_capacity(files.len());
    let mut errors = Vec::new();
    for f in files {
        let name = f.display().to_string();
        match std::fs::read_to_string(&f) {
            Ok(text) => {
                let (raw, mut e) = parse_lenient(&name, &text);
                errors.append(&mut e);
                if let Some(raw) = raw {
                    parsed.push((name, raw));
                }
            }
            Err(e) => errors.push(ConfigError::new(&name, "", "", format!("cannot read: {e}"))),
        }
    }
    match compile(&parsed, source.merge_domains) {
        Ok(tree) if errors.is_empty() => Ok(tree),
        Ok(_) => Err(ConfigErrors(errors)),
        Err(ConfigErrors(mut more)) => {
            errors.append(&mut more);
            Err(ConfigErrors(errors))
        }
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
