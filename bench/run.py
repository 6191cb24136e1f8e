"""Herald's benchmark suite: ``python -m bench`` (or ``herald bench``) from the repository root.

Every run starts a fresh server pinned to one core (``taskset -c 0``) and drives it
with the C load generator (``bench/loadgen.c``, built on first use) pinned to the
other core; the targets are measured in the same session so that the ratios stay
meaningful on a shared, noisy machine.  ``HERALD_BENCH_PIN=0`` leaves the processes to
the scheduler (the test suite's smoke runs do, so they do not starve the other test
worker; their figures mean nothing anyway).

Targets
    tutorial          the seed tutorial's code under ``uvicorn tutorial_main:app`` (defaults)
    node_ws           the same endpoints on Node's ``ws`` 8 + bufferutil (skipped without node)
    herald_broadcast  ``herald serve``: the tutorial's ``/ws_broadcast`` and ``/ws``
    herald_channels   ``herald serve``: protocol v1 on ``/connect``, one channel
    herald_*_asgi     the same with ``HERALD_FAST_PATH=0`` (plain ASGI sends) with ``--asgi``

Workloads (see docs/benchmarks.md)
    S1    fan-out: 1000 subscribers, 200 messages of 100 B, 10 in flight
    S2    1000 subscribers, 50 msgs/s for 10 s: latency percentiles
    S3    echo: 50 clients x 2000 sequential round trips
    S4    5000 idle connections: server memory per connection
    slow  S2 at 100 msgs/s of 1 KiB with 1 of 1000 subscribers not reading, vs the clean run
    idle10k  10,000 idle connections: memory and connect rate
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
BASELINES = BENCH_DIR / "baselines"
BUILD_DIR = BENCH_DIR / ".build"
LOADGEN_SRC = BENCH_DIR / "loadgen.c"
LOADGEN = BUILD_DIR / "loadgen"

SERVER_CPU = "0"
LOADGEN_CPU = "1"

# Herald's settings for the benchmark channel: no presence or join/leave pushes
# (1000 subscribes would otherwise be 500k join pushes before the first publication),
# history on so that publications carry offsets as in production.
HERALD_ENV = {
    "HERALD_LOG_LEVEL": "warning",
    # S3 drives 2000 commands per connection as fast as the server answers: not abuse here.
    "HERALD_RATE_LIMIT": "0",
    "HERALD_NAMESPACES": json.dumps({"bench": {"presence": False, "join_leave": False, "history_size": 100}}),
}
CHANNEL = "bench:s1"


# ---------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    mode: str  # loadgen mode
    params: dict[str, Any]
    kind: str  # "pubsub" | "echo" | "idle"


def workloads(scale: float) -> dict[str, Workload]:
    """The issue's workloads; ``scale`` < 1 shrinks counts and durations (development, smoke test)."""

    def n(value: int, low: int = 2) -> int:
        return max(low, int(value * scale))

    def d(value: float) -> float:
        return max(0.5, round(value * scale, 2))

    return {
        "S1": Workload(
            "S1",
            f"fan-out: {n(1000)} subscribers, {n(200, 20)} msgs of 100 B, 10 in flight",
            "fanout",
            {"subs": n(1000), "msgs": n(200, 20), "inflight": 10, "size": 100},
            "pubsub",
        ),
        "S2": Workload(
            "S2",
            f"{n(1000)} subscribers, 50 msgs/s for {d(10)} s",
            "rate",
            {"subs": n(1000), "rate": 50, "duration": d(10), "size": 100},
            "pubsub",
        ),
        "S3": Workload(
            "S3",
            f"echo: {n(50)} clients x {n(2000, 20)} round trips",
            "echo",
            {"clients": n(50), "rounds": n(2000, 20), "size": 100},
            "echo",
        ),
        "S4": Workload("S4", f"{n(5000)} idle connections", "idle", {"conns": n(5000)}, "idle"),
        # 40 s of 100 msgs/s of 1 KiB is 4 MB for the peer that stops reading: more than
        # the ~3 MB a loopback socket takes in for a peer with a 4 KiB receive buffer
        # (measured on the benchmark machine), so the server itself must hold or drop it.
        "slow_clean": Workload(
            "slow_clean",
            f"{n(1000)} subscribers, 100 msgs/s of 1 KiB for {d(40)} s (clean run)",
            "rate",
            {"subs": n(1000), "rate": 100, "duration": d(40), "size": 1024},
            "pubsub",
        ),
        "slow": Workload(
            "slow",
            f"same, 1 of {n(1000)} subscribers stops reading",
            "rate",
            {"subs": n(1000), "rate": 100, "duration": d(40), "size": 1024, "slow": 1},
            "pubsub",
        ),
        "idle10k": Workload("idle10k", f"{n(10000)} idle connections", "idle", {"conns": n(10000)}, "idle"),
    }


# The queue bound Herald runs the slow-consumer workloads with (and reports against).
SLOW_QUEUE_BYTES = 256 * 1024
SLOW_QUEUE_MESSAGES = 1024


# ---------------------------------------------------------------- targets


@dataclass
class Target:
    name: str
    label: str
    argv: list[str]
    cwd: Path
    env: dict[str, str] = field(default_factory=dict)
    broadcast_path: str = "/ws_broadcast"
    echo_path: str = "/ws"
    proto: str = "raw"
    baseline: bool = False
    skip_reason: str | None = None

    def loadgen_args(self, workload: Workload) -> list[str]:
        if self.proto == "herald":
            return ["proto=herald", "path=/connect", f"channel={CHANNEL}"]
        path = self.echo_path if workload.kind == "echo" else self.broadcast_path
        return ["proto=raw", f"path={path}"]


def herald_argv(port_placeholder: str = "{port}") -> list[str]:
    exe = Path(sys.executable).with_name("herald")
    base = [str(exe)] if exe.exists() else [sys.executable, "-m", "herald"]
    return [*base, "serve", "--port", port_placeholder]


def targets(asgi: bool) -> list[Target]:
    node = shutil.which("node")
    node_dir = BASELINES / "node_ws"
    node_skip = None
    if node is None:
        node_skip = "node is not installed"
    elif not (node_dir / "node_modules" / "ws").exists():
        node_skip = f"run `npm install` in {node_dir.relative_to(REPO)}"
    result = [
        Target(
            "tutorial",
            "tutorial code, `uvicorn main:app`",
            [sys.executable, "-m", "uvicorn", "tutorial_main:app", "--port", "{port}"],
            BASELINES,
            baseline=True,
        ),
        Target(
            "node_ws",
            "Node `ws` 8 + bufferutil",
            [node or "node", "server.js", "{port}"],
            node_dir,
            skip_reason=node_skip,
        ),
        Target("herald_broadcast", "Herald `/ws_broadcast`", herald_argv(), REPO, dict(HERALD_ENV)),
        Target(
            "herald_channels",
            "Herald channels (`/connect`)",
            herald_argv(),
            REPO,
            dict(HERALD_ENV),
            proto="herald",
        ),
    ]
    if asgi:
        result += [
            Target(
                "herald_broadcast_asgi",
                "Herald `/ws_broadcast`, fast path off",
                herald_argv(),
                REPO,
                {**HERALD_ENV, "HERALD_FAST_PATH": "false"},
            ),
            Target(
                "herald_channels_asgi",
                "Herald channels, fast path off",
                herald_argv(),
                REPO,
                {**HERALD_ENV, "HERALD_FAST_PATH": "false"},
                proto="herald",
            ),
        ]
    return result


# ---------------------------------------------------------------- processes


def build_loadgen() -> Path:
    if LOADGEN.exists() and LOADGEN.stat().st_mtime >= LOADGEN_SRC.stat().st_mtime:
        return LOADGEN
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise SystemExit("bench: a C compiler (gcc) is needed to build bench/loadgen.c")
    BUILD_DIR.mkdir(exist_ok=True)
    # Built under a name of its own, then renamed: two harnesses may build at once (the
    # test workers), and neither may run the other's half-written binary.
    partial = BUILD_DIR / f"loadgen.{os.getpid()}.partial"
    subprocess.run([gcc, "-O2", "-o", str(partial), str(LOADGEN_SRC)], check=True)
    os.replace(partial, LOADGEN)
    return LOADGEN


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _raise_nofile() -> None:
    # 10k idle connections need 10k descriptors on both sides.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), max(hard, want)))


def pin_argv(cpu: str) -> list[str]:
    """``taskset -c CPU`` where pinning is possible and wanted (``HERALD_BENCH_PIN``), else nothing."""
    wanted = os.environ.get("HERALD_BENCH_PIN", "1").strip().lower() not in ("0", "false", "no", "off")
    if wanted and shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        return ["taskset", "-c", cpu]
    return []


def _prefix(cpu: str, nice: bool) -> list[str]:
    argv = pin_argv(cpu)
    if nice:
        argv += ["nice", "-n", "19"]
    return argv


def proc_cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


def proc_write_calls(pid: int) -> int:
    """Write system calls made so far by ``pid`` (``syscw`` in ``/proc/PID/io``; 0 when unreadable)."""
    return _proc_value(f"/proc/{pid}/io", "syscw:")


def _proc_value(path: str, key: str) -> int:
    """The first number after ``key`` at the start of a line of ``path``; 0 when absent."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def proc_rss_kib(pid: int) -> int:
    return _proc_value(f"/proc/{pid}/status", "VmRSS:")


class RssSampler:
    """Samples a process's RSS every 50 ms in a thread; keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, proc_rss_kib(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, proc_rss_kib(self.pid))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"server did not listen on {port} within {timeout} s")


@contextlib.contextmanager
def running(target: Target, nice: bool, extra_env: dict[str, str], log: Path) -> Iterator[tuple[int, int]]:
    port = free_port()
    argv = [a.replace("{port}", str(port)) for a in target.argv]
    env = {**os.environ, **target.env, **extra_env}
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            _prefix(SERVER_CPU, nice) + argv,
            cwd=target.cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_raise_nofile,
            start_new_session=True,
        )
    try:
        wait_port(port, proc)
        time.sleep(0.2)  # let the server finish its start-up allocations before the RSS baseline
        yield port, proc.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_workload(
    target: Target, workload: Workload, *, nice: bool, log: Path, timeout: float
) -> dict[str, Any]:
    loadgen = build_loadgen()
    extra: dict[str, str] = {}
    if workload.name in ("slow", "slow_clean"):
        extra = {
            "HERALD_MAX_QUEUE_BYTES": str(SLOW_QUEUE_BYTES),
            "HERALD_MAX_QUEUE_MESSAGES": str(SLOW_QUEUE_MESSAGES),
        }
    with running(target, nice, extra, log) as (port, pid):
        args = [f"{k}={v}" for k, v in workload.params.items()]
        argv = [
            *_prefix(LOADGEN_CPU, nice),
            str(loadgen),
            workload.mode,
            f"port={port}",
            f"timeout={timeout}",
            *target.loadgen_args(workload),
            *args,
        ]
        rss0 = proc_rss_kib(pid)
        cpu0 = proc_cpu_seconds(pid)
        if workload.kind == "idle":
            return _run_idle(
                argv, pid, rss0, timeout, settle=1.0 if workload.params["conns"] >= 1000 else 0.2
            )
        with RssSampler(pid) as sampler:
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=timeout + 60, preexec_fn=_raise_nofile
            )
        if done.returncode != 0:
            raise RuntimeError(f"loadgen failed ({done.returncode}): {done.stderr.strip()[-500:]}")
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        result["server_cpu_s"] = proc_cpu_seconds(pid) - cpu0
        result["server_rss0_kib"] = rss0
        result["server_rss_peak_kib"] = sampler.peak
        result["server_rss_growth_kib"] = sampler.peak - rss0
        count = result.get("delivered") or result.get("round_trips") or 0
        if count:
            result["server_us_per_msg"] = 1e6 * result["server_cpu_s"] / count
        return result


def _run_idle(argv: list[str], pid: int, rss0: int, timeout: float, settle: float) -> dict[str, Any]:
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_raise_nofile,
    )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        line = proc.stdout.readline()
        if not line.startswith("READY "):
            proc.kill()
            raise RuntimeError(f"loadgen failed: {line!r} {proc.stderr.read() if proc.stderr else ''}")
        result: dict[str, Any] = json.loads(line[len("READY ") :])
        # Let the server settle (writer tasks started, handshakes' garbage collected).
        time.sleep(settle)
        rss1 = proc_rss_kib(pid)
        result["server_rss0_kib"] = rss0
        result["server_rss_kib"] = rss1
        established = max(1, int(result["established"]))
        result["kib_per_conn"] = (rss1 - rss0) / established
        proc.stdin.write("done\n")
        proc.stdin.flush()
        proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return result


# ---------------------------------------------------------------- suite


HEADLINE = {
    "S1": ("msgs_per_s", "delivered msgs/s", True),
    "S2": ("p99", "p50 / p99 latency (ms)", False),
    "S3": ("round_trips_per_s", "round trips/s", True),
    "S4": ("kib_per_conn", "KiB per idle connection", False),
    "slow_clean": ("p99", "p50 / p99 latency (ms)", False),
    "slow": ("p99", "p50 / p99 latency (ms)", False),
    "idle10k": ("kib_per_conn", "KiB per connection (connects/s)", False),
}


def headline(result: dict[str, Any], workload: str) -> float:
    key = HEADLINE[workload][0]
    if key in ("p50", "p99"):
        return float(result["latency_ms"][key])
    return float(result[key])


def median_run(runs: list[dict[str, Any]], workload: str) -> dict[str, Any]:
    """The run whose headline figure is the median (so its other figures belong together)."""
    ordered = sorted(runs, key=lambda r: headline(r, workload))
    return ordered[len(ordered) // 2]


def run_suite(args: argparse.Namespace) -> dict[str, Any]:
    all_workloads = workloads(args.scale)
    chosen = args.workloads or list(all_workloads)
    unknown = [w for w in chosen if w not in all_workloads]
    if unknown:
        raise SystemExit(f"bench: unknown workload(s) {unknown}; choose from {list(all_workloads)}")
    all_targets = targets(args.asgi)
    if args.targets:
        names = {t.name for t in all_targets}
        bad = [t for t in args.targets if t not in names]
        if bad:
            raise SystemExit(f"bench: unknown target(s) {bad}; choose from {sorted(names)}")
        all_targets = [t for t in all_targets if t.name in args.targets]
    log = Path(args.out).with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    results: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "scale": args.scale,
        "repeat": args.repeat,
        "nice": args.nice,
        "machine": machine_info(),
        "workloads": {w: all_workloads[w].title for w in chosen},
        "targets": {t.name: {"label": t.label, "skip": t.skip_reason} for t in all_targets},
        "results": {},
    }
    for target in all_targets:
        if target.skip_reason:
            print(f"-- skip {target.name}: {target.skip_reason}", file=sys.stderr)
            continue
        for name in chosen:
            workload = all_workloads[name]
            runs, errors = [], []
            for _ in range(args.repeat):
                try:
                    runs.append(run_workload(target, workload, nice=args.nice, log=log, timeout=args.timeout))
                except Exception as exc:
                    errors.append(str(exc))
            entry: dict[str, Any] = {"runs": runs, "errors": errors}
            if runs:
                entry["median"] = median_run(runs, name)
            results["results"].setdefault(target.name, {})[name] = entry
            print(f"{target.name:24} {name:10} {summary(entry, name)}", file=sys.stderr)
    return results


def summary(entry: dict[str, Any], workload: str) -> str:
    if "median" not in entry:
        return "FAILED: " + "; ".join(entry["errors"])[:200]
    r = entry["median"]
    parts = []
    if "msgs_per_s" in r:
        parts.append(f"{r['msgs_per_s']:.0f} msg/s")
    if "round_trips_per_s" in r:
        parts.append(f"{r['round_trips_per_s']:.0f} rt/s")
    if "latency_ms" in r:
        parts.append(f"p50 {r['latency_ms']['p50']:.2f} p99 {r['latency_ms']['p99']:.2f} ms")
    if "kib_per_conn" in r:
        parts.append(f"{r['kib_per_conn']:.1f} KiB/conn {r['connects_per_s']:.0f} conn/s")
    if "lost" in r:
        parts.append(f"lost {r['lost']}")
    if r.get("order_errors"):
        parts.append(f"ORDER ERRORS {r['order_errors']}")
    if "server_us_per_msg" in r:
        parts.append(f"server {r['server_us_per_msg']:.2f} us/msg")
    if "loadgen_cpu_pct" in r:
        parts.append(f"loadgen cpu {r['loadgen_cpu_pct']:.0f}%")
    if r.get("slow"):
        parts.append(f"slow closed {r['slow_closed']} code {r['slow_close_code']}")
    if "server_rss_growth_kib" in r:
        parts.append(f"rss +{r['server_rss_growth_kib']} KiB")
    return ", ".join(parts)


def machine_info() -> dict[str, str]:
    def out(argv: list[str]) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
        return "unavailable"

    versions = {"python": platform.python_version()}
    for module in ("uvicorn", "websockets", "fastapi", "starlette", "uvloop"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[module] = version(module)
    node = shutil.which("node")
    if node:
        versions["node"] = out([node, "--version"])
    return {
        "lscpu": out(["lscpu"]),
        "uname": out(["uname", "-a"]),
        "loadavg": Path("/proc/loadavg").read_text().strip() if Path("/proc/loadavg").exists() else "",
        "versions": json.dumps(versions),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("workloads", nargs="*", help="S1 S2 S3 S4 slow_clean slow idle10k (default: all)")
    parser.add_argument("--targets", nargs="+", help="subset of targets (default: all)")
    parser.add_argument("--repeat", type=int, default=3, help="fresh runs per figure; the median is kept")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="shrink subscriber counts and durations (e.g. 0.2)"
    )
    parser.add_argument("--nice", action="store_true", help="run servers and load under nice -n 19")
    parser.add_argument("--asgi", action="store_true", help="also run Herald with the fast path off")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per loadgen run")
    parser.add_argument("--out", default=str(BENCH_DIR / "results" / "latest.json"), help="results JSON file")
    parser.add_argument(
        "--docs",
        nargs="?",
        const=str(REPO / "docs"),
        help="write benchmarks.md and the latency plot into this folder (default: docs/)",
    )
    args = parser.parse_args(argv)
    _raise_nofile()
    results = run_suite(args)
    out = Path(args.out)
    out.write_text(json.dumps(results, indent=1))
    print(f"results: {out}", file=sys.stderr)
    if args.docs:
        from .report import write_report

        write_report(results, Path(args.docs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
