"""Server CPU per publish command to a channel nobody joined (issue 19).

``python -m bench.publish_cost`` starts ``herald serve`` (memory broker, history on,
rate limit off, logging at warning), connects one client on ``/connect`` and sends
``publish`` commands to ``chat:nobody``: pipelined in batches (the server's cost per
command) and one at a time (adding a system-call round trip per command).  The
server's CPU time is read from ``/proc/<pid>/stat`` before and after each run.
``--broker redis://HOST:PORT`` runs the server on that broker instead (one at a time,
a publish is then a lone script call: the Redis round trip a paced publisher pays).

``--profile`` runs the server under cProfile instead and prints where a publish
command's time goes (parse and limits, validation, policy, history, reply, metrics);
cProfile roughly doubles the figures, so read it as a split, not a cost.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import pstats
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import websockets

ROOT = Path(__file__).resolve().parent.parent
ENV = {
    "HERALD_RATE_LIMIT": "0",
    "HERALD_DEMOS": "false",
    "HERALD_NAMESPACES": '{"chat": {"history_size": 100}}',
}

#: Functions whose cumulative time makes up the split, in the order of a command's path.
SPLIT = [
    ("parse and limits", "codec.py", "_parse"),
    ("parse and limits", "codec.py", "_check_limits"),
    ("validate (pydantic)", "", "validate_python"),  # a built-in method: no file
    ("policy", "policy.py", "check"),
    ("policy", "policy.py", "check_now"),
    ("history (memory broker)", "memory.py", "publish_now"),
    ("reply", "connection.py", "send"),
    ("metrics (publish latency)", "metrics.py", "observe"),
    # Without hooks a publish is answered without a task (_publish_now); else awaited.
    ("whole command", "commands.py", "_publish_now"),
    ("whole command", "commands.py", "_cmd_publish"),
]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def publish(port: int, count: int, batch: int, start_id: int) -> None:
    async with websockets.connect(f"ws://127.0.0.1:{port}/connect", max_size=None) as ws:
        await ws.send('{"id":1,"type":"connect"}')
        await ws.recv()
        next_id = start_id
        for _ in range(0, count, batch):
            for _ in range(batch):
                command = '{"id":%d,"type":"publish","channel":"chat:nobody","data":{"n":%d}}'
                ws.protocol.send_text((command % (next_id, next_id)).encode())
                next_id += 1
            ws.send_data()
            for _ in range(batch):
                await ws.recv()


def measure(port: int, pid: int, count: int, batch: int) -> tuple[float, float]:
    """(server CPU µs per command, commands per second)."""
    asyncio.run(publish(port, 2000, batch, 2))  # warm up
    before, started = cpu_seconds(pid), time.perf_counter()
    asyncio.run(publish(port, count, batch, 10_000))
    after, ended = cpu_seconds(pid), time.perf_counter()
    return (after - before) / count * 1e6, count / (ended - started)


def serve(port: int, profile_to: str | None = None, broker: str = "memory") -> subprocess.Popen[bytes]:
    env = {**os.environ, **ENV, "HERALD_BROKER": broker}
    args = ["serve", "--port", str(port), "--log-level", "warning"]
    if profile_to is None:
        command = [sys.executable, "-m", "herald", *args]
    else:
        code = (
            "import cProfile, os, signal, sys\n"
            f"sys.argv = ['herald', *{args!r}]\n"
            "from herald.cli import main\n"
            "profile = cProfile.Profile()\n"
            "def stop(*_):\n"
            f"    profile.disable(); profile.dump_stats({profile_to!r}); os._exit(0)\n"
            "signal.signal(signal.SIGUSR1, stop)\n"
            "profile.enable()\n"
            "main()\n"
        )
        command = [sys.executable, "-c", code]
    process = subprocess.Popen(
        command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            asyncio.run(_ping(port))
            return process
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit("herald serve did not start")


async def _ping(port: int) -> None:
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.close()


def split(profile: str) -> list[tuple[str, float]]:
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    calls = 0
    totals: dict[str, float] = {}
    for (filename, _, name), (_, ncalls, _, cumulative, _) in stats.items():
        for label, file_part, function in SPLIT:
            if filename.endswith(file_part) and name == function:
                totals[label] = totals.get(label, 0.0) + cumulative
                if label == "whole command":
                    calls += ncalls
    return [
        (label, totals.get(label, 0.0) / max(calls, 1) * 1e6) for label in dict.fromkeys(s[0] for s in SPLIT)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=40_000)
    parser.add_argument("--profile", action="store_true", help="print the cProfile split instead")
    parser.add_argument("--broker", default="memory", help="memory (default) or a broker URL (redis://...)")
    args = parser.parse_args()
    port = free_port()
    print(
        f"# bench.publish_cost, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"broker {args.broker}"
    )
    if args.profile:
        with tempfile.TemporaryDirectory() as scratch:
            out = str(Path(scratch) / "profile.out")
            server = serve(port, out, args.broker)
            asyncio.run(publish(port, args.count, 200, 2))
            server.send_signal(signal.SIGUSR1)
            server.wait(30)
            for label, micros in split(out):
                print(f"{label:28} {micros:6.1f} µs per command (under cProfile)")
        return
    server = serve(port, broker=args.broker)
    try:
        for batch, label in ((200, "pipelined, 200 per write"), (1, "one at a time")):
            cost, rate = measure(port, server.pid, args.count if batch > 1 else args.count // 4, batch)
            print(f"{label:26} {cost:6.1f} µs server CPU per publish, {rate:8.0f} commands/s")
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
