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
