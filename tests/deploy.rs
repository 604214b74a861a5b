//! The Kubernetes manifests: valid against the Kubernetes schemas (kubernetes-validate,
//! offline, strict), complete (every file the kustomization names exists), and in step with
//! the rules the repository ships. The image: the reference's command, `/bin/ratelimit` with
//! no arguments, serves.
#![allow(clippy::unwrap_used)]
mod support;

use std::path::{Path, PathBuf};

use ratelimitd::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use support::{config_dir, request, run_cli_env, Ratelimitd};
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

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

#[test]
fn the_image_provides_bin_ratelimit_like_the_reference_image() {
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    // The build stage links the reference's name to the binary (the final stage has no
    // shell), and the final stage copies the directory holding the link, which keeps it a link.
    let (build, image) = dockerfile.split_once("\nFROM gcr.io/distroless/").unwrap();
    assert!(
        build.contains(
            "RUN mkdir -p /out/bin && ln -s /usr/local/bin/ratelimitd /out/bin/ratelimit"
        ),
        "{dockerfile}"
    );
    let copies: Vec<&str> = image.lines().filter(|l| l.starts_with("COPY ")).collect();
    assert!(
        copies.contains(
            &"COPY --from=build /src/target/release/ratelimitd /usr/local/bin/ratelimitd"
        ),
        "{dockerfile}"
    );
    assert!(
        copies.contains(&"COPY --from=build /out/bin/ /bin/"),
        "{dockerfile}"
    );
    // The reference's default rules directory (RUNTIME_ROOT=/srv/runtime_data/current,
    // RUNTIME_APPDIRECTORY=config), so `/bin/ratelimit` alone finds the shipped rules.
    assert!(
        copies.contains(&"COPY config /srv/runtime_data/current/config"),
        "{dockerfile}"
    );
}

const RULES: &str =
    "domain: bare\ndescriptors:\n  - key: k\n    rate_limit: {unit: minute, requests_per_unit: 5}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_arguments_the_binary_serves_under_either_name() {
    // The rules where the reference's settings point: RUNTIME_ROOT/RUNTIME_SUBDIRECTORY/
    // RUNTIME_APPDIRECTORY, as Envoy Gateway sets them for /bin/ratelimit.
    let root_dir = config_dir(&[("ratelimit/config/r.yaml", RULES)]);
    let rules = root_dir.path().join("ratelimit/config");
    // `ratelimit`, the reference's name, as a link to the binary (as in the image).
    let links = tempfile::TempDir::new().unwrap();
    let link = links.path().join("ratelimit");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_ratelimitd"), &link).unwrap();

    for program in [PathBuf::from(env!("CARGO_BIN_EXE_ratelimitd")), link] {
        let rl = Ratelimitd::builder(&rules).bare(&program).start();
        let channel = rl.channel().await;
        for service in ["", "ratelimit"] {
            let status = HealthClient::new(channel.clone())
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .unwrap()
                .into_inner()
                .status;
            assert_eq!(
                status,
                ServingStatus::Serving as i32,
                "{program:?}: health of {service:?}"
            );
        }
        let reply = rl
            .client()
            .await
            .should_rate_limit(request("bare", &[&[("k", "v")]]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.overall_code, Code::Ok as i32, "{program:?}");
        assert_eq!(reply.statuses[0].limit_remaining, 4, "{program:?}");
    }
}

#[test]
fn serve_settings_are_read_only_to_serve() {
    // With no arguments the environment is serve's, and a bad value stops it as `serve` would…
    let (code, _, err) = run_cli_env(&[], &[("GRPC_PORT", "abc")]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("invalid value 'abc' for '--grpc-port <GRPC_PORT>'"),
        "{err}"
    );
    // …while the other commands never parse it.
    let rules = config_dir(&[("r.yaml", RULES)]);
    let (code, out, err) = run_cli_env(
        &["check-config", "--config", rules.path().to_str().unwrap()],
        &[("GRPC_PORT", "abc")],
    );
    assert_eq!(code, 0, "{out}{err}");
}
