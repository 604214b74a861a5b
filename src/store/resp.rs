//! RESP2, the part of it ratelimitd speaks on its own connections (`pipe.rs`): commands
//! written straight into a connection's outgoing buffer, and replies parsed from its incoming
//! one into redis-rs's [`Value`], so a script's reply is read by the same code
//! (`script::decisions`) whichever client carried it.
//!
//! A command is written in two passes over its arguments ([`Command::args`]): one counts them
//! (RESP puts the count first), the other writes them. Nothing is allocated for either.
//!
//! A reply's arrays come from the thread's spares, and the script's reply goes back to them
//! once read ([`recycle`]): under `RUNTIME_FLAVOR=per_core` a connection's task and its calls
//! share a thread, so a call's reply allocates nothing.

use redis::{ErrorKind, RedisError, Value};

use crate::spares::{self, Spares};

/// Where a command's arguments go.
pub trait Args {
    /// One argument, as bytes.
    fn bytes(&mut self, b: &[u8]);
    /// One argument, as its decimal digits.
    fn int<I: itoa::Integer + redis::ToRedisArgs>(&mut self, n: I);
}

/// A command: its arguments, the name first, given to any [`Args`].
pub trait Command {
    fn args<A: Args>(&self, a: &mut A);
}

/// Counts arguments.
struct Count(usize);

impl Args for Count {
    fn bytes(&mut self, _: &[u8]) {
        self.0 += 1;
    }
    fn int<I: itoa::Integer + redis::ToRedisArgs>(&mut self, _: I) {
        self.0 += 1;
    }
}

/// Writes arguments as RESP bulk strings.
struct Write<'a>(&'a mut Vec<u8>);

impl Write<'_> {
    fn header(&mut self, kind: u8, n: usize) {
        self.0.push(kind);
        self.0
            .extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
        self.0.extend_from_slice(b"\r\n");
    }
}

impl Args for Write<'_> {
    fn bytes(&mut self, b: &[u8]) {
        self.header(b'$', b.len());
        self.0.extend_from_slice(b);
        self.0.extend_from_slice(b"\r\n");
    }
    fn int<I: itoa::Integer + redis::ToRedisArgs>(&mut self, n: I) {
        let mut digits = itoa::Buffer::new();
        self.bytes(digits.format(n).as_bytes());
    }
}

/// Appends `command` to `out`, as a RESP array of bulk strings.
pub fn write(out: &mut Vec<u8>, command: &impl Command) {
    let mut count = Count(0);
    command.args(&mut count);
    let mut w = Write(out);
    w.header(b'*', count.0);
    command.args(&mut w);
}

/// `redis::Cmd` takes arguments too: the script's layout has one writer for both clients.
impl Args for redis::Cmd {
    fn bytes(&mut self, b: &[u8]) {
        self.arg(b);
    }
    fn int<I: itoa::Integer + redis::ToRedisArgs>(&mut self, n: I) {
        self.arg(n);
    }
}

/// A command given as its arguments (handshakes, `PING`).
pub struct Plain<'a>(pub &'a [&'a [u8]]);

impl Command for Plain<'_> {
    fn args<A: Args>(&self, a: &mut A) {
        for arg in self.0 {
            a.bytes(arg);
        }
    }
}

/// Spare arrays kept per thread, and the most elements one may hold to be kept (a script's
/// reply has 8 per check).
const SPARE_ARRAYS: usize = 64;
const SPARE_ARRAY_LEN: usize = 256;

thread_local! {
    static ARRAYS: Spares<Vec<Value>> = const { Spares::new() };
}

/// An empty array with room for `n` elements, this thread's spare if it has one.
fn array(n: usize) -> Vec<Value> {
    match spares::take(&ARRAYS) {
        Some(mut items) => {
            items.reserve(n);
            items
        }
        None => Vec::with_capacity(n),
    }
}

/// Gives a reply's array back to this thread's spares, for the next reply [`parse`] reads.
pub fn recycle(mut items: Vec<Value>) {
    if items.capacity() > SPARE_ARRAY_LEN {
        return;
    }
    items.clear();
    spares::give(&ARRAYS, items, SPARE_ARRAYS);
}

/// Nesting deeper than any reply ratelimitd asks for (a script's reply is one flat array):
/// beyond it the stream is treated as broken rather than recursed into.
const MAX_DEPTH: usize = 8;

/// The reply at the start of `buf` and its length in bytes; `None` while it is incomplete.
/// An error reply is a [`Value::ServerError`] (built by redis-rs's own parser, so its kind,
/// NOSCRIPT or READONLY, is exactly what redis-rs would report); an error here means the
/// stream is not RESP and the connection cannot be trusted any more.
pub fn parse(buf: &[u8]) -> Result<Option<(Value, usize)>, RedisError> {
    value(buf, 0, 0)
}

fn protocol(detail: String) -> RedisError {
    RedisError::from((ErrorKind::Parse, "unexpected bytes from Redis", detail))
}

/// The line starting at `at` (without its CRLF) and where the next one starts.
fn line(buf: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let rest = buf.get(at..)?;
    let cr = rest.iter().position(|&b| b == b'\r')?;
    match rest.get(cr + 1) {
        Some(b'\n') => Some((rest.get(..cr)?, at + cr + 2)),
        Some(_) => Some((rest.get(..cr)?, usize::MAX)),
        None => None,
    }
}

fn integer(digits: &[u8]) -> Result<i64, RedisError> {
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            protocol(format!(
                "'{}' is not an integer",
                String::from_utf8_lossy(digits)
            ))
        })
}

fn value(buf: &[u8], at: usize, depth: usize) -> Result<Option<(Value, usize)>, RedisError> {
    let Some(&kind) = buf.get(at) else {
        return Ok(None);
    };
    let Some((text, next)) = line(buf, at + 1) else {
        return Ok(None);
    };
    if next == usize::MAX {
        return Err(protocol("a CR without its LF".into()));
    }
    let v = match kind {
        b'+' if text == b"OK" => Value::Okay,
        b'+' => Value::SimpleString(String::from_utf8_lossy(text).into_owned()),
        b':' => Value::Int(integer(text)?),
        b'-' => match buf.get(at..next).map(redis::parse_redis_value) {
            Some(Ok(v @ Value::ServerError(_))) => v,
            _ => return Err(protocol("an error reply redis-rs cannot read".into())),
        },
        b'$' => {
            let len = integer(text)?;
            if len < 0 {
                return Ok(Some((Value::Nil, next)));
            }
            let end = usize::try_from(len)
                .ok()
                .and_then(|len| next.checked_add(len))
                .ok_or_else(|| protocol(format!("a bulk string of {len} bytes")))?;
            let (Some(body), Some(crlf)) = (buf.get(next..end), buf.get(end..end + 2)) else {
                return Ok(None);
            };
            if crlf != b"\r\n" {
                return Err(protocol("a bulk string longer than its length".into()));
            }
            return Ok(Some((Value::BulkString(body.to_vec()), end + 2)));
        }
        b'*' => {
            let n = integer(text)?;
            if n < 0 {
                return Ok(Some((Value::Nil, next)));
            }
            if depth >= MAX_DEPTH {
                return Err(protocol(format!("arrays nested {MAX_DEPTH} deep")));
            }
            // Each element takes at least 3 bytes: a count beyond what is buffered is only
            // believed once the bytes arrive.
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            let mut items = array(n.min(buf.len().saturating_sub(next) / 3));
            let mut at = next;
            for _ in 0..n {
                let Some((item, end)) = value(buf, at, depth + 1)? else {
                    recycle(items);
                    return Ok(None);
                };
                items.push(item);
                at = end;
            }
            return Ok(Some((Value::Array(items), at)));
        }
        other => {
            return Err(protocol(format!(
                "a reply starting with byte {other:#04x} (RESP2 only)"
            )))
        }
    };
    Ok(Some((v, next)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        let mut out = b"already there".to_vec();
        write(&mut out, &Plain(&[b"AUTH", b"alice", b"s3cret"]));
        assert_eq!(
            out,
            b"already there*3\r\n$4\r\nAUTH\r\n$5\r\nalice\r\n$6\r\ns3cret\r\n"
        );

        struct Mixed;
        impl Command for Mixed {
            fn args<A: Args>(&self, a: &mut A) {
                a.bytes(b"EVALSHA");
                a.int(0u8);
                a.int(1_700_000_040_123u64);
                a.bytes(b"");
            }
        }
        let mut out = Vec::new();
        write(&mut out, &Mixed);
        assert_eq!(
            out,
            b"*4\r\n$7\r\nEVALSHA\r\n$1\r\n0\r\n$13\r\n1700000040123\r\n$0\r\n\r\n"
        );
        // The same arguments through redis-rs's own encoder.
        let mut cmd = redis::cmd("EVALSHA");
        cmd.int(0u8);
        cmd.int(1_700_000_040_123u64);
        cmd.bytes(b"");
        assert_eq!(cmd.get_packed_command(), out);
    }

    #[test]
    fn a_read_replys_array_is_used_again_and_spares_are_bounded() {
        ARRAYS.with(Spares::clear);
        let Some((Value::Array(first), _)) = parse(b"*3\r\n:1\r\n:2\r\n:3\r\n").unwrap() else {
            panic!("not an array");
        };
        let at = first.as_ptr();
        recycle(first);
        let Some((Value::Array(again), _)) = parse(b"*2\r\n:4\r\n:5\r\n").unwrap() else {
            panic!("not an array");
        };
        assert_eq!(again.as_ptr(), at, "the same allocation");
        assert_eq!(again, [Value::Int(4), Value::Int(5)]);
        // An incomplete reply gives its array back too.
        recycle(again);
        assert_eq!(parse(b"*3\r\n:3\r\n").unwrap(), None);
        assert_eq!(ARRAYS.with(Spares::len), 1);
        // Too large an array is freed; beyond SPARE_ARRAYS, arrays are freed.
        recycle(Vec::with_capacity(SPARE_ARRAY_LEN + 1));
        for _ in 0..SPARE_ARRAYS + 5 {
            recycle(Vec::with_capacity(8));
        }
        assert_eq!(ARRAYS.with(Spares::len), SPARE_ARRAYS);
    }

    #[test]
    fn replies_parse_as_redis_rs_parses_them() {
        let cases: &[&[u8]] = &[
            b"+OK\r\n",
            b"+PONG\r\n",
            b":-42\r\n",
            b"$5\r\nhe\r\no\r\n",
            b"$0\r\n\r\n",
            b"$-1\r\n",
            b"*-1\r\n",
            b"*0\r\n",
            b"*3\r\n:1\r\n$2\r\n17\r\n*2\r\n:0\r\n+x\r\n",
            b"-NOSCRIPT No matching script. Please use EVAL.\r\n",
            b"-READONLY You can't write against a read only replica.\r\n",
            b"-ERR wrong number of arguments\r\n",
            b"*2\r\n:1\r\n-LOADING server is loading\r\n",
        ];
        for &case in cases {
            let want = redis::parse_redis_value(case).unwrap();
            assert_eq!(
                parse(case).unwrap(),
                Some((want, case.len())),
                "{}",
                String::from_utf8_lossy(case)
            );
            // Every strict prefix is incomplete, not an error.
            for cut in 0..case.len() {
                assert_eq!(parse(&case[..cut]).unwrap(), None, "{cut}");
            }
        }
        let err = parse(b"-NOSCRIPT No matching script\r\n")
            .unwrap()
            .unwrap()
            .0
            .extract_error()
            .unwrap_err();
        assert_eq!(
            err.kind(),
            ErrorKind::Server(redis::ServerErrorKind::NoScript)
        );
    }

    #[test]
    fn replies_follow_each_other_in_one_buffer() {
        let buf = b":1\r\n*2\r\n:2\r\n:3\r\n+OK";
        let (first, used) = parse(buf).unwrap().unwrap();
        assert_eq!((first, used), (Value::Int(1), 4));
        let (second, used2) = parse(&buf[used..]).unwrap().unwrap();
        assert_eq!(second, Value::Array(vec![Value::Int(2), Value::Int(3)]));
        assert_eq!(parse(&buf[used + used2..]).unwrap(), None);
    }

    #[test]
    fn what_is_not_resp2_breaks_the_stream() {
        for bad in [
            &b"?1\r\n"[..],
            b":x\r\n",
            b"$3\r\nabcd\r\n",
            b"$-9999999999999999999\r\n",
            b"*1\r\n:1\rx",
            b"%1\r\n",
        ] {
            assert!(parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let deep = b"*1\r\n".repeat(MAX_DEPTH + 1);
        assert!(parse(&deep).is_err());
        // A huge count is not believed before its elements arrive (no allocation for it).
        assert_eq!(parse(b"*9223372036854775807\r\n:1\r\n").unwrap(), None);
    }
}
