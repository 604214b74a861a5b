//! examples/several-windows: 10 per minute, 100 per hour and 500 per day for each user, all
//! enforced together, with strict charging. Proved through the real Envoy, ratelimitd and
//! Redis with the recipe's own files:
//! - the 11th request in a minute is 429 with `Retry-After` = the seconds left in the minute,
//!   and the minute, hour and day counters in Redis all stay at exactly 10 after refused
//!   requests (a refused request charges no window);
//! - `RateLimit-Limit` lists the three windows and `RateLimit-Remaining` counts down the one
//!   with the fewest requests left;
//! - another user has budgets of their own;
//! - the hour window refuses too (its counter pre-loaded in Redis to 99 under the key
//!   `explain` prints), waiting until the hour ends, while the minute and day counters count
//!   only what was admitted.

use std::time::Duration;

use crate::support::{ensure_window_room, http_request, recipe::Recipe, unix_now};
use crate::support::{
    http_header as header,
    recipe::{header_secs as secs, secs_to_window_end},
};

const NAME: &str = "several-windows";
/// Every window, as ratelimitd's `RateLimit-Limit` lists them after the reported limit.
const WINDOWS: &str = "10;w=60, 100;w=3600, 500;w=86400";

/// The Redis keys of `user`'s minute, hour and day counters at `now` (the layout `ratelimitd
/// explain` prints: a rule with several limits adds the window to the reference's key).
fn keys(user: &str, now: u64) -> [String; 3] {
    [(60, "1minute"), (3600, "1hour"), (86400, "1day")]
        .map(|(w, tag)| format!("{NAME}_user_{user}_{}_{tag}", now - now % w))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_minute_refuses_the_eleventh_and_refused_requests_charge_no_window() {
    let r = Recipe::start(NAME, &[]);
    let get = |user: &str| http_request(&r.envoy.ingress, "GET", "/", &[("x-user-id", user)]);
    let count = |key: &String| r.redis_number(&["GET", key]);

    // Everything below happens in one minute (hence one hour and one day): an hour or a day
    // ends only where a minute does.
    ensure_window_room(60, Duration::from_secs(30)).await;
    let now = unix_now();

    // Ten requests pass; the minute is the window with the fewest left.
    for left in (0..10).rev() {
        let before = secs_to_window_end(60);
        let (status, headers, body) = get("alice");
        let after = secs_to_window_end(60);
        assert_eq!(
            (status, body.as_str()),
            (200, "hello from the upstream\n"),
            "{headers:?}"
        );
        assert_eq!(
            header(&headers, "ratelimit-limit"),
            Some(format!("10, {WINDOWS}").as_str())
        );
        assert_eq!(
            header(&headers, "ratelimit-remaining"),
            Some(left.to_string().as_str())
        );
        // Reset: when the reported window, the minute, ends.
        let reset = secs(&headers, "ratelimit-reset");
        assert!(
            (after..=before).contains(&reset),
            "RateLimit-Reset {reset} not in {after}..={before}"
        );
    }

    // The 11th and 12th: refused until the minute ends.
    for _ in 0..2 {
        let before = secs_to_window_end(60);
        let (status, headers, _) = get("alice");
        let after = secs_to_window_end(60);
        assert_eq!(status, 429, "{headers:?}");
        assert_eq!(header(&headers, "x-envoy-ratelimited"), Some("true"));
        let wait = secs(&headers, "retry-after");
        assert!(
            (after..=before).contains(&wait),
            "Retry-After {wait} not in {after}..={before}"
        );
        assert_eq!(
            header(&headers, "ratelimit-limit"),
            Some(format!("10, {WINDOWS}").as_str())
        );
        assert_eq!(header(&headers, "ratelimit-remaining"), Some("0"));
        assert_eq!(
            header(&headers, "ratelimit-reset"),
            Some(wait.to_string().as_str())
        );
    }
    // Strict charging: the two refused requests are in none of the windows.
    for key in &keys("alice", now) {
        assert_eq!(count(key), Some(10), "{key}");
    }

    // Another user, in the same minute, has all three windows to themselves.
    let (status, headers, _) = get("bob");
    assert_eq!(status, 200, "{headers:?}");
    assert_eq!(header(&headers, "ratelimit-remaining"), Some("9"));
    for key in &keys("bob", now) {
        assert_eq!(count(key), Some(1), "{key}");
    }

    // The hour window refuses too: carol has already made 99 requests this hour (as if
    // spread over earlier minutes; the counter is set directly in Redis, with a TTL as
    // ratelimitd would give it).
    let [minute, hour, day] = keys("carol", now);
    assert_eq!(
        r.redis.command(&["SET", &hour, "99", "EX", "3600"]),
        "+OK\r\n"
    );
    let before = secs_to_window_end(3600);
    let (status, headers, _) = get("carol");
    let after = secs_to_window_end(3600);
    assert_eq!(status, 200, "the hour's 100th: {headers:?}");
    // Reported: the hour, now with the fewest left (the minute has 9), resetting when the
    // hour ends.
    assert_eq!(
        header(&headers, "ratelimit-limit"),
        Some(format!("100, {WINDOWS}").as_str())
    );
    assert_eq!(header(&headers, "ratelimit-remaining"), Some("0"));
    let reset = secs(&headers, "ratelimit-reset");
    assert!(
        (after..=before).contains(&reset),
        "RateLimit-Reset {reset} not in {after}..={before}"
    );
    for _ in 0..2 {
        let before = secs_to_window_end(3600);
        let (status, headers, _) = get("carol");
        let after = secs_to_window_end(3600);
        assert_eq!(status, 429, "over the hour, within the minute: {headers:?}");
        let wait = secs(&headers, "retry-after");
        assert!(
            (after..=before).contains(&wait),
            "Retry-After {wait} not in {after}..={before} (the hour's end)"
        );
        assert_eq!(
            header(&headers, "ratelimit-limit"),
            Some(format!("100, {WINDOWS}").as_str())
        );
        assert_eq!(header(&headers, "ratelimit-remaining"), Some("0"));
    }
    // The minute and the day counted the one admitted request only.
    assert_eq!(count(&minute), Some(1));
    assert_eq!(count(&hour), Some(100));
    assert_eq!(count(&day), Some(1));
}
