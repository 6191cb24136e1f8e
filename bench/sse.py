"""SSE against WebSocket on the same ``herald serve``, in one run: ``python -m bench.sse``.

Three of the suite's workloads (docs/benchmarks.md), at sizes a Python client can
drive (the C load generator speaks WebSocket only):

    S1  fan-out: ``--subs`` subscribers, ``--msgs`` publications of 100 B, 10 in flight
    S2  steady rate: ``--subs`` subscribers, ``--rate`` publications/s for ``--duration`` s:
        latency percentiles (publish command sent -> event parsed by the subscriber)
    S4  ``--idle`` idle subscribed connections: the server's memory per connection

Each workload runs twice against one server, once with WebSocket subscribers
(``/connect``, protocol v1: connect, subscribe) and once with SSE subscribers
(``GET /sse?channel=...``; the chunked body is scanned for whole events, each chunk
being one event).  The publisher is the same in both: one ``/connect`` client sending
``publish`` commands.  The server is pinned to CPU 0 (``taskset``) and the clients to
CPU 1 when the machine has two.

Limits: the clients are Python (asyncio; ``websockets`` for WebSocket, raw sockets for
SSE), so on a two-core machine the client side saturates first: wall-clock
throughput is a floor for both transports, and the comparable numbers are the
server's CPU time per 1000 deliveries and its memory per connection, which the
client's speed does not change.  Latency includes the client's own loop lag, the
same for both transports.  Results: docs/benchmarks-sse.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as _dt
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from .run import HERALD_ENV, free_port, herald_argv, pin_argv, proc_cpu_seconds, proc_rss_kib

CHANNEL = "bench:sse"
MARKER = re.compile(rb"#(\d+):(\d+)#")
SIZE = 100


def payload(seq: int) -> str:
    """A publication's data: ``#<seq>:<send time in ns>#`` padded to :data:`SIZE` bytes."""
    head = f"#{seq}:{time.perf_counter_ns()}#"
    return head + "x" * max(0, SIZE - len(head))


# ---------------------------------------------------------------- server


#: Extra server environment (``--no-fast-path`` sets ``HERALD_FAST_PATH=0``).
SERVER_ENV: dict[str, str] = {}


@contextlib.contextmanager
def server(port: int) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, **HERALD_ENV, "HERALD_DEMOS": "false", "HERALD_PING_INTERVAL": "25", **SERVER_ENV}
    prefix = pin_argv("0")
    argv = [part.replace("{port}", str(port)) for part in herald_argv()]
    log = open(Path("/tmp") / f"herald-bench-sse-{port}.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([*prefix, *argv], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        import socket

        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"herald serve exited with {proc.returncode}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


# ---------------------------------------------------------------- clients


Handler = Callable[[int, int], None]  # (seq, send time ns) for each publication received


class WsSubscriber:
    """A ``/connect`` client subscribed to :data:`CHANNEL`."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ws: Any = None

    async def open(self) -> None:
        from websockets.asyncio.client import connect

        self.ws = await connect(f"ws://127.0.0.1:{self.port}/connect", max_size=None, compression=None)
        await self.ws.send(json.dumps({"type": "connect", "id": 1}))
        await self.ws.recv()
        await self.ws.send(json.dumps({"type": "subscribe", "id": 2, "channels": [{"channel": CHANNEL}]}))
        await self.ws.recv()

    async def read(self, on_publication: Handler) -> None:
        async for message in self.ws:
            data = message.encode() if isinstance(message, str) else message
            for match in MARKER.finditer(data):
                on_publication(int(match[1]), int(match[2]))

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()


class SseSubscriber:
    """A ``GET /sse`` client on a raw socket: each chunk of the response is one whole
    event, so markers are found between chunk-size lines without decoding them."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writer.write(
            f"GET /sse?channel={CHANNEL} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n\r\n".encode()
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        if not head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
            raise RuntimeError(head.decode(errors="replace"))
        # The stream is subscribed once its first event (subscribed) arrived.
        await self.reader.readuntil(b"event: subscribed")
        await self.reader.readuntil(b"\n\n")

    async def read(self, on_publication: Handler) -> None:
        assert self.reader is not None
        rest = b""
        while chunk := await self.reader.read(65536):
            data = rest + chunk
            end = data.rfind(b"\n\n") + 2  # only whole events: a marker is never split
            for match in MARKER.finditer(data, 0, end):
                on_publication(int(match[1]), int(match[2]))
            rest = data[end:]

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.transport.abort()


class Publisher:
    """One ``/connect`` client sending ``publish`` commands, replies read in a task."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ws: Any = None
        self.ids = 10
        self._reader: asyncio.Task[None] | None = None

    async def open(self) -> None:
        from websockets.asyncio.client import connect

        self.ws = await connect(f"ws://127.0.0.1:{self.port}/connect", compression=None)
        await self.ws.send(json.dumps({"type": "connect", "id": 1}))
        await self.ws.recv()
        self._reader = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        with contextlib.suppress(Exception):
            async for _ in self.ws:
                pass

    async def publish(self, seq: int) -> None:
        self.ids += 1
        await self.ws.send(
            json.dumps({"type": "publish", "id": self.ids, "channel": CHANNEL, "data": payload(seq)})
        )

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        await self.ws.close()


def subscriber(kind: str, port: int) -> WsSubscriber | SseSubscriber:
    return WsSubscriber(port) if kind == "ws" else SseSubscriber(port)


@contextlib.asynccontextmanager
async def subscribers(kind: str, port: int, count: int) -> AsyncIterator[list[WsSubscriber | SseSubscriber]]:
    clients = [subscriber(kind, port) for _ in range(count)]
    try:
        for start in range(0, count, 50):  # 50 handshakes at a time
            await asyncio.gather(*(c.open() for c in clients[start : start + 50]))
        yield clients
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


# ---------------------------------------------------------------- workloads


async def _timed(pid: int, work: Callable[[], Awaitable[None]]) -> tuple[float, float]:
    cpu0, wall0 = proc_cpu_seconds(pid), time.perf_counter()
    await work()
    return time.perf_counter() - wall0, proc_cpu_seconds(pid) - cpu0


async def fan_out(kind: str, port: int, pid: int, subs: int, msgs: int, inflight: int = 10) -> dict[str, Any]:
    """S1: ``msgs`` publications to ``subs`` subscribers, ``inflight`` not yet delivered to all."""
    received = [0] * (msgs + 1)
    done_upto = 0
    progress = asyncio.Event()
    order_errors = 0
    last_seen: dict[int, int] = {}

    def handler_for(index: int) -> Handler:
        def on_publication(seq: int, _sent: int) -> None:
            nonlocal done_upto, order_errors
            if seq != last_seen.get(index, 0) + 1:
                order_errors += 1
            last_seen[index] = seq
            received[seq] += 1
            while done_upto < msgs and received[done_upto + 1] == subs:
                done_upto += 1
                progress.set()

        return on_publication

    async with subscribers(kind, port, subs) as clients:
        readers = [asyncio.create_task(c.read(handler_for(i))) for i, c in enumerate(clients)]
        publisher = Publisher(port)
        await publisher.open()

        async def run() -> None:
            for seq in range(1, msgs + 1):
                while seq - done_upto > inflight:
                    progress.clear()
                    await asyncio.wait_for(progress.wait(), 30)
                await publisher.publish(seq)
            while done_upto < msgs:
                progress.clear()
                await asyncio.wait_for(progress.wait(), 30)

        wall, cpu = await _timed(pid, run)
        await publisher.close()
        for task in readers:
            task.cancel()
    deliveries = subs * msgs
    return {
        "deliveries": deliveries,
        "deliveries_per_s": round(deliveries / wall),
        "server_cpu_s": round(cpu, 3),
        "server_cpu_ms_per_1000": round(cpu * 1e6 / deliveries, 2),
        "order_errors": order_errors,
    }


async def steady_rate(
    kind: str, port: int, pid: int, subs: int, rate: float, duration: float
) -> dict[str, Any]:
    """S2: ``rate`` publications/s for ``duration`` s; latency of every delivery."""
    latencies: list[int] = []
    total = int(rate * duration)
    all_in = asyncio.Event()

    def on_publication(_seq: int, sent: int) -> None:
        latencies.append(time.perf_counter_ns() - sent)
        if len(latencies) >= total * subs:
            all_in.set()

    async with subscribers(kind, port, subs) as clients:
        readers = [asyncio.create_task(c.read(on_publication)) for c in clients]
        publisher = Publisher(port)
        await publisher.open()

        async def run() -> None:
            start = time.perf_counter()
            for seq in range(1, total + 1):
                delay = start + seq / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                await publisher.publish(seq)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_in.wait(), 10)  # a lost delivery shows in "received"

        _, cpu = await _timed(pid, run)
        await publisher.close()
        for task in readers:
            task.cancel()
    latencies.sort()

    def pct(p: float) -> float:
        return (
            round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] / 1e6, 2) if latencies else 0.0
        )

    return {
        "expected": total * subs,
        "received": len(latencies),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": round(latencies[-1] / 1e6, 2) if latencies else 0.0,
        "mean_ms": round(statistics.fmean(latencies) / 1e6, 2) if latencies else 0.0,
        "server_cpu_s": round(cpu, 3),
    }


async def idle_memory(kind: str, port: int, pid: int, count: int) -> dict[str, Any]:
    """S4: the server's RSS growth per idle subscribed connection."""
    await asyncio.sleep(0.5)
    before = proc_rss_kib(pid)
    async with subscribers(kind, port, count):
        await asyncio.sleep(1.0)  # let the server settle (writers, buffers)
        after = proc_rss_kib(pid)
    return {
        "connections": count,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "kib_per_connection": round((after - before) / count, 2),
    }


# ---------------------------------------------------------------- the run


def machine() -> dict[str, str]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": model,
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * args.idle + 1000)), hard))
    if hasattr(os, "sched_setaffinity") and pin_argv("1"):
        os.sched_setaffinity(0, {1})
    port = free_port()
    results: dict[str, Any] = {"machine": machine(), "params": vars(args), "S1": {}, "S2": {}, "S4": {}}
    with server(port) as proc:
        for kind in ("ws", "sse"):
            results["S1"][kind] = await fan_out(kind, port, proc.pid, args.subs, args.msgs)
            await asyncio.sleep(0.5)
        for kind in ("ws", "sse"):
            results["S2"][kind] = await steady_rate(kind, port, proc.pid, args.subs, args.rate, args.duration)
            await asyncio.sleep(0.5)
    # S4 on a fresh server per transport, so that one's freed memory does not hide the other's.
    for kind in ("ws", "sse"):
        port = free_port()
        with server(port) as proc:
            results["S4"][kind] = await idle_memory(kind, port, proc.pid, args.idle)
    return results


def table(results: dict[str, Any]) -> str:
    s1, s2, s4 = results["S1"], results["S2"], results["S4"]
    rows = [
        "| workload | WebSocket (/connect) | SSE (/sse) |",
        "|---|---|---|",
        "| S1 deliveries/s (client-bound) | {} | {} |".format(
            s1["ws"]["deliveries_per_s"], s1["sse"]["deliveries_per_s"]
        ),
        "| S1 server CPU ms per 1000 deliveries | {} | {} |".format(
            s1["ws"]["server_cpu_ms_per_1000"], s1["sse"]["server_cpu_ms_per_1000"]
        ),
        "| S1 order errors | {} | {} |".format(s1["ws"]["order_errors"], s1["sse"]["order_errors"]),
        "| S2 received / expected | {}/{} | {}/{} |".format(
            s2["ws"]["received"], s2["ws"]["expected"], s2["sse"]["received"], s2["sse"]["expected"]
        ),
        "| S2 latency p50 / p99 / max (ms) | {} / {} / {} | {} / {} / {} |".format(
            s2["ws"]["p50_ms"],
            s2["ws"]["p99_ms"],
            s2["ws"]["max_ms"],
            s2["sse"]["p50_ms"],
            s2["sse"]["p99_ms"],
            s2["sse"]["max_ms"],
        ),
        "| S2 server CPU s | {} | {} |".format(s2["ws"]["server_cpu_s"], s2["sse"]["server_cpu_s"]),
        "| S4 server KiB per idle connection | {} | {} |".format(
            s4["ws"]["kib_per_connection"], s4["sse"]["kib_per_connection"]
        ),
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sse", description=__doc__.split("\n")[0])
    parser.add_argument("--subs", type=int, default=200, help="subscribers in S1 and S2 (default 200)")
    parser.add_argument("--msgs", type=int, default=200, help="S1 publications (default 200)")
    parser.add_argument("--rate", type=float, default=50.0, help="S2 publications per second (default 50)")
    parser.add_argument("--duration", type=float, default=10.0, help="S2 seconds (default 10)")
    parser.add_argument("--idle", type=int, default=1000, help="S4 idle connections (default 1000)")
    parser.add_argument(
        "--no-fast-path",
        action="store_true",
        help="HERALD_FAST_PATH=0: WebSocket frames and SSE events through the ASGI send chain",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.no_fast_path:
        SERVER_ENV["HERALD_FAST_PATH"] = "0"
    results = asyncio.run(run(args))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(json.dumps(results["machine"]))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
