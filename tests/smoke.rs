#![allow(clippy::unwrap_used)]
mod support;

use ratelimitd::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use support::*;

#[tokio::test]
async fn shipped_example_config_serves_in_memory() {
    let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let rl = Ratelimitd::builder(&config).start();
    let mut c = rl.client().await;
    let r = c
        .should_rate_limit(request("example", &[&[("api_key", "abc")]]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.overall_code, Code::Ok as i32);
    assert_eq!(r.statuses.len(), 1);
    assert_eq!(
        r.statuses[0]
            .current_limit
            .as_ref()
            .unwrap()
            .requests_per_unit,
        10
    );
    assert!((8..=9).contains(&r.statuses[0].limit_remaining));
}

#[tokio::test]
async fn every_runtime_setting_serves_and_counts_exactly() {
    let rules =
        "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: hour, requests_per_unit: 2}\n";
    let dir = config_dir(&[("rules.yaml", rules)]);
    for env in [
        [("RUNTIME_FLAVOR", "multi_thread"), ("WORKER_THREADS", "1")],
        [
            ("RUNTIME_FLAVOR", "current_thread"),
            ("WORKER_THREADS", "0"),
        ],
        [("RUNTIME_FLAVOR", "multi-thread"), ("WORKER_THREADS", "3")],
        [("RUNTIME_FLAVOR", "per_core"), ("WORKER_THREADS", "0")],
        [("RUNTIME_FLAVOR", "per-core"), ("WORKER_THREADS", "1")],
    ] {
        let rl = Ratelimitd::builder(dir.path()).envs(&env).start();
        let mut c = rl.client().await;
        let mut answers = Vec::new();
        for _ in 0..3 {
            let r = c
                .should_rate_limit(request("d", &[&[("k", "v")]]))
                .await
                .unwrap()
                .into_inner();
            answers.push((r.overall_code, r.statuses[0].limit_remaining));
        }
        assert_eq!(
            answers,
            [
                (Code::Ok as i32, 1),
                (Code::Ok as i32, 0),
                (Code::OverLimit as i32, 0)
            ],
            "{env:?}"
        );
    }
}
