//! The ghz scenarios in bench/ghz: valid per ghz's configuration schema (the JSON tags of its
//! runner.Config), calling our method, and carrying data that is a valid RateLimitRequest for
//! the shipped rules once ghz's template placeholders are filled in.
#![allow(clippy::unwrap_used)]

use std::path::Path;

/// ghz's config-file keys (runner/config.go, `json:"..."` tags).
const GHZ_KEYS: &[&str] = &[
    "proto",
    "protoset",
    "call",
    "cacert",
    "cert",
    "key",
    "skipTLS",
    "cname",
    "authority",
    "insecure",
    "total",
    "concurrency",
    "connections",
    "qps",
    "duration",
    "duration-stop",
    "max-duration",
    "timeout",
    "data",
    "data-file",
    "binary-file",
    "metadata",
    "metadata-file",
    "stream-interval",
    "output",
    "format",
    "connect-timeout",
    "keepalive",
    "cpus",
    "import-paths",
    "name",
    "tags",
    "reflect-metadata",
    "debug",
    "host",
    "enable-compression",
];

#[test]
fn every_ghz_scenario_is_valid_and_sends_a_valid_request() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<_> = std::fs::read_dir(root.join("bench/ghz"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("json"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 4);
    let tree = ratelimitd::config::load_dir_or_file(&ratelimitd::config::ConfigSource {
        path: root.join("config"),
        ignore_dotfiles: false,
        merge_domains: false,
        default_algorithm: ratelimitd::limiter::Algorithm::FixedWindow,
    })
    .unwrap();
    for path in files {
        let name = path.display().to_string();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let obj = v.as_object().unwrap();
        for k in obj.keys() {
            assert!(
                GHZ_KEYS.contains(&k.as_str()),
                "{name}: unknown ghz key {k}"
            );
        }
        assert_eq!(
            obj["call"], "envoy.service.ratelimit.v3.RateLimitService.ShouldRateLimit",
            "{name}"
        );
        assert!(
            obj["host"].as_str().unwrap().starts_with("127.0.0.1:"),
            "{name}: loopback only"
        );
        assert!(
            obj["total"].as_u64().unwrap() > 0,
            "{name}: bounded by a total"
        );
        let timeout = obj["timeout"].as_str().unwrap();
        assert!(
            ratelimitd::settings::parse_go_duration(timeout).is_ok(),
            "{name}: timeout {timeout}"
        );
        if let Some(proto) = obj.get("proto") {
            assert!(
                root.join(proto.as_str().unwrap()).is_file(),
                "{name}: proto path from the repository root"
            );
            for p in obj["import-paths"].as_array().unwrap() {
                assert!(
                    root.join(p.as_str().unwrap()).is_dir(),
                    "{name}: import path"
                );
            }
        } else {
            assert!(
                name.contains("reflection"),
                "{name}: no proto means server reflection"
            );
        }
        // ghz accepts an object (or a non-empty array of objects) as data.
        let data = serde_json::to_string(obj["data"].as_object().unwrap()).unwrap();
        let filled = data
            .replace("{{.RequestNumber}}", "17")
            .replace("{{.WorkerID}}", "3");
        assert!(
            !filled.contains("{{"),
            "{name}: only placeholders this test knows"
        );
        let req = ratelimitd::json::Codec::new()
            .parse_request(filled.as_bytes())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(req.domain, "example");
        for d in &req.descriptors {
            let entries: Vec<(&str, &str)> = d
                .entries
                .iter()
                .map(|e| (e.key.as_str(), e.value.as_str()))
                .collect();
            assert!(
                ratelimitd::matcher::find(&tree, &req.domain, &entries, &mut String::new())
                    .is_some(),
                "{name}: {entries:?} matches a shipped rule"
            );
        }
    }
}
