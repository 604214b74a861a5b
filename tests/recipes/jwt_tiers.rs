//! examples/jwt-tiers: Envoy's jwt_authn verifies a Bearer JWT; the verified payload's `tier`
//! and `user_id` claims become the descriptor (tier, user_id), limited per tier (standard 5,
//! premium 20, any other tier 5 per minute); requests without a token are limited per client
//! IP (2 per minute); a token that fails verification is refused (401; 403 for a wrong
//! audience) before any rate limit call.
//!
//! The test makes its own Ed25519 key pair, puts its public key in place of the recipe's
//! placeholder JWKS (the one edit to the shipped envoy.yaml) and signs its tokens itself.

use std::{net::Ipv4Addr, time::Duration};

use rcgen::{KeyPair, SigningKey, PKCS_ED25519};
use serde_json::{json, Value};

use crate::support::http_header as header;
use crate::support::{
    ensure_window_room, http_request,
    recipe::{http_request_from, Recipe},
    unix_now, RedisServer,
};

const NAME: &str = "jwt-tiers";
/// The issuer and audience the shipped jwt_authn provider accepts.
const ISSUER: &str = "https://idp.example.com";
const AUDIENCE: &str = "api.example.com";

/// Base64url without padding (RFC 7515 §2), as JWTs and JWKs use it.
fn b64url(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(char::from(ABC[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

/// An identity provider made in the test: an Ed25519 key pair that signs EdDSA JWTs.
struct Idp {
    key: KeyPair,
}

impl Idp {
    fn new() -> Self {
        Self {
            key: KeyPair::generate_for(&PKCS_ED25519).unwrap(),
        }
    }

    /// The public key as a JWK's `x` (the raw 32 bytes, base64url).
    fn jwk_x(&self) -> String {
        b64url(self.key.public_key_raw())
    }

    /// A JWT with exactly these claims, signed with this key.
    fn sign(&self, claims: &Value) -> String {
        let header = json!({"alg": "EdDSA", "typ": "JWT", "kid": "recipe-demo"});
        let input = format!(
            "{}.{}",
            b64url(header.to_string().as_bytes()),
            b64url(claims.to_string().as_bytes())
        );
        let sig = self.key.sign(input.as_bytes()).unwrap();
        format!("{input}.{}", b64url(&sig))
    }

    /// A valid token for `user_id` with `extra` claims (e.g. `tier`) added, valid for an hour.
    fn token(&self, user_id: &str, extra: &[(&str, &str)]) -> String {
        let mut claims = json!({
            "iss": ISSUER,
            "aud": AUDIENCE,
            "exp": unix_now() + 3600,
            "user_id": user_id,
        });
        for (k, v) in extra {
            claims[*k] = json!(v);
        }
        self.sign(&claims)
    }
}

/// The recipe as shipped, with `idp`'s public key in place of the placeholder JWKS key.
fn start(idp: &Idp) -> Recipe {
    Recipe::start_with_envoy_edit(NAME, &[], |shipped| {
        let (_, rest) = shipped
            .split_once(r#""kty":"OKP","crv":"Ed25519""#)
            .expect("envoy.yaml: an Ed25519 key in the local JWKS");
        let placeholder = rest
            .split_once(r#""x":""#)
            .and_then(|(_, x)| x.split_once('"'))
            .expect("envoy.yaml: the JWK's x")
            .0;
        assert_eq!(shipped.matches(placeholder).count(), 1);
        shipped.replace(placeholder, &idp.jwk_x())
    })
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Every key in Redis, sorted.
fn redis_keys(redis: &RedisServer) -> Vec<String> {
    let reply = redis.command(&["KEYS", "*"]);
    let mut keys: Vec<String> = reply
        .split("\r\n")
        .filter(|l| !l.is_empty() && !l.starts_with('*') && !l.starts_with('$'))
        .map(str::to_owned)
        .collect();
    keys.sort();
    keys
}

/// A counter's value.
fn count(redis: &RedisServer, key: &str) -> u64 {
    let reply = redis.command(&["GET", key]);
    reply
        .split("\r\n")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("GET {key}: {reply:?}"))
}

/// The sum of Envoy's rate limit filter counters ending in `.ratelimit.<what>`.
fn ratelimit_stat(recipe: &Recipe, what: &str) -> u64 {
    let suffix = format!(".ratelimit.{what}");
    recipe
        .envoy
        .stats("ratelimit")
        .iter()
        .filter(|(k, _)| k.ends_with(&suffix))
        .map(|(_, v)| *v)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_that_fails_verification_is_refused_before_any_rate_limit_call() {
    let idp = Idp::new();
    let recipe = start(&idp);
    let ingress = &recipe.envoy.ingress;
    let attacker = Idp::new();
    let valid = idp.token("alice", &[("tier", "standard")]);
    // alice's token with its payload rewritten to premium, her signature kept.
    let upgraded = {
        let parts: Vec<&str> = valid.split('.').collect();
        let claims = json!({
            "iss": ISSUER, "aud": AUDIENCE, "exp": unix_now() + 3600,
            "user_id": "alice", "tier": "premium",
        });
        format!(
            "{}.{}.{}",
            parts[0],
            b64url(claims.to_string().as_bytes()),
            parts[2]
        )
    };
    let unsigned = format!(
        "{}.{}.",
        b64url(br#"{"alg":"none","typ":"JWT"}"#),
        b64url(
            json!({"iss": ISSUER, "aud": AUDIENCE, "exp": unix_now() + 3600,
                   "user_id": "mallory", "tier": "premium"})
            .to_string()
            .as_bytes()
        )
    );
    let claims = |iss: &str, aud: &str, exp: u64| json!({"iss": iss, "aud": aud, "exp": exp, "user_id": "alice", "tier": "premium"});
    const BAD_SIGNATURE: &str = "Jwt verification fails";
    const MALFORMED: &str =
        "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections";
    // (what, token, Envoy's status, Envoy's body)
    let refused = [
        (
            "signed by another key",
            attacker.token("mallory", &[("tier", "premium")]),
            401,
            BAD_SIGNATURE,
        ),
        (
            "payload changed after signing",
            upgraded,
            401,
            BAD_SIGNATURE,
        ),
        ("alg none, no signature", unsigned, 401, MALFORMED),
        (
            "expired",
            idp.sign(&claims(ISSUER, AUDIENCE, unix_now() - 600)),
            401,
            "Jwt is expired",
        ),
        (
            "another issuer",
            idp.sign(&claims("https://evil.example", AUDIENCE, unix_now() + 3600)),
            401,
            "Jwt issuer is not configured",
        ),
        (
            "another audience",
            idp.sign(&claims(ISSUER, "other.example", unix_now() + 3600)),
            403,
            "Audiences in Jwt are not allowed",
        ),
        (
            "no exp (require_expiration)",
            idp.sign(&json!({"iss": ISSUER, "aud": AUDIENCE, "user_id": "alice"})),
            401,
            BAD_SIGNATURE,
        ),
        ("not a JWT", "not-a-jwt".to_owned(), 401, MALFORMED),
    ];
    for (what, token, code, message) in &refused {
        let (status, headers, body) =
            http_request(ingress, "GET", "/", &[("authorization", &bearer(token))]);
        assert_eq!((status, body.as_str()), (*code, *message), "{what}");
        assert!(
            header(&headers, "www-authenticate").is_some_and(|v| v.starts_with("Bearer")),
            "{what}: {headers:?}"
        );
        assert_eq!(header(&headers, "x-ratelimit-limit"), None, "{what}");
    }
    // None of them reached ratelimitd or Redis.
    for what in ["ok", "over_limit", "error", "failure_mode_allowed"] {
        assert_eq!(ratelimit_stat(&recipe, what), 0, "ratelimit.{what}");
    }
    assert_eq!(
        recipe
            .envoy
            .stats("cluster.ratelimitd.upstream_rq_total")
            .values()
            .sum::<u64>(),
        0
    );
    assert_eq!(redis_keys(&recipe.redis), Vec::<String>::new());

    // Headers a client sets are not claims: an anonymous request claiming a tier, a user and
    // another address gets the anonymous per-IP budget of its real address (2 per minute).
    ensure_window_room(60, Duration::from_secs(10)).await;
    let window = unix_now() / 60 * 60;
    let spoofed = [
        ("x-tier", "premium"),
        ("tier", "premium"),
        ("x-user-id", "carol"),
        ("user_id", "carol"),
        ("x-forwarded-for", "198.51.100.7"),
        ("x-jwt-payload", "eyJ0aWVyIjoicHJlbWl1bSJ9"),
    ];
    for left in ["1", "0"] {
        let (status, headers, _) = http_request(ingress, "GET", "/", &spoofed);
        assert_eq!(status, 200, "{headers:?}");
        assert_eq!(header(&headers, "x-ratelimit-remaining"), Some(left));
    }
    let (status, headers, _) = http_request(ingress, "GET", "/", &spoofed);
    assert_eq!(status, 429, "{headers:?}");
    assert_eq!(
        redis_keys(&recipe.redis),
        [format!(
            "jwt_tiers_user_id_anonymous_remote_address_127.0.0.1_{window}"
        )]
    );
    // The one signed token of this test still passes, with its own (standard) budget.
    let (status, headers, _) =
        http_request(ingress, "GET", "/", &[("authorization", &bearer(&valid))]);
    assert_eq!(status, 200, "{headers:?}");
    assert_eq!(header(&headers, "x-ratelimit-remaining"), Some("4"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_tier_limits_each_user_and_anonymous_clients_are_limited_per_ip() {
    let idp = Idp::new();
    let recipe = start(&idp);
    let ingress = &recipe.envoy.ingress;
    let as_user = |token: &str| {
        let auth = bearer(token);
        http_request(ingress, "GET", "/", &[("authorization", &auth)])
    };
    let alice = idp.token("alice", &[("tier", "standard")]);
    let bob = idp.token("bob", &[("tier", "standard")]);
    let carol = idp.token("carol", &[("tier", "premium")]);
    let dave = idp.token("dave", &[]);
    let erin = idp.token("erin", &[("tier", "gold")]);

    // About 45 requests, all in one minute window.
    ensure_window_room(60, Duration::from_secs(20)).await;
    let window = unix_now() / 60 * 60;

    // Anonymous, from 127.0.0.1: 2 per minute, then 429 with Retry-After.
    let anonymous =
        |source: [u8; 4]| http_request_from(Ipv4Addr::from(source), ingress, "GET", "/", &[]);
    for left in ["1", "0"] {
        let (status, headers, body) = anonymous([127, 0, 0, 1]).await;
        assert_eq!((status, body.as_str()), (200, "hello from the upstream\n"));
        assert_eq!(header(&headers, "x-ratelimit-remaining"), Some(left));
        assert!(
            header(&headers, "x-ratelimit-limit") == Some(r#"2, 2;w=60;name="anonymous""#),
            "{headers:?}"
        );
    }
    let (status, headers, _) = anonymous([127, 0, 0, 1]).await;
    assert_eq!(status, 429, "{headers:?}");
    assert_eq!(header(&headers, "x-envoy-ratelimited"), Some("true"));
    let retry: u64 = header(&headers, "retry-after").unwrap().parse().unwrap();
    assert!(
        (1..=60).contains(&retry) && retry.abs_diff(60 - unix_now() % 60) <= 1,
        "retry-after {retry}"
    );
    // Another client address has its own anonymous budget.
    let (status, headers, _) = anonymous([127, 0, 0, 2]).await;
    assert_eq!(status, 200, "{headers:?}");
    assert_eq!(header(&headers, "x-ratelimit-remaining"), Some("1"));

    // Standard: 5 per minute per user, from the same address whose anonymous budget is spent
    // (signed-in requests are not counted per IP).
    for left in ["4", "3", "2", "1", "0"] {
        let (status, headers, _) = as_user(&alice);
        assert_eq!(status, 200, "{headers:?}");
        assert_eq!(header(&headers, "x-ratelimit-remaining"), Some(left));
        assert!(
            header(&headers, "x-ratelimit-limit") == Some(r#"5, 5;w=60;name="standard""#),
            "{headers:?}"
        );
    }
    let (status, headers, _) = as_user(&alice);
    assert_eq!(status, 429, "{headers:?}");
    assert!(header(&headers, "retry-after").is_some(), "{headers:?}");
    // bob, also standard, is counted apart from alice.
    let (status, headers, _) = as_user(&bob);
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-ratelimit-remaining"), Some("4"));

    // Premium: 20 per minute.
    for i in 0..20 {
        let (status, headers, _) = as_user(&carol);
        assert_eq!(status, 200, "request {i}: {headers:?}");
        assert_eq!(
            header(&headers, "x-ratelimit-remaining"),
            Some((19 - i).to_string().as_str())
        );
    }
    let (status, headers, _) = as_user(&carol);
    assert_eq!(status, 429, "{headers:?}");
    assert!(
        header(&headers, "x-ratelimit-limit") == Some(r#"20, 20;w=60;name="premium""#),
        "{headers:?}"
    );

    // A verified token without a tier claim is standard; an unknown tier gets the catch-all
    // rule's limit (also 5), counted under its own tier value.
    for (token, rule) in [(&dave, "standard"), (&erin, "unknown-tier")] {
        for _ in 0..5 {
            assert_eq!(as_user(token).0, 200);
        }
        let (status, headers, _) = as_user(token);
        assert_eq!(status, 429, "{headers:?}");
        assert_eq!(
            header(&headers, "x-ratelimit-limit"),
            Some(format!(r#"5, 5;w=60;name="{rule}""#).as_str())
        );
    }

    // A verified token whose user_id is not a string (here a number) has no user to count:
    // it is counted as anonymous, per IP (from 127.0.0.3, a budget of its own).
    let numeric = idp.sign(&json!({
        "iss": ISSUER, "aud": AUDIENCE, "exp": unix_now() + 3600,
        "user_id": 42, "tier": "premium",
    }));
    let auth = bearer(&numeric);
    let (status, headers, _) = http_request_from(
        Ipv4Addr::new(127, 0, 0, 3),
        ingress,
        "GET",
        "/",
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(status, 200, "{headers:?}");
    assert_eq!(
        header(&headers, "x-ratelimit-limit"),
        Some(r#"2, 2;w=60;name="anonymous""#)
    );

    // Exactly these counters, each holding every request it saw (a fixed window counts the
    // refused ones too, as the reference does).
    assert_eq!(unix_now() / 60 * 60, window, "the test ran in one window");
    let key = |rest: &str| format!("jwt_tiers_{rest}_{window}");
    let expected = [
        (key("tier_gold_user_id_erin"), 6),
        (key("tier_premium_user_id_carol"), 21),
        (key("tier_standard_user_id_alice"), 6),
        (key("tier_standard_user_id_bob"), 1),
        (key("tier_standard_user_id_dave"), 6),
        (key("user_id_anonymous_remote_address_127.0.0.1"), 3),
        (key("user_id_anonymous_remote_address_127.0.0.2"), 1),
        (key("user_id_anonymous_remote_address_127.0.0.3"), 1),
    ];
    assert_eq!(
        redis_keys(&recipe.redis),
        expected.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>()
    );
    for (k, n) in &expected {
        assert_eq!(count(&recipe.redis, k), *n, "{k}");
    }
    assert_eq!(ratelimit_stat(&recipe, "error"), 0);
    assert_eq!(ratelimit_stat(&recipe, "failure_mode_allowed"), 0);
}
