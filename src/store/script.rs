//! The counting engine's Redis side: the scripts that decide a whole request in one call, the
//! KEYS and ARGV they are called with, and their replies read back into [`Decided`]s.
//!
//! Two scripts. `engine.lua` runs every algorithm and charging mode (what it writes depends on
//! what it reads). `fixed.lua` takes the commonest request, the reference's own case: every
//! check a fixed window that fits, charged unconditionally (`Charging::Always`), where nothing
//! written depends on what is read. It sends INCRBY and EXPIRE per key and returns the counts,
//! and [`decisions`] feeds them to [`engine::decide`] as the states read, which decides
//! exactly what `engine.lua` would. Redis spends about a fifth of the CPU on it
//! (docs/benchmarks.md, "Fixed windows in Redis").
//!
//! The layouts are documented at the top of each script and in the README ("The Redis
//! script"); this file is their only writer and reader.

use std::time::Instant;

use redis::{Cmd, ErrorKind, ServerErrorKind, Value};

use super::{
    pipe::{Failed, Pipe},
    resp::{self, Args},
    StoreError,
};
use crate::limiter::{
    algorithm::{Algorithm, State, Verdict},
    engine::{self, Batch, Charging, Decided, DecidedList},
    MAX_COUNT,
};

/// `engine.lua`'s source, sent with `EVAL` only when Redis does not know its SHA1.
pub const SOURCE: &str = include_str!("engine.lua");
/// `fixed.lua`'s source, likewise.
pub const FIXED_SOURCE: &str = include_str!("fixed.lua");

/// Fields per check in ARGV, and values per check in the reply (`engine.lua`).
const ARGV_PER_CHECK: usize = 8;
const REPLY_PER_CHECK: usize = 8;

/// The two scripts and their SHA1s, computed once.
pub struct EngineScript {
    engine: redis::Script,
    fixed: redis::Script,
}

impl Default for EngineScript {
    fn default() -> Self {
        Self {
            engine: redis::Script::new(SOURCE),
            fixed: redis::Script::new(FIXED_SOURCE),
        }
    }
}

/// A script's reply, and which script gave it.
#[derive(Debug)]
pub enum Reply {
    /// `engine.lua`'s: [`REPLY_PER_CHECK`] values per check.
    Engine(Value),
    /// `fixed.lua`'s: each check's count after its increment.
    Fixed(Value),
}

/// Whether `batch` takes `fixed.lua`: every check a fixed window whose cost fits (so it is
/// charged whatever it reads, see [`engine::decide`]), under `Charging::Always`.
fn fixed_only(batch: &Batch<'_>) -> bool {
    batch.charging == Charging::Always
        && batch.checks.iter().all(|c| {
            c.quota.algorithm == Algorithm::FixedWindow
                && c.cost <= c.quota.capacity
                && c.cost <= MAX_COUNT
        })
}

impl EngineScript {
    /// The usual call, `EVALSHA sha numkeys KEYS… ARGV…` (tests read its layout).
    #[cfg(test)]
    fn evalsha(&self, batch: &Batch<'_>, read: &[Option<String>]) -> Cmd {
        self.command(false, fixed_only(batch), batch, read)
    }

    /// The call after `NOSCRIPT`, `EVAL source numkeys KEYS… ARGV…`.
    #[cfg(test)]
    fn eval(&self, batch: &Batch<'_>, read: &[Option<String>]) -> Cmd {
        self.command(true, fixed_only(batch), batch, read)
    }

    /// [`Call`] as a redis-rs command.
    fn command(
        &self,
        source: bool,
        fixed: bool,
        batch: &Batch<'_>,
        read: &[Option<String>],
    ) -> Cmd {
        let mut cmd = Cmd::new();
        resp::Command::args(
            &Call {
                script: self,
                source,
                fixed,
                batch,
                read,
            },
            &mut cmd,
        );
        cmd
    }

    /// [`EngineScript::run`] on one of our own connections: the command written straight into
    /// its outgoing buffer. Each command is bounded by the connection (`REDIS_TIMEOUT` from
    /// when it was written, and `deadline`, see `pipe.rs`).
    pub async fn run_on(
        &self,
        pipe: &Pipe,
        batch: &Batch<'_>,
        deadline: Option<Instant>,
    ) -> Result<Reply, Failed> {
        let fixed = fixed_only(batch);
        let call = |source| Call {
            script: self,
            source,
            fixed,
            batch,
            read: &[],
        };
        let value = match pipe.call_by(&call(false), deadline).await {
            Err(Failed::Redis(e)) if no_script(&e) => pipe.call_by(&call(true), deadline).await,
            other => other,
        }?;
        Ok(Reply::of(fixed, value))
    }

    /// Runs the batch's script on `conn`: `EVALSHA`, which sends only the hash, then `EVAL`
    /// with the source when the server answers NOSCRIPT (Redis restarted or `SCRIPT FLUSH`:
    /// nothing ran, so nothing can be charged twice; `EVAL` caches it again). `read[i]`, when
    /// `Some`, is check `i`'s previous-window value as stored (`"0"` for no key), sent in ARGV
    /// instead of its key in KEYS (`REDIS_TYPE=cluster`, where that key may be on another
    /// node); `read` is empty otherwise. Unbounded: the caller applies `REDIS_TIMEOUT`.
    pub async fn run<C: redis::aio::ConnectionLike + Send>(
        &self,
        conn: &mut C,
        batch: &Batch<'_>,
        read: &[Option<String>],
    ) -> Result<Reply, redis::RedisError> {
        let fixed = fixed_only(batch);
        let sent = self.command(false, fixed, batch, read);
        let value = match sent.query_async::<Value>(conn).await {
            Err(e) if no_script(&e) => {
                let with_source = self.command(true, fixed, batch, read);
                with_source.query_async::<Value>(conn).await
            }
            other => other,
        }?;
        Ok(Reply::of(fixed, value))
    }
}

/// Whether Redis did not know the script (nothing ran): send it again with `EVAL`.
fn no_script(e: &redis::RedisError) -> bool {
    e.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
}

impl Reply {
    /// `value`, from `fixed.lua` when `fixed`, else from `engine.lua`.
    fn of(fixed: bool, value: Value) -> Self {
        if fixed {
            Reply::Fixed(value)
        } else {
            Reply::Engine(value)
        }
    }
}

/// `EVAL` with the source, or `EVALSHA` with the hash, of `fixed.lua` or `engine.lua`, for
/// a batch: one layout for both clients (redis-rs's `Cmd` and our own connections).
struct Call<'a> {
    script: &'a EngineScript,
    source: bool,
    fixed: bool,
    batch: &'a Batch<'a>,
    read: &'a [Option<String>],
}

impl resp::Command for Call<'_> {
    fn args<A: Args>(&self, a: &mut A) {
        a.bytes(if self.source { b"EVAL" } else { b"EVALSHA" });
        let (text, script) = if self.fixed {
            (FIXED_SOURCE, &self.script.fixed)
        } else {
            (SOURCE, &self.script.engine)
        };
        if self.source {
            a.bytes(text.as_bytes());
        } else {
            a.bytes(script.get_hash().as_bytes());
        }
        if self.fixed {
            push_fixed(a, self.batch);
        } else {
            push_keys_and_args(a, self.batch, self.read);
        }
    }
}

/// `fixed.lua`'s KEYS and ARGV: each check's key; then its cost and TTL in seconds (the
/// window, at least a second, plus the jitter: `engine.lua`'s for a fixed window).
fn push_fixed(a: &mut impl Args, batch: &Batch<'_>) {
    a.int(batch.checks.len());
    for c in batch.checks {
        a.bytes(c.key.as_bytes());
    }
    for c in batch.checks {
        let ttl = (c.quota.window_ms / 1000)
            .max(1)
            .saturating_add(c.jitter_secs);
        a.int(c.cost);
        a.int(ttl);
    }
}

fn algorithm_arg(a: Algorithm) -> &'static str {
    match a {
        Algorithm::FixedWindow => "fixed",
        Algorithm::SlidingWindow => "sliding",
        Algorithm::TokenBucket => "bucket",
    }
}

fn charging_arg(c: Charging) -> &'static str {
    match c {
        Charging::Always => "always",
        Charging::StopWhenOver => "stop_when_over",
        Charging::OnlyOver => "only_over",
        Charging::AllOrNothing => "all_or_nothing",
        Charging::Never => "never",
    }
}

/// A sliding window's previous key; the other algorithms read only their own key (the memory
/// store would read a fixed window's or a bucket's `previous` into a state field they ignore
/// or misread, a combination the engine never builds).
fn previous(c: &crate::limiter::engine::Check) -> Option<&str> {
    match c.quota.algorithm {
        Algorithm::SlidingWindow => c.previous.as_deref(),
        _ => None,
    }
}

fn push_keys_and_args(a: &mut impl Args, batch: &Batch<'_>, read: &[Option<String>]) {
    // Check i's previous window: read beforehand, in KEYS, or none.
    let read_at = |i: usize| read.get(i).and_then(Option::as_deref);
    let in_keys = |i: usize, c| previous(c).filter(|_| read_at(i).is_none());
    let keys = batch.checks.len()
        + (0..batch.checks.len())
            .zip(batch.checks)
            .filter(|&(i, c)| in_keys(i, c).is_some())
            .count();
    a.int(keys);
    for (i, c) in batch.checks.iter().enumerate() {
        a.bytes(c.key.as_bytes());
        if let Some(p) = in_keys(i, c) {
            a.bytes(p.as_bytes());
        }
    }
    a.int(batch.now_ms);
    a.bytes(charging_arg(batch.charging).as_bytes());
    a.int(u8::from(batch.never_refuse));
    a.int(batch.quota_total);
    a.int(batch.roles.len());
    for r in batch.roles {
        a.int(u8::from(r.shadow));
        a.int(u8::from(r.quota));
    }
    for (i, c) in batch.checks.iter().enumerate() {
        let q = &c.quota;
        a.int(c.descriptor);
        a.bytes(algorithm_arg(q.algorithm).as_bytes());
        a.int(q.limit);
        a.int(q.window_ms);
        a.int(q.capacity);
        a.int(c.cost);
        a.int(c.jitter_secs);
        match (previous(c), read_at(i)) {
            (Some(_), Some(value)) => a.bytes(format!("c{value}").as_bytes()),
            (p, _) => a.int(u8::from(p.is_some())),
        }
    }
    debug_assert_eq!(
        ARGV_PER_CHECK, 8,
        "the loop above writes 8 fields per check"
    );
}

/// Reads a script's reply into the batch's decisions, in order.
pub fn decisions(batch: &Batch<'_>, reply: Reply) -> Result<DecidedList, StoreError> {
    let (fixed, reply) = match reply {
        Reply::Engine(v) => (false, v),
        Reply::Fixed(v) => (true, v),
    };
    let Value::Array(values) = reply else {
        let script = if fixed {
            "fixed-window script"
        } else {
            "counting script"
        };
        return Err(StoreError::Reply(format!(
            "{script}: expected an array, got {reply:?}"
        )));
    };
    let decided = if fixed {
        fixed_decisions(batch, &values)
    } else {
        engine_decisions(batch, &values)
    };
    // Read: the array goes back to this thread's spares, for the next reply (`resp.rs`).
    resp::recycle(values);
    decided
}

/// `fixed.lua`'s counts, decided by [`engine::decide`]: a key's state as read is its first
/// count less that check's cost (for a saturated count, any value from which the cost
/// saturates: the verdict and the charged state are the same). A later check of the same key
/// sees what the earlier ones charged, as in the script, which ran them one after another.
fn fixed_decisions(batch: &Batch<'_>, values: &[Value]) -> Result<DecidedList, StoreError> {
    if values.len() != batch.checks.len() {
        return Err(StoreError::Reply(format!(
            "fixed-window script: expected {} counts, got {}",
            batch.checks.len(),
            values.len()
        )));
    }
    let states = values
        .iter()
        .zip(batch.checks)
        .map(|(v, c)| {
            let count = number(v)?;
            if count > MAX_COUNT || count < c.cost {
                return Err(StoreError::Reply(format!(
                    "fixed-window script: count {count} for a cost of {}",
                    c.cost
                )));
            }
            Ok(State {
                a: count - c.cost,
                b: 0,
            })
        })
        // Inline for the usual few checks: no allocation for them.
        .collect::<Result<smallvec::SmallVec<[State; engine::INLINE_CHECKS]>, _>>()?;
    Ok(engine::decide(batch, &states))
}

/// `engine.lua`'s reply: [`REPLY_PER_CHECK`] values per check, in order.
fn engine_decisions(batch: &Batch<'_>, values: &[Value]) -> Result<DecidedList, StoreError> {
    if values.len() != batch.checks.len() * REPLY_PER_CHECK {
        return Err(StoreError::Reply(format!(
            "counting script: expected {} values for {} checks, got {}",
            batch.checks.len() * REPLY_PER_CHECK,
            batch.checks.len(),
            values.len()
        )));
    }
    values
        .chunks_exact(REPLY_PER_CHECK)
        .map(|v| {
            let n = |i: usize| number(&v[i]);
            let verdict = Verdict {
                allowed: flag(&v[0])?,
                remaining: n(1)?,
                reset_ms: n(2)?,
                retry_ms: n(3)?,
                used: n(4)?,
            };
            let state = State { a: n(6)?, b: n(7)? };
            Ok(Decided {
                verdict,
                charge: flag(&v[5])?.then_some(state),
                cached: false,
            })
        })
        .collect()
}

/// An integer reply, or a decimal string (counts beyond a double's exact integers).
fn number(v: &Value) -> Result<u64, StoreError> {
    let parsed = match v {
        Value::Int(n) => u64::try_from(*n).ok(),
        Value::BulkString(b) => std::str::from_utf8(b).ok().and_then(|s| s.parse().ok()),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    };
    parsed.ok_or_else(|| StoreError::Reply(format!("counting script: {v:?} is not a u64")))
}

fn flag(v: &Value) -> Result<bool, StoreError> {
    match number(v)? {
        0 => Ok(false),
        1 => Ok(true),
        other => Err(StoreError::Reply(format!(
            "counting script: {other} is not a flag"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::{
        algorithm::Quota,
        engine::{Check, Role},
        Unit,
    };

    fn check(descriptor: usize, algorithm: Algorithm, previous: Option<&str>) -> Check {
        Check {
            descriptor,
            quota: Quota::new(algorithm, 5, Unit::Minute, 2, Some(7)),
            key: format!("k{descriptor}"),
            previous: previous.map(str::to_owned),
            cost: 3,
            jitter_secs: 4,
            per_second: false,
        }
    }

    fn args(cmd: &Cmd) -> Vec<String> {
        cmd.args_iter()
            .map(|a| match a {
                redis::Arg::Simple(b) => String::from_utf8_lossy(b).into_owned(),
                _ => "<not a plain argument>".into(),
            })
            .collect()
    }

    #[test]
    fn lays_out_keys_and_argv_as_the_script_reads_them() {
        let checks = [
            check(0, Algorithm::SlidingWindow, Some("p0")),
            // A previous key on a bucket is not sent: only sliding windows read one.
            check(1, Algorithm::TokenBucket, Some("ignored")),
        ];
        let roles = [
            Role::default(),
            Role {
                shadow: true,
                quota: true,
            },
        ];
        let batch = Batch {
            checks: &checks,
            roles: &roles,
            quota_total: 2,
            charging: Charging::StopWhenOver,
            never_refuse: false,
            now_ms: 1_700_000_040_123,
        };
        let got = args(&EngineScript::default().evalsha(&batch, &[]));
        assert_eq!(got[0], "EVALSHA");
        assert_eq!(got[1].len(), 40);
        #[rustfmt::skip]
        let want = [
            "3", "k0", "p0", "k1",
            "1700000040123", "stop_when_over", "0", "2", "2", "0", "0", "1", "1",
            "0", "sliding", "5", "120000", "5", "3", "4", "1",
            "1", "bucket", "5", "120000", "7", "3", "4", "0",
        ];
        assert_eq!(got[2..], want);
    }

    #[test]
    fn our_connections_send_the_bytes_redis_rs_would() {
        let checks = [
            check(0, Algorithm::SlidingWindow, Some("p0")),
            check(1, Algorithm::FixedWindow, None),
        ];
        let roles = [Role::default(), Role::default()];
        let engine = Batch {
            checks: &checks,
            roles: &roles,
            quota_total: 0,
            charging: Charging::StopWhenOver,
            never_refuse: true,
            now_ms: 1_700_000_040_123,
        };
        let fixed = always(&checks[1..]);
        let script = EngineScript::default();
        for (batch, is_fixed) in [(&engine, false), (&fixed, true)] {
            assert_eq!(fixed_only(batch), is_fixed);
            for source in [false, true] {
                let call = Call {
                    script: &script,
                    source,
                    fixed: is_fixed,
                    batch,
                    read: &[],
                };
                let mut ours = Vec::new();
                resp::write(&mut ours, &call);
                let theirs = script.command(source, is_fixed, batch, &[]);
                assert_eq!(
                    ours,
                    theirs.get_packed_command(),
                    "fixed {is_fixed}, source {source}"
                );
            }
        }
    }

    fn always(checks: &[Check]) -> Batch<'_> {
        Batch::plain(checks, 1_700_000_040_123)
    }

    #[test]
    fn fixed_windows_charged_always_take_the_fixed_script() {
        let mut checks = [
            check(0, Algorithm::FixedWindow, None),
            check(0, Algorithm::FixedWindow, None),
        ];
        checks[1].key = "k0".into();
        checks[1].cost = 5;
        checks[1].jitter_secs = 0;
        checks[1].quota = Quota::new(Algorithm::FixedWindow, 5, Unit::Second, 1, None);
        let script = EngineScript::default();
        let got = args(&script.evalsha(&always(&checks), &[]));
        assert_eq!(got[1], script.fixed.get_hash());
        // Both keys (one repeated), then cost and TTL: 120 s + 4 s jitter, and 1 s.
        assert_eq!(got[2..], ["2", "k0", "k0", "3", "124", "5", "1"]);
        let got = args(&script.eval(&always(&checks), &[]));
        assert_eq!((got[0].as_str(), got[1].as_str()), ("EVAL", FIXED_SOURCE));

        // Anything else takes the engine: a cost above the limit (never charged) ...
        checks[1].cost = 6;
        assert!(!fixed_only(&always(&checks)));
        assert_eq!(
            args(&script.evalsha(&always(&checks), &[]))[1],
            script.engine.get_hash()
        );
        // ... another algorithm, or another charging mode.
        checks[1].cost = 1;
        assert!(fixed_only(&always(&checks)));
        let mut other = checks.clone();
        other[1].quota.algorithm = Algorithm::SlidingWindow;
        assert!(!fixed_only(&always(&other)));
        for charging in [
            Charging::StopWhenOver,
            Charging::OnlyOver,
            Charging::AllOrNothing,
            Charging::Never,
        ] {
            let batch = Batch {
                charging,
                ..always(&checks)
            };
            assert!(!fixed_only(&batch), "{charging:?}");
        }
    }

    #[test]
    fn fixed_counts_decide_as_the_engine_does_from_the_states_before() {
        // k0 twice (3 then 2), k1 once (3): counts 4, 6 (k0 held 1) and 5 (k1 held 2).
        let mut checks = [
            check(0, Algorithm::FixedWindow, None),
            check(1, Algorithm::FixedWindow, None),
            check(0, Algorithm::FixedWindow, None),
        ];
        checks[2].cost = 2;
        let batch = always(&checks);
        let got = decisions(
            &batch,
            Reply::Fixed(Value::Array(vec![
                Value::Int(4),
                Value::Int(5),
                Value::Int(6),
            ])),
        )
        .unwrap();
        let want = engine::decide(
            &batch,
            &[
                State { a: 1, b: 0 },
                State { a: 2, b: 0 },
                State { a: 1, b: 0 },
            ],
        );
        assert_eq!(got, want);
        let remaining: Vec<u64> = got.iter().map(|d| d.verdict.remaining).collect();
        assert_eq!(remaining, [1, 0, 0]);
        assert!(!got[2].verdict.allowed, "6 of 5");
        assert_eq!(got[2].charge, Some(State { a: 6, b: 0 }));

        // A saturated count, beyond a double's exact integers, as a string.
        let one = [check(0, Algorithm::FixedWindow, None)];
        let got = decisions(
            &always(&one),
            Reply::Fixed(Value::Array(vec![Value::BulkString(
                MAX_COUNT.to_string().into_bytes(),
            )])),
        )
        .unwrap();
        assert_eq!(got[0].verdict.used, MAX_COUNT);
        assert_eq!(got[0].charge, Some(State { a: MAX_COUNT, b: 0 }));
    }

    #[test]
    fn refuses_malformed_fixed_replies() {
        let checks = [check(0, Algorithm::FixedWindow, None)];
        let batch = always(&checks);
        for bad in [
            Value::Nil,
            Value::Array(vec![]),
            Value::Array(vec![Value::Int(1), Value::Int(2)]),
            Value::Array(vec![Value::Int(-1)]),
            // Below the check's cost of 3: no increment gives that.
            Value::Array(vec![Value::Int(2)]),
            Value::Array(vec![Value::BulkString(b"9223372036854775808".to_vec())]),
            Value::Array(vec![Value::BulkString(b"x".to_vec())]),
        ] {
            assert!(
                matches!(
                    decisions(&batch, Reply::Fixed(bad.clone())),
                    Err(StoreError::Reply(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn sends_previous_windows_read_beforehand_in_argv() {
        let checks = [
            check(0, Algorithm::SlidingWindow, Some("p0")),
            check(1, Algorithm::SlidingWindow, Some("p1")),
            check(2, Algorithm::FixedWindow, Some("ignored")),
        ];
        let batch = Batch::plain(&checks, 5);
        let read = [Some("17".to_owned()), None, Some("9".to_owned())];
        let got = args(&EngineScript::default().evalsha(&batch, &read));
        // Check 0's previous window travels as a value, check 1's as a key; a fixed window
        // has none whatever `read` says.
        assert_eq!(got[2..6], ["4", "k0", "k1", "p1"]);
        let previous_fields: Vec<&str> = [21, 29, 37].iter().map(|&i| got[i].as_str()).collect();
        assert_eq!(previous_fields, ["c17", "1", "0"]);
    }

    #[test]
    fn refuses_malformed_replies() {
        let checks = [check(0, Algorithm::FixedWindow, None)];
        let batch = Batch::plain(&checks, 0);
        let int = Value::Int;
        let good = vec![
            int(1),
            int(2),
            int(3),
            int(0),
            Value::BulkString(b"9223372036854775807".to_vec()),
            int(1),
            Value::BulkString(b"3".to_vec()),
            int(0),
        ];
        let d = decisions(&batch, Reply::Engine(Value::Array(good.clone()))).unwrap();
        assert_eq!(d[0].verdict.used, 9_223_372_036_854_775_807);
        assert_eq!(d[0].charge, Some(State { a: 3, b: 0 }));
        let mut short = good.clone();
        short.pop();
        assert!(matches!(
            decisions(&batch, Reply::Engine(Value::Array(short))),
            Err(StoreError::Reply(_))
        ));
        let mut bad_flag = good.clone();
        bad_flag[0] = int(2);
        assert!(decisions(&batch, Reply::Engine(Value::Array(bad_flag))).is_err());
        let mut negative = good;
        negative[1] = int(-1);
        assert!(decisions(&batch, Reply::Engine(Value::Array(negative))).is_err());
        assert!(decisions(&batch, Reply::Engine(Value::Nil)).is_err());
    }
}
