//! examples/cost-budgets: each request carries its cost in micro-dollars, charged to the
//! user's budget ($5 per day) and to a global one ($100 per day) with strict charging, and the
//! response says what is left. Proved through the real Envoy, ratelimitd and Redis with the
//! recipe's own files:
//! - a request without a user or a well-formed cost is refused by Envoy (400) and charged
//!   nowhere; a cost of 0 is charged as 1;
//! - costs summing to exactly $5 pass, with `RateLimit-Remaining` the user's budget left in
//!   micro-dollars;
//! - a cost that does not fit is 429 (until the day ends) and charges nothing, in Redis, to
//!   either budget; a smaller one that still fits passes after it;
//! - the global budget, nearly spent (its counter pre-loaded in Redis under the key `explain`
//!   prints), admits another user's request that fits exactly and then refuses that user
//!   although their own budget has room; `RateLimit-*` then report the global budget;
//! - with ratelimitd stopped, Envoy refuses (503) rather than let spending through.

use std::time::Duration;

use crate::support::{ensure_window_room, http_request, recipe::Recipe, unix_now};
use crate::support::{
    http_header as header,
    recipe::{header_secs as secs, secs_to_window_end},
};

const NAME: &str = "cost-budgets";
const USER_LIMIT: &str = "5000000";
const GLOBAL_LIMIT: &str = "100000000";

/// Seconds until the current UTC day ends, as a fixed window reports them.
fn secs_to_day_end() -> u64 {
    secs_to_window_end(86_400)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn costs_fill_the_budget_exactly_a_cost_that_does_not_fit_charges_nothing() {
    let mut r = Recipe::start(NAME, &[]);
    let spend = |user: &str, cost: &str| {
        http_request(
            &r.envoy.ingress,
            "POST",
            "/v1/generate",
            &[("x-user-id", user), ("x-cost-microdollars", cost)],
        )
    };
    let spent = |key: &str| r.redis_number(&["GET", key]);

    // Everything below happens in one UTC day (one window of both budgets).
    ensure_window_room(86400, Duration::from_secs(60)).await;
    let day = unix_now() - unix_now() % 86400;
    let global = format!("{NAME}_generic_key_global_{day}");
    let alice = format!("{NAME}_user_alice_{day}");
    let bob = format!("{NAME}_user_bob_{day}");

    // No cost, an unreadable cost, no user: refused by Envoy, never reaching ratelimitd.
    for headers in [
        &[("x-user-id", "alice")][..],
        &[("x-user-id", "alice"), ("x-cost-microdollars", "12abc")],
        &[("x-user-id", "alice"), ("x-cost-microdollars", "-5")],
        &[("x-cost-microdollars", "100")],
    ] {
        let (status, _, body) = http_request(&r.envoy.ingress, "POST", "/v1/generate", headers);
        assert_eq!(
            (status, body.as_str()),
            (
                400,
                "x-user-id and x-cost-microdollars (whole micro-dollars) are required\n"
            ),
            "{headers:?}"
        );
    }
    assert_eq!(spent(&global), None, "nothing charged");

    // $2 + $2: passes, the user's budget is the one with the least left.
    for left in ["3000000", "1000000"] {
        let before = secs_to_day_end();
        let (status, headers, body) = spend("alice", "2000000");
        let after = secs_to_day_end();
        assert_eq!(
            (status, body.as_str()),
            (200, "hello from the upstream\n"),
            "{headers:?}"
        );
        assert_eq!(header(&headers, "ratelimit-limit"), Some(USER_LIMIT));
        assert_eq!(header(&headers, "ratelimit-remaining"), Some(left));
        // Reset: when the budget renews, at the end of the UTC day.
        let reset = secs(&headers, "ratelimit-reset");
        assert!(
            (after..=before).contains(&reset),
            "RateLimit-Reset {reset} not in {after}..={before}"
        );
    }

    // $1.50 does not fit the $1 left: refused until the day ends, and charged nowhere.
    let before = secs_to_day_end();
    let (status, headers, _) = spend("alice", "1500000");
    let after = secs_to_day_end();
    assert_eq!(status, 429, "{headers:?}");
    assert_eq!(header(&headers, "x-envoy-ratelimited"), Some("true"));
    let wait = secs(&headers, "retry-after");
    assert!(
        (after..=before).contains(&wait),
        "Retry-After {wait} not in {after}..={before}"
    );
    assert_eq!(header(&headers, "ratelimit-limit"), Some(USER_LIMIT));
    assert_eq!(header(&headers, "ratelimit-remaining"), Some("0"));
    assert_eq!(spent(&alice), Some(4000000));
    assert_eq!(spent(&global), Some(4000000));

    // $1 still fits: the budget is spent to the last micro-dollar, and then nothing fits.
    let (status, headers, _) = spend("alice", "1000000");
    assert_eq!(status, 200, "{headers:?}");
    assert_eq!(header(&headers, "ratelimit-remaining"), Some("0"));
    let (status, headers, _) = spend("alice", "1");
    assert_eq!(status, 429, "{headers:?}");
    assert_eq!(spent(&alice), Some(5000000));
    assert_eq!(spent(&global), Some(5000000));

    // A cost of 0 is charged as 1 (a request's hits_addend of 0 means 1).
    let dave = format!("{NAME}_user_dave_{day}");
    let (status, headers, _) = spend("dave", "0");
    assert_eq!(status, 200, "{headers:?}");
    assert_eq!(header(&headers, "ratelimit-remaining"), Some("4999999"));
    assert_eq!(spent(&dave), Some(1));
    assert_eq!(spent(&global), Some(5000001));

    // Everyone else has spent $99 today (set directly in Redis, with a TTL as ratelimitd
    // would give it): bob's $1 fits the global budget exactly, then the global budget, not
    // bob's own, refuses him.
    assert_eq!(
        r.redis
            .command(&["SET", &global, "99000000", "EX", "86400"]),
        "+OK\r\n"
    );
    let (status, headers, _) = spend("bob", "1000000");
    assert_eq!(status, 200, "{headers:?}");
    assert_eq!(header(&headers, "ratelimit-limit"), Some(GLOBAL_LIMIT));
    assert_eq!(header(&headers, "ratelimit-remaining"), Some("0"));
    let (status, headers, _) = spend("bob", "1");
    assert_eq!(status, 429, "{headers:?}");
    assert_eq!(header(&headers, "ratelimit-limit"), Some(GLOBAL_LIMIT));
    assert_eq!(header(&headers, "ratelimit-remaining"), Some("0"));
    assert_eq!(spent(&bob), Some(1000000), "$4 of bob's left");
    assert_eq!(spent(&global), Some(100000000));

    // Money fails closed: with ratelimitd gone, Envoy refuses (503) instead of letting
    // unmetered spending through.
    r.rl.terminate();
    let (status, headers, _) = http_request(
        &r.envoy.ingress,
        "POST",
        "/v1/generate",
        &[("x-user-id", "carol"), ("x-cost-microdollars", "1")],
    );
    assert_eq!(status, 503, "{headers:?}");
}
