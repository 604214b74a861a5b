//! The Kubernetes manifests: valid against the Kubernetes schemas (kubernetes-validate,
//! offline, strict), complete (every file the kustomization names exists), and in step with
//! the rules the repository ships.
#![allow(clippy::unwrap_used)]
mod support;

use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn validator() -> PathBuf {
    let venv = root().join(".venv/bin/kubernetes-validate");
    assert!(
        venv.is_file(),
        "kubernetes-validate missing: run ./scripts/test.sh (it installs tests/py/requirements.txt into .venv)"
    );
    venv
}

#[test]
fn every_manifest_validates_strictly_against_the_kubernetes_schemas() {
    let dir = root().join("deploy/kubernetes");
    let kustomization = std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap();
    let resources: Vec<&str> = kustomization
        .lines()
        .skip_while(|l| !l.starts_with("resources:"))
        .skip(1)
        .take_while(|l| l.trim_start().starts_with("- "))
        .map(|l| l.trim_start().trim_start_matches("- ").trim())
        .collect();
    assert_eq!(
        resources,
        vec![
            "namespace.yaml",
            "ratelimitd.yaml",
            "redis.yaml",
            "envoy.yaml"
        ]
    );
    for r in &resources {
        let out = std::process::Command::new(validator())
            .args(["--strict", "-k", "1.32.0"])
            .arg(dir.join(r))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{r}: {text}");
        assert!(
            text.contains("passed") && !text.contains("failed"),
            "{r}: {text}"
        );
    }
    for generated in ["rules/example.yaml", "envoy-config/envoy.yaml"] {
        assert!(
            kustomization.contains(generated),
            "{generated} is generated into a ConfigMap"
        );
        assert!(dir.join(generated).is_file(), "{generated} exists");
    }
}

#[test]
fn the_configmap_rules_are_the_shipped_rules() {
    let shipped = std::fs::read_to_string(root().join("config/example.yaml")).unwrap();
    let in_cluster =
        std::fs::read_to_string(root().join("deploy/kubernetes/rules/example.yaml")).unwrap();
    assert_eq!(
        in_cluster, shipped,
        "deploy/kubernetes/rules/example.yaml must be a copy of config/example.yaml"
    );
}

fn validate_compose(file: &Path) -> (bool, String) {
    let python = root().join(".venv/bin/python");
    assert!(
        python.is_file(),
        "Python venv missing: run ./scripts/test.sh"
    );
    let out = std::process::Command::new(python)
        .arg(root().join("tests/py/validate_compose.py"))
        .arg(file)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn docker_compose_follows_the_compose_specification() {
    let (ok, text) = validate_compose(&root().join("docker-compose.yml"));
    assert!(ok, "{text}");
    assert_eq!(text.trim(), "valid");
    // The validator does reject what the specification forbids.
    let dir = support::config_dir(&[("bad.yml", "services:\n  x:\n    image: 5\n    bogus: 1\n")]);
    let (ok, text) = validate_compose(&dir.path().join("bad.yml"));
    assert!(!ok);
    assert!(
        text.contains("services/x/image: 5 is not of type 'string'"),
        "{text}"
    );
    // Every service the README promises, wired as in envoy/.
    let compose = std::fs::read_to_string(root().join("docker-compose.yml")).unwrap();
    for service in ["  redis:", "  ratelimitd:", "  upstream:", "  envoy:"] {
        assert!(compose.contains(service), "{service}");
    }
    assert!(compose.contains("./envoy/envoy-compose.yaml:/etc/envoy/envoy.yaml:ro"));
}
