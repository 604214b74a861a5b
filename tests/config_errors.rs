//! Every config error, one fixture each, checked word for word: the message names the file,
//! the descriptor path and the field. Also: `check-config` exit codes and `serve` refusing to
//! start on an invalid config.
#![allow(clippy::unwrap_used)]
mod support;

use ratelimitd::{
    config::{load_dir_or_file, ConfigSource},
    limiter::Algorithm,
};

/// (fixture, every expected error line)
const CASES: &[(&str, &[&str])] = &[
    (
        "tests/config/bad/bad_flag.yaml",
        &["tests/config/bad/bad_flag.yaml: d > k: shadow_mode: error loading config file: expected true or false, found a string"],
    ),
    (
        "tests/config/bad/bad_unlimited.yaml",
        &["tests/config/bad/bad_unlimited.yaml: d > k: rate_limit.unlimited: error loading config file: expected true or false, found a string"],
    ),
    (
        "tests/config/bad/bad_unit.yaml",
        &["tests/config/bad/bad_unit.yaml: messaging > message_type=marketing > to_number: rate_limit.unit: invalid rate limit unit 'fortnight' (expected one of: second, minute, hour, day, week, month, year)"],
    ),
    (
        "tests/config/bad/descriptors_not_a_list.yaml",
        &["tests/config/bad/descriptors_not_a_list.yaml: d: descriptors: error loading config file: expected a list of descriptors, found a mapping"],
    ),
    (
        "tests/config/bad/duplicate_descriptor.yaml",
        &["tests/config/bad/duplicate_descriptor.yaml: d > k=v: key: duplicate descriptor composite key 'd.k_v'"],
    ),
    (
        "tests/config/bad/fraction_as_string.yaml",
        &[
            "tests/config/bad/fraction_as_string.yaml: d > k: value: error checking config (expected a string, found the number 1.5)",
            "tests/config/bad/fraction_as_string.yaml: d > n: rate_limit.name: error checking config (expected a string, found the number .inf)",
        ],
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
        &["tests/config/bad/fractional_limit.yaml: d > k: rate_limit.requests_per_unit: error checking config (must be a whole number, found 1.5)"],
    ),
    (
        "tests/config/bad/huge_limit.yaml",
        &["tests/config/bad/huge_limit.yaml: d > k: rate_limit.requests_per_unit: error loading config file: 4294967296 is larger than 4294967295"],
    ),
    (
        "tests/config/bad/invalid_yaml.yaml",
        &["tests/config/bad/invalid_yaml.yaml: error loading config file: invalid YAML: did not find expected '-' indicator at line 4 column 4, while parsing a block collection at line 3 column 3"],
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
        &["tests/config/bad/missing_unit.yaml: d > k: rate_limit.unit: invalid rate limit unit '' (missing: a rate_limit needs a unit, or unlimited: true)"],
    ),
    (
        "tests/config/bad/negative_limit.yaml",
        &["tests/config/bad/negative_limit.yaml: d > k: rate_limit.requests_per_unit: error loading config file: must not be negative, found -5"],
    ),
    (
        "tests/config/bad/non_string_key.yaml",
        &["tests/config/bad/non_string_key.yaml: d > k: config error, key is not of type string: 1 (field names must be strings)"],
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
        &["tests/config/bad/several_errors.yaml: d > b: rate_limit.requests_per_unit: error loading config file: must not be negative, found -1", "tests/config/bad/several_errors.yaml: d > b > c: typo: config error, unknown key 'typo' (expected one of: key, value, rate_limit, rate_limits, descriptors, shadow_mode, quota_mode, detailed_metric, value_to_metric, share_threshold, metadata)", "tests/config/bad/several_errors.yaml: d > a: rate_limit.unit: invalid rate limit unit 'eon' (expected one of: second, minute, hour, day, week, month, year)"],
    ),
    (
        "tests/config/bad/share_threshold_without_wildcard.yaml",
        &["tests/config/bad/share_threshold_without_wildcard.yaml: d > path=/exact: share_threshold: share_threshold can only be used with wildcard values (containing '*'), but found key 'path_/exact'"],
    ),
    (
        "tests/config/bad/string_limit.yaml",
        &["tests/config/bad/string_limit.yaml: d > k: rate_limit.requests_per_unit: error loading config file: expected a whole number, found a string"],
    ),
    (
        "tests/config/bad/too_deep_block.yaml",
        &["tests/config/bad/too_deep_block.yaml: error loading config file: invalid YAML: nesting deeper than 64 levels at line 3 column 129"],
    ),
    (
        "tests/config/bad/too_deep_flow.yaml",
        &["tests/config/bad/too_deep_flow.yaml: error loading config file: invalid YAML: nesting deeper than 64 levels at line 4 column 76"],
    ),
    (
        "tests/config/bad/unknown_descriptor_field.yaml",
        &["tests/config/bad/unknown_descriptor_field.yaml: d > k: shadowmode: config error, unknown key 'shadowmode' (expected one of: key, value, rate_limit, rate_limits, descriptors, shadow_mode, quota_mode, detailed_metric, value_to_metric, share_threshold, metadata)"],
    ),
    (
        "tests/config/bad/unknown_field.yaml",
        &["tests/config/bad/unknown_field.yaml: d > k: rate_limit.request_per_unit: config error, unknown key 'request_per_unit' (expected one of: unit, requests_per_unit, unit_multiplier, algorithm, burst, unlimited, name, replaces)"],
    ),
    (
        "tests/config/bad/unknown_root_field.yaml",
        &["tests/config/bad/unknown_root_field.yaml: descriptor: config error, unknown key 'descriptor' (expected one of: domain, descriptors)"],
    ),
    (
        "tests/config/bad/unlimited_with_limit.yaml",
        &["tests/config/bad/unlimited_with_limit.yaml: d > k: rate_limit.requests_per_unit: should not specify requests_per_unit when unlimited"],
    ),
    (
        "tests/config/bad/unlimited_with_unit.yaml",
        &["tests/config/bad/unlimited_with_unit.yaml: d > k: rate_limit.unit: should not specify rate limit unit when unlimited"],
    ),
    // Issue 9: algorithms, rate_limits, unit_multiplier.
    (
        "tests/config/bad/rate_limit_and_rate_limits.yaml",
        &["tests/config/bad/rate_limit_and_rate_limits.yaml: d > k: rate_limits: a descriptor has rate_limit or rate_limits, not both (put every limit in rate_limits)"],
    ),
    (
        "tests/config/bad/empty_rate_limits.yaml",
        &["tests/config/bad/empty_rate_limits.yaml: d > k: rate_limits: the list is empty; give at least one limit (or rate_limit: {unlimited: true} for none)"],
    ),
    (
        "tests/config/bad/rate_limits_not_a_list.yaml",
        &["tests/config/bad/rate_limits_not_a_list.yaml: d > k: rate_limits: error loading config file: expected a list of limits, found a mapping"],
    ),
    (
        "tests/config/bad/rate_limits_item_not_a_mapping.yaml",
        &["tests/config/bad/rate_limits_item_not_a_mapping.yaml: d > k: rate_limits[1]: config error, yaml file contains list of type other than map: minute (expected a mapping, found a string)"],
    ),
    (
        "tests/config/bad/rate_limits_item_name.yaml",
        &["tests/config/bad/rate_limits_item_name.yaml: d > k: rate_limits[0].name: config error, unknown key 'name' (expected one of: unit, requests_per_unit, unit_multiplier, algorithm, burst)"],
    ),
    (
        "tests/config/bad/rate_limits_missing_limit.yaml",
        &["tests/config/bad/rate_limits_missing_limit.yaml: d > k: rate_limits[1].requests_per_unit: missing; each rate_limits item needs requests_per_unit"],
    ),
    (
        "tests/config/bad/string_burst.yaml",
        &["tests/config/bad/string_burst.yaml: d > k: rate_limits[1].burst: error loading config file: expected a whole number, found a string"],
    ),
    (
        "tests/config/bad/burst_with_window.yaml",
        &["tests/config/bad/burst_with_window.yaml: d > k: rate_limit.burst: burst applies only to algorithm token_bucket, not sliding_window"],
    ),
    (
        "tests/config/bad/burst_with_default_algorithm.yaml",
        &["tests/config/bad/burst_with_default_algorithm.yaml: d > k: rate_limit.burst: burst applies only to algorithm token_bucket; this limit names no algorithm and DEFAULT_ALGORITHM is fixed_window (add algorithm: token_bucket)"],
    ),
    (
        "tests/config/bad/zero_burst.yaml",
        &["tests/config/bad/zero_burst.yaml: d > k: rate_limit.burst: must be at least 1 (the token bucket's capacity)"],
    ),
    (
        "tests/config/bad/zero_unit_multiplier.yaml",
        &["tests/config/bad/zero_unit_multiplier.yaml: d > k: rate_limit.unit_multiplier: must be at least 1 (a window of 0 units)"],
    ),
    (
        "tests/config/bad/window_too_long.yaml",
        &["tests/config/bad/window_too_long.yaml: d > k: rate_limit.unit_multiplier: a window of 101 years is longer than 100 years"],
    ),
    (
        "tests/config/bad/bucket_too_large.yaml",
        &["tests/config/bad/bucket_too_large.yaml: d > k: rate_limit.burst: burst × window is too large for exact refills: burst 200000 × 31536000000 ms is above 2^52 (4503599627370496); use a smaller burst or a shorter window"],
    ),
    (
        "tests/config/bad/bucket_too_large_without_burst.yaml",
        &["tests/config/bad/bucket_too_large_without_burst.yaml: d > k: rate_limits[0].requests_per_unit: burst × window is too large for exact refills: burst 200000 (requests_per_unit, as burst is unset) × 31536000000 ms is above 2^52 (4503599627370496); use a smaller burst or a shorter window"],
    ),
    (
        "tests/config/bad/duplicate_window.yaml",
        &["tests/config/bad/duplicate_window.yaml: d > user: rate_limits[2]: same unit and unit_multiplier as rate_limits[0] (minute × 1); the limits of a rule need different windows"],
    ),
    (
        "tests/config/bad/unlimited_with_algorithm.yaml",
        &["tests/config/bad/unlimited_with_algorithm.yaml: d > k: rate_limit.algorithm: should not specify algorithm when unlimited"],
    ),
    (
        "tests/config/bad/unlimited_with_burst.yaml",
        &["tests/config/bad/unlimited_with_burst.yaml: d > k: rate_limit.burst: should not specify burst when unlimited"],
    ),
    (
        "tests/config/bad/unlimited_with_unit_multiplier.yaml",
        &["tests/config/bad/unlimited_with_unit_multiplier.yaml: d > k: rate_limit.unit_multiplier: should not specify unit_multiplier when unlimited"],
    ),
    (
        "tests/config/bad/unknown_algorithm.yaml",
        &["tests/config/bad/unknown_algorithm.yaml: d > k: rate_limit.algorithm: invalid algorithm 'leaky_bucket' (expected one of: fixed_window, sliding_window, token_bucket)"],
    ),
    (
        "tests/config/bad_dirs/duplicate_domain",
        &["tests/config/bad_dirs/duplicate_domain/b.yaml: d: domain: duplicate domain 'd' in config file (also in tests/config/bad_dirs/duplicate_domain/a.yaml; set MERGE_DOMAIN_CONFIG=true to merge)"],
    ),
];

/// The reference's own words (envoyproxy/ratelimit, `src/config/config_impl.go`) for each
/// fixture's errors, line by line, which our message carries right after its file, descriptor
/// path and field, so that alerts written for the reference keep firing. `None` where the
/// reference has no such error: a rule it accepts (`unlimited` with `requests_per_unit`, a
/// missing `requests_per_unit`, read as 0) or fields of ours, whose key it refuses as unknown.
/// Errors about our own fields that are of a kind the reference has (a wrong type, an unknown
/// field, a list item that is not a mapping) use its words for that kind.
const REFERENCE_WORDING: &[(&str, &[Option<&str>])] = &[
    ("tests/config/bad/bad_flag.yaml", &[Some("error loading config file")]),
    ("tests/config/bad/bad_unlimited.yaml", &[Some("error loading config file")]),
    ("tests/config/bad/bad_unit.yaml", &[Some("invalid rate limit unit 'fortnight'")]),
    ("tests/config/bad/descriptors_not_a_list.yaml", &[Some("error loading config file")]),
    ("tests/config/bad/duplicate_descriptor.yaml", &[Some("duplicate descriptor composite key 'd.k_v'")]),
    ("tests/config/bad/fraction_as_string.yaml", &[Some("error checking config"), Some("error checking config")]),
    ("tests/config/bad/empty_domain.yaml", &[Some("config file cannot have empty domain")]),
    ("tests/config/bad/empty_key.yaml", &[Some("descriptor has empty key")]),
    ("tests/config/bad/fractional_limit.yaml", &[Some("error checking config")]),
    ("tests/config/bad/huge_limit.yaml", &[Some("error loading config file")]),
    ("tests/config/bad/invalid_yaml.yaml", &[Some("error loading config file")]),
    ("tests/config/bad/missing_key.yaml", &[Some("descriptor has empty key")]),
    ("tests/config/bad/missing_limit.yaml", &[None]),
    ("tests/config/bad/missing_unit.yaml", &[Some("invalid rate limit unit ''")]),
    ("tests/config/bad/negative_limit.yaml", &[Some("error loading config file")]),
    ("tests/config/bad/non_string_key.yaml", &[Some("config error, key is not of type string: 1")]),
    ("tests/config/bad/replaces_empty.yaml", &[Some("should not have an empty replaces entry")]),
    ("tests/config/bad/replaces_self.yaml", &[Some("replaces should not contain name of same descriptor")]),
    ("tests/config/bad/several_errors.yaml", &[Some("error loading config file"), Some("config error, unknown key 'typo'"), Some("invalid rate limit unit 'eon'")]),
    ("tests/config/bad/share_threshold_without_wildcard.yaml", &[Some("share_threshold can only be used with wildcard values (containing '*'), but found key 'path_/exact'")]),
    ("tests/config/bad/string_limit.yaml", &[Some("error loading config file")]),
    ("tests/config/bad/too_deep_block.yaml", &[Some("error loading config file")]),
    ("tests/config/bad/too_deep_flow.yaml", &[Some("error loading config file")]),
    ("tests/config/bad/unknown_descriptor_field.yaml", &[Some("config error, unknown key 'shadowmode'")]),
    ("tests/config/bad/unknown_field.yaml", &[Some("config error, unknown key 'request_per_unit'")]),
    ("tests/config/bad/unknown_root_field.yaml", &[Some("config error, unknown key 'descriptor'")]),
    ("tests/config/bad/unlimited_with_limit.yaml", &[None]),
    ("tests/config/bad/unlimited_with_unit.yaml", &[Some("should not specify rate limit unit when unlimited")]),
    ("tests/config/bad/rate_limit_and_rate_limits.yaml", &[None]),
    ("tests/config/bad/empty_rate_limits.yaml", &[None]),
    ("tests/config/bad/rate_limits_not_a_list.yaml", &[Some("error loading config file")]),
    ("tests/config/bad/rate_limits_item_not_a_mapping.yaml", &[Some("config error, yaml file contains list of type other than map: minute")]),
    ("tests/config/bad/rate_limits_item_name.yaml", &[Some("config error, unknown key 'name'")]),
    ("tests/config/bad/rate_limits_missing_limit.yaml", &[None]),
    ("tests/config/bad/string_burst.yaml", &[Some("error loading config file")]),
    ("tests/config/bad/burst_with_window.yaml", &[None]),
    ("tests/config/bad/burst_with_default_algorithm.yaml", &[None]),
    ("tests/config/bad/zero_burst.yaml", &[None]),
    ("tests/config/bad/zero_unit_multiplier.yaml", &[None]),
    ("tests/config/bad/window_too_long.yaml", &[None]),
    ("tests/config/bad/bucket_too_large.yaml", &[None]),
    ("tests/config/bad/bucket_too_large_without_burst.yaml", &[None]),
    ("tests/config/bad/duplicate_window.yaml", &[None]),
    ("tests/config/bad/unlimited_with_algorithm.yaml", &[None]),
    ("tests/config/bad/unlimited_with_burst.yaml", &[None]),
    ("tests/config/bad/unlimited_with_unit_multiplier.yaml", &[None]),
    ("tests/config/bad/unknown_algorithm.yaml", &[None]),
    ("tests/config/bad_dirs/duplicate_domain", &[Some("duplicate domain 'd' in config file")]),
];

fn load(path: &str) -> Result<ratelimitd::config::RuleTree, Vec<String>> {
    load_dir_or_file(&ConfigSource {
        path: path.into(),
        ignore_dotfiles: false,
        merge_domains: false,
        default_algorithm: Algorithm::FixedWindow,
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
fn each_error_carries_the_reference_wording_after_its_location() {
    let listed: Vec<&str> = REFERENCE_WORDING.iter().map(|(f, _)| *f).collect();
    let cases: Vec<&str> = CASES.iter().map(|(f, _)| *f).collect();
    assert_eq!(listed, cases, "one row per case, in the same order");
    for ((fixture, expected), (_, wording)) in CASES.iter().zip(REFERENCE_WORDING) {
        assert_eq!(
            expected.len(),
            wording.len(),
            "{fixture}: one wording per error"
        );
        for (line, wording) in expected.iter().zip(*wording) {
            let Some(wording) = wording else { continue };
            assert!(
                line.contains(&format!(": {wording}")),
                "{fixture}: {line:?} lacks {wording:?}"
            );
        }
    }
    // The same texts reach check-config's output (and reload logs: the same Display).
    let (code, out, _) = support::run_cli(&[
        "check-config",
        "--config",
        "tests/config/bad/unknown_descriptor_field.yaml",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.starts_with("error: tests/config/bad/unknown_descriptor_field.yaml: d > k: shadowmode: config error, unknown key 'shadowmode' (expected one of: "),
        "{out}"
    );
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
        default_algorithm: Algorithm::FixedWindow,
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
        out.starts_with("config OK: 1 file(s), 1 domain(s) [example], 11 rule(s)\n"),
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
            "error: {}: error loading config file: invalid YAML: nesting deeper than 64 levels at line 1 column 65\n",
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

/// Issue 9's example, plus a reference rule and an unlimited one.
const ALGORITHMS_YAML: &str = "domain: d
descriptors:
  - key: api_key
    rate_limit:
      unit: minute
      requests_per_unit: 100
      algorithm: token_bucket
      burst: 20
  - key: user
    rate_limits:
      - {unit: minute, requests_per_unit: 10}
      - {unit: hour, requests_per_unit: 100}
      - {unit: day, requests_per_unit: 500, algorithm: sliding_window}
  - key: report
    rate_limit: {unit: minute, unit_multiplier: 5, requests_per_unit: 3}
  - key: plain
    rate_limit: {unit: second, requests_per_unit: 10}
  - key: free
    rate_limit: {unlimited: true}
";

#[test]
fn check_config_shows_algorithms_and_every_limit() {
    let dir = support::config_dir(&[("r.yaml", ALGORITHMS_YAML)]);
    let dir_arg = dir.path().to_str().unwrap();
    let (code, out, err) = support::run_cli(&["check-config", "--config", dir_arg]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        out,
        "config OK: 1 file(s), 1 domain(s) [d], 5 rule(s)
  d.api_key: unit=MINUTE requests_per_unit=100 algorithm=token_bucket burst=20, shadow_mode: false, quota_mode: false
  d.free: unit=UNKNOWN requests_per_unit=0, shadow_mode: false, quota_mode: false
  d.plain: unit=SECOND requests_per_unit=10, shadow_mode: false, quota_mode: false
  d.report: unit=MINUTE requests_per_unit=3 unit_multiplier=5 algorithm=fixed_window, shadow_mode: false, quota_mode: false
  d.user: unit=MINUTE requests_per_unit=10 algorithm=fixed_window; unit=HOUR requests_per_unit=100 algorithm=fixed_window; unit=DAY requests_per_unit=500 algorithm=sliding_window, shadow_mode: false, quota_mode: false
"
    );

    // DEFAULT_ALGORITHM (environment or flag) reaches the limits that name none.
    let (code, out, err) = support::run_cli_env(
        &["check-config", "--config", dir_arg],
        &[("DEFAULT_ALGORITHM", "token_bucket")],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("  d.plain: unit=SECOND requests_per_unit=10 algorithm=token_bucket, shadow_mode: false, quota_mode: false\n"), "{out}");
    assert!(out.contains("  d.user: unit=MINUTE requests_per_unit=10 algorithm=token_bucket; unit=HOUR requests_per_unit=100 algorithm=token_bucket; unit=DAY requests_per_unit=500 algorithm=sliding_window, "), "{out}");
    let (code, out, err) = support::run_cli(&[
        "check-config",
        "--config",
        dir_arg,
        "--default-algorithm",
        "sliding_window",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("  d.plain: unit=SECOND requests_per_unit=10 algorithm=sliding_window, "),
        "{out}"
    );

    // A burst without an algorithm is refused under a window default, naming the setting.
    let burst = support::config_dir(&[(
        "r.yaml",
        "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: minute, requests_per_unit: 10, burst: 20}\n",
    )]);
    let burst_arg = burst.path().to_str().unwrap();
    let (code, out, _) = support::run_cli(&["check-config", "--config", burst_arg]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(": d > k: rate_limit.burst: burst applies only to algorithm token_bucket; this limit names no algorithm and DEFAULT_ALGORITHM is fixed_window (add algorithm: token_bucket)\n"), "{out}");
    let (code, out, _) = support::run_cli_env(
        &["check-config", "--config", burst_arg],
        &[("DEFAULT_ALGORITHM", "token_bucket")],
    );
    assert_eq!(code, 0, "{out}");
}

#[test]
fn an_unknown_default_algorithm_is_refused_naming_the_setting() {
    for cmd in ["check-config", "serve"] {
        let (code, out, err) = support::run_cli_env(
            &[cmd, "--config", "config"],
            &[("DEFAULT_ALGORITHM", "leaky_bucket")],
        );
        assert_eq!(code, 2, "{cmd}: {out}{err}");
        assert!(
            err.contains("DEFAULT_ALGORITHM: unknown algorithm 'leaky_bucket' (fixed_window, sliding_window or token_bucket)"),
            "{cmd}: {err}"
        );
    }
}

#[test]
fn explain_lists_every_limit_with_its_algorithm() {
    let dir = support::config_dir(&[("r.yaml", ALGORITHMS_YAML)]);
    let dir_arg = dir.path().to_str().unwrap();
    let explain = |entry: &str| {
        let (code, out, err) =
            support::run_cli(&["explain", "--config", dir_arg, "--domain", "d", entry]);
        assert_eq!(code, 0, "{out}{err}");
        out
    };
    let out = explain("user=u1");
    assert!(
        out.contains("  rule: d > user (d.user)\n  limits: 3, all checked and charged together\n    10 per minute (fixed_window)\n    100 per hour (fixed_window)\n    500 per day (sliding_window)\n  counter key: d_user_u1_"),
        "{out}"
    );
    let out = explain("api_key=k");
    assert!(
        out.contains("\n  limit: 100 per minute (token_bucket, burst 20)\n"),
        "{out}"
    );
    let out = explain("report=r");
    assert!(
        out.contains("\n  limit: 3 per 5 minutes (fixed_window)\n"),
        "{out}"
    );
    let out = explain("plain=p");
    assert!(out.contains("\n  limit: 10 per second\n"), "{out}");
}

/// yaml.v2 (the reference's YAML library) gives a string field a plain scalar's text as
/// written, even where YAML reads a number or a boolean, and reads YAML 1.1's `yes`/`on`/...
/// as booleans: the real binary matches, keys and names rules as the reference does.
#[tokio::test]
async fn scalars_are_read_as_the_reference_reads_them() {
    use ratelimitd::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
    const RULES: &str = r#"
domain: 0x10
descriptors:
  - key: flag
    value: True
    rate_limit: {unit: minute, requests_per_unit: 3, name: 0o17}
  - key: +5
    value: 0x1F
    shadow_mode: yes
    rate_limit: {unit: minute, requests_per_unit: 1}
"#;
    let svc = support::start_service("memory", RULES, &[]);
    let c = svc.rl.client().await;
    let ask = |entries: &'static [(&'static str, &'static str)]| {
        let req = support::request("0x10", &[entries]);
        let mut c = c.clone();
        async move { c.should_rate_limit(req).await.unwrap().into_inner() }
    };
    let r = ask(&[("flag", "True")]).await;
    let s = &r.statuses[0];
    assert_eq!((s.code, s.limit_remaining), (Code::Ok as i32, 2));
    assert_eq!(s.current_limit.as_ref().unwrap().name, "0o17");
    // `true` is another value: no rule.
    let r = ask(&[("flag", "true")]).await;
    assert!(r.statuses[0].current_limit.is_none());
    // `+5: 0x1F`, shadowed by `shadow_mode: yes`: over its limit, answered OK.
    for _ in 0..2 {
        let r = ask(&[("+5", "0x1F")]).await;
        assert_eq!(r.overall_code, Code::Ok as i32);
        assert_eq!(
            r.statuses[0]
                .current_limit
                .as_ref()
                .unwrap()
                .requests_per_unit,
            1
        );
    }
    let r = ask(&[("5", "31")]).await;
    assert!(r.statuses[0].current_limit.is_none());
}
