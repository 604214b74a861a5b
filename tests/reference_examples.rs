#![allow(clippy::unwrap_used)]
//! Examples 1-11 of envoyproxy/ratelimit's README ("Configuration" → "Examples"), replayed
//! against the real `ratelimitd` binary over gRPC, once with the in-memory backend and once
//! with a real Redis.
//!
//! Every expected answer is what the reference computes (src/config/config_impl.go
//! `GetLimit`, src/service/ratelimit.go `constructLimitsToCheck`/`shouldRateLimitWorker`,
//! src/limiter/base_limiter.go `GetResponseDescriptorStatus`, src/limiter/cache_key.go):
//! - a descriptor matching no rule (or whose limit is replaced) → OK, no current limit,
//!   remaining 0, no `duration_until_reset`;
//! - `unlimited: true` → OK, no current limit, remaining u32::MAX, no `duration_until_reset`;
//! - a limit of N → the k-th hit in a window is OK with remaining N-k while k <= N, then
//!   OVER_LIMIT with remaining 0 (counters keep counting when over the limit);
//!   `duration_until_reset` is `window - now % window`, so within 1..=window;
//! - `current_limit.name` is the rule's `rate_limit.name` ("" when not set);
//! - `shadow_mode: true` turns a rule's OVER_LIMIT into OK (remaining stays 0).
//!
//! Deliberate differences from the reference that these tests expect: an OVER_LIMIT answer
//! carries one `Retry-After` header (1..=window seconds); no other header is sent because
//! `LIMIT_RESPONSE_HEADERS_ENABLED` is off, as in the reference's default.

mod support;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::future::join_all;
use ratelimitd::proto::envoy::service::ratelimit::v3::{
    rate_limit_response::{rate_limit::Unit, Code, RateLimit},
    rate_limit_service_client::RateLimitServiceClient,
    RateLimitRequest, RateLimitResponse,
};
use support::*;
use tempfile::TempDir;
use tonic::transport::Channel;

// ---------------------------------------------------------------------------------------------
// Harness around the support module
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Memory,
    Redis,
}

/// A configured limit as it must appear in `current_limit`.
#[derive(Clone, Copy, Debug)]
struct Lim {
    rpu: u32,
    unit: Unit,
    name: &'static str,
}

const fn lim(rpu: u32, unit: Unit) -> Lim {
    Lim {
        rpu,
        unit,
        name: "",
    }
}

const fn named(rpu: u32, unit: Unit, name: &'static str) -> Lim {
    Lim { rpu, unit, name }
}

impl Lim {
    fn proto(self) -> RateLimit {
        RateLimit {
            name: self.name.to_owned(),
            requests_per_unit: self.rpu,
            unit: self.unit as i32,
        }
    }
}

fn window_secs(unit: Unit) -> i64 {
    match unit {
        Unit::Second => 1,
        Unit::Minute => 60,
        Unit::Hour => 3600,
        Unit::Day => 86_400,
        other => panic!("unit {other:?} is not used by the README examples"),
    }
}

/// The expected status of one descriptor.
#[derive(Clone, Copy, Debug)]
enum Exp {
    /// No rule matched (or the rule was replaced): OK, no limit, remaining 0.
    NoRule,
    /// `unlimited: true`: OK, no limit, remaining u32::MAX.
    Unlimited,
    /// OK under `Lim` with this many requests left.
    Ok(Lim, u32),
    /// OVER_LIMIT under `Lim` (remaining 0).
    Over(Lim),
}

/// One running ratelimitd (and its Redis, for the Redis backend).
struct Rig {
    client: RateLimitServiceClient<Channel>,
    rl: Ratelimitd,
    redis: Option<RedisServer>,
    _dir: TempDir,
    /// When the current checked sequence started (for failure messages about timing).
    t0: Instant,
}

impl Rig {
    async fn start(backend: Backend, files: &[(&str, &str)]) -> Self {
        let dir = config_dir(files);
        let redis = (backend == Backend::Redis).then(RedisServer::start);
        let mut b = Ratelimitd::builder(dir.path());
        if let Some(r) = &redis {
            b = b.redis(r);
        }
        let rl = b.start();
        let client = rl.client().await;
        Self {
            client,
            rl,
            redis,
            _dir: dir,
            t0: Instant::now(),
        }
    }

    /// Waits for the start of the next second (+50 ms) so a per-second sequence fits in one
    /// window.
    async fn align_second(&mut self) {
        align_to_window(1, Duration::from_millis(50)).await;
        self.t0 = Instant::now();
    }

    /// Minute/hour/day windows all roll over on a minute boundary: if fewer than 5 s remain
    /// in this minute, wait for the next one.
    async fn avoid_minute_boundary(&mut self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        if 60.0 - now % 60.0 < 5.0 {
            align_to_window(60, Duration::from_millis(50)).await;
        }
        self.t0 = Instant::now();
    }

    fn ctx(&self, what: &str) -> String {
        format!(
            "{what} ({} ms into the sequence)\nratelimitd log:\n{}",
            self.t0.elapsed().as_millis(),
            self.rl.log()
        )
    }

    async fn send(&mut self, req: RateLimitRequest) -> RateLimitResponse {
        let what = format!("{req:?}");
        match self.client.should_rate_limit(req).await {
            Ok(r) => r.into_inner(),
            Err(e) => panic!("{}", self.ctx(&format!("request {what} failed: {e:?}"))),
        }
    }

    /// Sends `req` and checks every status against `exp` (in order) and the overall code.
    async fn expect(&mut self, req: RateLimitRequest, exp: &[Exp]) {
        let what = describe(&req);
        let resp = self.send(req).await;
        if let Err(msg) = check(&resp, exp) {
            panic!(
                "{}",
                self.ctx(&format!(
                    "{what}: {msg}\nexpected {exp:?}\nactual {resp:#?}"
                ))
            );
        }
    }

    /// Sends `n` copies of a one-descriptor request concurrently. All must be OK under `l`,
    /// and their `limit_remaining` values must be exactly `first-n+1 ..= first` (each hit
    /// counted once, atomically).
    async fn burst_ok(&mut self, req: RateLimitRequest, n: u32, l: Lim, first: u32) {
        assert!(n >= 1 && n <= first + 1);
        let what = describe(&req);
        let calls = (0..n).map(|_| {
            let mut c = self.client.clone();
            let r = req.clone();
            async move { c.should_rate_limit(r).await }
        });
        let results = join_all(calls).await;
        let mut remaining = Vec::with_capacity(n as usize);
        for r in results {
            let resp = match r {
                Ok(r) => r.into_inner(),
                Err(e) => panic!("{}", self.ctx(&format!("burst {what} failed: {e:?}"))),
            };
            let rem = resp.statuses.first().map_or(0, |s| s.limit_remaining);
            if let Err(msg) = check(&resp, &[Exp::Ok(l, rem)]) {
                panic!(
                    "{}",
                    self.ctx(&format!("burst of {n} × {what}: {msg}\nactual {resp:#?}"))
                );
            }
            remaining.push(rem);
        }
        remaining.sort_unstable();
        let want: Vec<u32> = (first + 1 - n..=first).collect();
        assert_eq!(
            remaining,
            want,
            "{}",
            self.ctx(&format!(
                "burst of {n} × {what}: limit_remaining values (sorted)"
            ))
        );
    }

    /// Sends `req` `n` times in a row; the i-th answer (0-based) is `exp(i)`.
    async fn expect_seq(&mut self, req: &RateLimitRequest, n: u32, exp: impl Fn(u32) -> Vec<Exp>) {
        for i in 0..n {
            self.expect(req.clone(), &exp(i)).await;
        }
    }
}

fn describe(req: &RateLimitRequest) -> String {
    let ds: Vec<String> = req
        .descriptors
        .iter()
        .map(|d| {
            let es: Vec<String> = d
                .entries
                .iter()
                .map(|e| format!("({}, {})", e.key, e.value))
                .collect();
            es.join(",")
        })
        .collect();
    format!("domain {} descriptors [{}]", req.domain, ds.join("] ["))
}

fn check(resp: &RateLimitResponse, exp: &[Exp]) -> Result<(), String> {
    if resp.statuses.len() != exp.len() {
        return Err(format!(
            "{} statuses, expected {}",
            resp.statuses.len(),
            exp.len()
        ));
    }
    let mut over_window = 0i64;
    for (i, (s, e)) in resp.statuses.iter().zip(exp).enumerate() {
        let fail = |m: String| Err(format!("status {i}: {m}"));
        match *e {
            Exp::NoRule | Exp::Unlimited => {
                let rem = if matches!(e, Exp::NoRule) {
                    0
                } else {
                    u32::MAX
                };
                if s.code != Code::Ok as i32 {
                    return fail(format!("code {} expected OK", s.code));
                }
                if s.current_limit.is_some() {
                    return fail(format!("current_limit {:?} expected None", s.current_limit));
                }
                if s.limit_remaining != rem {
                    return fail(format!(
                        "limit_remaining {} expected {rem}",
                        s.limit_remaining
                    ));
                }
                if s.duration_until_reset.is_some() {
                    return fail(format!(
                        "duration_until_reset {:?} expected None",
                        s.duration_until_reset
                    ));
                }
            }
            Exp::Ok(l, _) | Exp::Over(l) => {
                let (code, rem) = match *e {
                    Exp::Ok(_, r) => (Code::Ok, r),
                    _ => (Code::OverLimit, 0),
                };
                if s.code != code as i32 {
                    return fail(format!(
                        "code {} expected {code:?} ({})",
                        s.code, code as i32
                    ));
                }
                if s.current_limit.as_ref() != Some(&l.proto()) {
                    return fail(format!(
                        "current_limit {:?} expected {:?}",
                        s.current_limit,
                        l.proto()
                    ));
                }
                if s.limit_remaining != rem {
                    return fail(format!(
                        "limit_remaining {} expected {rem}",
                        s.limit_remaining
                    ));
                }
                let w = window_secs(l.unit);
                match &s.duration_until_reset {
                    Some(d) if (1..=w).contains(&d.seconds) => {}
                    other => {
                        return fail(format!(
                            "duration_until_reset {other:?} expected 1..={w} seconds"
                        ))
                    }
                }
                if code == Code::OverLimit {
                    over_window = over_window.max(w);
                }
            }
        }
    }
    let overall = if over_window > 0 {
        Code::OverLimit
    } else {
        Code::Ok
    };
    if resp.overall_code != overall as i32 {
        return Err(format!(
            "overall_code {} expected {overall:?} ({})",
            resp.overall_code, overall as i32
        ));
    }
    // Deliberate difference: OVER_LIMIT carries Retry-After; nothing else is added because
    // LIMIT_RESPONSE_HEADERS_ENABLED is off (the reference adds no header at all then).
    if overall == Code::OverLimit {
        let h = &resp.response_headers_to_add;
        let ok = h.len() == 1
            && h[0].key.eq_ignore_ascii_case("retry-after")
            && h[0]
                .value
                .parse::<i64>()
                .is_ok_and(|v| (1..=over_window).contains(&v));
        if !ok {
            return Err(format!(
                "response_headers_to_add {h:?} expected one Retry-After of 1..={over_window}"
            ));
        }
    } else if !resp.response_headers_to_add.is_empty() {
        return Err(format!(
            "response_headers_to_add {:?} expected none",
            resp.response_headers_to_add
        ));
    }
    Ok(())
}

fn req_hits(domain: &str, descriptors: &[&[(&str, &str)]], hits: u32) -> RateLimitRequest {
    let mut r = request(domain, descriptors);
    r.hits_addend = hits;
    r
}

/// Generates `memory::NAME` and `redis::NAME` tests from `async fn NAME(Backend)`.
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::Backend::Memory).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::Backend::Redis).await;
                }
            )*
        }
    };
}

both_backends!(
    example01_two_values_same_key,
    example02_nested_descriptors_and_multiple_descriptors,
    example03_most_specific_match_and_zero_limit,
    example04_descriptor_depth_must_match,
    example05_unlimited,
    example06_shadow_mode,
    example07_replaces,
    example08_detailed_metric,
    example09_wildcards,
    example10_value_to_metric,
    example11_share_threshold,
);

// ---------------------------------------------------------------------------------------------
// Example 1
// ---------------------------------------------------------------------------------------------

const EXAMPLE1: &str = r#"
domain: mongo_cps
descriptors:
  - key: database
    value: users
    rate_limit:
      unit: second
      requests_per_unit: 500

  - key: database
    value: default
    rate_limit:
      unit: second
      requests_per_unit: 500
"#;

async fn example01_two_values_same_key(backend: Backend) {
    const L: Lim = lim(500, Unit::Second);
    let mut rig = Rig::start(backend, &[("example1.yaml", EXAMPLE1)]).await;

    // Values that no rule names, a key-only lookup, a deeper descriptor and an unknown domain
    // match nothing.
    rig.expect(
        request("mongo_cps", &[&[("database", "other")]]),
        &[Exp::NoRule],
    )
    .await;
    rig.expect(request("mongo_cps", &[&[("db", "users")]]), &[Exp::NoRule])
        .await;
    rig.expect(
        request("mongo_cps", &[&[("database", "users"), ("table", "t")]]),
        &[Exp::NoRule],
    )
    .await;
    rig.expect(
        request("other_domain", &[&[("database", "users")]]),
        &[Exp::NoRule],
    )
    .await;

    rig.align_second().await;
    // 500 requests per second for database=users: all OK, remaining 499..0 ...
    rig.burst_ok(
        request("mongo_cps", &[&[("database", "users")]]),
        500,
        L,
        499,
    )
    .await;
    // ... the 501st is over the limit ...
    rig.expect(
        request("mongo_cps", &[&[("database", "users")]]),
        &[Exp::Over(L)],
    )
    .await;
    // ... while database=default has its own 500 in the same second. One request can carry
    // both descriptors; the overall code is the OR of both.
    rig.expect(
        request(
            "mongo_cps",
            &[&[("database", "users")], &[("database", "default")]],
        ),
        &[Exp::Over(L), Exp::Ok(L, 499)],
    )
    .await;
    rig.expect(
        request(
            "mongo_cps",
            &[&[("database", "default")], &[("database", "other")]],
        ),
        &[Exp::Ok(L, 498), Exp::NoRule],
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// Example 2
// ---------------------------------------------------------------------------------------------

const EXAMPLE2: &str = r#"
domain: messaging
descriptors:
  # Only allow 5 marketing messages a day
  - key: message_type
    value: marketing
    descriptors:
      - key: to_number
        rate_limit:
          unit: day
          requests_per_unit: 5

  # Only allow 100 messages a day to any unique phone number
  - key: to_number
    rate_limit:
      unit: day
      requests_per_unit: 100
"#;

async fn example02_nested_descriptors_and_multiple_descriptors(backend: Backend) {
    const MARKETING: Lim = lim(5, Unit::Day);
    const PER_NUMBER: Lim = lim(100, Unit::Day);
    let mut rig = Rig::start(backend, &[("example2.yaml", EXAMPLE2)]).await;
    rig.avoid_minute_boundary().await;

    let both = |n: &str| {
        request(
            "messaging",
            &[
                &[("message_type", "marketing"), ("to_number", n)],
                &[("to_number", n)],
            ],
        )
    };
    // The README's request: both descriptors in one call. Marketing allows 5 a day, the
    // number 100 a day; the 6th marketing message is over the limit (overall OVER_LIMIT)
    // while the per-number counter keeps counting.
    let r = both("2061111111");
    rig.expect_seq(&r, 5, |i| {
        vec![Exp::Ok(MARKETING, 4 - i), Exp::Ok(PER_NUMBER, 99 - i)]
    })
    .await;
    rig.expect(r.clone(), &[Exp::Over(MARKETING), Exp::Ok(PER_NUMBER, 94)])
        .await;
    rig.expect(r, &[Exp::Over(MARKETING), Exp::Ok(PER_NUMBER, 93)])
        .await;

    // Each phone number gets its own counters.
    rig.expect(
        both("2062222222"),
        &[Exp::Ok(MARKETING, 4), Exp::Ok(PER_NUMBER, 99)],
    )
    .await;

    // The per-number limit alone: 93 more fit, then OVER_LIMIT.
    let one = request("messaging", &[&[("to_number", "2061111111")]]);
    rig.burst_ok(one.clone(), 93, PER_NUMBER, 92).await;
    rig.expect(one, &[Exp::Over(PER_NUMBER)]).await;

    // The placeholder (message_type, marketing) has no limit of its own; other message types
    // match nothing, and a deeper descriptor does not match the one-level to_number rule.
    rig.expect(
        request("messaging", &[&[("message_type", "marketing")]]),
        &[Exp::NoRule],
    )
    .await;
    rig.expect(
        request(
            "messaging",
            &[&[
                ("message_type", "transactional"),
                ("to_number", "2061111111"),
            ]],
        ),
        &[Exp::NoRule],
    )
    .await;
    rig.expect(
        request(
            "messaging",
            &[&[("to_number", "2063333333"), ("message_type", "marketing")]],
        ),
        &[Exp::NoRule],
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// Example 3
// ---------------------------------------------------------------------------------------------

const EXAMPLE3: &str = r#"
domain: edge_proxy_per_ip
descriptors:
  - key: remote_address
    rate_limit:
      unit: second
      requests_per_unit: 10

  # Black list IP
  - key: remote_address
    value: 50.0.0.5
    rate_limit:
      unit: second
      requests_per_unit: 0
"#;

async fn example03_most_specific_match_and_zero_limit(backend: Backend) {
    const PER_IP: Lim = lim(10, Unit::Second);
    const BLOCKED: Lim = lim(0, Unit::Second);
    let mut rig = Rig::start(backend, &[("example3.yaml", EXAMPLE3)]).await;
    rig.align_second().await;

    // Any IP: 10 per second.
    let ip1 = request("edge_proxy_per_ip", &[&[("remote_address", "50.0.0.1")]]);
    rig.expect_seq(&ip1, 10, |i| vec![Exp::Ok(PER_IP, 9 - i)])
        .await;
    rig.expect(ip1.clone(), &[Exp::Over(PER_IP)]).await;
    rig.expect(ip1, &[Exp::Over(PER_IP)]).await;

    // The key/value rule wins over the key-only rule: 0 per second, so the first request is
    // already over the limit.
    let ip5 = request("edge_proxy_per_ip", &[&[("remote_address", "50.0.0.5")]]);
    rig.expect(ip5.clone(), &[Exp::Over(BLOCKED)]).await;
    rig.expect(ip5, &[Exp::Over(BLOCKED)]).await;

    // Another IP has its own counter.
    rig.expect(
        request(
            "edge_proxy_per_ip",
            &[
                &[("remote_address", "50.0.0.2")],
                &[("remote_address", "50.0.0.5")],
            ],
        ),
        &[Exp::Ok(PER_IP, 9), Exp::Over(BLOCKED)],
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// Example 4
// ---------------------------------------------------------------------------------------------

const EXAMPLE4_FLAT: &str = r#"
domain: example4
descriptors:
  - key: key
    value: value
    rate_limit:
      requests_per_unit: 300
      unit: second
"#;

const EXAMPLE4_NESTED: &str = r#"
domain: example4
descriptors:
  - key: key
    value: value
    descriptors:
      - key: subkey
        rate_limit:
          requests_per_unit: 300
          unit: second
"#;

async fn example04_descriptor_depth_must_match(backend: Backend) {
    const L: Lim = lim(300, Unit::Second);
    let two = request("example4", &[&[("key", "value"), ("subkey", "subvalue")]]);
    let one = request("example4", &[&[("key", "value")]]);

    // The flat config: the two-entry descriptor does not match; the one-entry one does.
    {
        let mut rig = Rig::start(backend, &[("example4.yaml", EXAMPLE4_FLAT)]).await;
        rig.align_second().await;
        rig.expect(two.clone(), &[Exp::NoRule]).await;
        rig.expect(one.clone(), &[Exp::Ok(L, 299)]).await;
        rig.expect(
            request(
                "example4",
                &[&[("key", "value")], &[("key", "value"), ("subkey", "x")]],
            ),
            &[Exp::Ok(L, 298), Exp::NoRule],
        )
        .await;
    }

    // The nested config: the two-entry descriptor matches (300 per second, then
    // OVER_LIMIT); the one-entry one and other first-level values do not.
    let mut rig = Rig::start(backend, &[("example4.yaml", EXAMPLE4_NESTED)]).await;
    rig.expect(one.clone(), &[Exp::NoRule]).await;
    rig.expect(
        request("example4", &[&[("key", "other"), ("subkey", "subvalue")]]),
        &[Exp::NoRule],
    )
    .await;
    rig.expect(
        request(
            "example4",
            &[&[("key", "value"), ("subkey", "subvalue"), ("third", "x")]],
        ),
        &[Exp::NoRule],
    )
    .await;
    rig.align_second().await;
    rig.burst_ok(two.clone(), 300, L, 299).await;
    rig.expect(two, &[Exp::Over(L)]).await;
    // Any subkey value gets its own counter.
    rig.expect(
        request("example4", &[&[("key", "value"), ("subkey", "other")]]),
        &[Exp::Ok(L, 299)],
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// Example 5
// ---------------------------------------------------------------------------------------------

const EXAMPLE5: &str = r#"
domain: internal
descriptors:
  - key: ldap
    rate_limit:
      unlimited: true

  - key: azure
    rate_limit:
      unit: minute
      requests_per_unit: 100
"#;

async fn example05_unlimited(backend: Backend) {
    const AZURE: Lim = lim(100, Unit::Minute);
    let mut rig = Rig::start(backend, &[("example5.yaml", EXAMPLE5)]).await;
    rig.avoid_minute_boundary().await;

    // Unlimited: OK with remaining MaxUint32, however often (and with any hits_addend).
    let ldap = request("internal", &[&[("ldap", "cn=admin")]]);
    rig.expect_seq(&ldap, 3, |_| vec![Exp::Unlimited]).await;
    rig.expect(
        req_hits("internal", &[&[("ldap", "cn=other")]], 1_000_000),
        &[Exp::Unlimited],
    )
    .await;

    // azure: 100 a minute.
    let azure = request("internal", &[&[("azure", "tenant-1")]]);
    rig.burst_ok(azure.clone(), 100, AZURE, 99).await;
    rig.expect(azure, &[Exp::Over(AZURE)]).await;
    rig.expect(
        request(
            "internal",
            &[
                &[("ldap", "cn=admin")],
                &[("azure", "tenant-1")],
                &[("gcp", "x")],
            ],
        ),
        &[Exp::Unlimited, Exp::Over(AZURE), Exp::NoRule],
    )
    .await;
    rig.expect(
        request(
            "internal",
            &[&[("ldap", "cn=admin")], &[("azure", "tenant-2")]],
        ),
        &[Exp::Unlimited, Exp::Ok(AZURE, 99)],
    )
    .await;

    // "the request will not be sent to the underlying cache": no counter for ldap in Redis.
    if let Some(redis) = &rig.redis {
        assert_eq!(redis.command(&["KEYS", "*ldap*"]), "*0\r\n");
        assert_ne!(redis.command(&["KEYS", "*azure*"]), "*0\r\n");
    }
}

// ---------------------------------------------------------------------------------------------
// Example 6
// ---------------------------------------------------------------------------------------------

const EXAMPLE6: &str = r#"
domain: example6
descriptors:
  - key: service
    descriptors:
      - key: user
        value: user-a
        rate_limit:
          requests_per_unit: 10
          unit: second
        shadow_mode: true
      - key: user
        value: user-b
        rate_limit:
          requests_per_unit: 20
          unit: second
"#;

async fn example06_shadow_mode(backend: Backend) {
    const USER_A: Lim = lim(10, Unit::Second);
    const USER_B: Lim = lim(20, Unit::Second);
    let mut rig = Rig::start(backend, &[("example6.yaml", EXAMPLE6)]).await;
    let a = request(
        "example6",
        &[&[("service", "auth-service"), ("user", "user-a")]],
    );
    let b = request(
        "example6",
        &[&[("service", "auth-service"), ("user", "user-b")]],
    );

    rig.expect(
        request(
            "example6",
            &[&[("service", "auth-service"), ("user", "user-c")]],
        ),
        &[Exp::NoRule],
    )
    .await;
    rig.expect(
        request("example6", &[&[("service", "auth-service")]]),
        &[Exp::NoRule],
    )
    .await;

    rig.align_second().await;
    // user-a: 10 per second in shadow mode. Past the limit the status is still OK (remaining
    // 0, limit reported) and so is the overall code.
    rig.expect_seq(&a, 10, |i| vec![Exp::Ok(USER_A, 9 - i)])
        .await;
    rig.expect_seq(&a, 5, |_| vec![Exp::Ok(USER_A, 0)]).await;

    // user-b: 20 per second, enforced.
    rig.expect_seq(&b, 20, |i| vec![Exp::Ok(USER_B, 19 - i)])
        .await;
    rig.expect(b, &[Exp::Over(USER_B)]).await;

    // Both in one request: the shadowed one stays OK, the enforced one decides.
    rig.expect(
        request(
            "example6",
            &[
                &[("service", "auth-service"), ("user", "user-a")],
                &[("service", "auth-service"), ("user", "user-b")],
            ],
        ),
        &[Exp::Ok(USER_A, 0), Exp::Over(USER_B)],
    )
    .await;
    // Any service value: the counter is per (service, user) value pair.
    rig.expect(
        request("example6", &[&[("service", "billing"), ("user", "user-a")]]),
        &[Exp::Ok(USER_A, 9)],
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// Example 7
// ---------------------------------------------------------------------------------------------

const EXAMPLE7: &str = r#"
domain: example7
descriptors:
  - key: key_1
    value: value_1
    descriptors:
      - key: user
        value: bkthomps
        rate_limit:
          name: specific_limit
          requests_per_unit: 5
          unit: second
  - key: key_2
    value: value_2
    descriptors:
      - key: user
        value: bkthomps
        rate_limit:
          replaces:
            - name: specific_limit
          requests_per_unit: 10
          unit: second
"#;

async fn example07_replaces(backend: Backend) {
    const SPECIFIC: Lim = named(5, Unit::Second, "specific_limit");
    const REPLACING: Lim = lim(10, Unit::Second);
    let mut rig = Rig::start(backend, &[("example7.yaml", EXAMPLE7)]).await;
    let d1: &[(&str, &str)] = &[("key_1", "value_1"), ("user", "bkthomps")];
    let d2: &[(&str, &str)] = &[("key_2", "value_2"), ("user", "bkthomps")];

    rig.align_second().await;
    // (key_1, value_1), (key_2, value_2), (user, bkthomps): 10 / sec. The replaced
    // descriptor answers as if no rule matched and its counter is not touched.
    let both = request("example7", &[d1, d2]);
    rig.expect_seq(&both, 10, |i| vec![Exp::NoRule, Exp::Ok(REPLACING, 9 - i)])
        .await;
    rig.expect(both, &[Exp::NoRule, Exp::Over(REPLACING)]).await;
    // Order in the request does not matter.
    rig.expect(
        request("example7", &[d2, d1]),
        &[Exp::Over(REPLACING), Exp::NoRule],
    )
    .await;

    // (key_1, value_1), (user, bkthomps) alone: 5 / sec, its counter still untouched.
    let one = request("example7", &[d1]);
    rig.expect_seq(&one, 5, |i| vec![Exp::Ok(SPECIFIC, 4 - i)])
        .await;
    rig.expect(one, &[Exp::Over(SPECIFIC)]).await;

    // (key_2, value_2), (user, bkthomps) alone: 10 / sec (already used up above).
    rig.expect(request("example7", &[d2]), &[Exp::Over(REPLACING)])
        .await;
    // Another user matches neither rule.
    rig.expect(
        request("example7", &[&[("key_1", "value_1"), ("user", "someone")]]),
        &[Exp::NoRule],
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// Example 8
// ---------------------------------------------------------------------------------------------

const EXAMPLE8: &str = r#"
domain: example8
descriptors:
  - key: key1
    detailed_metric: true
    rate_limit:
      unit: minute
      requests_per_unit: 10
  - key: key1
    value: value1
    rate_limit:
      unit: minute
      requests_per_unit: 20
"#;

async fn example08_detailed_metric(backend: Backend) {
    const ANY: Lim = lim(10, Unit::Minute);
    const VALUE1: Lim = lim(20, Unit::Minute);
    let mut rig = Rig::start(backend, &[("example8.yaml", EXAMPLE8)]).await;
    rig.avoid_minute_boundary().await;

    // detailed_metric changes metrics only; limiting works as normal.
    let u1 = request("example8", &[&[("key1", "unspecified_value")]]);
    rig.expect_seq(&u1, 10, |i| vec![Exp::Ok(ANY, 9 - i)]).await;
    rig.expect(u1, &[Exp::Over(ANY)]).await;
    rig.expect(
        request("example8", &[&[("key1", "unspecified_value2")]]),
        &[Exp::Ok(ANY, 9)],
    )
    .await;

    let v1 = request("example8", &[&[("key1", "value1")]]);
    rig.expect_seq(&v1, 20, |i| vec![Exp::Ok(VALUE1, 19 - i)])
        .await;
    rig.expect(v1, &[Exp::Over(VALUE1)]).await;
}

// ---------------------------------------------------------------------------------------------
// Example 9
// ---------------------------------------------------------------------------------------------

// The README shows three snippets for domain example9; their keys differ, so they are loaded
// as one file.
const EXAMPLE9: &str = r#"
domain: example9
descriptors:
  - key: key1
    value: value*
    rate_limit:
      unit: minute
      requests_per_unit: 20
  - key: path
    value: /api/*/action
    rate_limit:
      unit: minute
      requests_per_unit: 20
  - key: route
    value: /api/*/resource/*/action
    rate_limit:
      unit: minute
      requests_per_unit: 20
"#;

async fn example09_wildcards(backend: Backend) {
    const L: Lim = lim(20, Unit::Minute);
    let mut rig = Rig::start(backend, &[("example9.yaml", EXAMPLE9)]).await;
    rig.avoid_minute_boundary().await;
    let one = |k: &str, v: &str| request("example9", &[&[(k, v)]]);

    // Trailing wildcard: value1, value2, valueXYZ (and "value": * matches zero characters),
    // each with its own counter (no share_threshold).
    let v1 = one("key1", "value1");
    rig.burst_ok(v1.clone(), 20, L, 19).await;
    rig.expect(v1, &[Exp::Over(L)]).await;
    rig.expect(one("key1", "value2"), &[Exp::Ok(L, 19)]).await;
    rig.expect(one("key1", "valueXYZ"), &[Exp::Ok(L, 19)]).await;
    rig.expect(one("key1", "value"), &[Exp::Ok(L, 19)]).await;
    rig.expect(one("key1", "valu"), &[Exp::NoRule]).await;
    rig.expect(one("key1", "xvalue1"), &[Exp::NoRule]).await;
    rig.expect(one("key2", "value1"), &[Exp::NoRule]).await;

    // Middle wildcard: fixed prefix and suffix.
    let p = one("path", "/api/123/action");
    rig.burst_ok(p.clone(), 20, L, 19).await;
    rig.expect(p, &[Exp::Over(L)]).await;
    rig.expect(one("path", "/api/user-id/action"), &[Exp::Ok(L, 19)])
        .await;
    rig.expect(one("path", "/api//action"), &[Exp::Ok(L, 19)])
        .await;
    rig.expect(one("path", "/api/123/other"), &[Exp::NoRule])
        .await;
    // Prefix and suffix may not overlap: "/api/action" is shorter than "/api/" + "/action".
    rig.expect(one("path", "/api/action"), &[Exp::NoRule]).await;

    // Multiple wildcards: each * an independent segment, in order.
    rig.expect(
        one("route", "/api/v1/resource/123/action"),
        &[Exp::Ok(L, 19)],
    )
    .await;
    rig.expect(
        one("route", "/api/v2/resource/456/action"),
        &[Exp::Ok(L, 19)],
    )
    .await;
    rig.expect(
        one("route", "/api/v1/resource/123/action"),
        &[Exp::Ok(L, 18)],
    )
    .await;
    rig.expect(one("route", "/api/v1/other/123/action"), &[Exp::NoRule])
        .await;
    rig.expect(one("route", "/api/v1/resource/123/read"), &[Exp::NoRule])
        .await;
}

// ---------------------------------------------------------------------------------------------
// Example 10
// ---------------------------------------------------------------------------------------------

const EXAMPLE10: &str = r#"
domain: example10
descriptors:
  - key: route
    value_to_metric: true
    descriptors:
      - key: http_method
        value_to_metric: true
        descriptors:
          - key: subject_id
            rate_limit:
              unit: minute
              requests_per_unit: 60
"#;

const EXAMPLE10_WILDCARD: &str = r#"
domain: example10_wildcard
descriptors:
  - key: user
    value_to_metric: true
    descriptors:
      - key: action
        value: read*
        value_to_metric: true
        descriptors:
          - key: resource
            rate_limit:
              unit: minute
              requests_per_unit: 100
"#;

async fn example10_value_to_metric(backend: Backend) {
    const L60: Lim = lim(60, Unit::Minute);
    const L100: Lim = lim(100, Unit::Minute);
    let mut rig = Rig::start(
        backend,
        &[
            ("example10.yaml", EXAMPLE10),
            ("example10_wildcard.yaml", EXAMPLE10_WILDCARD),
        ],
    )
    .await;
    rig.avoid_minute_boundary().await;

    // value_to_metric changes metrics only; every (route, method, subject) triple has its
    // own counter as usual.
    let api = request(
        "example10",
        &[&[
            ("route", "api"),
            ("http_method", "GET"),
            ("subject_id", "123"),
        ]],
    );
    rig.burst_ok(api.clone(), 60, L60, 59).await;
    rig.expect(api, &[Exp::Over(L60)]).await;
    rig.expect(
        request(
            "example10",
            &[&[
                ("route", "web"),
                ("http_method", "POST"),
                ("subject_id", "456"),
            ]],
        ),
        &[Exp::Ok(L60, 59)],
    )
    .await;
    rig.expect(
        request(
            "example10",
            &[&[
                ("route", "web"),
                ("http_method", "GET"),
                ("subject_id", "123"),
            ]],
        ),
        &[Exp::Ok(L60, 59)],
    )
    .await;
    rig.expect(
        request("example10", &[&[("route", "api"), ("http_method", "GET")]]),
        &[Exp::NoRule],
    )
    .await;

    // With a wildcard.
    let alice = request(
        "example10_wildcard",
        &[&[
            ("user", "alice"),
            ("action", "readfile"),
            ("resource", "documents"),
        ]],
    );
    rig.burst_ok(alice.clone(), 100, L100, 99).await;
    rig.expect(alice, &[Exp::Over(L100)]).await;
    rig.expect(
        request(
            "example10_wildcard",
            &[&[
                ("user", "alice"),
                ("action", "readdir"),
                ("resource", "documents"),
            ]],
        ),
        &[Exp::Ok(L100, 99)],
    )
    .await;
    rig.expect(
        request(
            "example10_wildcard",
            &[&[
                ("user", "bob"),
                ("action", "read"),
                ("resource", "documents"),
            ]],
        ),
        &[Exp::Ok(L100, 99)],
    )
    .await;
    rig.expect(
        request(
            "example10_wildcard",
            &[&[
                ("user", "alice"),
                ("action", "writefile"),
                ("resource", "documents"),
            ]],
        ),
        &[Exp::NoRule],
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// Example 11
// ---------------------------------------------------------------------------------------------

const EXAMPLE11: &str = r#"
domain: example11
descriptors:
  # With share_threshold: true, all files/* matches share the same threshold
  - key: files
    value: files/*
    share_threshold: true
    rate_limit:
      unit: hour
      requests_per_unit: 10

  # Without share_threshold, each files_no_share/* match has its own isolated threshold
  - key: files_no_share
    value: files_no_share/*
    share_threshold: false
    rate_limit:
      unit: hour
      requests_per_unit: 10
"#;

const EXAMPLE11_METRICS: &str = r#"
domain: example11_metrics
descriptors:
  - key: route
    value: api/*
    share_threshold: true
    value_to_metric: true
    descriptors:
      - key: method
        rate_limit:
          unit: minute
          requests_per_unit: 60
"#;

async fn example11_share_threshold(backend: Backend) {
    const HOURLY: Lim = lim(10, Unit::Hour);
    const L60: Lim = lim(60, Unit::Minute);
    let mut rig = Rig::start(
        backend,
        &[
            ("example11.yaml", EXAMPLE11),
            ("example11_metrics.yaml", EXAMPLE11_METRICS),
        ],
    )
    .await;
    rig.avoid_minute_boundary().await;
    let one = |k: &str, v: &str| request("example11", &[&[(k, v)]]);

    // 5 requests for files/a.pdf and 5 for files/b.csv use up the shared 10; files/c.txt is
    // then OVER_LIMIT.
    rig.expect_seq(&one("files", "files/a.pdf"), 5, |i| {
        vec![Exp::Ok(HOURLY, 9 - i)]
    })
    .await;
    rig.expect_seq(&one("files", "files/b.csv"), 5, |i| {
        vec![Exp::Ok(HOURLY, 4 - i)]
    })
    .await;
    rig.expect(one("files", "files/c.txt"), &[Exp::Over(HOURLY)])
        .await;
    rig.expect(one("files", "files/a.pdf"), &[Exp::Over(HOURLY)])
        .await;
    rig.expect(one("files", "other/a.pdf"), &[Exp::NoRule])
        .await;

    // Without share_threshold each value has its own 10.
    let a = one("files_no_share", "files_no_share/a.pdf");
    rig.expect_seq(&a, 10, |i| vec![Exp::Ok(HOURLY, 9 - i)])
        .await;
    rig.expect(a, &[Exp::Over(HOURLY)]).await;
    rig.expect_seq(&one("files_no_share", "files_no_share/b.csv"), 10, |i| {
        vec![Exp::Ok(HOURLY, 9 - i)]
    })
    .await;

    // share_threshold on a wildcard level with a nested limit: all api/* routes share one
    // counter per method value.
    let m = |route: &str, method: &str| {
        request(
            "example11_metrics",
            &[&[("route", route), ("method", method)]],
        )
    };
    rig.expect(m("api/v1", "GET"), &[Exp::Ok(L60, 59)]).await;
    rig.expect(m("api/v2", "GET"), &[Exp::Ok(L60, 58)]).await;
    rig.burst_ok(m("api/v3", "GET"), 58, L60, 57).await;
    rig.expect(m("api/v1", "GET"), &[Exp::Over(L60)]).await;
    rig.expect(m("api/v1", "POST"), &[Exp::Ok(L60, 59)]).await;
    // Two descriptors sharing one counter in one request: counted one after the other.
    rig.expect(
        request(
            "example11_metrics",
            &[
                &[("route", "api/v7"), ("method", "POST")],
                &[("route", "api/v8"), ("method", "POST")],
            ],
        ),
        &[Exp::Ok(L60, 58), Exp::Ok(L60, 57)],
    )
    .await;
    rig.expect(m("web/v1", "GET"), &[Exp::NoRule]).await;
    rig.expect(
        request("example11_metrics", &[&[("route", "api/v1")]]),
        &[Exp::NoRule],
    )
    .await;
}
