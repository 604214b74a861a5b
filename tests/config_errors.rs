//! Every config error, one fixture each, checked word for word: the message names the file,
//! the descriptor path and the field. Also: `check-config` exit codes and `serve` refusing to
//! start on an invalid config.
#![allow(clippy::unwrap_used)]
mod support;

use ratelimitd::config::{load_dir_or_file, ConfigSource};

/// (fixture, every expected error line)
const CASES: &[(&str, &[&str])] = &[
    (
        "tests/config/bad/bad_flag.yaml",
        &["tests/config/bad/bad_flag.yaml: d > k: shadow_mode: expected true or false, found a string"],
    ),
    (
        "tests/config/bad/bad_unlimited.yaml",
        &["tests/config/bad/bad_unlimited.yaml: d > k: rate_limit.unlimited: expected true or false, found a string"],
    ),
    (
        "tests/config/bad/bad_unit.yaml",
        &["tests/config/bad/bad_unit.yaml: messaging > message_type=marketing > to_number: rate_limit.unit: invalid rate limit unit 'fortnight' (expected one of: second, minute, hour, day, week, month, year)"],
    ),
    (
        "tests/config/bad/descriptors_not_a_list.yaml",
        &["tests/config/bad/descriptors_not_a_list.yaml: d: descriptors: expected a list of descriptors, found a mapping"],
    ),
    (
        "tests/config/bad/duplicate_descriptor.yaml",
        &["tests/config/bad/duplicate_descriptor.yaml: d > k=v: key: duplicate descriptor composite key 'd.k_v'"],
    ),
    (
        "tests/config/bad/empty_domain.yaml",
        &["tests/config/bad/empty_domain.yaml: domain: config file cannot have empty domain"],
    ),
    (
        "tests/config/bad/empty_key.yaml",
        &["tests/config/bad/empty_key.yaml: d > descriptors[0]: key: descriptor has empty key"],
    ),
    (
        "tests/config/bad/fractional_limit.yaml",
        &["tests/config/bad/fractional_limit.yaml: d > k: rate_limit.requests_per_unit: must be a whole number, found 1.5"],
    ),
    (
        "tests/config/bad/huge_limit.yaml",
        &["tests/config/bad/huge_limit.yaml: d > k: rate_limit.requests_per_unit: 4294967296 is larger than 4294967295"],
    ),
    (
        "tests/config/bad/invalid_yaml.yaml",
        &["tests/config/bad/invalid_yaml.yaml: invalid YAML: did not find expected '-' indicator at line 4 column 4, while parsing a block collection at line 3 column 3"],
    ),
    (
        "tests/config/bad/missing_key.yaml",
        &["tests/config/bad/missing_key.yaml: d > descriptors[0]: key: descriptor has empty key"],
    ),
    (
        "tests/config/bad/missing_limit.yaml",
        &["tests/config/bad/missing_limit.yaml: d > k: rate_limit.requests_per_unit: missing; a rate_limit needs requests_per_unit (or unlimited: true)"],
    ),
    (
        "tests/config/bad/missing_unit.yaml",
        &["tests/config/bad/missing_unit.yaml: d > k: rate_limit.unit: missing; a rate_limit needs a unit (or unlimited: true)"],
    ),
    (
        "tests/config/bad/negative_limit.yaml",
        &["tests/config/bad/negative_limit.yaml: d > k: rate_limit.requests_per_unit: must not be negative, found -5"],
    ),
    (
        "tests/config/bad/non_string_key.yaml",
        &["tests/config/bad/non_string_key.yaml: d > k: field names must be strings, found the number 1"],
    ),
    (
        "tests/config/bad/replaces_empty.yaml",
        &["tests/config/bad/replaces_empty.yaml: d > k: rate_limit.replaces[0].name: should not have an empty replaces entry"],
    ),
    (
        "tests/config/bad/replaces_self.yaml",
        &["tests/config/bad/replaces_self.yaml: d > k: rate_limit.replaces[0].name: replaces should not contain name of same descriptor ('mine')"],
    ),
    (
        "tests/config/bad/several_errors.yaml",
        &["tests/config/bad/several_errors.yaml: d > b: rate_limit.requests_per_unit: must not be negative, found -1", "tests/config/bad/several_errors.yaml: d > b > c: typo: unknown field (expected one of: key, value, rate_limit, descriptors, shadow_mode, quota_mode, detailed_metric, value_to_metric, share_threshold, metadata)", "tests/config/bad/several_errors.yaml: d > a: rate_limit.unit: invalid rate limit unit 'eon' (expected one of: second, minute, hour, day, week, month, year)"],
    ),
    (
        "tests/config/bad/share_threshold_without_wildcard.yaml",
        &["tests/config/bad/share_threshold_without_wildcard.yaml: d > path=/exact: share_threshold: share_threshold can only be used with wildcard values (containing '*'), but found key 'path_/exact'"],
    ),
    (
        "tests/config/bad/string_limit.yaml",
        &["tests/config/bad/string_limit.yaml: d > k: rate_limit.requests_per_unit: expected a whole number, found a string"],
    ),
    (
        "tests/config/bad/too_deep_block.yaml",
        &["tests/config/bad/too_deep_block.yaml: invalid YAML: nesting deeper than 64 levels at line 3 column 129"],
    ),
    (
        "tests/config/bad/too_deep_flow.yaml",
        &["tests/config/bad/too_deep_flow.yaml: invalid YAML: nesting deeper than 64 levels at line 4 column 76"],
    ),
    (
        "tests/config/bad/unknown_descriptor_field.yaml",
        &["tests/config/bad/unknown_descriptor_field.yaml: d > k: shadowmode: unknown field (expected one of: key, value, rate_limit, descriptors, shadow_mode, quota_mode, detailed_metric, value_to_metric, share_threshold, metadata)"],
    ),
    (
        "tests/config/bad/unknown_field.yaml",
        &["tests/config/bad/unknown_field.yaml: d > k: rate_limit.request_per_unit: unknown field (expected one of: unit, requests_per_unit, unlimited, name, replaces)"],
    ),
    (
        "tests/config/bad/unknown_root_field.yaml",
        &["tests/config/bad/unknown_root_field.yaml: descriptor: unknown field (expected one of: domain, descriptors)"],
    ),
    (
        "tests/config/bad/unlimited_with_limit.yaml",
        &["tests/config/bad/unlimited_with_limit.yaml: d > k: rate_limit.requests_per_unit: should not specify requests_per_unit when unlimited"],
    ),
    (
        "tests/config/bad/unlimited_with_unit.yaml",
        &["tests/config/bad/unlimited_with_unit.yaml: d > k: rate_limit.unit: should not specify rate limit unit when unlimited"],
    ),
    (
        "tests/config/bad_dirs/duplicate_domain",
        &["tests/config/bad_dirs/duplicate_domain/b.yaml: d: domain: duplicate domain 'd' (also in tests/config/bad_dirs/duplicate_domain/a.yaml; set MERGE_DOMAIN_CONFIG=true to merge)"],
    ),
];

fn load(path: &str) -> Result<ratelimitd::config::RuleTree, Vec<String>> {
    load_dir_or_file(&ConfigSource {
        path: path.into(),
        ignore_dotfiles: false,
        merge_domains: false,
    })
    .map_err(|e| e.0.iter().map(ToString::to_string).collect())
}

#[test]
fn each_bad_fixture_fails_with_its_exact_errors() {
    for (fixture, expected) in CASES {
        let got = load(fixture)
            .err()
            .unwrap_or_else(|| panic!("{fixture} loaded"));
        assert_eq!(&got, expected, "{fixture}");
    }
}

#[test]
fn every_fixture_file_is_covered() {
    let mut on_disk: Vec<String> = std::fs::read_dir("tests/config/bad")
        .unwrap()
        .map(|e| {
            format!(
                "tests/config/bad/{}",
                e.unwrap().file_name().to_string_lossy()
            )
        })
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = CASES
        .iter()
        .map(|(f, _)| f.to_string())
        .filter(|f| f.starts_with("tests/config/bad/"))
        .collect();
    listed.sort();
    assert_eq!(on_disk, listed);
}

#[test]
fn merging_accepts_a_domain_split_across_files() {
    let tree = load_dir_or_file(&ConfigSource {
        path: "tests/config/bad_dirs/duplicate_domain".into(),
        ignore_dotfiles: false,
        merge_domains: true,
    })
    .unwrap();
    assert_eq!(tree.rule_count(), 2);
}

#[test]
fn check_config_exits_1_with_every_error_and_0_with_a_summary() {
    let (code, out, _) = support::run_cli(&[
        "check-config",
        "--config",
        "tests/config/bad/several_errors.yaml",
    ]);
    assert_eq!(code, 1);
    assert_eq!(
        out.lines().filter(|l| l.starts_with("error: ")).count(),
        3,
        "{out}"
    );
    assert!(
        out.ends_with("3 error(s) in tests/config/bad/several_errors.yaml\n"),
        "{out}"
    );

    let (code, out, _) = support::run_cli(&["check-config", "--config", "config"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.starts_with("config OK: 1 file(s), 1 domain(s) [example], 9 rule(s)\n"),
        "{out}"
    );
    assert!(out.contains("  example.api_key: unit=SECOND requests_per_unit=10, shadow_mode: false, quota_mode: false\n"), "{out}");
}

#[test]
fn check_config_refuses_deep_nesting_before_parsing() {
    // 2 MB of `[`: serde_norway alone takes seconds over it; the depth check stops at the 65th.
    let dir = support::config_dir(&[("deep.yaml", &"[".repeat(2_000_000))]);
    let file = dir.path().join("deep.yaml");
    let (code, out, _) = support::run_cli(&["check-config", "--config", file.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.starts_with(&format!(
            "error: {}: invalid YAML: nesting deeper than 64 levels at line 1 column 65\n",
            file.display()
        )),
        "{out}"
    );
}

#[test]
fn a_leading_byte_order_mark_is_ignored() {
    // Content on the first line: after a BOM, serde_norway read it as indented by one column
    // and the next line as a second document.
    let text = "domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: second, requests_per_unit: 1}\n  - key: b\n    descriptors:\n      - key: c\n        rate_limit: {unit: hour, requests_per_unit: 5}\n";
    let dir = support::config_dir(&[
        ("plain.yaml", text),
        ("bom.yaml", &format!("\u{feff}{text}")),
    ]);
    let with_bom = load(dir.path().join("bom.yaml").to_str().unwrap()).unwrap();
    let without = load(dir.path().join("plain.yaml").to_str().unwrap()).unwrap();
    // Every field of every rule (their metrics handles, unregistered here, print alike).
    assert_eq!(
        format!("{:?}", with_bom.rules()),
        format!("{:?}", without.rules())
    );
    assert_eq!(with_bom.rule_count(), 2);
}

#[test]
fn serve_refuses_to_start_on_an_invalid_config() {
    let (code, _, err) = support::run_cli(&["serve", "--config", "tests/config/bad/bad_unit.yaml"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("tests/config/bad/bad_unit.yaml: messaging > message_type=marketing > to_number: rate_limit.unit: invalid rate limit unit 'fortnight'"),
        "{err}"
    );
}

/// `serve` with CACHE_KEY_HASH_SECRET_FILE (set in the environment) and the shipped config:
/// (exit code, stderr).
fn serve_with_secret_file(path: &std::path::Path) -> (Option<i32>, String) {
    let secret = path.to_str().unwrap();
    support::serve_expecting_refusal(
        std::path::Path::new("config"),
        &[("CACHE_KEY_HASH_SECRET_FILE", secret)],
    )
}

#[test]
fn serve_and_explain_refuse_a_missing_or_short_hash_secret_file() {
    let dir = tempfile::TempDir::new().unwrap();
    let missing = dir.path().join("missing");
    let (code, err) = serve_with_secret_file(&missing);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "ratelimitd: CACHE_KEY_HASH_SECRET_FILE: cannot read {}: ",
            missing.display()
        )),
        "{err}"
    );

    let short = dir.path().join("short");
    std::fs::write(&short, "too short\n").unwrap();
    let (code, err) = serve_with_secret_file(&short);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "ratelimitd: CACHE_KEY_HASH_SECRET_FILE: {}: the secret is 9 bytes long; at least 16 are needed",
            short.display()
        )),
        "{err}"
    );
    assert!(
        !err.contains("too short"),
        "the secret is never printed: {err}"
    );

    let (code, out, err) = support::run_cli(&[
        "explain",
        "--config",
        "config",
        "--domain",
        "example",
        "--cache-key-hash-secret-file",
        short.to_str().unwrap(),
        "api_key=k",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(
        err.starts_with("ratelimitd: CACHE_KEY_HASH_SECRET_FILE: "),
        "{err}"
    );
}

#[test]
fn runtime_root_settings_locate_the_config_like_the_reference() {
    let dir = support::config_dir(&[
        ("srv/ratelimit/config/a.yaml", "domain: a\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: 1}\n"),
        ("srv/ratelimit/config/.hidden.yaml", "domain: hidden\n"),
        ("srv/ratelimit/config/notes.txt", "not yaml"),
    ]);
    let root = dir.path().join("srv");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ratelimitd"))
        .arg("check-config")
        .env_clear()
        .env("RUNTIME_ROOT", &root)
        .env("RUNTIME_SUBDIRECTORY", "ratelimit")
        .env("RUNTIME_IGNOREDOTFILES", "true")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.starts_with("config OK: 1 file(s), 1 domain(s) [a], 1 rule(s)"),
        "{stdout}"
    );
}
