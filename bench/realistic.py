"""Realistic workloads (issue 19): ``python -m bench.realistic`` from the repository root.

Many channels, publishing through the protocol, connect storms and a broker in the
path, run against Herald and the peers a Python team compares it with, in the same
session so that the ratios mean something on a shared machine.  The load comes from
the same C load generator as ``python -m bench`` (``bench/loadgen.c``, modes ``s5``,
``s8``, ``storm`` and ``fanout``), pinned to core 1; each server is pinned to core 0.

Workloads (``--workloads``, comma-separated)
    s5      10,000 connections on /connect, each in 5 of 2,000 channels drawn with weight
            1/rank, capped at 500 members; publications to channels drawn uniformly at a
            fixed total rate, ramped in steps; per step delivered msgs/s, p50/p99, loss,
            server CPU per delivery (before the ramp: the idle CPU share at 10 publications/s).
            Headline: highest step with p99 <= 50 ms, no loss.
    s5big   the same with one 5,000-member channel; fan-out time per recipient of a
            publication to it (one at a time, before the ramp)
    s8      1,000 publishers, one publication in flight each, first to channels nobody
            joined (server CPU per publish command), then each to its own room of 10
            subscribers; then one publisher offered 2x the measured capacity, reading its
            replies: is it closed (it must not be), was every acknowledged one delivered
    s7      connect storm: 10,000 clients, 300 in flight: /ws_broadcast (to the 101), and
            /connect + connect + subscribe, anonymous and with an HS256 JWT per user
    s6      S1 and S5 on Herald with the Redis broker, one node and two nodes sharing a
            redis-server started here; ratios to the memory broker

Targets (``--targets``)
    herald           ``herald serve``, namespace ``bench`` with presence and join/leave off
    herald_shipped   the same with the namespaces as shipped (S5 set-up cost of join/leave)
    herald_logs      the same with the shipped log level (S7: what default logging costs)
    herald_delay     ``herald`` with ``HERALD_WRITE_DELAY=0.02`` (frames may wait 20 ms to share a
                     write; not the default, not run unless named: it gains nothing in S5)
    socketio_node    bench/baselines/socketio_node (Socket.IO 4 rooms; npm install there)
    python_socketio  bench/baselines/python_socketio under uvicorn (``--setup-peers``)
    django_channels  bench/baselines/django_channels under daphne, in-memory channel layer
    node_ws          bench/baselines/node_ws (S7 /ws_broadcast only: plain connects)
    herald_redis, herald_redis2   S6: one / two Herald nodes on one redis-server

Results: ``bench/results/realistic.json`` and a Markdown summary next to it (``--md``).
``--smoke`` runs everything at a tiny size in about a minute per target.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import run as base

BASELINES = base.BASELINES
PEERS_VENV = base.BUILD_DIR / "peers-venv"
PEERS_REQUIREMENTS = BASELINES / "python_socketio" / "requirements.txt"
SIO_PATH = "/socket.io/?EIO=4&transport=websocket"
JWT_SECRET = "herald-bench-hs256-secret-0123456789abcdef"
#: The Socket.IO peer the ratios are taken against.
REFERENCE = "socketio_node"

HERALD_ENV = {**base.HERALD_ENV, "HERALD_MAX_CONNECTIONS_PER_USER": "0", "HERALD_DEMOS": "false"}
SHIPPED_NS_ENV = {k: v for k, v in HERALD_ENV.items() if k != "HERALD_NAMESPACES"}
LOGS_ENV = {k: v for k, v in HERALD_ENV.items() if k != "HERALD_LOG_LEVEL"}
#: ``herald_delay``: fanned-out frames may wait 20 ms to share a write (write_delay, off by default).
DELAY_ENV = {**HERALD_ENV, "HERALD_WRITE_DELAY": "0.02"}

FULL_RATES = [25, 50, 100, 200, 400, 700, 1000, 1400, 2000, 2800, 4000, 5600, 8000]
SMOKE_RATES = [50, 100]


# ---------------------------------------------------------------- targets


@dataclass
class Peer:
    name: str
    label: str
    argv: list[str]  # "{port}" is replaced
    cwd: Path
    env: dict[str, str] = field(default_factory=dict)
    proto: str = "herald"  # herald | sio (loadgen framing)
    prefix: str = "bench:"  # channel names: prefix + "c123"
    connect_path: str = "/connect"
    broadcast_path: str | None = None  # raw /ws_broadcast (S7 only)
    jwt_env: dict[str, str] = field(default_factory=dict)
    nodes: int = 1
    redis: bool = False
    lacks: str = ""
    skip_reason: str | None = None


def _peer_python() -> Path:
    return PEERS_VENV / "bin" / "python"


def peers() -> dict[str, Peer]:
    herald = base.herald_argv()
    node = shutil.which("node")
    py = _peer_python()
    py_skip = None if py.exists() else "run `python -m bench.realistic --setup-peers`"

    def node_skip(folder: str, module: str) -> str | None:
        if node is None:
            return "node is not installed"
        if not (BASELINES / folder / "node_modules" / module).exists():
            return f"run `npm install` in bench/baselines/{folder}"
        return None

    redis_skip = None if shutil.which("redis-server") else "redis-server is not installed"
    herald_jwt = {"HERALD_TOKEN_SECRET": JWT_SECRET}
    peer_jwt = {"BENCH_JWT_SECRET": JWT_SECRET}
    result = [
        Peer("herald", "Herald (`herald serve`)", herald, base.REPO, dict(HERALD_ENV),
             broadcast_path="/ws_broadcast", jwt_env=herald_jwt),
        Peer("herald_shipped", "Herald, namespaces as shipped", herald, base.REPO, dict(SHIPPED_NS_ENV),
             prefix="", jwt_env=herald_jwt),
        Peer("herald_logs", "Herald, log level as shipped", herald, base.REPO, dict(LOGS_ENV),
             broadcast_path="/ws_broadcast", jwt_env=herald_jwt),
        Peer("herald_delay", "Herald, write_delay 20 ms", herald, base.REPO, dict(DELAY_ENV),
             broadcast_path="/ws_broadcast", jwt_env=herald_jwt),
        Peer("socketio_node", "Socket.IO 4 on Node (rooms)", [node or "node", "server.js", "{port}"],
             BASELINES / "socketio_node", proto="sio", prefix="", connect_path=SIO_PATH, jwt_env=peer_jwt,
             lacks="no history, no recovery (connection-state recovery off, as by default), no presence, "
             "no bounded per-client queue",
             skip_reason=node_skip("socketio_node", "socket.io")),
        Peer("python_socketio", "python-socketio 5 under uvicorn (rooms, ASGI)",
             [str(py), "-m", "uvicorn", "app:app", "--port", "{port}", "--log-level", "warning"],
             BASELINES / "python_socketio", proto="sio", prefix="", connect_path=SIO_PATH, jwt_env=peer_jwt,
             lacks="no history, no recovery, no presence, no bounded per-client queue", skip_reason=py_skip),
        Peer("django_channels", "Django Channels 4 under daphne (groups, in-memory layer)",
             [str(py), "-m", "daphne", "-v", "0", "-b", "127.0.0.1", "-p", "{port}", "benchsite.asgi:application"],
             BASELINES / "django_channels", prefix="", jwt_env=peer_jwt,
             lacks="no history, no recovery, no presence; the in-memory layer drops messages over its "
             "per-channel capacity (100) and is one process only",
             skip_reason=py_skip),
        Peer("node_ws", "Node `ws` 8 (plain connects)", [node or "node", "server.js", "{port}"],
             BASELINES / "node_ws", proto="raw", broadcast_path="/ws_broadcast",
             skip_reason=node_skip("node_ws", "ws")),
        Peer("herald_redis", "Herald, Redis broker, 1 node", [*herald, "--broker", "{redis}"], base.REPO,
             dict(HERALD_ENV), redis=True, skip_reason=redis_skip),
        Peer("herald_redis2", "Herald, Redis broker, 2 nodes", [*herald, "--broker", "{redis}"], base.REPO,
             dict(HERALD_ENV), redis=True, nodes=2, skip_reason=redis_skip),
    ]  # fmt: skip
    return {p.name: p for p in result}


# ---------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Job:
    """One workload on one target."""

    workload: str  # s5, s5big, s8, s7_broadcast, s7_connect, s7_jwt, s1
    target: str


DEFAULT_TARGETS = {
    "s5": ["herald", "herald_shipped", "socketio_node", "python_socketio", "django_channels"],
    "s5big": ["herald", "socketio_node", "python_socketio", "django_channels"],
    "s8": ["herald", "socketio_node", "python_socketio", "django_channels"],
    "s7_broadcast": ["herald", "herald_logs", "node_ws"],
    "s7_connect": ["herald", "herald_logs", "socketio_node", "python_socketio", "django_channels"],
    "s7_jwt": ["herald", "socketio_node", "python_socketio", "django_channels"],
    # S6
    "s1": ["herald", "herald_redis", "herald_redis2"],
    # Herald on the memory broker is the reference (skipped when s5 runs it anyway).
    "s5_redis": ["herald", "herald_redis", "herald_redis2"],
}
GROUPS = {
    "s5": ["s5"],
    "s5big": ["s5big"],
    "s8": ["s8"],
    "s7": ["s7_broadcast", "s7_connect", "s7_jwt"],
    "s6": ["s1", "s5_redis"],
}
TITLES = {
    "s5": "S5 many channels",
    "s5big": "S5-big (one 5,000-member channel)",
    "s8": "S8 publish through the protocol",
    "s7_broadcast": "S7 connect storm, /ws_broadcast (to the 101)",
    "s7_connect": "S7 connect storm, connect + subscribe, anonymous",
    "s7_jwt": "S7 connect storm, connect + subscribe, HS256 JWT per user",
    "s1": "S6: S1 fan-out (memory vs Redis)",
    "s5_redis": "S6: S5 on Redis",
}


@dataclass
class Sizes:
    """The issue's sizes times ``scale`` (``--smoke``: tiny, with short steps)."""

    scale: float = 1.0
    smoke: bool = False
    rates: list[float] = field(default_factory=lambda: list(FULL_RATES))
    step: float = 0.0  # 0: 10 s, shortened with the scale
    publishers: int = 1

    def n(self, value: int, low: int = 2) -> int:
        return max(low, int(value * self.scale))

    def d(self, value: float) -> float:
        """A duration: full at scale 1, shorter below (0.5 s at least)."""
        return max(0.5, round(value * min(1.0, max(0.05, self.scale)), 2))

    def s5(self, big: bool) -> dict[str, Any]:
        subs, channels, per = self.n(10000, 20), self.n(2000, 10), 5
        cap = max(self.n(500, 5), math.ceil(3 * subs * per / channels))
        params: dict[str, Any] = {
            "subs": subs, "channels": channels, "per": per, "cap": cap, "pubs": self.publishers,
            "rates": ",".join(f"{r:g}" for r in self.rates), "step": self.step or self.d(10),
            "idle": 0.5 if self.smoke else 10, "idle_rate": 10, "warmup": 0.3 if self.smoke else 3, "drain": 2 if self.smoke else 5, "p99": 50, "stop_fail": 2,
            "size": 100,
        }  # fmt: skip
        if big:
            params |= {"big": subs // 2, "probes": 3 if self.smoke else 20}
        return params

    def s8(self) -> dict[str, Any]:
        return {
            "rooms": self.n(1000, 5), "room_size": 10, "empty": self.d(5), "duration": self.d(10),
            "over_factor": 2, "over_duration": self.d(5), "drain": 3 if self.smoke else 5, "size": 100,
        }  # fmt: skip

    def storm(self) -> dict[str, Any]:
        conns = self.n(10000, 20)
        return {"conns": conns, "concurrency": min(300, conns), "channels": 100}

    def s1(self) -> dict[str, Any]:
        return dict(base.workloads(self.scale)["S1"].params)


# ---------------------------------------------------------------- processes


@contextlib.contextmanager
def redis_server(log: Path) -> Iterator[str]:
    port = base.free_port()
    tmp = tempfile.mkdtemp(prefix="herald-bench-redis-")
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
             "--dir", tmp],
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        base.wait_port(port, proc)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def servers(peer: Peer, extra_env: dict[str, str], nice: bool, log: Path) -> Iterator[list[tuple[int, int]]]:
    """Starts ``peer.nodes`` server processes (node i on core i); yields ``[(port, pid), ...]``."""
    with contextlib.ExitStack() as stack:
        redis_url = stack.enter_context(redis_server(log)) if peer.redis else ""
        started: list[tuple[int, int]] = []
        for index in range(peer.nodes):
            port = base.free_port()
            argv = [a.replace("{port}", str(port)).replace("{redis}", redis_url) for a in peer.argv]
            env = {**os.environ, **peer.env, **extra_env}
            with open(log, "ab") as out:
                out.write(f"\n=== {peer.name} node {index}: {' '.join(argv)}\n".encode())
                proc = subprocess.Popen(
                    base._prefix(str(index % 2) if index else base.SERVER_CPU, nice) + argv,
                    cwd=peer.cwd,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    preexec_fn=base._raise_nofile,
                    start_new_session=True,
                )
            stack.callback(_stop, proc)
            base.wait_port(port, proc, timeout=30)
            started.append((port, proc.pid))
        time.sleep(0.3)  # start-up allocations settle before the RSS baseline
        yield started


def _stop(proc: subprocess.Popen[bytes]) -> None:
    import signal

    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _py_spy() -> str | None:
    found = shutil.which("py-spy")
    local = PEERS_VENV / "bin" / "py-spy"
    return found or (str(local) if local.exists() else None)


@contextlib.contextmanager
def py_spy(pid: int, svg: Path, log: Path, rate: int = 250) -> Iterator[None]:
    """Samples ``pid`` with py-spy (a flame graph in ``svg``; collapsed stacks when it
    ends in ``.txt``) while the body runs.

    py-spy runs on the load generator's core, so it steals a little from the load,
    never from the server; ``--nonblocking`` does not pause the server to sample it.
    """
    import signal

    exe = _py_spy()
    if exe is None:
        raise RuntimeError("--profile needs py-spy (`python -m bench.realistic --setup-peers` installs it)")
    svg.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [*base._prefix(base.LOADGEN_CPU, False), exe, "record", "--pid", str(pid), "--rate", str(rate),
             "--nonblocking", "--format", "raw" if svg.suffix == ".txt" else "flamegraph",
             "--output", str(svg)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)  # py-spy writes the flame graph on SIGINT
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def mint_tokens(count: int, folder: Path) -> Path:
    """One HS256 connection token per user (``sub`` user<i>), minted before the timed part."""
    import jwt

    path = folder / "tokens.txt"
    with open(path, "w") as out:
        for i in range(count):
            out.write(jwt.encode({"sub": f"user{i}"}, JWT_SECRET, algorithm="HS256") + "\n")
    return path


# ---------------------------------------------------------------- one job


def _loadgen(
    mode: str, params: dict[str, Any], nodes: list[tuple[int, int]], nice: bool, timeout: float
) -> list[str]:
    argv = [
        *base._prefix(base.LOADGEN_CPU, nice),
        str(base.build_loadgen()),
        mode,
        f"port={nodes[0][0]}",
        f"server_pids={','.join(str(pid) for _, pid in nodes)}",
        f"timeout={timeout}",
    ]
    if len(nodes) > 1:
        argv.append(f"port2={nodes[1][0]}")
    return argv + [f"{k}={v}" for k, v in params.items()]


def _proto_args(peer: Peer, prefix: str) -> dict[str, Any]:
    return {"proto": peer.proto, "path": peer.connect_path, "prefix": peer.prefix + prefix}


def run_job(
    job: Job,
    peer: Peer,
    sizes: Sizes,
    *,
    nice: bool,
    log: Path,
    timeout: float,
    profile: Path | None = None,
    profile_raw: bool = False,
    profile_rate: int = 250,
) -> dict[str, Any]:
    workload = job.workload
    extra: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="herald-bench-")))
        if workload in ("s5", "s5big", "s5_redis"):
            mode, params = "s5", {**sizes.s5(workload == "s5big"), **_proto_args(peer, "c")}
        elif workload == "s8":
            mode, params = "s8", {**sizes.s8(), **_proto_args(peer, "r")}
        elif workload.startswith("s7"):
            mode, params = "storm", {**sizes.storm(), **_proto_args(peer, "s")}
            if workload == "s7_broadcast":
                params |= {"proto": "raw", "path": peer.broadcast_path}
            if workload == "s7_jwt":
                extra = dict(peer.jwt_env)
                params["tokens"] = str(mint_tokens(int(params["conns"]), tmp))
        elif workload == "s1":
            mode = "fanout"
            params = {**sizes.s1(), "proto": "herald", "path": "/connect", "channel": base.CHANNEL}
        else:
            raise ValueError(workload)
        nodes = stack.enter_context(servers(peer, extra, nice, log))
        argv = _loadgen(mode, params, nodes, nice, timeout)
        pids = [pid for _, pid in nodes]
        if profile is not None and peer.name.startswith("herald"):
            stack.enter_context(
                py_spy(
                    pids[0],
                    profile / f"{workload}-{peer.name}.{'txt' if profile_raw else 'svg'}",
                    log,
                    profile_rate,
                )
            )
        rss0 = sum(base.proc_rss_kib(pid) for pid in pids)
        if mode == "storm":
            result = _run_storm(argv, pids, rss0, timeout)
        else:
            cpu0 = sum(base.proc_cpu_seconds(pid) for pid in pids)
            writes0 = sum(base.proc_write_calls(pid) for pid in pids)
            budget = timeout + _expected_seconds(mode, params) + 120
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=budget, preexec_fn=base._raise_nofile
            )
            with open(log, "a") as out:
                out.write(done.stderr)
            if done.returncode != 0 or not done.stdout.strip():
                raise RuntimeError(f"loadgen failed ({done.returncode}): {done.stderr.strip()[-500:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            result["server_cpu_s"] = sum(base.proc_cpu_seconds(pid) for pid in pids) - cpu0
            if mode == "fanout" and result.get("delivered"):
                result["server_us_per_msg"] = 1e6 * result["server_cpu_s"] / result["delivered"]
                writes = sum(base.proc_write_calls(pid) for pid in pids) - writes0
                result["server_writes_per_msg"] = writes / result["delivered"]
        result["server_rss0_kib"] = rss0
        result["server_rss_end_kib"] = sum(base.proc_rss_kib(pid) for pid in pids)
        result["params"] = {k: v for k, v in params.items() if k != "tokens"}
        return summarise(workload, result)


def _expected_seconds(mode: str, params: dict[str, Any]) -> float:
    if mode == "s5":
        steps = len(str(params["rates"]).split(","))
        return (steps + 2) * (float(params["step"]) + float(params["drain"]) + 1) + 10 * int(
            params.get("probes", 0)
        )
    if mode == "s8":
        return (
            float(params["empty"])
            + float(params["duration"])
            + 4 * float(params["over_duration"])
            + 4 * float(params["drain"])
        )
    return 0.0


def _run_storm(argv: list[str], pids: list[int], rss0: int, timeout: float) -> dict[str, Any]:
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=base._raise_nofile,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdin is not None
    try:
        line = proc.stdout.readline()
        if not line.startswith("READY "):
            proc.kill()
            raise RuntimeError(f"loadgen failed: {line!r} {proc.stderr.read() if proc.stderr else ''}")
        result: dict[str, Any] = json.loads(line[len("READY ") :])
        time.sleep(1.0)  # let the server settle (garbage of the handshakes collected)
        rss1 = sum(base.proc_rss_kib(pid) for pid in pids)
        result["server_rss_kib"] = rss1
        established = int(result["established"])
        result["kib_per_conn"] = (rss1 - rss0) / established if established else None
        proc.stdin.write("done\n")
        proc.stdin.flush()
        proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return result


# ---------------------------------------------------------------- figures


def summarise(workload: str, r: dict[str, Any]) -> dict[str, Any]:
    """Adds the headline figures (``headline``) and whether anything was lost (``lost``)."""
    if "steps" in r:
        steps = r["steps"]
        passing = [s for s in steps if s["pass"]]
        best = max(passing, key=lambda s: s["rate"]) if passing else None
        # "At saturation": the first failing step above the headline (a step that failed
        # below it was a blip of a shared machine, not the server's capacity).
        failing = [s for s in steps if not s["pass"] and (best is None or s["rate"] > best["rate"])]
        saturated = failing[0] if failing else (steps[-1] if steps else None)
        r["headline"] = {
            "rate": best["rate"] if best else 0,
            "deliveries_per_s": best["deliveries_per_s"] if best else 0,
            "p50": best["latency_ms"]["p50"] if best else None,
            "p99": best["latency_ms"]["p99"] if best else None,
            "saturation_us_per_delivery": saturated["server_us_per_delivery"] if saturated else None,
            "saturation_rate": saturated["rate"] if saturated else None,
            "max_deliveries_per_s": max((s["deliveries_per_s"] for s in steps), default=0),
            "ramp_ended": bool(failing),
        }
        # Loss below saturation (steps up to the headline) is what must never happen.
        r["lost"] = sum(s["lost"] for s in steps if best and s["rate"] <= best["rate"])
    elif workload == "s8":
        c, o = r["closed_loop"], r["over_capacity"]
        r["headline"] = {
            "round_trips_per_s": c["round_trips_per_s"],
            "deliveries_per_s": c["deliveries_per_s"],
            "p99": c["round_trip_ms"]["p99"],
            "over_closed": o["publisher_closed"],
            "over_acked_not_delivered": o["acked_not_delivered"],
            "empty_us_per_publication": r.get("empty_channels", {}).get("server_us_per_publication"),
        }
        r["lost"] = c["lost"] + o["acked_not_delivered"]
    elif workload.startswith("s7"):
        r["headline"] = {
            "connects_per_s": r["connects_per_s"],
            "p99": r["time_to_ready_ms"]["p99"],
            "us_per_conn": r["server_us_per_connection"],
            "kib_per_conn": r["kib_per_conn"],
        }
        r["lost"] = int(r["failed"]) + int(r["unfinished"])
    return r


def headline_value(workload: str, r: dict[str, Any]) -> float:
    h = r.get("headline", {})
    if workload in ("s5", "s5big", "s5_redis"):
        return float(h.get("deliveries_per_s") or 0)
    if workload == "s8":
        return float(h.get("round_trips_per_s") or 0)
    if workload.startswith("s7"):
        return float(h.get("connects_per_s") or 0)
    return float(r.get("msgs_per_s") or 0)


# ---------------------------------------------------------------- suite


def plan(workloads: list[str], targets: list[str] | None) -> list[Job]:
    jobs: list[Job] = []
    for group in workloads:
        if group not in GROUPS:
            raise SystemExit(f"bench.realistic: unknown workload {group!r}; choose from {sorted(GROUPS)}")
        for workload in GROUPS[group]:
            for target in DEFAULT_TARGETS[workload]:
                if workload == "s5_redis" and target == "herald" and "s5" in workloads:
                    continue
                if targets is None or target in targets:
                    jobs.append(Job(workload, target))
    return jobs


def run_suite(args: argparse.Namespace) -> dict[str, Any]:
    sizes = Sizes(scale=args.scale, smoke=args.smoke)
    if args.smoke:
        sizes.scale, sizes.rates, sizes.step = min(args.scale, 0.01), list(SMOKE_RATES), 0.5
    if args.rates:
        sizes.rates = [float(r) for r in args.rates.split(",")]
    if args.step:
        sizes.step = args.step
    sizes.publishers = args.publishers
    all_peers = peers()
    targets = args.targets.split(",") if args.targets else None
    if targets:
        unknown = [t for t in targets if t not in all_peers]
        if unknown:
            raise SystemExit(f"bench.realistic: unknown target(s) {unknown}; choose from {sorted(all_peers)}")
    jobs = plan(args.workloads.split(","), targets)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_suffix(".log")
    log.write_text("")
    results: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "scale": sizes.scale,
        "smoke": args.smoke,
        "repeat": args.repeat,
        "nice": args.nice,
        "machine": base.machine_info(),
        "targets": {
            name: {"label": p.label, "skip": p.skip_reason, "lacks": p.lacks}
            for name, p in all_peers.items()
            if any(j.target == name for j in jobs)
        },
        "results": {},
    }
    for job in jobs:
        peer = all_peers[job.target]
        entry: dict[str, Any] = {"runs": [], "errors": []}
        results["results"].setdefault(job.workload, {})[job.target] = entry
        if peer.skip_reason:
            entry["skipped"] = peer.skip_reason
            print(f"-- skip {job.target}: {peer.skip_reason}", file=sys.stderr)
            continue
        for _ in range(args.repeat):
            started = time.monotonic()
            try:
                run = run_job(
                    job,
                    peer,
                    sizes,
                    nice=args.nice,
                    log=log,
                    timeout=args.timeout,
                    profile=args.profile,
                    profile_raw=args.profile_raw,
                    profile_rate=args.profile_rate,
                )
                run["wall_s"] = round(time.monotonic() - started, 1)
                entry["runs"].append(run)
            except Exception as exc:  # a failed run is reported, the suite goes on
                entry["errors"].append(f"{type(exc).__name__}: {exc}")
        if entry["runs"]:
            ordered = sorted(entry["runs"], key=lambda r: headline_value(job.workload, r))
            entry["median"] = ordered[len(ordered) // 2]
        print(f"{job.workload:13} {job.target:16} {one_line(job.workload, entry)}", file=sys.stderr)
        out.write_text(json.dumps(results, indent=1))  # partial results survive an interrupted run
    return results


def one_line(workload: str, entry: dict[str, Any]) -> str:
    if "median" not in entry:
        return "FAILED: " + "; ".join(entry["errors"])[:300]
    r, h = entry["median"], entry["median"].get("headline", {})
    if workload in ("s5", "s5big", "s5_redis"):
        text = (
            f"best step {h['rate']:g} pubs/s = {h['deliveries_per_s']:.0f} deliveries/s"
            f" (p50 {h['p50'] or 0:.1f} p99 {h['p99'] or 0:.1f} ms); saturation"
            f" {h['saturation_us_per_delivery'] or 0:.1f} us/delivery; set-up {r['setup_s']:.1f} s"
        )
        if "big_probe" in r:
            text += f"; big room {r['big_probe']['fanout_us_per_recipient']['p50']:.2f} us/recipient"
        return text + f"; lost {r['lost']}"
    if workload == "s8":
        o = r["over_capacity"]
        return (
            f"{h['round_trips_per_s']:.0f} rt/s, {h['deliveries_per_s']:.0f} deliveries/s, rt p99 {h['p99']:.1f} ms;"
            f" over capacity: offered {o['offered']} at {o['offered_rate']:.0f}/s, acked {o['acked']},"
            f" closed {o['publisher_closed']}, acked-not-delivered {o['acked_not_delivered']}"
        )
    if workload.startswith("s7"):
        return (
            f"{h['connects_per_s']:.0f} conn/s, p99 {h['p99']:.0f} ms, {h['us_per_conn']:.0f} us CPU/conn,"
            f" {h['kib_per_conn'] or 0:.1f} KiB/conn, failed {r['failed']} unfinished {r['unfinished']}"
        )
    return (
        f"{r.get('msgs_per_s', 0):.0f} msgs/s, lost {r.get('lost')}, {r.get('server_us_per_msg', 0):.2f} us/msg, "
        f"{r.get('server_writes_per_msg', 0):.2f} writes/msg"
    )


# ---------------------------------------------------------------- report


def _ratio(value: float | None, ref: float | None) -> str:
    if value is None or not ref:
        return ""
    return f" ({value / ref:.2f}×)"


def _idle_pct(r: dict[str, Any] | None) -> float | None:
    return float(r["idle"]["server_cpu_pct"]) if r and "idle" in r else None


def _idle(r: dict[str, Any]) -> str:
    pct = _idle_pct(r)
    return "—" if pct is None else f"{pct:.1f}"


def render(results: dict[str, Any]) -> str:
    """A Markdown summary: one table per workload, ratios against Socket.IO on Node (same run)."""
    res = results["results"]
    labels = {name: info["label"] for name, info in results["targets"].items()}
    lines = [
        f"Realistic workloads, run on {results['date']}"
        f"{', smoke size' if results.get('smoke') else ''}{', scale ' + str(results['scale']) if results['scale'] != 1 else ''}"
        f"; {results['repeat']} fresh server(s) per figure, median shown. Ratios against {REFERENCE} in this run.",
        "",
    ]

    def med(workload: str, target: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = res.get(workload, {}).get(target, {}).get("median")
        return found

    def status(workload: str, target: str) -> str | None:
        entry = res.get(workload, {}).get(target)
        if entry is None:
            return None
        if "skipped" in entry:
            return f"skipped: {entry['skipped']}"
        if "median" not in entry:
            return "failed: " + "; ".join(entry["errors"])[:200]
        return ""

    for workload in ("s5", "s5big", "s5_redis"):
        if workload not in res:
            continue
        if workload == "s5_redis":
            ref = med("s5_redis", "herald") or med("s5", "herald")
        else:
            ref = med(workload, REFERENCE)
        lines += [
            f"### {TITLES[workload]}"
            + (" (ratios against Herald on the memory broker)" if workload == "s5_redis" else ""),
            "",
            "| target | highest step with p99 ≤ 50 ms, no loss: deliveries/s | p50 / p99 (ms) | server µs per delivery at saturation | set-up (s) | idle: server CPU % (all subscribed, 10 pubs/s) |"
            + (" fan-out µs per recipient (big room, median) |" if workload == "s5big" else ""),
            "|---|---|---|---|---|---|" + ("---|" if workload == "s5big" else ""),
        ]
        for target in res[workload]:
            note = status(workload, target)
            if note:
                lines.append(f"| {labels[target]} | {note} |")
                continue
            r = med(workload, target)
            assert r is not None
            h = r["headline"]
            rh = ref["headline"] if ref else {}
            best = (
                f"{h['deliveries_per_s'] / 1000:.1f}k at {h['rate']:g} pubs/s"
                f"{_ratio(h['deliveries_per_s'], rh.get('deliveries_per_s'))}"
                if h["rate"]
                else f"no step passed (lowest: {r['params']['rates'].split(',')[0]} pubs/s)"
            )
            row = (
                f"| {labels[target]} | {best}"
                f"{', **lost ' + str(r['lost']) + '**' if r['lost'] else ''}"
                f" | {h['p50'] or 0:.1f} / {h['p99'] or 0:.1f}"
                f" | {h['saturation_us_per_delivery'] or 0:.1f}{_ratio(h['saturation_us_per_delivery'], rh.get('saturation_us_per_delivery'))}"
                f"{'' if h['ramp_ended'] else ' (ramp never saturated)'}"
                f" | {r['setup_s']:.1f}{_ratio(r['setup_s'], ref.get('setup_s') if ref else None)}"
                f" | {_idle(r)}{_ratio(_idle_pct(r), _idle_pct(ref))} |"
            )
            if workload == "s5big":
                per = r["big_probe"]["fanout_us_per_recipient"]["p50"]
                ref_per = ref["big_probe"]["fanout_us_per_recipient"]["p50"] if ref else None
                row += f" {per:.2f}{_ratio(per, ref_per)} |"
            lines.append(row)
        lines.append("")
    shipped, tuned = med("s5", "herald_shipped"), med("s5", "herald")
    if shipped and tuned:
        lines += [
            f"S5 set-up with the namespaces as shipped: {shipped['setup_s']:.1f} s against {tuned['setup_s']:.1f} s"
            f" with presence and join/leave off ({shipped['setup_s'] / max(tuned['setup_s'], 1e-9):.2f}×).",
            "",
        ]
    if "s8" in res:
        ref = med("s8", REFERENCE)
        lines += [
            f"### {TITLES['s8']}",
            "",
            "| target | round trips/s | deliveries/s | round trip p50 / p99 (ms) | lost | over capacity: offered/s, acked/s | publisher closed | acknowledged but not delivered | server µs per publish to a channel nobody joined |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for target in res["s8"]:
            note = status("s8", target)
            if note:
                lines.append(f"| {labels[target]} | {note} |")
                continue
            r = med("s8", target)
            assert r is not None
            c, o = r["closed_loop"], r["over_capacity"]
            rc = ref["closed_loop"] if ref else {}
            lines.append(
                f"| {labels[target]} | {c['round_trips_per_s']:.0f}{_ratio(c['round_trips_per_s'], rc.get('round_trips_per_s'))}"
                f" | {c['deliveries_per_s'] / 1000:.1f}k | {c['round_trip_ms']['p50']:.1f} / {c['round_trip_ms']['p99']:.1f}"
                f" | {c['lost']} | {o['offered_rate']:.0f}, {o['acked_per_s']:.0f}"
                f" | {'**yes** (code ' + str(o['close_code']) + ')' if o['publisher_closed'] else 'no'}"
                f" | {o['acked_not_delivered']}"
                f" | {r['headline']['empty_us_per_publication'] or 0:.1f} |"
            )
        lines.append("")
    for workload in ("s7_broadcast", "s7_connect", "s7_jwt"):
        if workload not in res:
            continue
        ref = med(workload, "node_ws" if workload == "s7_broadcast" else REFERENCE)
        lines += [
            f"### {TITLES[workload]}",
            "",
            "| target | connections/s | p99 time to subscribed (ms) | server µs CPU per connection | KiB per connection | failed |",
            "|---|---|---|---|---|---|",
        ]
        for target in res[workload]:
            note = status(workload, target)
            if note:
                lines.append(f"| {labels[target]} | {note} |")
                continue
            r = med(workload, target)
            assert r is not None
            h = r["headline"]
            rh = ref["headline"] if ref else {}
            lines.append(
                f"| {labels[target]} | {h['connects_per_s']:.0f}{_ratio(h['connects_per_s'], rh.get('connects_per_s'))}"
                f" | {h['p99']:.0f} | {h['us_per_conn']:.0f} | {h['kib_per_conn'] or 0:.1f}"
                f" | {'**' + str(r['failed'] + r['unfinished']) + '**' if r['failed'] + r['unfinished'] else 0} |"
            )
        lines.append("")
    if "s1" in res:
        ref = med("s1", "herald")
        lines += [
            f"### {TITLES['s1']}",
            "",
            "| target | S1 delivered msgs/s | server µs per message | lost |",
            "|---|---|---|---|",
        ]
        for target in res["s1"]:
            note = status("s1", target)
            if note:
                lines.append(f"| {labels[target]} | {note} |")
                continue
            r = med("s1", target)
            assert r is not None
            lines.append(
                f"| {labels[target]} | {r['msgs_per_s'] / 1000:.0f}k{_ratio(r['msgs_per_s'], ref['msgs_per_s'] if ref else None)}"
                f" | {r.get('server_us_per_msg', 0):.2f} | {r['lost']} |"
            )
        lines.append("")
    lacks = [(labels[t], info["lacks"]) for t, info in results["targets"].items() if info.get("lacks")]
    if lacks:
        lines += [
            "What the peers do not offer (Herald does): "
            + "; ".join(f"{label}: {text}" for label, text in lacks)
            + ".",
            "",
        ]
    return "\n".join(lines)


# ---------------------------------------------------------------- entry point


def setup_peers() -> int:
    """Installs the Python peers into bench/.build/peers-venv and the Node peers' packages."""
    if not _peer_python().exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True)
    subprocess.run(
        [str(_peer_python()), "-m", "pip", "install", "-q", "-r", str(PEERS_REQUIREMENTS)], check=True
    )
    npm = shutil.which("npm")
    for folder in ("socketio_node", "node_ws"):
        if npm:
            subprocess.run([npm, "install", "--no-audit", "--no-fund"], cwd=BASELINES / folder, check=True)
        else:
            print(
                f"bench.realistic: npm is missing; bench/baselines/{folder} will be skipped", file=sys.stderr
            )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.realistic", description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default="s5,s5big,s8,s7,s6", help="comma list of s5 s5big s8 s7 s6")
    parser.add_argument("--targets", help="comma list (default: every target each workload names)")
    parser.add_argument("--scale", type=float, default=1.0, help="shrink connection counts (e.g. 0.1)")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes and short steps (tests, development)"
    )
    parser.add_argument("--rates", help="S5 ramp, publications/s, comma list (default: 25..8000)")
    parser.add_argument("--step", type=float, help="seconds per S5 step (default 10)")
    parser.add_argument("--publishers", type=int, default=1, help="S5 publishers sharing the total rate")
    parser.add_argument("--repeat", type=int, default=1, help="fresh runs per figure; the median is kept")
    parser.add_argument("--nice", action="store_true", help="run servers and load under nice -n 19")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds allowed for a set-up phase")
    parser.add_argument(
        "--out", default=str(base.BENCH_DIR / "results" / "realistic.json"), help="results JSON"
    )
    parser.add_argument("--md", help="Markdown summary file (default: next to --out)")
    parser.add_argument(
        "--profile",
        type=Path,
        help="folder for py-spy flame graphs of every Herald server (<workload>-<target>.svg)",
    )
    parser.add_argument(
        "--profile-raw", action="store_true", help="collapsed stacks (<workload>-<target>.txt), not SVG"
    )
    parser.add_argument(
        "--profile-rate", type=int, default=250, help="py-spy samples per second (default 250)"
    )
    parser.add_argument("--setup-peers", action="store_true", help="install the peers' packages and exit")
    args = parser.parse_args(argv)
    if args.setup_peers:
        return setup_peers()
    base._raise_nofile()
    results = run_suite(args)
    out = Path(args.out)
    out.write_text(json.dumps(results, indent=1))
    md = Path(args.md) if args.md else out.with_suffix(".md")
    md.write_text(render(results))
    print(f"results: {out}, summary: {md}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
