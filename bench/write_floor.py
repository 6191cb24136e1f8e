"""The floor under a fan-out: what one ``send()`` of one small frame to each of many
loopback TCP sockets costs the sender, with nothing else around it.

``python -m bench.write_floor`` from the repository root.  Every WebSocket server that
writes each recipient its own frame (Herald, Socket.IO on Node, Node ``ws``) pays at
least this per delivery: the system call, the kernel's TCP send and, on loopback, the
receiving side's TCP processing and wake-up, which run in the sender's context.  Issue
19's S5-big target (fan-out time per recipient at most half of Socket.IO on Node's) is
read against it in docs/benchmarks.md.

The sender (this process, core 0 when there are two) writes a ``--size``-byte frame to
each of ``--sockets`` connections with ``TCP_NODELAY`` (as uvloop sets), one round after
another; a reader process (core 1) drains the other ends with epoll.  The figure is the
sender thread's own CPU time per write (``time.thread_time``), median of the rounds;
the Python loop around the calls adds about 0.1 µs.  ``--transport uvloop`` writes
through uvloop's ``transport.write`` instead of ``socket.send`` (what Herald calls).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import platform
import selectors
import socket
import statistics
import time
from collections.abc import Callable
from typing import Any

from .run import _raise_nofile


def _pin(cpu: int) -> None:
    if (os.cpu_count() or 1) > cpu and hasattr(os, "sched_setaffinity"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {cpu})


def _reader(port: int, sockets: int, frames: int, ready: Any) -> None:
    _raise_nofile()
    _pin(1)
    ends = [socket.create_connection(("127.0.0.1", port)) for _ in range(sockets)]
    selector = selectors.EpollSelector()
    for end in ends:
        end.setblocking(False)
        selector.register(end, selectors.EVENT_READ)
    ready.set()
    received = 0
    deadline = time.monotonic() + 300
    while received < frames and time.monotonic() < deadline:
        for key, _ in selector.select(1):
            with contextlib.suppress(BlockingIOError):
                received += len(key.fileobj.recv(1 << 16))  # type: ignore[union-attr]


def measure(sockets: int, rounds: int, size: int, transport: str = "socket") -> dict[str, Any]:
    """Writes ``rounds`` rounds of one frame per socket; returns the CPU per write."""
    _raise_nofile()
    _pin(0)
    frame = b"\x81" + bytes([size - 2]) + b"x" * (size - 2)  # a WebSocket text frame
    if transport == "uvloop":
        import uvloop

        cpu_us, wall_us = uvloop.run(_through_uvloop(sockets, rounds, frame))
    else:
        cpu_us, wall_us = _through_sockets(sockets, rounds, frame)
    return {
        "transport": transport,
        "sockets": sockets,
        "rounds": rounds,
        "frame_bytes": size,
        "cpu_us_per_write": round(statistics.median(cpu_us), 2),
        "cpu_us_per_write_min": round(min(cpu_us), 2),
        "wall_us_per_write": round(statistics.median(wall_us), 2),
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def _start_reader(port: int, sockets: int, total: int) -> tuple[Any, Any]:
    ready = multiprocessing.Event()
    reader = multiprocessing.Process(target=_reader, args=(port, sockets, total, ready))
    reader.start()
    return reader, ready


def _timed_round(
    writes: list[Callable[[bytes], Any]], frame: bytes, cpu_us: list[float], wall_us: list[float]
) -> None:
    """One round: ``frame`` through each of ``writes``; appends the CPU and wall time per write."""
    cpu, wall = time.thread_time(), time.perf_counter()
    for write in writes:
        write(frame)
    cpu_us.append((time.thread_time() - cpu) / len(writes) * 1e6)
    wall_us.append((time.perf_counter() - wall) / len(writes) * 1e6)


def _through_sockets(sockets: int, rounds: int, frame: bytes) -> tuple[list[float], list[float]]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    reader, ready = _start_reader(listener.getsockname()[1], sockets, sockets * rounds * len(frame))
    conns: list[socket.socket] = []
    cpu_us: list[float] = []
    wall_us: list[float] = []
    try:
        for _ in range(sockets):
            conn, _ = listener.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.setblocking(False)
            conns.append(conn)
        ready.wait(60)
        sends = [conn.send for conn in conns]
        for _ in range(rounds):
            _timed_round(sends, frame, cpu_us, wall_us)
            time.sleep(0.2)  # the reader drains: every round starts with empty buffers
        reader.join(60)
    finally:
        if reader.is_alive():
            reader.kill()
        for conn in conns:
            conn.close()
        listener.close()
    return cpu_us, wall_us


async def _through_uvloop(sockets: int, rounds: int, frame: bytes) -> tuple[list[float], list[float]]:
    loop = asyncio.get_running_loop()
    transports: list[asyncio.WriteTransport] = []
    accepted = asyncio.Event()

    class Sink(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            transports.append(transport)  # type: ignore[arg-type]
            if len(transports) == sockets:
                accepted.set()

    server = await loop.create_server(Sink, "127.0.0.1", 0, backlog=4096)
    port = server.sockets[0].getsockname()[1]
    reader, ready = _start_reader(port, sockets, sockets * rounds * len(frame))
    cpu_us: list[float] = []
    wall_us: list[float] = []
    try:
        await asyncio.wait_for(accepted.wait(), 60)
        await loop.run_in_executor(None, ready.wait, 60)
        writes = [transport.write for transport in transports]
        for _ in range(rounds):
            _timed_round(writes, frame, cpu_us, wall_us)
            await asyncio.sleep(0.2)
        await loop.run_in_executor(None, reader.join, 60)
    finally:
        if reader.is_alive():
            reader.kill()
        for transport in transports:
            transport.close()
        server.close()
    return cpu_us, wall_us


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.write_floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sockets", type=int, default=5000, help="connections written to (S5-big: 5000)")
    parser.add_argument("--rounds", type=int, default=20, help="rounds of one frame per connection")
    parser.add_argument("--size", type=int, default=100, help="frame bytes, 3-127")
    parser.add_argument(
        "--transport", choices=["socket", "uvloop"], default="socket", help="socket.send or uvloop's write"
    )
    args = parser.parse_args(argv)
    if not 3 <= args.size <= 127:
        parser.error("--size must be 3-127 (a WebSocket frame with a one-byte length)")
    result = measure(args.sockets, args.rounds, args.size, args.transport)
    call = "send()" if args.transport == "socket" else "transport.write()"
    print(
        f"{result['sockets']} sockets, {result['frame_bytes']}-byte frames, {result['date']}: "
        f"{result['cpu_us_per_write']} µs of sender CPU per {call} (median of {result['rounds']} rounds; "
        f"min {result['cpu_us_per_write_min']}), {result['wall_us_per_write']} µs wall"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
