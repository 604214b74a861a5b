//! examples/global-cap, through the real Envoy, ratelimitd and redis-server with the recipe's
//! own files (ratelimitd serving a copy of its rules directory, which phase 2 edits).
//! It proves, with exact Redis counters and ratelimitd's Prometheus `/metrics`:
//! - phase 1 (as shipped, `shadow_mode: true`): with the global counter past 1,000 requests
//!   are still served (200), each counted in the cap's counter and in
//!   `ratelimit_service_rate_limit_shadow_mode{domain="global_cap",key1="generic_key_global"}`,
//!   while the per-user limit refuses a user's 101st request, charging nothing (STRICT_CHARGING);
//! - phase 2: the rule file rewritten with `shadow_mode: false` is reloaded with no restart, the
//!   cap keeps its counter (same key, same count), and the next request is 429 with
//!   Retry-After, again charging nothing.
//!
//! The first 900 of the hour's requests are not sent: the test writes the cap's counter as
//! ratelimitd would have left it (`SET global_cap_generic_key_global_<hour> 900`, expiring at
//! the end of the hour). The other requests all go through Envoy.

use std::time::{Duration, Instant};

use crate::support::http_header as header;
use crate::support::{
    ensure_window_room, http_get, http_request, recipe::Recipe, sample, unix_now,
};

/// A GET of `/` as the user `user` (`None`: no x-user-id): (status, headers, body).
fn get(r: &Recipe, user: Option<&str>) -> (u16, Vec<(String, String)>, String) {
    let headers: Vec<(&str, &str)> = user.map(|u| ("x-user-id", u)).into_iter().collect();
    http_request(&r.envoy.ingress, "GET", "/", &headers)
}

fn assert_served((status, headers, body): &(u16, Vec<(String, String)>, String), what: &str) {
    assert_eq!(
        (*status, body.as_str()),
        (200, "hello from the upstream\n"),
        "{what}: {headers:?}"
    );
    assert_eq!(header(headers, "x-envoy-ratelimited"), None, "{what}");
}

/// A 429 from the rate limit filter, whose Retry-After is the rest of the hour.
fn assert_refused((status, headers, body): &(u16, Vec<(String, String)>, String), what: &str) {
    assert_eq!((*status, body.as_str()), (429, ""), "{what}: {headers:?}");
    assert_eq!(
        header(headers, "x-envoy-ratelimited"),
        Some("true"),
        "{what}"
    );
    let retry: u64 = header(headers, "retry-after").unwrap().parse().unwrap();
    let left = 3600 - unix_now() % 3600;
    assert!(
        retry.abs_diff(left) <= 2,
        "{what}: Retry-After {retry}, {left} s left in the hour"
    );
}

/// The cap's per-rule series `name` on ratelimitd's `/metrics` (0 when not yet exported).
fn cap_metric(r: &Recipe, name: &str) -> f64 {
    let (status, text) = http_get(&r.rl.http, "/metrics");
    assert_eq!(status, 200);
    let labels = [("domain", "global_cap"), ("key1", "generic_key_global")];
    sample(&text, name, &labels).unwrap_or(0.0)
}

const SHADOW: &str = "ratelimit_service_rate_limit_shadow_mode";
const OVER: &str = "ratelimit_service_rate_limit_over_limit";
const TOTAL: &str = "ratelimit_service_rate_limit_total_hits";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_mode_first_then_enforced_by_a_hot_reload_keeping_the_count() {
    let r = Recipe::start_with_copied_rules("global-cap", &[]);
    // All of it in one hour window: about 110 requests and one reload.
    ensure_window_room(3600, Duration::from_secs(120)).await;
    let now = unix_now();
    let hour = now - now % 3600;
    let global = format!("global_cap_generic_key_global_{hour}");
    let user = |id: &str| format!("global_cap_user_{id}_{hour}");
    let count = |key: &str| r.redis_number(&["GET", key]);
    r.redis.command(&[
        "SET",
        &global,
        "900",
        "EX",
        &(hour + 3600 - now).to_string(),
    ]);

    // Phase 1, as shipped. Alice's 100 requests take the cap to exactly 1,000: all within.
    for i in 0..100 {
        assert_served(&get(&r, Some("alice")), &format!("alice #{i}"));
    }
    assert_eq!(count(&global), Some(1000));
    assert_eq!(count(&user("alice")), Some(100));
    assert_eq!(cap_metric(&r, SHADOW), 0.0);
    // Bob's 5: each over the cap, each served, each counted in the cap and in shadow_mode.
    for i in 0..5 {
        let got = get(&r, Some("bob"));
        assert_served(&got, &format!("bob #{i} (over the cap, shadowed)"));
        // What the cap would say, on a request it let through: nothing left.
        assert_eq!(
            header(&got.1, "x-ratelimit-remaining"),
            Some("0"),
            "{:?}",
            got.1
        );
    }
    assert_eq!(count(&global), Some(1005));
    assert_eq!(count(&user("bob")), Some(5));
    assert_eq!(cap_metric(&r, SHADOW), 5.0);
    assert_eq!(cap_metric(&r, OVER), 5.0);
    assert_eq!(cap_metric(&r, TOTAL), 105.0);
    // Alice's 101st: her own limit is enforced; nothing is charged, the cap included.
    assert_refused(&get(&r, Some("alice")), "alice #101");
    assert_eq!(count(&user("alice")), Some(100));
    assert_eq!(count(&global), Some(1005));
    // The metrics count what each rule decided: the cap, alone, would have refused this
    // request too (1,006 > 1,000), so it is a shadow-mode hit, though it charged nothing.
    assert_eq!(cap_metric(&r, SHADOW), 6.0);
    assert_eq!(cap_metric(&r, OVER), 6.0);
    assert_eq!(cap_metric(&r, TOTAL), 106.0);

    // Phase 2: shadow_mode: false, written aside and renamed over the file, as an operator
    // (or the kubelet) replaces it. ratelimitd reloads by itself: wait until /rlconfig says so.
    let file = r.rules.join("global_cap.yaml");
    let shipped = std::fs::read_to_string(&file).unwrap();
    // The rule's own line (the comments above it mention the setting too).
    let (shadowed, enforcing) = ("\n    shadow_mode: true\n", "\n    shadow_mode: false\n");
    assert_eq!(shipped.matches(shadowed).count(), 1);
    let aside = r.rules.join("global_cap.yaml.new");
    std::fs::write(&aside, shipped.replace(shadowed, enforcing)).unwrap();
    std::fs::rename(&aside, &file).unwrap();
    let enforced = "global_cap.generic_key_global: unit=HOUR requests_per_unit=1000, \
                    shadow_mode: false, quota_mode: false\n";
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, rules) = http_get(&r.rl.http, "/rlconfig");
        if rules.contains(enforced) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not reloaded in 20 s:\n{rules}\n{}",
            r.rl.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(r.rl.log().contains("config reloaded"), "{}", r.rl.log());
    // Same rule, same key, same count: the reload did not reset the cap.
    assert_eq!(count(&global), Some(1005));

    // Bob (4 of his 100 left) is now refused by the cap, and charged nothing.
    assert_refused(&get(&r, Some("bob")), "bob after the flip");
    assert_eq!(count(&global), Some(1005));
    assert_eq!(count(&user("bob")), Some(5));
    // So is a request without a user (the cap alone).
    assert_refused(&get(&r, None), "no user after the flip");
    assert_eq!(count(&global), Some(1005));
    // Refusals now: over_limit counts them, shadow_mode no longer does.
    assert_eq!(cap_metric(&r, SHADOW), 6.0);
    assert_eq!(cap_metric(&r, OVER), 8.0);
    assert_eq!(cap_metric(&r, TOTAL), 108.0);
    let mut want = vec![global.clone(), user("alice"), user("bob")];
    want.sort();
    assert_eq!(r.redis_keys(), want);

    // 105 served, 3 refused; every call answered by ratelimitd, none failed open.
    let stats = r.envoy.stats("ratelimit");
    let stat = |name: &str| {
        stats
            .get(&format!("cluster.upstream.ratelimit.{name}"))
            .copied()
    };
    assert_eq!(stat("ok"), Some(105), "{stats:?}");
    assert_eq!(stat("over_limit"), Some(3), "{stats:?}");
    assert_eq!(stat("error").unwrap_or(0), 0, "{stats:?}");
    assert_eq!(stat("failure_mode_allowed").unwrap_or(0), 0, "{stats:?}");
}
