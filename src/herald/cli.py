"""The ``herald`` command: ``serve``, ``connect``.

``herald serve`` runs the server under uvicorn; every flag also has a
``HERALD_*`` environment variable (flags win).  ``herald connect URL`` is an
interactive WebSocket client like ``wscat -c``: it prints each message that
arrives as ``< text`` and sends each line typed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from . import __version__


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .config import Settings

    overrides = {
        "host": args.host,
        "port": args.port,
        "workers": args.workers,
        "log_level": args.log_level,
        "reload": args.reload or None,
        "broker": args.broker,
    }
    try:
        settings = Settings.load(args.config, **overrides)
    except (ValidationError, OSError, ValueError) as exc:
        print(f"herald: invalid configuration: {exc}", file=sys.stderr)
        return 2
    if settings.workers > 1 and settings.broker == "memory":
        print(
            "herald: --workers > 1 needs a shared broker: with the in-memory broker each worker "
            "would be a separate island (broadcasts and history would not reach clients on other "
            "workers). Use --broker redis://localhost:6379/0.",
            file=sys.stderr,
        )
        return 2
    # Workers are separate processes that build their settings from the environment.
    for name, value in overrides.items():
        if value is not None:
            os.environ[f"HERALD_{name.upper()}"] = str(value)
    if args.config:
        os.environ["HERALD_CONFIG_FILE"] = args.config
    print(
        f"Herald {__version__} on http://{settings.host}:{settings.port} "
        f"(broker: {settings.broker}, workers: {settings.workers})",
        file=sys.stderr,
    )
    uvicorn.run(
        "herald.server:app",
        host=settings.host,
        port=settings.port,
        workers=settings.workers if not settings.reload else None,
        reload=settings.reload,
        log_level=settings.log_level,
        # The protocol enforces its own limits; let uvicorn close oversized frames with 1009 too.
        ws_max_size=settings.max_message_size,
        ws_ping_interval=20.0,
        ws_ping_timeout=20.0,
        timeout_graceful_shutdown=max(int(settings.drain_timeout) + 1, 1),
    )
    return 0


async def _connect(args: argparse.Namespace) -> int:
    import websockets
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    headers: list[tuple[str, str]] = []
    for header in args.header or []:
        name, sep, value = header.partition(":")
        if not sep:
            print(f"herald: --header must look like 'Name: value', got {header!r}", file=sys.stderr)
            return 2
        headers.append((name.strip(), value.strip()))
    options: dict[str, Any] = {"additional_headers": headers, "max_size": None}
    if args.origin:
        options["origin"] = args.origin
    if args.subprotocol:
        options["subprotocols"] = args.subprotocol
    try:
        websocket = await websockets.connect(args.url, open_timeout=args.timeout, **options)
    except InvalidStatus as exc:
        print(
            f"herald: server refused the handshake: HTTP {exc.response.status_code}",
            file=sys.stderr,
        )
        return 1
    except (
        OSError,
        TimeoutError,
        websockets.exceptions.InvalidURI,
        websockets.exceptions.InvalidHandshake,
    ) as exc:
        print(f"herald: cannot connect to {args.url}: {exc}", file=sys.stderr)
        return 1
    out = sys.stdout
    out.write(f"Connected to {args.url} (press Ctrl-D to quit)\n")
    out.flush()

    async def printer() -> None:
        try:
            async for message in websocket:
                text = (
                    message
                    if isinstance(message, str)
                    else f"<binary {len(message)} bytes> {message.hex()}"
                )
                out.write(f"< {text}\n")
                out.flush()
        except ConnectionClosed:
            pass

    async def typist() -> None:
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                await websocket.close()
                return
            try:
                await websocket.send(line.rstrip("\r\n"))
            except ConnectionClosed:
                return

    reading = asyncio.create_task(printer())
    typing = asyncio.create_task(typist())
    await asyncio.wait({reading, typing}, return_when=asyncio.FIRST_COMPLETED)
    if typing.done():
        await asyncio.wait_for(reading, args.timeout)
    code = websocket.close_code
    reason = websocket.close_reason or ""
    out.write(f"Disconnected ({code}{' ' + reason if reason else ''})\n")
    out.flush()
    # The executor thread blocked on stdin would keep us alive.
    os._exit(0 if code in (1000, 1001, None) else 1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="herald", description="Real-time messaging for FastAPI.")
    parser.add_argument("--version", action="version", version=f"herald {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the Herald server")
    serve.add_argument("--host", help="bind address (HERALD_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (HERALD_PORT, default 8000)")
    serve.add_argument(
        "--workers", type=int, help="worker processes (HERALD_WORKERS; >1 needs --broker)"
    )
    serve.add_argument("--reload", action="store_true", help="reload on code changes (development)")
    serve.add_argument(
        "--log-level", choices=["critical", "error", "warning", "info", "debug", "trace"]
    )
    serve.add_argument("--broker", help="memory (default), redis://host:port/db, nats://host:port")
    serve.add_argument("--config", help="TOML file with settings (environment and flags win)")
    serve.set_defaults(func=_serve)

    connect = commands.add_parser("connect", help="interactive WebSocket client, like wscat -c")
    connect.add_argument("url", help="ws:// or wss:// URL")
    connect.add_argument("--origin", help="Origin header to send")
    connect.add_argument(
        "-H", "--header", action="append", help="extra header 'Name: value' (repeatable)"
    )
    connect.add_argument(
        "--subprotocol", action="append", help="subprotocol to request (repeatable)"
    )
    connect.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait for the handshake"
    )
    connect.set_defaults(func=_connect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = args.func(args)
    if asyncio.iscoroutine(result):
        try:
            return int(asyncio.run(result))
        except KeyboardInterrupt:
            return 130
    return int(result)
