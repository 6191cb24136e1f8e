"""Python heap per idle connection, by package (tracemalloc).

    python -m bench.heap [--conns 500] [--path /connect] [--asgi]

Runs ``create_app()`` under uvicorn in a thread with Herald's WebSocket protocol
class, opens ``--conns`` idle connections from plain blocking sockets in this
process (``/connect`` ones send ``connect`` and subscribe to one channel), and
prints the heap growth per connection grouped by the package that allocated it.
``--asgi`` keeps Herald's routes on ASGI (``native_routes=False``) for comparison.
The clients' own allocations (this file, ``socket``) are filtered out.
"""

from __future__ import annotations

import argparse
import base64
import gc
import os
import socket
import sys
import threading
import time
import tracemalloc
from collections import defaultdict

import uvicorn

from herald.config import Settings
from herald.server import create_app
from herald.transports.uvicorn import HeraldWebSocketProtocol


def masked_text(text: str) -> bytes:
    payload = text.encode()
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert len(payload) < 126
    return bytes((0x81, 0x80 | len(payload))) + mask + body


def open_client(port: int, path: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(4096)
    if path == "/connect":
        sock.sendall(masked_text('{"id":1,"type":"connect"}'))
        sock.sendall(masked_text('{"id":2,"type":"subscribe","channels":[{"channel":"bench:heap"}]}'))
        while b'"id":2' not in received:
            received += sock.recv(4096)
    return sock


def package_of(filename: str) -> str:
    if "site-packages/" in filename:
        return filename.split("site-packages/", 1)[1].split("/", 1)[0]
    if "/herald/" in filename:
        return "herald"
    return os.path.splitext(os.path.basename(filename))[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.heap", description=__doc__.split("\n")[0])
    parser.add_argument("--conns", type=int, default=500)
    parser.add_argument("--path", default="/connect", choices=["/connect", "/ws_broadcast", "/ws"])
    parser.add_argument("--asgi", action="store_true", help="serve Herald's routes through ASGI")
    parser.add_argument(
        "--lines", type=int, default=0, help="also print the N source lines that allocated most"
    )
    args = parser.parse_args(argv)

    app = create_app(Settings(demos=False, metrics=False, admin=False, native_routes=not args.asgi))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(app, port=port, log_level="warning", ws=HeraldWebSocketProtocol, lifespan="on")
    server = uvicorn.Server(config)
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)

    # Warm up: first connections build caches (route tables, pydantic, the learned path).
    warm = [open_client(port, args.path) for _ in range(20)]
    tracemalloc.start(1)
    time.sleep(0.5)
    gc.collect()
    before = tracemalloc.take_snapshot()
    clients = [open_client(port, args.path) for _ in range(args.conns)]
    time.sleep(1.0)  # let handshake garbage go
    gc.collect()
    after = tracemalloc.take_snapshot()
    ignore = [tracemalloc.Filter(False, __file__), tracemalloc.Filter(False, socket.__file__)]
    stats = after.filter_traces(ignore).compare_to(before.filter_traces(ignore), "filename")
    by_package: dict[str, int] = defaultdict(int)
    for stat in stats:
        by_package[package_of(stat.traceback[0].filename)] += stat.size_diff
    total = sum(by_package.values())
    route = "ASGI" if args.asgi else "native"
    print(f"{args.path} ({route}), {args.conns} idle connections: {total / args.conns:.0f} B per connection")
    for package, size in sorted(by_package.items(), key=lambda item: -item[1]):
        if abs(size) / args.conns >= 50:
            print(f"  {size / args.conns:8.0f}  {package}")
    if args.lines:
        by_line = after.filter_traces(ignore).compare_to(before.filter_traces(ignore), "lineno")
        for stat in by_line[: args.lines]:
            frame = stat.traceback[0]
            where = f"{package_of(frame.filename)}/{os.path.basename(frame.filename)}:{frame.lineno}"
            print(
                f"  {stat.size_diff / args.conns:8.0f} B {stat.count_diff / args.conns:5.2f} blocks  {where}"
            )
    for sock in clients + warm:
        sock.close()
    server.should_exit = True
    return 0


if __name__ == "__main__":
    sys.exit(main())
