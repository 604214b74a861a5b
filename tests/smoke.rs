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
