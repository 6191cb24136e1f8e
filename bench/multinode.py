"""Scale-out benchmark: fan-out across 3 ``herald serve`` processes on Redis versus 1 on memory.

``python -m bench.multinode`` from the repository root (needs ``redis-server``).

Setups, measured in the same session so that the ratios mean something on a
shared, noisy machine:

    memory-1   one process, in-memory broker (the baseline)
    redis-1    one process on Redis (what Redis itself costs)
    redis-3    three processes on one Redis; subscribers spread round-robin

Each setup runs two phases with the same total subscribers on one channel:

    fan-out    ``--publications`` publications, ``--inflight`` at a time, from one
               publisher connected to the first node: delivered messages per second
               (subscribers x publications / time from first send to last delivery)
    latency    ``--rate`` publications/s for ``--duration`` s: publish -> deliver
               latency percentiles over every delivery (send time is in the payload;
               publisher and subscribers share this process's clock)

Server processes (and Redis) run under ``nice -n 10``: other people share the
cores.  The subscribers are a minimal WebSocket client written for this file
(counting frames costs a few microseconds each, so the load generator is not the
bottleneck; its CPU time is reported next to the servers').  Results go to
``docs/benchmarks-multinode.md`` (``--out``) and, with ``--json``, to a JSON file.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as _dt
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CHANNEL = "bench:multinode"
SERVER_ENV = {
    "HERALD_LOG_LEVEL": "warning",
    "HERALD_DEMOS": "false",
    "HERALD_RATE_LIMIT": "0",
    "HERALD_MAX_CONNECTIONS_PER_USER": "0",
    # No presence or join/leave pushes: the benchmark measures publications only.
    "HERALD_NAMESPACES": json.dumps({"bench": {"presence": False, "join_leave": False, "history_size": 100}}),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------- a minimal WebSocket client


class _Client(asyncio.Protocol):
    """Protocol v1 over a hand-rolled WebSocket client: counts publications, reads ``ts``."""

    def __init__(self, bench: _Run) -> None:
        self.bench = bench
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.handshaken = False
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.replies: dict[int, asyncio.Future[bytes]] = {}
        self.received = 0
        self.next_id = 1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(
            (
                f"GET /connect HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"connection lost: {exc!r}"))
        for future in self.replies.values():
            if not future.done():
                future.set_exception(ConnectionError("connection lost"))

    def send(self, text: bytes) -> None:
        assert self.transport is not None
        length = len(text)
        if length < 126:
            header = bytes((0x81, 0x80 | length))
        elif length < 65536:
            header = bytes((0x81, 0x80 | 126)) + length.to_bytes(2, "big")
        else:
            header = bytes((0x81, 0x80 | 127)) + length.to_bytes(8, "big")
        mask = os.urandom(4)
        key = int.from_bytes((mask * (length // 4 + 1))[:length], "big")
        masked = (int.from_bytes(text, "big") ^ key).to_bytes(length, "big") if length else b""
        self.transport.write(header + mask + masked)

    async def call(self, kind: str, **fields: Any) -> bytes:
        command_id = self.next_id
        self.next_id += 1
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.replies[command_id] = future
        self.send(json.dumps({"id": command_id, "type": kind, **fields}).encode())
        return await future

    def call_nowait(self, kind: str, **fields: Any) -> asyncio.Future[bytes]:
        command_id = self.next_id
        self.next_id += 1
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.replies[command_id] = future
        self.send(json.dumps({"id": command_id, "type": kind, **fields}).encode())
        return future

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        if not self.handshaken:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            if not buffer.startswith(b"HTTP/1.1 101"):
                self.opened.set_exception(ConnectionError(bytes(buffer[:200]).decode(errors="replace")))
                return
            del buffer[: end + 4]
            self.handshaken = True
            self.opened.set_result(None)
        pos, size = 0, len(buffer)
        while size - pos >= 2:
            opcode, length = buffer[pos] & 0x0F, buffer[pos + 1] & 0x7F
            start = pos + 2
            if length == 126:
                if size - pos < 4:
                    break
                length, start = int.from_bytes(buffer[pos + 2 : pos + 4], "big"), pos + 4
            elif length == 127:
                if size - pos < 10:
                    break
                length, start = int.from_bytes(buffer[pos + 2 : pos + 10], "big"), pos + 10
            if size - start < length:
                break
            payload = bytes(buffer[start : start + length])
            pos = start + length
            if opcode == 1:
                self._on_text(payload)
            elif opcode == 9 and self.transport is not None:  # RFC 6455 ping: pong, masked
                self.transport.write(bytes((0x8A, 0x80 | len(payload))) + b"\0\0\0\0" + payload)
        del buffer[:pos]

    def _on_text(self, payload: bytes) -> None:
        if payload.startswith(b'{"type":"publication"'):
            self.received += 1
            self.bench.on_publication(payload)
            return
        if payload.startswith(b'{"id":'):
            end = payload.index(b",", 6)
            future = self.replies.pop(int(payload[6:end]), None)
            if future is not None and not future.done():
                future.set_result(payload)
            return
        if b'"type":"ping"' in payload:
            self.send(b'{"type":"pong"}')


@dataclass
class _Run:
    """Counts deliveries of one phase; records latencies when ``timed``."""

    expected: int = 0
    delivered: int = 0
    timed: bool = False
    latencies: list[float] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    last_delivery: float = 0.0

    def on_publication(self, payload: bytes) -> None:
        now = time.perf_counter()
        self.delivered += 1
        self.last_delivery = now
        if self.timed:
            start = payload.find(b'"ts":') + 5
            end = payload.find(b",", start)
            self.latencies.append(now - float(payload[start:end]))
        if self.delivered >= self.expected:
            self.done.set()


async def _open(port: int, run: _Run) -> _Client:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(lambda: _Client(run), "127.0.0.1", port)
    await asyncio.wait_for(client.opened, 10)
    reply = await asyncio.wait_for(client.call("connect"), 10)
    if b'"result"' not in reply:
        raise RuntimeError(f"connect refused: {reply!r}")
    return client


# ---------------------------------------------------------------- processes


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as response:
            if response.status == 200:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready")


@contextlib.contextmanager
def _redis_server(log_dir: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    proc = subprocess.Popen(
        ["nice", "-n", "10", "redis-server", "--bind", "127.0.0.1", "--port", str(port),
         "--save", "", "--appendonly", "no", "--dir", str(log_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    break
            if time.monotonic() > deadline:
                raise TimeoutError("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0", proc
    finally:
        proc.terminate()
        proc.wait(5)


@contextlib.contextmanager
def _servers(count: int, broker: str, log_dir: Path) -> Iterator[list[tuple[int, subprocess.Popen[bytes]]]]:
    started: list[tuple[int, subprocess.Popen[bytes]]] = []
    try:
        for index in range(count):
            port = free_port()
            log = open(log_dir / f"{broker.split(':')[0]}-{count}-{index}.log", "ab")  # noqa: SIM115
            proc = subprocess.Popen(
                ["nice", "-n", "10", sys.executable, "-m", "herald", "serve",
                 "--host", "127.0.0.1", "--port", str(port)],
                env={**os.environ, **SERVER_ENV, "HERALD_BROKER": broker},
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )  # fmt: skip
            log.close()
            started.append((port, proc))
        for port, proc in started:
            _wait_http(f"http://127.0.0.1:{port}/readyz", proc)
        yield started
    finally:
        for _, proc in started:
            proc.terminate()
        for _, proc in started:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


# ---------------------------------------------------------------- phases


@contextlib.asynccontextmanager
async def _subscribers(ports: list[int], count: int, run: _Run) -> AsyncIterator[list[_Client]]:
    clients: list[_Client] = []
    try:
        for start in range(0, count, 50):  # connect in batches: no accept-queue overflow
            batch = [ports[i % len(ports)] for i in range(start, min(start + 50, count))]
            clients += await asyncio.gather(*(_open(port, run) for port in batch))
        replies = await asyncio.gather(
            *(asyncio.wait_for(c.call("subscribe", channels=[{"channel": CHANNEL}]), 10) for c in clients)
        )
        refused = [r for r in replies if b'"error"' in r]
        if refused:
            raise RuntimeError(f"subscribe refused: {refused[0]!r}")
        yield clients
    finally:
        for client in clients:
            if client.transport is not None:
                client.transport.close()


async def _fanout(ports: list[int], subscribers: int, publications: int, inflight: int) -> dict[str, Any]:
    run = _Run(expected=subscribers * publications)
    async with _subscribers(ports, subscribers, run) as clients:
        publisher = await _open(ports[0], _Run())
        try:
            window = asyncio.Semaphore(inflight)
            started = time.perf_counter()

            async def publish(n: int) -> None:
                async with window:
                    reply = await publisher.call("publish", channel=CHANNEL, data={"ts": 0, "n": n})
                    if b'"result"' not in reply:
                        raise RuntimeError(f"publish failed: {reply!r}")

            await asyncio.gather(*(publish(n) for n in range(publications)))
            await asyncio.wait_for(run.done.wait(), 60)
            elapsed = run.last_delivery - started
        finally:
            assert publisher.transport is not None
            publisher.transport.close()
        per_client = {c.received for c in clients}
    return {
        "delivered": run.delivered,
        "expected": run.expected,
        "exactly_once": per_client == {publications},
        "seconds": round(elapsed, 4),
        "msgs_per_s": round(run.delivered / elapsed, 1),
    }


async def _latency(ports: list[int], subscribers: int, rate: float, duration: float) -> dict[str, Any]:
    count = max(int(rate * duration), 1)
    run = _Run(expected=subscribers * count, timed=True)
    async with _subscribers(ports, subscribers, run):
        publisher = await _open(ports[0], _Run())
        try:
            started = time.perf_counter()
            pending = []
            for n in range(count):
                target = started + n / rate
                delay = target - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                ts = time.perf_counter()
                pending.append(publisher.call_nowait("publish", channel=CHANNEL, data={"ts": ts, "n": n}))
            await asyncio.gather(*pending)
            await asyncio.wait_for(run.done.wait(), 60)
        finally:
            assert publisher.transport is not None
            publisher.transport.close()
    latencies = sorted(run.latencies)

    def pct(p: float) -> float:
        return round(latencies[min(int(p / 100 * len(latencies)), len(latencies) - 1)] * 1000, 2)

    return {
        "publications": count,
        "deliveries": len(latencies),
        "p50_ms": pct(50),
        "p99_ms": pct(99),
        "max_ms": round(latencies[-1] * 1000, 2),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 2),
    }


def _loadgen_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _measure(setup: str, ports: list[int], pids: list[int], args: argparse.Namespace) -> dict[str, Any]:
    cpu0 = sum(_cpu_seconds(pid) for pid in pids)
    gen0 = _loadgen_cpu()
    wall0 = time.perf_counter()
    # A small warm-up run, then the median of ``repeat`` fan-out runs: the machine is shared.
    await _fanout(ports, min(args.subscribers, 50), 10, args.inflight)
    runs = [
        await _fanout(ports, args.subscribers, args.publications, args.inflight) for _ in range(args.repeat)
    ]
    fanout = sorted(runs, key=lambda r: r["msgs_per_s"])[len(runs) // 2]
    fanout["runs_msgs_per_s"] = [r["msgs_per_s"] for r in runs]
    fanout["exactly_once"] = all(r["exactly_once"] for r in runs)
    latency = await _latency(ports, args.subscribers, args.rate, args.duration)
    return {
        "setup": setup,
        "processes": len(ports),
        "fanout": fanout,
        "latency": latency,
        "server_cpu_s": round(sum(_cpu_seconds(pid) for pid in pids) - cpu0, 2),
        "loadgen_cpu_s": round(_loadgen_cpu() - gen0, 2),
        "wall_s": round(time.perf_counter() - wall0, 2),
    }


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    if shutil.which("redis-server") is None:
        raise SystemExit("bench.multinode needs redis-server (apt-get install redis-server)")
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="herald-bench-mn-") as tmp:
        log_dir = Path(tmp)
        with _servers(1, "memory", log_dir) as servers:
            ports, pids = [p for p, _ in servers], [s.pid for _, s in servers]
            results.append(asyncio.run(_measure("memory-1", ports, pids, args)))
        with _redis_server(log_dir) as (url, redis_proc):
            for count in (1, args.nodes):
                with _servers(count, url, log_dir) as servers:
                    ports = [p for p, _ in servers]
                    pids = [s.pid for _, s in servers] + [redis_proc.pid]
                    results.append(asyncio.run(_measure(f"redis-{count}", ports, pids, args)))
    return {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "params": {
            k: getattr(args, k)
            for k in ("subscribers", "publications", "inflight", "rate", "duration", "nodes", "repeat")
        },
        "machine": _machine(),
        "results": results,
    }


def _machine() -> dict[str, str]:
    def out(argv: list[str]) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
        return "unavailable"

    return {
        "lscpu": "\n".join(out(["lscpu"]).splitlines()[:10]),
        "uname": out(["uname", "-a"]),
        "redis": out(["redis-server", "--version"]),
        "python": sys.version.split()[0],
        "loadavg": Path("/proc/loadavg").read_text().strip() if Path("/proc/loadavg").exists() else "",
    }


def render(report: dict[str, Any]) -> str:
    results = report["results"]
    base = results[0]
    p = report["params"]
    lines = [
        "# Multi-node benchmark: Redis fan-out versus one process",
        "",
        "Written by `python -m bench.multinode` (see `bench/multinode.py`); ratios are against the",
        "one-process memory-broker run made in the same session.",
        "",
        f"- date: {report['date']}",
        f"- workload: {p['subscribers']} subscribers on one channel, spread round-robin over the "
        f"processes; fan-out: {p['publications']} publications ({p['inflight']} in flight) from one "
        f"publisher on the first process, median of {p['repeat']} runs after a warm-up; latency: "
        f"{p['rate']} publications/s for {p['duration']} s",
        "- server processes and Redis under `nice -n 10`; the load generator (one Python process, "
        "a minimal WebSocket client) shares the same 2 cores",
        "",
        "| setup | processes | delivered msgs/s | vs memory-1 | p50 ms | p99 ms | vs memory-1 (p50, p99) "
        "| exactly once | server CPU s | load generator CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        f, lat = r["fanout"], r["latency"]
        lines.append(
            f"| {r['setup']} | {r['processes']} | {f['msgs_per_s']:,.0f} | "
            f"{f['msgs_per_s'] / base['fanout']['msgs_per_s']:.2f}x | {lat['p50_ms']} | {lat['p99_ms']} | "
            f"{lat['p50_ms'] - base['latency']['p50_ms']:+.2f} / {lat['p99_ms'] - base['latency']['p99_ms']:+.2f} ms | "
            f"{'yes' if f['exactly_once'] else 'NO'} | {r['server_cpu_s']} | {r['loadgen_cpu_s']} |"
        )
    lines += [
        "",
        "Machine:",
        "",
        "```",
        report["machine"]["lscpu"],
        report["machine"]["uname"],
        report["machine"]["redis"],
        f"python {report['machine']['python']}; load average at the end: {report['machine']['loadavg']}",
        "```",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.multinode", description=__doc__.split("\n")[0])
    parser.add_argument("--subscribers", type=int, default=300)
    parser.add_argument("--publications", type=int, default=100)
    parser.add_argument("--inflight", type=int, default=10)
    parser.add_argument("--rate", type=float, default=20.0, help="publications/s in the latency phase")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds of the latency phase")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3, help="fan-out runs per setup (median)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks-multinode.md")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args(argv)
    report = run_all(args)
    text = render(report)
    args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print(text)
    return 0 if all(r["fanout"]["exactly_once"] for r in report["results"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
