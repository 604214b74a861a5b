//! The failure policy through the service, over a store that fails, hangs or answers on
//! demand.

use std::{
    num::NonZeroUsize,
    sync::{
        atomic::{AtomicU64, AtomicU8, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;

use super::*;
use crate::{
    config::{compile, parse},
    limiter::SystemClock,
    metrics::{Stats, StatsSettings},
    proto::envoy::{
        extensions::common::ratelimit::v3::{rate_limit_descriptor::Entry, RateLimitDescriptor},
        service::ratelimit::v3::{rate_limit_response::Code, RateLimitRequest, RateLimitResponse},
    },
    service::{RateLimiter, ServiceSettings},
};

const ANSWER: u8 = 0;
const FAIL: u8 = 1;
const HANG: u8 = 2;

/// A store that answers (from memory), fails with a lost connection, or never answers.
struct Flaky {
    mode: AtomicU8,
    calls: AtomicU64,
    inner: MemoryStore,
}

impl Store for Flaky {
    async fn decide(&self, batch: &Batch<'_>) -> Result<DecidedList, StoreError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        match self.mode.load(Ordering::SeqCst) {
            ANSWER => self.inner.decide(batch).await,
            FAIL => Err(StoreError::Connection(::redis::RedisError::from(
                std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused"),
            ))),
            _ => std::future::pending().await,
        }
    }
}

const RULES: &str = "
domain: d
descriptors:
  - key: k
    rate_limit: {unit: hour, requests_per_unit: 3}
  - key: s
    shadow_mode: true
    rate_limit: {unit: hour, requests_per_unit: 1}
";

fn limiter(failure: FailureSettings) -> (RateLimiter<Flaky>, Arc<Flaky>) {
    let raw = parse("rules.yaml", RULES).unwrap();
    let tree = compile(&[("rules.yaml".to_owned(), raw)], false).unwrap();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let store = Arc::new(Flaky {
        mode: AtomicU8::new(ANSWER),
        calls: AtomicU64::new(0),
        inner: MemoryStore::new(clock.clone(), NonZeroUsize::MIN.saturating_add(99)),
    });
    let settings = ServiceSettings {
        rule_header: Some("X-Rule".into()),
        near_limit_ratio: 0.8,
        failure,
        ..ServiceSettings::default()
    };
    let stats = Arc::new(Stats::new(None, StatsSettings::default()));
    let l = RateLimiter::new(
        Arc::new(ArcSwap::from_pointee(tree)),
        store.clone(),
        clock,
        settings,
        stats,
    );
    (l, store)
}

fn policy(p: Policy) -> FailureSettings {
    FailureSettings {
        policy: p,
        ..FailureSettings::default()
    }
}

fn request(keys: &[(&str, &str)]) -> RateLimitRequest {
    RateLimitRequest {
        domain: "d".into(),
        descriptors: keys
            .iter()
            .map(|(k, v)| RateLimitDescriptor {
                entries: vec![Entry {
                    key: (*k).into(),
                    value: (*v).into(),
                }],
                ..Default::default()
            })
            .collect(),
        hits_addend: 0,
    }
}

fn codes(r: &RateLimitResponse) -> (Code, Vec<Code>) {
    (
        r.overall_code(),
        r.statuses.iter().map(|s| s.code()).collect(),
    )
}

fn header<'a>(r: &'a RateLimitResponse, name: &str) -> Option<&'a str> {
    r.response_headers_to_add
        .iter()
        .find(|h| h.key == name)
        .map(|h| h.value.as_str())
}

#[tokio::test]
async fn deny_refuses_limited_descriptors_except_shadow_ones_and_says_so() {
    let (l, store) = limiter(policy(Policy::Deny));
    store.mode.store(FAIL, Ordering::SeqCst);
    let r = l
        .answer(&request(&[("k", "a"), ("s", "b"), ("none", "c")]))
        .await
        .unwrap();
    assert_eq!(
        codes(&r),
        (Code::OverLimit, vec![Code::OverLimit, Code::Ok, Code::Ok])
    );
    assert_eq!(header(&r, "X-Rule"), Some("backend-failure-policy:deny"));
    assert_eq!(header(&r, "Retry-After"), Some("1"));
    let shown = r.statuses[0].current_limit.as_ref().unwrap();
    assert_eq!(shown.requests_per_unit, 3);
    // Only a shadow-mode descriptor: nothing to refuse.
    let r = l.answer(&request(&[("s", "b")])).await.unwrap();
    assert_eq!(codes(&r), (Code::Ok, vec![Code::Ok]));
    assert_eq!(header(&r, "X-Rule"), None);
}

#[tokio::test]
async fn allow_answers_ok_and_the_store_answers_again_once_back() {
    let (l, store) = limiter(policy(Policy::Allow));
    store.mode.store(FAIL, Ordering::SeqCst);
    for _ in 0..5 {
        let r = l.answer(&request(&[("k", "a")])).await.unwrap();
        assert_eq!(codes(&r), (Code::Ok, vec![Code::Ok]));
    }
    store.mode.store(ANSWER, Ordering::SeqCst);
    // The circuit opened after 5 failures; it probes after its open duration (1 s).
    let started = Instant::now();
    loop {
        let r = l.answer(&request(&[("k", "a")])).await.unwrap();
        if r.statuses[0].limit_remaining == 2 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "{r:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(l.guard().breaker().state(), breaker::State::Closed);
}

#[tokio::test]
async fn error_fails_calls_and_the_open_circuit_skips_the_store() {
    let (l, store) = limiter(FailureSettings {
        breaker: BreakerSettings {
            failures: 2,
            ..BreakerSettings::default()
        },
        ..policy(Policy::Error)
    });
    store.mode.store(FAIL, Ordering::SeqCst);
    for kind in ["connection error", "connection error", "circuit open"] {
        let e = l.answer(&request(&[("k", "a")])).await.unwrap_err();
        assert_eq!(
            e.client_message(),
            format!("rate limit backend unavailable ({kind})")
        );
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::Unavailable);
    }
    assert_eq!(store.calls.load(Ordering::SeqCst), 2);
    // Usage reports the store or fails; the policy never answers it.
    let (l, store) = limiter(policy(Policy::Allow));
    store.mode.store(FAIL, Ordering::SeqCst);
    let e = l
        .usage("d", &[vec![("k".into(), "a".into())]])
        .await
        .unwrap_err();
    assert!(matches!(e, ServiceError::Store(_)), "{e}");
}

#[tokio::test]
async fn a_hanging_store_is_given_up_at_the_deadline_and_local_limits_apply() {
    let (l, store) = limiter(FailureSettings {
        expected_replicas: 2,
        deadline_margin: Duration::from_millis(5),
        ..policy(Policy::Local)
    });
    store.mode.store(HANG, Ordering::SeqCst);
    // 3 an hour shared by 2 replicas: 2 here.
    let mut got = Vec::new();
    for _ in 0..4 {
        let started = Instant::now();
        let r = l
            .answer_by(&request(&[("k", "a")]), Some("25m"))
            .await
            .unwrap();
        assert!(started.elapsed() < Duration::from_secs(1));
        got.push((r.overall_code(), header(&r, "X-Rule").map(str::to_owned)));
    }
    let refused = Some("backend-failure-policy:local".to_owned());
    assert_eq!(
        got,
        [
            (Code::Ok, None),
            (Code::Ok, None),
            (Code::OverLimit, refused.clone()),
            (Code::OverLimit, refused)
        ]
    );
    assert_eq!(store.calls.load(Ordering::SeqCst), 4);
}
