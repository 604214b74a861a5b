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
  slow          Redis answers, but 50 ms late each way: a TCP proxy (asyncio, in this process)
                in front of redis-server delays every chunk in both directions; the delay goes
                from 0 to 50 ms for 3 s of calls (8 clients, 20 ms deadline) and back to 0. Same
                columns as policy, per policy; "recovery" runs from the delay's return to 0.
                "before": policy error, breaker off, no client deadline.
  cluster-failover  REDIS_TYPE=cluster (3 masters with a replica each, node timeout 1 s):
                8 clients call with a 20 ms deadline for 10 s; 1 s in, one master is killed
                (SIGKILL). Policies error and local. "recovery" is the time from the kill until
                a call on a fresh key in the dead master's slots is counted in Redis again
                (probed one call at a time with a 20 ms deadline beside the clients; the end
                of the longest run of probes not answered by Redis).
  sentinel-failover  REDIS_TYPE=sentinel (master, replica, 3 sentinels, down-after 1 s):
                as cluster-failover, with SENTINEL FAILOVER instead of a kill; "recovery" is the
                time from the command until a call is counted in Redis again after the
                longest run of calls that were not ("no outage" if none failed).
"""
import argparse
import asyncio
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


def start_redis(*extra, sentinel=False):
    """A redis-server (or, with `sentinel`, a sentinel whose config lines are `extra`) on a
    free port, in its own directory under WORK."""
    port = free_port()
    work = tempfile.mkdtemp(dir=WORK, prefix=f"redis-{port}-")
    if sentinel:
        conf = os.path.join(work, "sentinel.conf")
        with open(conf, "w") as f:
            f.write(f"port {port}\nbind 127.0.0.1\ndir {work}\n" + "".join(extra))
        argv = ["redis-server", conf, "--sentinel"]
    else:
        argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", work, *extra]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
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

    def __init__(self, binary, env=None, redis_port=None, nofile=None, redis_url=None):
        config = os.path.join(WORK, "config")
        os.makedirs(config, exist_ok=True)
        with open(os.path.join(config, "res.yaml"), "w") as f:
            f.write(CONFIG)
        full_env = dict(PATH=os.environ["PATH"], **BASE_ENV, **(env or {}))
        if redis_port:
            full_env.update(BACKEND_TYPE="redis", REDIS_SOCKET_TYPE="tcp",
                            REDIS_URL=f"127.0.0.1:{redis_port}")
        if redis_url:
            full_env.update(BACKEND_TYPE="redis", REDIS_SOCKET_TYPE="tcp", REDIS_URL=redis_url)
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


class LatencyProxy:
    """A TCP proxy on a free loopback port to 127.0.0.1:`target` that writes each chunk,
    in either direction, `delay` seconds after reading it (read when the chunk arrives, so it
    can change while connections are open). Runs an asyncio loop on its own thread."""

    def __init__(self, target):
        self.target, self.delay = target, 0.0
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)
            server = self.loop.run_until_complete(
                asyncio.start_server(self._connection, "127.0.0.1", 0))
            self.port = server.sockets[0].getsockname()[1]
            started.set()
            self.loop.run_forever()
            server.close()
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        if not started.wait(5):
            raise RuntimeError("latency proxy not started within 5 s")

    async def _connection(self, client_r, client_w):
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            client_w.close()
            return
        for w in (client_w, server_w):
            w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.gather(self._pipe(client_r, server_w), self._pipe(server_r, client_w),
                             return_exceptions=True)

    async def _pipe(self, reader, writer):
        queue = asyncio.Queue()

        async def write():
            while (item := await queue.get()) is not None:
                await asyncio.sleep(max(0.0, item[0] - self.loop.time()))
                writer.write(item[1])
                await writer.drain()
            writer.close()
        task = asyncio.ensure_future(write())
        try:
            while data := await reader.read(65536):
                queue.put_nowait((self.loop.time() + self.delay, data))
        finally:
            queue.put_nowait(None)
            await task

    def stop(self):
        """Closes every proxied connection, then the loop."""
        async def shutdown():
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.loop.stop()
        asyncio.run_coroutine_threadsafe(shutdown(), self.loop)
        self.thread.join(5)


def crc16(data):
    """CRC16-XMODEM, Redis Cluster's key hash (slot = crc16(key) % 16384 without a hash tag)."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def redis_cli(port, *args):
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True,
                          text=True, timeout=10).stdout


def info(port, *command):
    """`name:value` lines of INFO `command` (or of `command` itself, e.g. CLUSTER INFO)."""
    command = command if len(command) > 1 else ("INFO", *command)
    return {k: v.strip() for k, _, v in (line.partition(":") for line in
                                         redis_cli(port, *command).splitlines()) if v}


def start_cluster():
    """Six cluster nodes made three masters with a replica each; returns their ports."""
    ports = []
    for _ in range(6):
        _, port = start_redis("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                              "--cluster-node-timeout", "1000", "--cluster-port",
                              str(free_port()), "--repl-diskless-sync-delay", "0")
        ports.append(port)
    subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
                    "--cluster-replicas", "1", "--cluster-yes"], check=True,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, timeout=60)
    wait_until(lambda: all(info(p, "CLUSTER", "INFO").get("cluster_state") == "ok"
                           and info(p, "CLUSTER", "INFO").get("cluster_slots_ok") == "16384"
                           for p in ports), 30, "cluster_state:ok")
    wait_until(lambda: sum(info(p, "replication").get("master_link_status") == "up"
                           for p in ports) == 3, 30, "replicas in sync")
    return ports


def own_slots(port):
    """The slots the node on `port` serves, from its CLUSTER NODES line."""
    line = next(ln for ln in redis_cli(port, "CLUSTER", "NODES").splitlines() if "myself" in ln)
    slots = set()
    for part in line.split()[8:]:
        if not part.startswith("["):
            lo, _, hi = part.partition("-")
            slots.update(range(int(lo), int(hi or lo) + 1))
    return slots


def start_sentinels(name="rlmaster"):
    """A master, its replica and three sentinels; returns (master, replica, sentinel ports)."""
    _, master = start_redis("--repl-diskless-sync-delay", "0")
    _, replica = start_redis("--replicaof", "127.0.0.1", str(master),
                             "--repl-diskless-sync-delay", "0")
    wait_until(lambda: info(replica, "replication").get("master_link_status") == "up",
               20, "replica in sync")
    conf = (f"sentinel monitor {name} 127.0.0.1 {master} 2\n"
            f"sentinel down-after-milliseconds {name} 1000\n"
            f"sentinel failover-timeout {name} 5000\n")
    sentinels = [start_redis(conf, sentinel=True)[1] for _ in range(3)]

    def known():
        for s in sentinels:
            fields = redis_cli(s, "SENTINEL", "MASTER", name).split()
            pairs = dict(zip(fields[::2], fields[1::2]))
            if pairs.get("num-slaves") != "1" or pairs.get("num-other-sentinels") != "2":
                return False
        return True
    wait_until(known, 30, "sentinels know the replica and each other")
    return master, replica, sentinels


def from_redis(stub, value, timeout=0.02):
    """Whether a call on fresh `value` was answered by Redis (5 - 1 = 4 remaining)."""
    try:
        r = stub.ShouldRateLimit(request(value), timeout=timeout)
    except grpc.RpcError:
        return False
    return r.overall_code == rls_pb2.RateLimitResponse.OK and r.statuses[0].limit_remaining == 4


def outage_end(addr, values, start, watch=9, bound=30):
    """Probes one call at a time on `values` (fresh each) for `watch` s from `start`, and on
    while they fail (up to `bound` s): seconds from `start` until the first call answered by
    Redis after the longest run of calls that were not (a lone call missing its 20 ms on a
    loaded host does not end the outage early), None if every call was answered by Redis;
    and the number of probes."""
    streak, longest = None, None  # (start index, length)
    results = []
    with grpc.insecure_channel(addr) as ch:
        stub = rls_pb2_grpc.RateLimitServiceStub(ch)
        for value in values:
            elapsed = time.monotonic() - start
            if elapsed > bound or (elapsed > watch and (not results or results[-1][1])):
                break
            results.append((elapsed, from_redis(stub, value)))
            time.sleep(0.005)
    for i, (_, ok) in enumerate(results):
        if ok:
            streak = None
            continue
        streak = (streak[0], streak[1] + 1) if streak else (i, 1)
        if not longest or streak[1] > longest[1]:
            longest = streak
    if not longest:
        return None, len(results)
    after = longest[0] + longest[1]
    if after >= len(results):
        return f">{round(results[-1][0], 1)}", len(results)
    return round(results[after][0], 3), len(results)


def row(got, by_policy, recovered):
    ms = sorted(got["ms"])
    failed = sum(got["failed"].values())
    detail = ",".join(f"{c}:{n}" for c, n in sorted(got["failed"].items()))
    return (f"calls={got['calls']} failed={failed}{f' ({detail})' if detail else ''} "
            f"by_policy={by_policy:g} worst_ms={ms[-1]:.1f} "
            f"p99_ms={ms[int(len(ms) * 0.99) - 1]:.1f} recovery_s={recovered}")


def scenario_slow(binary):
    rows = {}
    cases = [("before", {"BACKEND_FAILURE_POLICY": "error", "BACKEND_CIRCUIT_FAILURES": "0"},
              None)]
    cases += [(p, {"BACKEND_FAILURE_POLICY": p, "EXPECTED_REPLICAS": "2"}, 0.02)
              for p in ("error", "allow", "deny", "local")]
    for name, env, timeout in cases:
        _, port = start_redis()
        proxy = LatencyProxy(port)
        try:
            rld = Ratelimitd(binary, env, redis_port=proxy.port)
            assert call(rld.grpc, request("warmup"))[0] == "OK"
            before = policy_answers(rld)
            proxy.delay = 0.05
            got = drive(rld.grpc, 3, timeout)
            by_policy = policy_answers(rld) - before
            proxy.delay = 0.0
            rows[f"{name}/slow"] = row(got, by_policy, recovery_seconds(rld.grpc, "slow-rec"))
        finally:
            stop_all()
            proxy.stop()
    return rows


def failover_case(binary, policy, redis_type, url, inject, probe_values, new_master=None):
    """8 clients for 10 s; `inject()` 1 s in; the row, the recovery from `inject` (see
    `outage_end`) and, given the port of the `new_master`, when it ran its first script."""
    env = {"BACKEND_FAILURE_POLICY": policy, "EXPECTED_REPLICAS": "2", "REDIS_TYPE": redis_type}
    rld = Ratelimitd(binary, env, redis_url=url)
    wait_until(lambda: call(rld.grpc, request("warmup"))[0] == "OK", 10, "first call")
    before = policy_answers(rld)
    with ThreadPoolExecutor(2) as pool:
        load = pool.submit(drive, rld.grpc, 10, 0.02)
        time.sleep(1)
        start = time.monotonic()
        inject()
        if new_master:
            switched = pool.submit(first_script, new_master, start)
        recovered, probes = outage_end(rld.grpc, probe_values, start)
        got = load.result()
    by_policy = policy_answers(rld) - before
    text = row(got, by_policy, recovered if recovered is not None else "no_outage")
    text += f" probes={probes}"
    if new_master:
        text += f" new_master_first_script_s={switched.result()}"
    return text


def first_script(port, start, bound=30):
    """Seconds from `start` until the server on `port` has run a script (EVALSHA or EVAL)."""
    while time.monotonic() - start < bound:
        stats = info(port, "commandstats")
        if any(k in stats for k in ("cmdstat_evalsha", "cmdstat_eval")):
            return round(time.monotonic() - start, 3)
        time.sleep(0.01)
    return f">{bound}"


def scenario_cluster_failover(binary):
    rows = {}
    for policy in ("error", "local"):
        ports = start_cluster()
        victim = next(p for p in ports if info(p, "replication").get("role") == "master")
        slots = own_slots(victim)
        window = int(time.time()) // 3600 * 3600
        values = (f"p{i}" for i in range(10**6)
                  if crc16(f"res_a_p{i}_{window}".encode()) % 16384 in slots)
        proc = next(p for p in PROCS if str(victim) in p.args)

        def kill():
            proc.kill()
            proc.wait()
        url = ",".join(f"127.0.0.1:{p}" for p in ports)
        rows[f"{policy}/cluster"] = failover_case(
            binary, policy, "cluster", url, kill, values)
        stop_all()
    return rows


def scenario_sentinel_failover(binary):
    rows = {}
    for policy in ("error", "local"):
        _, replica, sentinels = start_sentinels()
        url = "rlmaster," + ",".join(f"127.0.0.1:{s}" for s in sentinels)

        def failover():
            reply = redis_cli(sentinels[0], "SENTINEL", "FAILOVER", "rlmaster")
            assert reply.startswith("OK"), reply
        rows[f"{policy}/sentinel"] = failover_case(
            binary, policy, "sentinel", url, failover, (f"s{i}" for i in range(10**6)),
            new_master=replica)
        assert info(replica, "replication").get("role") == "master", "no failover"
        stop_all()
    return rows


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
            rows[f"{name}/{failure}"] = row(got, by_policy, recovered)
        stop_all()
    return rows


SCENARIOS = {"cancel": scenario_cancel, "fd": scenario_fd, "drain": scenario_drain,
             "silent": scenario_silent, "slow-headers": scenario_slow_headers,
             "poison": scenario_poison, "policy": scenario_policy, "slow": scenario_slow,
             "cluster-failover": scenario_cluster_failover,
             "sentinel-failover": scenario_sentinel_failover}
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
            if name in ("policy", "slow", "cluster-failover", "sentinel-failover"):
                for label, text in runs[0].items():
                    print(f"{label:13} {text}", flush=True)
                continue
            print(f"{name:13} {summarize(runs)}", flush=True)
    finally:
        stop_all()
        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
