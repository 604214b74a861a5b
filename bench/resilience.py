#!/usr/bin/env python3
"""Resilience scenarios behind docs/resilience.md, runnable against any ratelimitd binary.

Usage: bench/resilience.py BINARY [--scenario NAME] [--repeat N]
Needs grpcio and xds-protos (the versions in tests/py/requirements.txt), redis-server and
redis-cli. Starts its own redis-server and ratelimitd on free loopback ports and kills them
(by PID) at the end. Prints one line per scenario; with --repeat N, the numeric scenarios
(cancel, fd) run N times and each number is printed as its median followed by the raw runs.
Settings the old binary lacks (CONNECTION_OPENING_TIMEOUT, ...) are set anyway: clap ignores
environment variables it does not know.

Scenarios, each reproducing one failure mode:
  cancel        Redis hangs (SIGSTOP for 5 s, REDIS_TIMEOUT=30s) while 8 clients send calls with
                Envoy's default 20 ms deadline. Do the cancelled calls show up in the call
                counter, the error counter, the latency histogram, and is the backend in-flight
                gauge back to 0 once Redis resumes? Counters are deltas over the freeze;
                client_<CODE> counts what the client saw (CANCELLED "Timeout expired" is the
                server enforcing grpc-timeout, DEADLINE_EXCEEDED the client giving up first).
  fd            The process runs out of file descriptors (ulimit -n 64, 16 connections more than
                fit). CPU use and "accept" log lines over 3 s (an accept loop that spins or logs
                every EMFILE), then the time until a call succeeds once the connections close.
  drain         SIGTERM with one idle, never-speaking gRPC connection open (DRAIN_TIMEOUT=20s):
                does shutdown wait for that connection?
  silent        One idle TCP connection each to the gRPC and the HTTP port, sending nothing, at
                default settings: does the server ever close them?
  slow-headers  An HTTP request whose header block never ends (slowloris): when does the server
                give up, and what does it answer?
  poison        A descriptor with hits_addend 2^63+5 next to a normal one on Redis: does it wrap
                the counter (later calls OK again) or poison it, and what do clients see?
  policy        BACKEND_FAILURE_POLICY (error, allow, deny, local with EXPECTED_REPLICAS=2) while
                8 clients call with Envoy's 20 ms deadline: Redis hangs (SIGSTOP 3 s, then
                SIGCONT), and Redis crashes (SIGKILL, 3 s of calls, then restarted empty). One
                line per policy and failure: calls made, failed (any gRPC error), answered by
                the policy (ratelimitd_backend_policy_answers_total), worst and p99 client
                latency, and the time from SIGCONT/restart until a call on a fresh key is
                answered by Redis again. "before" is policy error with the breaker off and no
                client deadline (REDIS_TIMEOUT=10s, Redis stopped 12 s): the old behaviour for
                a caller without a deadline.
"""
import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

try:
    import grpc
    from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
except ImportError:
    sys.exit("needs grpcio and xds-protos: python3 -m venv /tmp/rv && /tmp/rv/bin/pip install "
             "grpcio==1.85.1 xds-protos==1.85.0, then run this script with /tmp/rv/bin/python")

CONFIG = "domain: res\ndescriptors:\n  - key: a\n    rate_limit: {unit: hour, requests_per_unit: 5}\n"
BASE_ENV = dict(GRPC_HOST="127.0.0.1", GRPC_PORT="0", HOST="127.0.0.1", PORT="0",
                DEBUG_HOST="127.0.0.1", DEBUG_PORT="0", USE_STATSD="false", LOG_LEVEL="info")
PROCS = []  # every process started here, killed at exit
WORK = tempfile.mkdtemp(prefix="resilience-")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, bound, what):
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        if (value := predicate()):
            return value
        time.sleep(0.05)
    raise RuntimeError(f"{what} not ready within {bound} s")


def start_redis():
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    PROCS.append(proc)

    def pong():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False
    wait_until(pong, 5, "redis-server")
    return proc, port


class Ratelimitd:
    """A ratelimitd process; `grpc` and `http` are its host:port, `log` its stderr file."""

    def __init__(self, binary, env=None, redis_port=None, nofile=None):
        config = os.path.join(WORK, "config")
        os.makedirs(config, exist_ok=True)
        with open(os.path.join(config, "res.yaml"), "w") as f:
            f.write(CONFIG)
        full_env = dict(PATH=os.environ["PATH"], **BASE_ENV, **(env or {}))
        if redis_port:
            full_env.update(BACKEND_TYPE="redis", REDIS_SOCKET_TYPE="tcp",
                            REDIS_URL=f"127.0.0.1:{redis_port}")
        argv = [binary, "serve", "--config", config]
        if nofile:  # exec keeps the PID, so /proc/PID is ratelimitd's own
            argv = ["sh", "-c", f'ulimit -n {nofile} && exec "$0" "$@"'] + argv
        fd, self.log = tempfile.mkstemp(dir=WORK, prefix="log.")
        with os.fdopen(fd, "wb") as err:
            self.proc = subprocess.Popen(argv, env=full_env, stderr=err, stdout=subprocess.DEVNULL)
        PROCS.append(self.proc)
        line = wait_until(self._listening, 10, "ratelimitd")
        self.grpc, self.http = re.search(r"grpc=(\S+) http=(\S+)", line).groups()

    def _listening(self):
        with open(self.log, errors="replace") as f:
            for line in f:
                if "ratelimitd listening" in line:
                    return re.sub(r"\x1b\[[0-9;]*m", "", line)
        return None

    def metrics(self):
        text = urllib.request.urlopen(f"http://{self.http}/metrics", timeout=5).read().decode()
        out = {}
        for m in re.finditer(r"^(\w+(?:\{[^}]*\})?) (\S+)$", text, re.M):
            value = float(m.group(2))
            out[m.group(1)] = int(value) if value.is_integer() else value
        return out

    def accept_lines(self):
        with open(self.log, errors="replace") as f:
            return sum("accept" in line for line in f)


def request(*values, addend=None):
    req = rls_pb2.RateLimitRequest(domain="res")
    for i, value in enumerate(values):
        d = req.descriptors.add()
        d.entries.add(key="a", value=value)
        if addend is not None and i == 0:
            d.hits_addend.value = addend
    return req


def call(addr, req, timeout=1.0):
    """One call on a fresh channel: returns (code name, overall_code name or status message)."""
    with grpc.insecure_channel(addr) as ch:
        try:
            resp = rls_pb2_grpc.RateLimitServiceStub(ch).ShouldRateLimit(req, timeout=timeout)
            return "OK", rls_pb2.RateLimitResponse.Code.Name(resp.overall_code)
        except grpc.RpcError as e:
            return e.code().name, e.details()


def wait_closed(sock, bound):
    """Seconds until the peer closes `sock` (None if still open after `bound`), and what it sent."""
    start, got = time.monotonic(), b""
    while (left := bound - (time.monotonic() - start)) > 0:
        sock.settimeout(left)
        try:
            data = sock.recv(4096)
        except socket.timeout:
            break
        except OSError:  # reset
            return time.monotonic() - start, got
        if not data:
            return time.monotonic() - start, got
        got += data
    return None, got


def connect(addr):
    return socket.create_connection(addr.rsplit(":", 1), timeout=5)


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def scenario_cancel(binary):
    redis, port = start_redis()
    rld = Ratelimitd(binary, {"REDIS_TIMEOUT": "30s"}, redis_port=port)
    assert call(rld.grpc, request("warmup"))[0] == "OK"
    before = rld.metrics()
    codes, lock = {}, threading.Lock()
    with grpc.insecure_channel(rld.grpc) as ch:
        stub = rls_pb2_grpc.RateLimitServiceStub(ch)
        redis.send_signal(signal.SIGSTOP)
        end = time.monotonic() + 5

        def worker(w):
            i = 0
            while time.monotonic() < end and i < 10_000:
                i += 1
                try:
                    stub.ShouldRateLimit(request(f"w{w}-{i}"), timeout=0.02)
                    code = "OK"
                except grpc.RpcError as e:
                    code = e.code().name
                with lock:
                    codes[code] = codes.get(code, 0) + 1
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(worker, range(8)))
    redis.send_signal(signal.SIGCONT)
    time.sleep(1)
    after = rld.metrics()

    def delta(name):
        return after[name] - before.get(name, 0) if name in after else "absent"
    out = {"sent": sum(codes.values())}
    out.update({f"client_{c}": n for c, n in sorted(codes.items())})
    out["total_requests"] = delta('ratelimit_service_total_requests{grpc_method="ShouldRateLimit"}')
    for key in sorted(after):
        if key.startswith("ratelimit_service_should_rate_limit_error"):
            err_type = re.search(r'err_type="([^"]*)"', key)
            out[f"error[{err_type.group(1) if err_type else key}]"] = delta(key)
    out["backend_in_flight"] = after.get("ratelimitd_backend_requests_in_flight", "absent")
    out["response_time_count"] = delta(
        'ratelimit_service_response_time_seconds_count{grpc_method="ShouldRateLimit"}')
    return out


def scenario_fd(binary):
    rld = Ratelimitd(binary, {"CONNECTION_OPENING_TIMEOUT": "60s"}, nofile=64)
    pid = rld.proc.pid
    extra = 64 - len(os.listdir(f"/proc/{pid}/fd")) + 16
    conns = [connect(rld.grpc) for _ in range(extra)]
    time.sleep(0.5)  # let the server accept what fits and hit EMFILE
    cpu0, lines0, t0 = cpu_seconds(pid), rld.accept_lines(), time.monotonic()
    time.sleep(3)
    cpu1, lines1, t1 = cpu_seconds(pid), rld.accept_lines(), time.monotonic()
    fds_full = len(os.listdir(f"/proc/{pid}/fd"))
    for c in conns:
        c.close()
    start, recovered = time.monotonic(), None
    while time.monotonic() - start < 10:
        if call(rld.grpc, request("fd"), timeout=1)[0] == "OK":
            recovered = round(time.monotonic() - start, 3)
            break
        time.sleep(0.05)
    return {"connections": extra, "server_fds": fds_full,
            "cpu_pct": round(100 * (cpu1 - cpu0) / (t1 - t0), 1),
            "accept_log_lines_3s": lines1 - lines0, "accept_log_lines_total": lines1,
            "recovery_s": recovered if recovered is not None else ">10 s"}


def scenario_drain(binary):
    rld = Ratelimitd(binary, {"DRAIN_TIMEOUT": "20s", "CONNECTION_OPENING_TIMEOUT": "60s"})
    conn = connect(rld.grpc)
    time.sleep(0.2)
    start = time.monotonic()
    rld.proc.send_signal(signal.SIGTERM)
    try:
        rc = rld.proc.wait(timeout=30)
        took = f"{time.monotonic() - start:.2f} s"
    except subprocess.TimeoutExpired:
        rc, took = None, ">30 s (still running)"
    conn.close()
    return {"exit_after": took, "exit_code": rc}


def scenario_silent(binary):
    rld = Ratelimitd(binary)
    conns = {"grpc": connect(rld.grpc), "http": connect(rld.http)}
    with ThreadPoolExecutor(2) as pool:
        closed = dict(zip(conns, pool.map(lambda c: wait_closed(c, 15)[0], conns.values())))
    for c in conns.values():
        c.close()
    return {f"{port}_closed_after": f"{s:.2f} s" if s is not None else ">15 s (still open)"
            for port, s in closed.items()}


def scenario_slow_headers(binary):
    rld = Ratelimitd(binary)
    conn = connect(rld.http)
    conn.sendall(b"GET /healthcheck HTTP/1.1\r\nHost: x\r\n")
    seconds, got = wait_closed(conn, 40)
    conn.close()
    return {"closed_after": f"{seconds:.2f} s" if seconds is not None else ">40 s (still open)",
            "server_sent": repr(got[:120])}


def scenario_poison(binary):
    _, port = start_redis()
    rld = Ratelimitd(binary, redis_port=port)
    out = {"first(x+2^63+5,y)": "/".join(call(rld.grpc, request("x", "y", addend=2**63 + 5)))}
    for i in range(3):
        out[f"x#{i + 1}"] = "/".join(call(rld.grpc, request("x")))
    window = int(time.time()) // 3600 * 3600
    for v in "xy":
        got = subprocess.run(["redis-cli", "-p", str(port), "GET", f"res_a_{v}_{window}"],
                             capture_output=True, text=True, timeout=5).stdout.strip()
        out[f"redis[res_a_{v}]"] = got or "(nil)"
    return out


def drive(addr, seconds, timeout, workers=8):
    """`workers` threads calling on fresh keys for `seconds`: (calls, failed, latencies in ms)."""
    lock, out = threading.Lock(), {"calls": 0, "failed": {}, "ms": []}
    end = time.monotonic() + seconds
    with grpc.insecure_channel(addr) as ch:
        stub = rls_pb2_grpc.RateLimitServiceStub(ch)

        def worker(w):
            i = 0
            while time.monotonic() < end:
                i += 1
                start = time.monotonic()
                try:
                    stub.ShouldRateLimit(request(f"d{w}-{i}"), timeout=timeout)
                    failed = None
                except grpc.RpcError as e:
                    failed = e.code().name
                took = (time.monotonic() - start) * 1000
                with lock:
                    out["calls"] += 1
                    if failed:
                        out["failed"][failed] = out["failed"].get(failed, 0) + 1
                    out["ms"].append(took)
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(worker, range(workers)))
    return out


def recovery_seconds(addr, tag, bound=30):
    """Seconds until a call on a fresh key is answered by Redis (5 - 1 = 4 remaining)."""
    start = time.monotonic()
    with grpc.insecure_channel(addr) as ch:
        stub = rls_pb2_grpc.RateLimitServiceStub(ch)
        i = 0
        while time.monotonic() - start < bound:
            i += 1
            try:
                r = stub.ShouldRateLimit(request(f"{tag}-{i}"), timeout=1)
                if r.overall_code == rls_pb2.RateLimitResponse.OK and \
                        r.statuses[0].limit_remaining == 4:
                    return round(time.monotonic() - start, 3)
            except grpc.RpcError:
                pass
            time.sleep(0.005)
    return f">{bound}"


def policy_answers(rld):
    return sum(v for k, v in rld.metrics().items()
               if k.startswith("ratelimitd_backend_policy_answers_total"))


def scenario_policy(binary):
    rows = {}
    cases = [("before", {"BACKEND_FAILURE_POLICY": "error", "BACKEND_CIRCUIT_FAILURES": "0"},
              None, 12)]
    cases += [(p, {"BACKEND_FAILURE_POLICY": p, "EXPECTED_REPLICAS": "2"}, 0.02, 3)
              for p in ("error", "allow", "deny", "local")]
    for name, env, timeout, outage in cases:
        redis, port = start_redis()
        rld = Ratelimitd(binary, env, redis_port=port)
        assert call(rld.grpc, request("warmup"))[0] == "OK"
        for failure in ("hang", "crash"):
            before = policy_answers(rld)
            if failure == "hang":
                redis.send_signal(signal.SIGSTOP)
                got = drive(rld.grpc, outage, timeout)
                by_policy = policy_answers(rld) - before
                redis.send_signal(signal.SIGCONT)
            else:
                redis.kill()
                redis.wait()
                got = drive(rld.grpc, outage if name != "before" else 3, timeout)
                by_policy = policy_answers(rld) - before
                redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind",
                                          "127.0.0.1", "--save", "", "--appendonly", "no"],
                                         stdout=subprocess.DEVNULL)
                PROCS.append(redis)
            recovered = recovery_seconds(rld.grpc, f"{failure}-rec")
            ms = sorted(got["ms"])
            failed = sum(got["failed"].values())
            detail = ",".join(f"{c}:{n}" for c, n in sorted(got["failed"].items()))
            rows[f"{name}/{failure}"] = (
                f"calls={got['calls']} failed={failed}{f' ({detail})' if detail else ''} "
                f"by_policy={by_policy:g} worst_ms={ms[-1]:.1f} "
                f"p99_ms={ms[int(len(ms) * 0.99) - 1]:.1f} recovery_s={recovered}")
        stop_all()
    return rows


SCENARIOS = {"cancel": scenario_cancel, "fd": scenario_fd, "drain": scenario_drain,
             "silent": scenario_silent, "slow-headers": scenario_slow_headers,
             "poison": scenario_poison, "policy": scenario_policy}
NUMERIC = {"cancel", "fd"}


def summarize(runs):
    """One value per key: the median and the raw runs when every run gave a number."""
    keys = list(dict.fromkeys(k for r in runs for k in r))
    out = []
    for k in keys:
        values = [r.get(k, 0) for r in runs]
        if len(runs) > 1 and all(isinstance(v, (int, float)) for v in values):
            raw = " ".join(f"{v:g}" for v in values)
            out.append(f"{k}={statistics.median(values):g} [{raw}]")
        else:
            out.append(f"{k}={' | '.join(str(v) for v in values)}")
    return "  ".join(out)


def stop_all():
    while PROCS:
        proc = PROCS.pop()
        if proc.poll() is None:
            proc.kill()  # SIGKILL also ends a SIGSTOPped redis-server
        proc.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("binary")
    parser.add_argument("--scenario", choices=SCENARIOS, action="append")
    parser.add_argument("--repeat", type=int, default=1, help="runs of cancel and fd (median)")
    args = parser.parse_args()
    try:
        for name in args.scenario or SCENARIOS:
            runs = []
            for _ in range(args.repeat if name in NUMERIC else 1):
                runs.append(SCENARIOS[name](os.path.abspath(args.binary)))
                stop_all()
            if name == "policy":
                for row, text in runs[0].items():
                    print(f"{row:13} {text}", flush=True)
                continue
            print(f"{name:13} {summarize(runs)}", flush=True)
    finally:
        stop_all()
        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
