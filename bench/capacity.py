"""Capacity model, measured: ``python -m bench.capacity`` from the repository root.

Measures on this machine, with the C load generator (``bench/loadgen.c``, mode
``s5``), what one unit of work costs in CPU time of the ``herald serve``
processes and of the ``redis-server`` processes (process CPU time read from
``/proc/PID/task/*/schedstat``, nanoseconds, not wall time), for 1, 2 and 3 nodes
on 1 and 3 Redis shards (``--nodes``, ``--shards``); then memory per connection
with as many idle connections held by one process as the file-descriptor limit
allows, up to 100,000 (``--memory-conns``).  ``docs/capacity.md`` is written from
the JSON of a run (``--report``; ``--from-json`` re-renders an earlier run).

Phases of one setup (fresh ``herald serve`` nodes for each; the load generator's
connection ``i`` goes to node ``i % nodes``, its publishers too):

    fanout    ``subs`` connections in ``channels`` channels of equal size (fan-out F),
              publications at ``rate``/s in steps: server and Redis CPU per publication
    rooms     ``subs`` connections, each in 2 channels of its own (fan-out 1, like a
              personal channel): connect + 2 subscribes (server and Redis CPU per
              connect, memory per connection), held idle with a ping every
              ``ping`` s (CPU per connection-second), publications at ``rate``/s in
              steps (CPU per publication with one delivery), then every client
              closes (CPU per disconnect)
    presence  ``rooms`` with presence on and a short ``presence_ttl``: Redis CPU per
              presence add (set-up, against ``rooms``) and per entry refreshed (idle)

Server CPU per delivered message and per publication come from the two fan-outs:
``x = a F + b`` per publication, with ``x`` and ``F`` measured in ``fanout`` and
``rooms``.  Herald runs with presence and join/leave off except in ``presence``,
history on (``--history-size``, 100 by default, so publications carry offsets),
logging at warning, no rate or connection limits.  Herald nodes and Redis are
pinned to core 0, the load generator to core 1 (``taskset``), as in
docs/benchmarks.md.  A 3-shard setup uses the broker URL
``redis://127.0.0.1:P1/0,redis://127.0.0.1:P2/0,redis://127.0.0.1:P3/0``; where
Herald refuses it at start, those rows are skipped with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as _dt
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import run as base

NAMESPACE = "cap"  # presence off
PRESENCE_NAMESPACE = "capp"  # presence on
RESULTS = base.BENCH_DIR / "results" / "capacity.json"
#: Connections the memory phase aims for (the issue's figure).
MEMORY_TARGET = 100_000
#: Descriptors kept free for the processes' own files, Redis links and listening sockets.
FD_MARGIN = 400
#: Connections per loopback source address (the ephemeral range is 32768-60999 here).
PER_SOURCE = 20_000


# ---------------------------------------------------------------- sizes


@dataclass
class Sizes:
    """Full-size parameters times ``scale`` (counts) and ``min(1, scale)`` (durations)."""

    scale: float = 1.0
    history_size: int = 100

    def n(self, value: int, low: int) -> int:
        return max(low, int(value * self.scale))

    def d(self, value: float, low: float = 0.5) -> float:
        return max(low, round(value * min(1.0, self.scale * 4), 2))

    @property
    def fanout_subs(self) -> int:
        return self.n(1500, 40)

    @property
    def fanout_channels(self) -> int:
        return self.n(15, 4)

    @property
    def fanout_rate(self) -> float:
        return max(20.0, round(150 * min(1.0, self.scale * 4)))

    @property
    def rooms_subs(self) -> int:
        return self.n(2000, 40)

    @property
    def rooms_rate(self) -> float:
        return max(50.0, round(400 * min(1.0, self.scale * 4)))

    @property
    def step(self) -> float:
        return self.d(3.0)

    @property
    def idle(self) -> float:
        return self.d(10.0, 1.5)

    @property
    def ping(self) -> float:
        """Ping interval during the idle phase: several pings fit in it."""
        return max(0.5, round(self.idle / 4, 2))

    @property
    def presence_ttl(self) -> float:
        """Refresh every ttl/3 s: several refreshes fit in the idle phase."""
        return max(1.5, round(3 * self.idle / 5, 2))

    def memory_conns(self, requested: int) -> int:
        return requested if self.scale >= 1 else self.n(requested, 200)


def herald_env(sizes: Sizes, ping: float, presence_ttl: float) -> dict[str, str]:
    namespace = {"presence": False, "join_leave": False, "history_size": sizes.history_size}
    if sizes.history_size == 0:
        namespace["history_ttl"] = 0
    return {
        "HERALD_LOG_LEVEL": "warning",
        "HERALD_DEMOS": "false",
        "HERALD_RATE_LIMIT": "0",
        "HERALD_MAX_CONNECTIONS_PER_USER": "0",
        "HERALD_MAX_CONNECTIONS_PER_IP": "0",
        "HERALD_PING_INTERVAL": f"{ping:g}",
        "HERALD_PRESENCE_TTL": f"{presence_ttl:g}",
        "HERALD_NAMESPACES": json.dumps(
            {NAMESPACE: namespace, PRESENCE_NAMESPACE: {**namespace, "presence": True}}
        ),
    }


# ---------------------------------------------------------------- processes


def cpu_ns(pid: int) -> int:
    """CPU time of every live thread of ``pid`` (``/proc/PID/task/*/schedstat``), in ns."""
    total = 0
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0])
    return total


@dataclass
class Sample:
    label: str
    t: float
    cpu: dict[int, int]
    rss: dict[int, int]


def sample(label: str, pids: list[int]) -> Sample:
    return Sample(
        label, time.monotonic(), {p: cpu_ns(p) for p in pids}, {p: base.proc_rss_kib(p) for p in pids}
    )


def fd_limit() -> int:
    """The soft descriptor limit after raising it to the hard one (no CAP_SYS_RESOURCE needed)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _child_setup() -> None:
    """In each child before exec: the descriptor limit raised, and SIGTERM when we die.

    PR_SET_PDEATHSIG: a harness killed by a timeout (SIGKILL: no ``finally``) must not
    leave its nodes, Redis servers and load generator running on a shared machine.
    """
    fd_limit()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def _stop(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def redis_servers(count: int, log: Path, nice: bool) -> Iterator[list[tuple[str, int]]]:
    """``count`` redis-servers on free ports (never 6379), no persistence: ``[(url, pid)]``."""
    with contextlib.ExitStack() as stack:
        started: list[tuple[str, int]] = []
        for _ in range(count):
            port = base.free_port()
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="herald-capacity-redis-"))
            with open(log, "ab") as out:
                proc = subprocess.Popen(
                    [*base._prefix(base.SERVER_CPU, nice), "redis-server", "--bind", "127.0.0.1",
                     "--port", str(port), "--save", "", "--appendonly", "no", "--dir", folder],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    preexec_fn=_child_setup,
                    start_new_session=True,
                )  # fmt: skip
            stack.callback(_stop, proc)
            base.wait_port(port, proc)
            started.append((f"redis://127.0.0.1:{port}/0", proc.pid))
        yield started


class NodeStartError(RuntimeError):
    """A ``herald serve`` node did not become ready (e.g. a broker URL it refuses)."""


def _wait_ready(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-6:]
            raise NodeStartError(f"herald serve exited with {proc.returncode}: " + " | ".join(tail))
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response,
        ):
            if response.status == 200:
                return
        time.sleep(0.05)
    raise NodeStartError(f"herald serve on {port} not ready within {timeout} s")


@contextlib.contextmanager
def herald_nodes(
    count: int, broker: str, env: dict[str, str], log_dir: Path, nice: bool
) -> Iterator[list[tuple[int, int]]]:
    """``count`` fresh ``herald serve`` nodes on ``broker``, pinned to core 0: ``[(port, pid)]``."""
    with contextlib.ExitStack() as stack:
        started: list[tuple[int, int, subprocess.Popen[bytes], Path]] = []
        for _ in range(count):
            port = base.free_port()
            log = log_dir / f"node-{port}.log"
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    [*base._prefix(base.SERVER_CPU, nice), *base.herald_argv(str(port)),
                     "--host", "127.0.0.1", "--broker", broker],
                    cwd=base.REPO,
                    env={**os.environ, **env},
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    preexec_fn=_child_setup,
                    start_new_session=True,
                )  # fmt: skip
            stack.callback(_stop, proc)
            started.append((port, proc.pid, proc, log))
        for port, _, proc, log in started:
            _wait_ready(port, proc, log)
        time.sleep(0.3)  # start-up allocations settle before the baselines
        yield [(port, pid) for port, pid, _, _ in started]


# ---------------------------------------------------------------- one load generator run


@dataclass
class Trace:
    """The load generator's JSON and the samples taken at its progress lines."""

    result: dict[str, Any]
    samples: dict[str, Sample] = field(default_factory=dict)

    def cpu_s(self, start: str, end: str, pids: list[int]) -> float:
        a, b = self.samples[start], self.samples[end]
        return sum(b.cpu[p] - a.cpu[p] for p in pids) / 1e9

    def seconds(self, start: str, end: str) -> float:
        return self.samples[end].t - self.samples[start].t


def run_s5(
    params: dict[str, Any],
    ports: list[int],
    pids: list[int],
    *,
    nice: bool,
    timeout: float,
    after_setup: list[tuple[float, str]],
    log: Path,
) -> Trace:
    """Runs loadgen ``s5``; samples CPU and RSS of ``pids`` at its progress lines.

    Samples: ``start`` (before launch), ``setup`` (its "set-up" line: every
    connection subscribed), ``(offset, label)`` after the set-up line (the idle
    phase starts there), ``step<N>`` (each step's line), ``exit`` (it exited and
    closed every connection) and ``settled`` (the servers' CPU stopped moving:
    the disconnects are handled).
    """
    argv = [
        *base._prefix(base.LOADGEN_CPU, nice),
        str(base.build_loadgen()),
        "s5",
        f"port={ports[0]}",
        f"ports={','.join(map(str, ports))}",
        f"timeout={timeout}",
        *(f"{k}={v}" for k, v in params.items()),
    ]
    trace = Trace({})
    samples = trace.samples
    lines: list[str] = []
    quiet = _quiet_rate(pids)
    samples["start"] = sample("start", pids)
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_child_setup
    )
    assert proc.stdout is not None and proc.stderr is not None
    timers: list[threading.Timer] = []

    def take(label: str) -> None:
        samples[label] = sample(label, pids)

    def read_stderr(stream: Any) -> None:
        for line in stream:
            if "s5 set-up" in line:
                take("setup")
                for offset, label in after_setup:
                    timer = threading.Timer(offset, take, (label,))
                    timer.start()
                    timers.append(timer)
            elif line.startswith("loadgen: step "):
                take("step" + line.split()[2].rstrip(":"))
            lines.append(line)

    reader = threading.Thread(target=read_stderr, args=(proc.stderr,), daemon=True)
    reader.start()
    watchdog = threading.Timer(timeout * 3 + 120, proc.kill)
    watchdog.start()
    try:
        out = proc.stdout.read()  # the stderr thread reads the other pipe
        proc.wait()
    finally:
        watchdog.cancel()
        for timer in timers:
            timer.cancel()
    reader.join(5)
    take("exit")
    _wait_settled(pids, samples, take, quiet)
    with open(log, "a") as stream:
        stream.write("".join(lines))
    if proc.returncode != 0 or not out.strip():
        raise RuntimeError(f"loadgen failed ({proc.returncode}): {''.join(lines)[-600:]}")
    trace.result = json.loads(out.strip().splitlines()[-1])
    missing = [label for _, label in after_setup if label not in samples]
    if "setup" not in samples or missing:
        raise RuntimeError(f"loadgen progress lines missing ({missing}): {''.join(lines)[-300:]}")
    return trace


def _wait_settled(
    pids: list[int], samples: dict[str, Sample], take: Callable[[str], None], quiet_ns_per_s: float
) -> None:
    """Waits until the servers' CPU rate is back near its rate before the run (at most 10 s)."""
    deadline = time.monotonic() + 10
    last, t_last = sum(cpu_ns(p) for p in pids), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now, t_now = sum(cpu_ns(p) for p in pids), time.monotonic()
        if (now - last) / (t_now - t_last) <= max(7e6, 1.5 * quiet_ns_per_s):
            break
        last, t_last = now, t_now
    take("settled")


def _quiet_rate(pids: list[int], seconds: float = 0.5) -> float:
    """CPU ns per second of ``pids`` while nothing is connected (their own timers)."""
    before, t0 = sum(cpu_ns(p) for p in pids), time.monotonic()
    time.sleep(seconds)
    return (sum(cpu_ns(p) for p in pids) - before) / (time.monotonic() - t0)


def _background(trace: Trace, herald: list[int], redis: list[int]) -> tuple[float, float]:
    """CPU seconds per second of the servers and of Redis in the idle window (connections held)."""
    seconds = trace.seconds("idle0", "idle1")
    return trace.cpu_s("idle0", "idle1", herald) / seconds, trace.cpu_s("idle0", "idle1", redis) / seconds


def _steps(trace: Trace, herald: list[int], redis: list[int]) -> dict[str, float]:
    """Totals over steps 1.. (step 0 shares its window with the idle phase and warm-up).

    The CPU the servers spend anyway with these connections held (pings, timers:
    the idle window's rate) is subtracted over each step's window, so that the
    figures are what the publications themselves cost.  Redis's idle CPU is not
    (it comes in bursts of periodic work a short window misjudges; it is reported).
    """
    server_bg, redis_bg = _background(trace, herald, redis)
    steps = trace.result["steps"]
    used = [
        s
        for s in steps[1:]
        if f"step{s['step']}" in trace.samples and f"step{s['step'] - 1}" in trace.samples
    ]
    if not used:
        raise RuntimeError("no measured step after the first")
    totals = {"publications": 0.0, "delivered": 0.0, "expected": 0.0, "server_cpu_s": 0.0, "redis_cpu_s": 0.0,
              "window_s": 0.0, "server_background_cpu_s": 0.0, "redis_idle_cpu_s": 0.0}  # fmt: skip
    for s in used:
        start, end = f"step{s['step'] - 1}", f"step{s['step']}"
        window = trace.seconds(start, end)
        totals["publications"] += s["sent"]
        totals["delivered"] += s["delivered"]
        totals["expected"] += s["expected"]
        totals["window_s"] += window
        totals["server_background_cpu_s"] += server_bg * window
        totals["redis_idle_cpu_s"] += redis_bg * window  # reported, not subtracted: it is bursty
        totals["server_cpu_s"] += trace.cpu_s(start, end, herald) - server_bg * window
        totals["redis_cpu_s"] += trace.cpu_s(start, end, redis)
    totals["lost"] = totals["expected"] - totals["delivered"]
    totals["steps"] = len(used)
    return totals


# ---------------------------------------------------------------- phases


def _ramp(rate: float, steps: int = 3) -> str:
    return ",".join([f"{rate:g}"] * steps)


def phase_fanout(
    sizes: Sizes, nodes: list[tuple[int, int]], redis: list[int], *, nice: bool, timeout: float, log: Path
) -> dict[str, Any]:
    subs, channels = sizes.fanout_subs, sizes.fanout_channels
    cap = math.ceil(subs / channels)
    idle = max(1.0, sizes.idle / 2)  # the background to subtract from the steps
    params = {
        "proto": "herald", "path": "/connect", "prefix": f"{NAMESPACE}:f", "subs": subs,
        "channels": channels, "per": 1, "cap": cap, "pubs": 1, "rates": _ramp(sizes.fanout_rate),
        "step": sizes.step, "idle": idle, "idle_rate": 0.2, "warmup": sizes.d(1.0), "drain": 5, "p99": 1000,
        "stop_fail": 99, "size": 100, "concurrency": 100,
    }  # fmt: skip
    herald = [pid for _, pid in nodes]
    window = [(0.3, "idle0"), (idle - 0.2, "idle1")]
    trace = run_s5(
        params, [p for p, _ in nodes], herald + redis, nice=nice, timeout=timeout, after_setup=window, log=log
    )
    totals = _steps(trace, herald, redis)
    pubs = totals["publications"]
    return {
        "params": params,
        **totals,
        "fanout": totals["expected"] / pubs,
        "server_us_per_publication": 1e6 * totals["server_cpu_s"] / pubs,
        "server_us_per_delivery": 1e6 * totals["server_cpu_s"] / max(totals["delivered"], 1),
        "redis_us_per_publication": 1e6 * totals["redis_cpu_s"] / pubs,
        "biggest_channel": trace.result["biggest_channel"],
        "memberships": trace.result["memberships"],
    }


def phase_rooms(
    sizes: Sizes,
    nodes: list[tuple[int, int]],
    redis: list[int],
    *,
    presence: bool,
    nice: bool,
    timeout: float,
    log: Path,
) -> dict[str, Any]:
    """Connections in 2 channels of their own; ``presence`` picks the namespace."""
    subs = sizes.rooms_subs
    prefix = f"{PRESENCE_NAMESPACE if presence else NAMESPACE}:r"
    idle = sizes.idle
    params = {
        "proto": "herald", "path": "/connect", "prefix": prefix, "subs": subs, "channels": 2 * subs,
        "per": 2, "cap": 1, "pubs": 1, "rates": "5,5" if presence else _ramp(sizes.rooms_rate),
        "step": 0.5 if presence else sizes.step, "idle": idle, "idle_rate": 0.2, "warmup": 0,
        "drain": 5, "p99": 1000, "stop_fail": 99, "size": 100, "concurrency": 100,
    }  # fmt: skip
    herald = [pid for _, pid in nodes]
    # The idle window: after the publishers connected, before the idle phase ends.
    window = [(0.3, "idle0"), (1.0, "rss"), (idle - 0.2, "idle1")]
    trace = run_s5(
        params, [p for p, _ in nodes], herald + redis, nice=nice, timeout=timeout, after_setup=window, log=log
    )
    r = trace.result
    memberships = int(r["memberships"])
    idle_s = trace.seconds("idle0", "idle1")
    rss_start = sum(trace.samples["start"].rss[p] for p in herald)
    rss_setup = sum(trace.samples["rss"].rss[p] for p in herald)
    out: dict[str, Any] = {
        "params": params,
        "connections": subs,
        "memberships": memberships,
        "setup_s": r["setup_s"],
        "connects_per_s": subs / r["setup_s"],
        "setup_server_cpu_s": trace.cpu_s("start", "setup", herald),
        "setup_redis_cpu_s": trace.cpu_s("start", "setup", redis),
        "idle_s": idle_s,
        "idle_server_cpu_s": trace.cpu_s("idle0", "idle1", herald),
        "idle_redis_cpu_s": trace.cpu_s("idle0", "idle1", redis),
        "close_server_cpu_s": trace.cpu_s("exit", "settled", herald),
        "close_redis_cpu_s": trace.cpu_s("exit", "settled", redis),
        "kib_per_conn": (rss_setup - rss_start) / subs,
        "ping_interval_s": sizes.ping,
        "presence_ttl_s": sizes.presence_ttl,
    }
    out["server_us_per_connect"] = 1e6 * out["setup_server_cpu_s"] / subs
    out["redis_us_per_connect"] = 1e6 * out["setup_redis_cpu_s"] / subs
    out["server_us_per_disconnect"] = 1e6 * out["close_server_cpu_s"] / subs
    out["redis_us_per_disconnect"] = 1e6 * out["close_redis_cpu_s"] / subs
    out["server_us_per_conn_second"] = 1e6 * out["idle_server_cpu_s"] / (subs * idle_s)
    out["redis_us_per_conn_second"] = 1e6 * out["idle_redis_cpu_s"] / (subs * idle_s)
    if not presence:
        totals = _steps(trace, herald, redis)
        pubs = totals["publications"]
        out |= {
            **totals,
            "fanout": totals["expected"] / pubs,
            "server_us_per_publication": 1e6 * totals["server_cpu_s"] / pubs,
            "redis_us_per_publication": 1e6 * totals["redis_cpu_s"] / pubs,
        }
    return out


def measure_setup(
    sizes: Sizes, n_nodes: int, n_shards: int, *, nice: bool, timeout: float, log: Path
) -> dict[str, Any]:
    env = herald_env(sizes, sizes.ping, sizes.presence_ttl)
    row: dict[str, Any] = {"nodes": n_nodes, "shards": n_shards}
    with (
        tempfile.TemporaryDirectory(prefix="herald-capacity-") as tmp,
        redis_servers(n_shards, log, nice) as shards,
    ):
        broker = ",".join(url for url, _ in shards)
        redis = [pid for _, pid in shards]
        row["broker"] = broker
        folder = Path(tmp)
        with herald_nodes(n_nodes, broker, env, folder, nice) as nodes:
            row["fanout"] = phase_fanout(sizes, nodes, redis, nice=nice, timeout=timeout, log=log)
            row["redis_cpu_share"] = _shares(row, redis)
        with herald_nodes(n_nodes, broker, env, folder, nice) as nodes:
            row["rooms"] = phase_rooms(
                sizes, nodes, redis, presence=False, nice=nice, timeout=timeout, log=log
            )
        with herald_nodes(n_nodes, broker, env, folder, nice) as nodes:
            row["presence"] = phase_rooms(
                sizes, nodes, redis, presence=True, nice=nice, timeout=timeout, log=log
            )
    row["figures"] = figures(row)
    return row


def _shares(row: dict[str, Any], redis: list[int]) -> list[float]:
    """Each shard's share of Redis CPU so far in this setup (is the load spread?)."""
    used = [cpu_ns(pid) for pid in redis]
    total = sum(used) or 1
    return [round(u / total, 3) for u in used]


def figures(row: dict[str, Any]) -> dict[str, float]:
    """The per-unit costs of one setup (µs of CPU time)."""
    f, r, p = row["fanout"], row["rooms"], row["presence"]
    # x = a F + b per publication, measured at two fan-outs.
    a = (f["server_us_per_publication"] - r["server_us_per_publication"]) / (f["fanout"] - r["fanout"])
    b = r["server_us_per_publication"] - a * r["fanout"]
    adds = max(p["memberships"], 1)
    refreshes = p["memberships"] * p["idle_s"] / (p["presence_ttl_s"] / 3)
    return {
        "server_us_per_delivery": a,
        "server_us_per_delivery_at_fanout": f["server_us_per_delivery"],
        "fanout": f["fanout"],
        "server_us_per_publication": b,
        "server_us_per_connect": r["server_us_per_connect"],
        "server_us_per_disconnect": r["server_us_per_disconnect"],
        "server_us_per_conn_second": r["server_us_per_conn_second"],
        "server_us_per_ping": r["server_us_per_conn_second"] * r["ping_interval_s"],
        "kib_per_conn": r["kib_per_conn"],
        "redis_us_per_publication": r["redis_us_per_publication"],
        "redis_us_per_publication_fanout": f["redis_us_per_publication"],
        "redis_us_per_connect": r["redis_us_per_connect"],
        "redis_us_per_disconnect": r["redis_us_per_disconnect"],
        "redis_us_per_presence_add": 1e6 * (p["setup_redis_cpu_s"] - r["setup_redis_cpu_s"]) / adds,
        "server_us_per_presence_add": 1e6 * (p["setup_server_cpu_s"] - r["setup_server_cpu_s"]) / adds,
        "redis_us_per_presence_refresh": 1e6 * p["idle_redis_cpu_s"] / max(refreshes, 1),
        "server_us_per_presence_refresh": 1e6
        * (p["idle_server_cpu_s"] - r["idle_server_cpu_s"] * p["idle_s"] / r["idle_s"])
        / max(refreshes, 1),
    }


# ---------------------------------------------------------------- memory


def source_addresses(count: int) -> list[str]:
    """Loopback source addresses 127.0.0.2... for ``count`` connections (one per ~20k)."""
    return [f"127.0.0.{2 + i}" for i in range(max(2, math.ceil(count / PER_SOURCE)))]


def measure_memory(sizes: Sizes, requested: int, *, nice: bool, timeout: float, log: Path) -> dict[str, Any]:
    """One node on one Redis holds ``requested`` idle connections (2 channels each) if it can."""
    limit = fd_limit()
    nr_open = int(Path("/proc/sys/fs/nr_open").read_text()) if Path("/proc/sys/fs/nr_open").exists() else 0
    want = sizes.memory_conns(requested)
    conns = min(want, limit - FD_MARGIN)
    available = _mem_available_kib()
    # The server (~10 KiB), the load generator (~70 KiB virtual, a page or two resident)
    # and the kernel's two sockets per connection: stay far below the machine's memory.
    conns = min(conns, int(available / 64 / 2))
    note = ""
    if conns < want:
        note = (
            f"the file-descriptor hard limit here is {limit} (`ulimit -Hn`; raising it needs "
            f"CAP_SYS_RESOURCE, fs.nr_open is {nr_open}), so one process can hold {conns} of the "
            f"{want} connections asked for"
        )
    srcs = source_addresses(conns)
    env = herald_env(sizes, 25.0, 60.0)
    with tempfile.TemporaryDirectory(prefix="herald-capacity-") as tmp, redis_servers(1, log, nice) as shards:
        redis = [pid for _, pid in shards]
        with herald_nodes(1, shards[0][0], env, Path(tmp), nice) as nodes:
            herald = [pid for _, pid in nodes]
            params = {
                "proto": "herald", "path": "/connect", "prefix": f"{NAMESPACE}:m", "subs": conns,
                "channels": 2 * conns, "per": 2, "cap": 1, "pubs": 1, "rates": "1", "step": 0.5,
                "idle": 3.0, "idle_rate": 0.2, "warmup": 0, "drain": 1, "p99": 1000, "stop_fail": 99,
                "size": 100, "concurrency": 200, "srcs": ",".join(srcs),
            }  # fmt: skip
            trace = run_s5(
                params,
                [p for p, _ in nodes],
                herald + redis,
                nice=nice,
                timeout=max(timeout, conns / 500),
                after_setup=[(2.0, "rss")],
                log=log,
            )
    r = trace.result
    rss0 = sum(trace.samples["start"].rss[p] for p in herald)
    rss1 = sum(trace.samples["rss"].rss[p] for p in herald)
    return {
        "requested": want,
        "connections": conns,
        "memberships": r["memberships"],
        "source_addresses": srcs,
        "fd_limit": limit,
        "nr_open": nr_open,
        "note": note,
        "server_rss0_kib": rss0,
        "server_rss_kib": rss1,
        "kib_per_conn": (rss1 - rss0) / conns,
        "redis_rss_kib": sum(trace.samples["rss"].rss[p] for p in redis),
        "connects_per_s": conns / r["setup_s"],
        "server_us_per_connect": 1e6 * trace.cpu_s("start", "setup", herald) / conns,
    }


def _mem_available_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    return 0


# ---------------------------------------------------------------- suite


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    if shutil.which("redis-server") is None:
        raise SystemExit("bench.capacity needs redis-server (apt-get install redis-server)")
    sizes = Sizes(scale=args.scale, history_size=args.history_size)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_suffix(".log")
    log.write_text("")
    started = time.monotonic()
    results: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "scale": args.scale,
        "nice": args.nice,
        "machine": base.machine_info()
        | {"redis": _redis_version(), "loadavg_start": _loadavg(), "revision": _revision()},
        "sizes": {
            "fanout_subs": sizes.fanout_subs,
            "fanout_channels": sizes.fanout_channels,
            "fanout_rate": sizes.fanout_rate,
            "rooms_subs": sizes.rooms_subs,
            "rooms_rate": sizes.rooms_rate,
            "step_s": sizes.step,
            "idle_s": sizes.idle,
            "ping_interval_s": sizes.ping,
            "presence_ttl_s": sizes.presence_ttl,
            "history_size": sizes.history_size,
            "payload_bytes": 100,
        },
        "setups": [],
        "skipped": [],
    }
    for shards in args.shards:
        for nodes in args.nodes:
            label = f"{nodes} node(s), {shards} shard(s)"
            try:
                row = measure_setup(sizes, nodes, shards, nice=args.nice, timeout=args.timeout, log=log)
            except NodeStartError as exc:
                # Typically a broker URL this Herald does not accept (several shards before
                # sharding existed): say so and measure the other setups.
                reason = f"a herald serve node did not start on {shards} Redis shard(s): {exc}"
                results["skipped"].append({"nodes": nodes, "shards": shards, "reason": reason})
                print(f"-- skip {label}: {reason[:300]}", file=sys.stderr)
                continue
            except Exception as exc:  # a failed setup is reported, the run goes on
                results["skipped"].append(
                    {"nodes": nodes, "shards": shards, "reason": f"{type(exc).__name__}: {exc}"}
                )
                print(f"-- FAILED {label}: {exc}", file=sys.stderr)
                continue
            results["setups"].append(row)
            print(f"{label}: {one_line(row['figures'])}", file=sys.stderr)
            out.write_text(json.dumps(results, indent=1))  # partial results survive an interruption
    if args.memory_conns:
        try:
            results["memory"] = measure_memory(
                sizes, args.memory_conns, nice=args.nice, timeout=args.timeout, log=log
            )
            m = results["memory"]
            print(
                f"memory: {m['connections']} connections, {m['kib_per_conn']:.2f} KiB each", file=sys.stderr
            )
        except Exception as exc:
            results["memory_error"] = f"{type(exc).__name__}: {exc}"
            print(f"-- memory phase FAILED: {exc}", file=sys.stderr)
    results["machine"]["loadavg_end"] = _loadavg()
    results["wall_s"] = round(time.monotonic() - started, 1)
    out.write_text(json.dumps(results, indent=1))
    return results


def one_line(f: dict[str, float]) -> str:
    return (
        f"deliver {f['server_us_per_delivery']:.2f} us, publish {f['server_us_per_publication']:.1f} us, "
        f"connect {f['server_us_per_connect']:.0f} us, held {f['server_us_per_conn_second']:.2f} us/s, "
        f"redis/pub {f['redis_us_per_publication']:.1f} us, redis/presence add {f['redis_us_per_presence_add']:.1f} us"
    )


def _loadavg() -> str:
    path = Path("/proc/loadavg")
    return path.read_text().strip() if path.exists() else ""


def _revision() -> str:
    """The checkout's commit, ``-dirty`` with uncommitted changes."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=base.REPO,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return done.stdout.strip() or "unknown"
    return "unknown"


def _redis_version() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(
            ["redis-server", "--version"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    return "unavailable"


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.capacity", description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="shrink counts and durations (e.g. 0.05)")
    parser.add_argument("--nodes", type=_int_list, default=[1, 2, 3], help="node counts, comma list (1,2,3)")
    parser.add_argument(
        "--shards", type=_int_list, default=[1, 3], help="Redis shard counts, comma list (1,3)"
    )
    parser.add_argument(
        "--memory-conns",
        type=int,
        default=MEMORY_TARGET,
        help="idle connections for the memory phase (0: skip)",
    )
    parser.add_argument(
        "--history-size", type=int, default=100, help="publications kept per channel (0: off)"
    )
    parser.add_argument("--nice", action="store_true", help="run servers and load under nice -n 19")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a set-up may take")
    parser.add_argument(
        "--json", default=str(RESULTS), help="results JSON (default bench/results/capacity.json)"
    )
    parser.add_argument(
        "--report", type=Path, help="write the capacity model (Markdown) here, e.g. docs/capacity.md"
    )
    parser.add_argument(
        "--from-json", type=Path, help="render --report from this earlier run; measure nothing"
    )
    args = parser.parse_args(argv)
    if args.scale <= 0 or args.history_size < 0 or args.memory_conns < 0 or args.timeout <= 0:
        parser.error("--scale and --timeout must be positive, --history-size and --memory-conns not negative")
    if args.from_json:
        try:
            results = json.loads(args.from_json.read_text())
        except (OSError, ValueError) as exc:
            parser.error(f"--from-json {args.from_json}: {exc}")
    else:
        fd_limit()
        results = run_all(args)
        print(f"results: {args.json}", file=sys.stderr)
    if args.report:
        from .capacity_report import render

        args.report.write_text(render(results))
        print(f"report: {args.report}", file=sys.stderr)
    return 0 if results["setups"] else 1


if __name__ == "__main__":
    sys.exit(main())
