//! examples/public-widget, through the real Envoy, ratelimitd and redis-server with the
//! recipe's own files. Clients are told apart by their source address (the test connects from
//! 127.0.0.2, .3 and .4; the recipe's Envoy believes the connection, not X-Forwarded-For).
//! It proves, with exact Redis counters:
//! - the session window (5/minute per client IP) is counted for every request, with a known
//!   key, an unknown key or none, under the client's IP only;
//! - a request the session window refuses leaves the key's counter unchanged (and its own:
//!   STRICT_CHARGING);
//! - the key window (8/hour for `pk_acme_7f3k`) is shared by every client of that key and
//!   refuses when full, without charging the session of the refused request;
//! - twenty distinct made-up keys, allowed or refused, leave no Redis key mentioning them;
//! - a spoofed X-Forwarded-For does not move a client to another session;
//! - every call was answered (no call failed open).

use std::{net::Ipv4Addr, time::Duration};

use crate::support::http_header as header;
use crate::support::{
    ensure_window_room,
    recipe::{http_request_from, Recipe},
    unix_now,
};

const ACME: &str = "pk_acme_7f3k";

/// A GET of `path` from the source address `from` (a loopback address other than 127.0.0.1 is
/// another client to Envoy's `remote_address`): (status, lower-cased headers, body).
async fn get_from(
    from: Ipv4Addr,
    ingress: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, Vec<(String, String)>, String) {
    http_request_from(from, ingress, "GET", path, headers).await
}

/// A counter's value (`None`: no such key).
fn count(r: &Recipe, key: &str) -> Option<i64> {
    r.redis_number(&["GET", key])
}

/// A 200 from the upstream, with the rate limit headers of an allowed request.
fn assert_allowed((status, headers, body): &(u16, Vec<(String, String)>, String), what: &str) {
    assert_eq!(
        (*status, body.as_str()),
        (200, "widget\n"),
        "{what}: {headers:?}"
    );
    assert_eq!(header(headers, "x-envoy-ratelimited"), None, "{what}");
}

/// A 429 from the rate limit filter, with a Retry-After of at most `window` seconds.
fn assert_refused((status, headers, body): &(u16, Vec<(String, String)>, String), window: u64) {
    assert_eq!((*status, body.as_str()), (429, ""), "{headers:?}");
    assert_eq!(header(headers, "x-envoy-ratelimited"), Some("true"));
    assert_eq!(header(headers, "x-ratelimit-remaining"), Some("0"));
    let retry: u64 = header(headers, "retry-after").unwrap().parse().unwrap();
    assert!((1..=window).contains(&retry), "Retry-After {retry}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_first_key_only_when_allowed_and_no_counters_for_unknown_keys() {
    let r = Recipe::start("public-widget", &[]);
    let ingress = r.envoy.ingress.clone();
    let [a, b, c] = [2, 3, 4].map(|i| Ipv4Addr::new(127, 0, 0, i));
    // Every request below in one minute (session windows) and one hour (key windows): about 40
    // requests, seconds even on a loaded machine.
    ensure_window_room(3600, Duration::from_secs(45)).await;
    ensure_window_room(60, Duration::from_secs(45)).await;
    let now = unix_now();
    let (minute, hour) = (now - now % 60, now - now % 3600);
    let session = |ip: Ipv4Addr| format!("public_widget_remote_address_{ip}_{minute}");
    let acme = format!("public_widget_widget_key_{ACME}_{hour}");
    assert_eq!(r.redis_keys(), Vec::<String>::new());

    // Client C with twenty made-up keys: the first five pass on the session window alone (one
    // claims another address in X-Forwarded-For, which this edge Envoy does not believe), the
    // next fifteen are refused by it. No counter is written for any made-up key.
    for i in 0..20 {
        let path = format!("/widget?key=pk_madeup_{i:02}");
        let spoof: &[(&str, &str)] = if i == 0 {
            &[("x-forwarded-for", "203.0.113.7")]
        } else {
            &[]
        };
        let got = get_from(c, &ingress, &path, spoof).await;
        if i < 5 {
            assert_allowed(&got, &path);
        } else {
            assert_refused(&got, 60);
        }
    }
    assert_eq!(r.redis_keys(), vec![session(c)]);
    assert_eq!(count(&r, &session(c)), Some(5));
    let ttl = r.redis_number(&["TTL", &session(c)]).unwrap();
    assert!((1..=60 + 300).contains(&ttl), "TTL {ttl}");

    // Client A with the known key: five pass, charged to A's session and to the key.
    for i in 0..5 {
        let got = get_from(a, &ingress, &format!("/widget?key={ACME}"), &[]).await;
        assert_allowed(&got, &format!("A #{i}"));
    }
    assert_eq!(count(&r, &session(a)), Some(5));
    assert_eq!(count(&r, &acme), Some(5));
    // A's sixth: the session window refuses, and the key's counter is not touched.
    let got = get_from(a, &ingress, &format!("/widget?key={ACME}"), &[]).await;
    assert_refused(&got, 60);
    assert_eq!(count(&r, &session(a)), Some(5));
    assert_eq!(count(&r, &acme), Some(5));

    // Client B with the same key: the key has 3 of its 8 left this hour, whatever B's session.
    for i in 0..3 {
        let got = get_from(b, &ingress, &format!("/widget?key={ACME}"), &[]).await;
        assert_allowed(&got, &format!("B #{i}"));
    }
    assert_eq!(count(&r, &session(b)), Some(3));
    assert_eq!(count(&r, &acme), Some(8));
    // B's fourth: the key window refuses; B's session (3 of 5) is not charged for it.
    let got = get_from(b, &ingress, &format!("/widget?key={ACME}"), &[]).await;
    assert_refused(&got, 3600);
    assert_eq!(count(&r, &session(b)), Some(3));
    assert_eq!(count(&r, &acme), Some(8));
    // Without a key, B is limited by its session alone.
    let got = get_from(b, &ingress, "/widget", &[]).await;
    assert_allowed(&got, "B without a key");
    assert_eq!(count(&r, &session(b)), Some(4));

    // Exactly one counter per client and one for the known key: nothing for 203.0.113.7,
    // nothing for any made-up key, nothing per (client, key).
    let mut want = vec![session(a), session(b), session(c), acme.clone()];
    want.sort();
    assert_eq!(r.redis_keys(), want);
    let ttl = r.redis_number(&["TTL", &acme]).unwrap();
    assert!((1..=3600 + 300).contains(&ttl), "TTL {ttl}");

    // 5 + 15 (C), 5 + 1 (A), 3 + 1 + 1 (B): every call answered by ratelimitd, none failed open.
    let stats = r.envoy.stats("ratelimit");
    let stat = |name: &str| {
        stats
            .get(&format!("cluster.upstream.ratelimit.{name}"))
            .copied()
    };
    assert_eq!(stat("ok"), Some(14), "{stats:?}");
    assert_eq!(stat("over_limit"), Some(17), "{stats:?}");
    assert_eq!(stat("error").unwrap_or(0), 0, "{stats:?}");
    assert_eq!(stat("failure_mode_allowed").unwrap_or(0), 0, "{stats:?}");
}
