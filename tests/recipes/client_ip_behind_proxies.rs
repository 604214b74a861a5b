//! examples/client-ip-behind-proxies, through the real Envoy, ratelimitd and redis-server with
//! the recipe's own files. It proves, from the exact Redis keys and counts:
//! - the client is the right-most X-Forwarded-For hop (`xff_num_trusted_hops: 1`): a client
//!   varying the left-most hop still hits its own limit, and another client sending the same
//!   left-most hop has its own count; no spoofed address is ever counted;
//! - the office /24 and the VPN /16 are never limited nor counted, while an office address
//!   spoofed in the left-most hop earns no exemption;
//! - the health paths answer 200 beyond the limit without any call to ratelimitd (Envoy's
//!   rate limit counters and Redis stay as they were).

use std::time::Duration;

use crate::support::http_header as header;
use crate::support::{ensure_window_room, http_request, recipe::Recipe, unix_now};

const RECIPE: &str = "client-ip-behind-proxies";
const UPSTREAM: &str = "hello from the upstream\n";

/// A GET of `path` as the load balancer forwards it, with this X-Forwarded-For.
fn get(recipe: &Recipe, path: &str, xff: &str) -> (u16, Vec<(String, String)>, String) {
    http_request(
        &recipe.envoy.ingress,
        "GET",
        path,
        &[("x-forwarded-for", xff)],
    )
}

/// Every key in the recipe's Redis with its value, sorted by key.
fn counters(recipe: &Recipe) -> Vec<(String, String)> {
    let reply = recipe.redis.command(&["KEYS", "*"]);
    let mut keys: Vec<&str> = reply
        .lines()
        .skip(1)
        .filter(|l| !l.starts_with('$'))
        .collect();
    keys.sort_unstable();
    keys.into_iter()
        .map(|key| {
            let value = recipe.redis.command(&["GET", key]);
            let value = value.lines().nth(1).unwrap_or_default().to_owned();
            (key.to_owned(), value)
        })
        .collect()
}

/// The counter of `address` (in `network`) in the minute starting at `window`.
fn counter(network: &str, address: &str, window: u64) -> String {
    format!("edge_masked_remote_address_{network}_remote_address_{address}_{window}")
}

/// Envoy's counts of answers from ratelimitd (ok, over_limit, error, ...), by stat name.
fn calls(recipe: &Recipe) -> std::collections::BTreeMap<String, u64> {
    recipe.envoy.stats("cluster.upstream.ratelimit.")
}

/// Waits, if needed, until a minute has 30 s left, so the test's requests share one fixed
/// window; returns that window's start.
async fn one_window() -> u64 {
    ensure_window_room(60, Duration::from_secs(30)).await;
    unix_now() / 60 * 60
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limit_follows_the_right_most_hop_not_the_spoofable_left_most() {
    let recipe = Recipe::start(RECIPE, &[]);
    let window = one_window().await;

    // The client 198.51.100.7, behind the load balancer, sends a different made-up left-most
    // hop each time: all five count against 198.51.100.7.
    for i in 0..5 {
        let (status, headers, body) = get(&recipe, "/", &format!("192.0.2.{i}, 198.51.100.7"));
        assert_eq!((status, body.as_str()), (200, UPSTREAM), "request {i}");
        assert_eq!(
            header(&headers, "x-ratelimit-limit"),
            Some("5, 5;w=60;name=\"per-client-ip\"")
        );
        assert_eq!(
            header(&headers, "x-ratelimit-remaining"),
            Some((4 - i).to_string().as_str())
        );
    }
    // A new left-most hop, or none, does not reset the count.
    for xff in ["192.0.2.99, 198.51.100.7", "198.51.100.7"] {
        let (status, headers, _) = get(&recipe, "/", xff);
        assert_eq!(status, 429, "{xff}");
        assert_eq!(header(&headers, "x-envoy-ratelimited"), Some("true"));
    }
    // Another client with the same left-most hop as before: its own count.
    let (status, headers, _) = get(&recipe, "/", "192.0.2.0, 198.51.100.8");
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-ratelimit-remaining"), Some("4"));
    // An IPv6 client: its /64 and its address.
    let (status, headers, _) = get(&recipe, "/", "192.0.2.0, 2001:db8:1:2::5");
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-ratelimit-remaining"), Some("4"));

    // Counted: the right-most hops only (a fixed window counts refused requests too, as the
    // reference does: 5 + 2). No 192.0.2.x anywhere.
    assert_eq!(
        counters(&recipe),
        [
            (
                counter("198.51.100.0/24", "198.51.100.7", window),
                "7".into()
            ),
            (
                counter("198.51.100.0/24", "198.51.100.8", window),
                "1".into()
            ),
            (
                counter("2001:db8:1:2::/64", "2001:db8:1:2::5", window),
                "1".into()
            ),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exempt_networks_and_health_paths_are_never_limited_nor_counted() {
    let recipe = Recipe::start(RECIPE, &[]);
    let window = one_window().await;

    // An office address in the left-most hop is not the client: 198.51.100.20 is, and is
    // limited like anyone.
    for i in 0..5 {
        let (status, _, _) = get(&recipe, "/", "203.0.113.9, 198.51.100.20");
        assert_eq!(status, 200, "request {i}");
    }
    let (status, _, _) = get(&recipe, "/", "203.0.113.9, 198.51.100.20");
    assert_eq!(status, 429);

    // The office network and the VPN: far beyond the limit, never refused.
    for client in ["203.0.113.9", "203.0.113.200", "10.20.0.1", "10.20.255.254"] {
        for i in 0..8 {
            let (status, headers, body) = get(&recipe, "/", &format!("192.0.2.1, {client}"));
            assert_eq!((status, body.as_str()), (200, UPSTREAM), "{client}: {i}");
            // Unlimited: ratelimitd reports no limit, so Envoy adds no X-RateLimit-* headers.
            assert_eq!(header(&headers, "x-ratelimit-limit"), None, "{client}");
        }
    }
    // 10.200.x.x is not the VPN's 10.20.0.0/16.
    let (status, headers, _) = get(&recipe, "/", "10.200.0.1");
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-ratelimit-remaining"), Some("4"));

    let answered = calls(&recipe);
    assert_eq!(
        answered,
        [
            ("cluster.upstream.ratelimit.ok".to_owned(), 5 + 4 * 8 + 1),
            ("cluster.upstream.ratelimit.over_limit".to_owned(), 1),
        ]
        .into()
    );
    let counted = [
        (
            counter("10.200.0.0/24", "10.200.0.1", window),
            "1".to_owned(),
        ),
        (
            counter("198.51.100.0/24", "198.51.100.20", window),
            "6".to_owned(),
        ),
    ];
    assert_eq!(counters(&recipe), counted);

    // Health checks from the client that is over its limit: 200, no call, nothing counted.
    for path in ["/healthz", "/ready", "/healthz?probe=lb"] {
        let (status, _, body) = get(&recipe, path, "198.51.100.20");
        assert_eq!((status, body.as_str()), (200, UPSTREAM), "{path}");
    }
    assert_eq!(calls(&recipe), answered);
    assert_eq!(counters(&recipe), counted);
    // Any other path is still limited.
    let (status, _, _) = get(&recipe, "/healthz/extra", "198.51.100.20");
    assert_eq!(status, 429);
}
