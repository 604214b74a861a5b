//! The counting engine's Redis side: `engine.lua` (one script decides a whole request), the
//! KEYS and ARGV it is called with, and its reply read back into [`Decided`]s.
//!
//! The layout is documented at the top of `engine.lua` and in the README ("The Redis
//! script"); this file is its only writer and reader.

use redis::{Cmd, ErrorKind, ServerErrorKind, Value};

use super::StoreError;
use crate::limiter::{
    algorithm::{Algorithm, State, Verdict},
    engine::{Batch, Charging, Decided},
};

/// The script's source, sent with `EVAL` only when Redis does not know its SHA1.
pub const SOURCE: &str = include_str!("engine.lua");

/// Fields per check in ARGV, and values per check in the reply.
const ARGV_PER_CHECK: usize = 8;
const REPLY_PER_CHECK: usize = 8;

/// The script and its SHA1, computed once.
pub struct EngineScript {
    script: redis::Script,
}

impl Default for EngineScript {
    fn default() -> Self {
        Self {
            script: redis::Script::new(SOURCE),
        }
    }
}

impl EngineScript {
    /// `EVALSHA sha numkeys KEYS… ARGV…`: the usual call, which sends only the hash.
    /// `read[i]`, when `Some`, is check `i`'s previous-window value as stored (`"0"` for no
    /// key), sent in ARGV instead of its key in KEYS (`REDIS_TYPE=cluster`, where that key may
    /// be on another node); `read` is empty otherwise.
    pub fn evalsha(&self, batch: &Batch<'_>, read: &[Option<String>]) -> Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.script.get_hash());
        push_keys_and_args(&mut cmd, batch, read);
        cmd
    }

    /// `EVAL source numkeys KEYS… ARGV…`, `read` as for [`EngineScript::evalsha`]: after
    /// `NOSCRIPT` (Redis restarted or `SCRIPT FLUSH`). It runs the script and caches it
    /// again, so the next call's `EVALSHA` finds it.
    pub fn eval(&self, batch: &Batch<'_>, read: &[Option<String>]) -> Cmd {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(SOURCE);
        push_keys_and_args(&mut cmd, batch, read);
        cmd
    }

    /// Runs the script on `conn`: EVALSHA, then EVAL when the server answers NOSCRIPT (nothing
    /// ran, so nothing can be charged twice). Unbounded: the caller applies `REDIS_TIMEOUT`.
    pub async fn run<C: redis::aio::ConnectionLike + Send>(
        &self,
        conn: &mut C,
        batch: &Batch<'_>,
        read: &[Option<String>],
    ) -> Result<Value, redis::RedisError> {
        match self.evalsha(batch, read).query_async::<Value>(conn).await {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                self.eval(batch, read).query_async::<Value>(conn).await
            }
            other => other,
        }
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

fn push_keys_and_args(cmd: &mut Cmd, batch: &Batch<'_>, read: &[Option<String>]) {
    // Check i's previous window: read beforehand, in KEYS, or none.
    let read_at = |i: usize| read.get(i).and_then(Option::as_deref);
    let in_keys = |i: usize, c| previous(c).filter(|_| read_at(i).is_none());
    let keys = batch.checks.len()
        + (0..batch.checks.len())
            .zip(batch.checks)
            .filter(|&(i, c)| in_keys(i, c).is_some())
            .count();
    cmd.arg(keys);
    for (i, c) in batch.checks.iter().enumerate() {
        cmd.arg(&c.key);
        if let Some(p) = in_keys(i, c) {
            cmd.arg(p);
        }
    }
    cmd.arg(batch.now_ms)
        .arg(charging_arg(batch.charging))
        .arg(u8::from(batch.never_refuse))
        .arg(batch.quota_total)
        .arg(batch.roles.len());
    for r in batch.roles {
        cmd.arg(u8::from(r.shadow)).arg(u8::from(r.quota));
    }
    for (i, c) in batch.checks.iter().enumerate() {
        let q = &c.quota;
        cmd.arg(c.descriptor)
            .arg(algorithm_arg(q.algorithm))
            .arg(q.limit)
            .arg(q.window_ms)
            .arg(q.capacity)
            .arg(c.cost)
            .arg(c.jitter_secs);
        match (previous(c), read_at(i)) {
            (Some(_), Some(value)) => cmd.arg(format!("c{value}")),
            (p, _) => cmd.arg(u8::from(p.is_some())),
        };
    }
    debug_assert_eq!(
        ARGV_PER_CHECK, 8,
        "the loop above writes 8 fields per check"
    );
}

/// Reads the script's reply: [`REPLY_PER_CHECK`] values per check, in order.
pub fn decisions(batch: &Batch<'_>, reply: Value) -> Result<Vec<Decided>, StoreError> {
    let Value::Array(values) = reply else {
        return Err(StoreError::Reply(format!(
            "counting script: expected an array, got {reply:?}"
        )));
    };
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
    fn sends_previous_windows_read_beforehand_in_argv() {
        let checks = [
            check(0, Algorithm::SlidingWindow, Some("p0")),
            check(1, Algorithm::SlidingWindow, Some("p1")),
            check(2, Algorithm::FixedWindow, Some("ignored")),
        ];
        let batch = Batch {
            checks: &checks,
            roles: &[Role::default()],
            quota_total: 0,
            charging: Charging::Always,
            never_refuse: false,
            now_ms: 5,
        };
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
        let batch = Batch {
            checks: &checks,
            roles: &[Role::default()],
            quota_total: 0,
            charging: Charging::Always,
            never_refuse: false,
            now_ms: 0,
        };
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
        let d = decisions(&batch, Value::Array(good.clone())).unwrap();
        assert_eq!(d[0].verdict.used, 9_223_372_036_854_775_807);
        assert_eq!(d[0].charge, Some(State { a: 3, b: 0 }));
        let mut short = good.clone();
        short.pop();
        assert!(matches!(
            decisions(&batch, Value::Array(short)),
            Err(StoreError::Reply(_))
        ));
        let mut bad_flag = good.clone();
        bad_flag[0] = int(2);
        assert!(decisions(&batch, Value::Array(bad_flag)).is_err());
        let mut negative = good;
        negative[1] = int(-1);
        assert!(decisions(&batch, Value::Array(negative)).is_err());
        assert!(decisions(&batch, Value::Nil).is_err());
    }
}
