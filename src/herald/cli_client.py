"""The client side of the ``herald`` command: ``connect``, ``publish``, ``presence``, ``history``.

* ``herald connect URL`` is a raw WebSocket client like ``wscat -c``: each
  message that arrives is printed as ``< text`` and each line typed is sent.
* ``herald connect URL --channel chat:lobby`` speaks protocol v1 through
  :class:`herald.client.Client` (reconnect and recovery included): it prints
  publications, joins and leaves, and publishes each typed line to the first
  channel (as JSON when the line parses, else as a JSON string);
  ``--transport http_stream`` speaks it over HTTP (bidirectional emulation).
* ``herald publish`` / ``presence`` / ``history`` call the HTTP API
  (``--url``, default ``$HERALD_URL`` or ``http://127.0.0.1:8000``; the key
  from ``--api-key`` or ``$HERALD_API_KEY``).

Output is human-readable, or one JSON object per line with ``--json``.  Errors
are one line on stderr (``herald: ...``) and a non-zero exit status: 1 for a
failure, 2 for bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import inspect
import json
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

from .exceptions import ClientClosedError, ClientError, ReplyError

DEFAULT_URL = "http://127.0.0.1:8000"


class CliError(Exception):
    """A failure reported as one line on stderr; ``status`` is the exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def _fail(message: str) -> None:
    print(f"herald: {message}", file=sys.stderr, flush=True)


def _emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _parse_data(text: str) -> Any:
    """A typed line or DATA argument: JSON when it parses, else the text as a JSON string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _stdin_lines() -> asyncio.Queue[str | None]:
    """Lines typed on stdin, ``None`` at EOF.

    Read with ``os.read`` in a daemon thread: unlike ``sys.stdin`` it holds no
    Python I/O lock while blocked, so the process can exit while it waits.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    def put(item: str | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: we are exiting
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def pump() -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""
        try:
            while True:
                chunk = os.read(0, 65536)
                if not chunk:
                    break
                pending += decoder.decode(chunk)
                *lines, pending = pending.split("\n")
                for line in lines:
                    put(line.rstrip("\r"))
            pending += decoder.decode(b"", final=True)
            if pending:
                put(pending.rstrip("\r"))
        except OSError:
            pass
        put(None)

    threading.Thread(target=pump, name="herald-stdin", daemon=True).start()
    return queue


def _headers(args: argparse.Namespace) -> dict[str, str]:
    headers: dict[str, str] = {}
    for header in args.header or []:
        name, sep, value = header.partition(":")
        if not sep or not name.strip():
            raise CliError(f"--header must look like 'Name: value', got {header!r}", 2)
        headers[name.strip()] = value.strip()
    return headers


# ---------------------------------------------------------------- connect (raw)


async def _connect_raw(args: argparse.Namespace) -> int:
    import websockets
    from websockets.exceptions import ConnectionClosed, InvalidStatus
    from websockets.typing import Origin, Subprotocol

    options: dict[str, Any] = {"additional_headers": _headers(args), "max_size": None}
    if args.origin:
        options["origin"] = Origin(args.origin)
    if args.subprotocol:
        options["subprotocols"] = [Subprotocol(p) for p in args.subprotocol]
    try:
        websocket = await websockets.connect(args.url, open_timeout=args.timeout, **options)
    except InvalidStatus as exc:
        raise CliError(f"server refused the handshake: HTTP {exc.response.status_code}") from None
    except (
        OSError,
        TimeoutError,
        websockets.exceptions.InvalidURI,
        websockets.exceptions.InvalidHandshake,
    ) as exc:
        raise CliError(f"cannot connect to {args.url}: {exc or type(exc).__name__}") from None
    _emit(f"Connected to {args.url} (press Ctrl-D to quit)")

    received = 0

    async def printer() -> None:
        nonlocal received
        try:
            async for message in websocket:
                received += 1
                text = (
                    message if isinstance(message, str) else f"<binary {len(message)} bytes> {message.hex()}"
                )
                _emit(f"< {text}")
        except ConnectionClosed:
            pass

    async def typist() -> None:
        lines = _stdin_lines()
        while True:
            line = await lines.get()
            if line is None:
                # Piped input ends at once: give replies to the last lines a moment to arrive.
                await _quiet(lambda: received, 0.3, args.timeout)
                await websocket.close()
                return
            try:
                await websocket.send(line)
            except ConnectionClosed:
                return

    reading = asyncio.create_task(printer())
    typing = asyncio.create_task(typist())
    await asyncio.wait({reading, typing}, return_when=asyncio.FIRST_COMPLETED)
    if typing.done():
        try:
            await asyncio.wait_for(reading, args.timeout)
        except TimeoutError:
            reading.cancel()
    else:
        typing.cancel()
    code = websocket.close_code
    reason = websocket.close_reason or ""
    _emit(f"Disconnected ({code}{' ' + reason if reason else ''})")
    return 0 if code in (1000, 1001, None) else 1


async def _quiet(count: Callable[[], int], silence: float, limit: float) -> None:
    """Wait until ``count()`` stays the same for ``silence`` seconds (at most ``limit``)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    seen = -1
    while loop.time() < deadline:
        now = count()
        if now == seen:
            return
        seen = now
        await asyncio.sleep(silence)


# ---------------------------------------------------------------- connect (protocol v1)


async def _connect_protocol(args: argparse.Namespace) -> int:
    from .client import (
        Client,
        ClientPublication,
        ConnectedEvent,
        DisconnectedEvent,
        JoinEvent,
        LeaveEvent,
        RecoveredEvent,
        RecoveryFailedEvent,
        SubscribeErrorEvent,
    )

    as_json: bool = args.json

    def show(kind: str, human: str, **fields: Any) -> None:
        _emit(_compact({"type": kind, **fields}) if as_json else human)

    def who(info: Any) -> str:
        if info is None:
            return "server"
        return str(info.user or info.client)

    def info_dict(info: Any) -> Any:
        return None if info is None else {"client": info.client, "user": info.user, "info": info.info}

    client = Client(
        args.url,
        token=args.token,
        name=args.name or "herald-cli",
        origin=args.origin,
        headers=_headers(args),
        timeout=args.timeout,
        backoff_min=0.5,
        backoff_max=10.0,
        transport=args.transport,
    )

    def on_connected(event: ConnectedEvent) -> None:
        show(
            "connected",
            f"* connected to {args.url} as client {event.client}"
            + (f" (user {event.user})" if event.user else ""),
            client=event.client,
            user=event.user,
            reconnect=event.reconnect,
        )

    def on_disconnected(event: DisconnectedEvent) -> None:
        if client.state.value == "closed" and event.code == 1000:
            return
        show(
            "disconnected",
            f"* disconnected ({event.code}{' ' + event.reason if event.reason else ''})"
            + (", reconnecting..." if event.reconnect else ""),
            code=event.code,
            reason=event.reason,
            reconnect=event.reconnect,
        )

    def on_publication(pub: ClientPublication) -> None:
        show(
            "publication",
            f"[{pub.channel}] #{pub.offset} {who(pub.info)}: {_compact(pub.data)}",
            channel=pub.channel,
            offset=pub.offset,
            epoch=pub.epoch,
            data=pub.data,
            info=info_dict(pub.info),
        )

    def presence_printer(kind: str, mark: str, verb: str) -> Callable[[JoinEvent | LeaveEvent], None]:
        def on_event(event: JoinEvent | LeaveEvent) -> None:
            user = event.info.user or "anonymous"
            show(
                kind,
                f"[{event.channel}] {mark} {user} {verb} ({event.info.client})",
                channel=event.channel,
                info=info_dict(event.info),
            )

        return on_event

    on_join = presence_printer("join", "+", "joined")
    on_leave = presence_printer("leave", "-", "left")

    def on_recovered(event: RecoveredEvent) -> None:
        show(
            "recovered",
            f"* {event.channel}: recovered, {event.missed} missed publication(s) replayed",
            channel=event.channel,
            missed=event.missed,
        )

    def on_recovery_failed(event: RecoveryFailedEvent) -> None:
        # The reply carries the stream's current position: compare it with the one asked for.
        asked, top = event.previous, event.position
        if event.epoch_changed:
            reason, why = "epoch_changed", "the stream was reset"
        elif asked.offset > top.offset:
            reason = "ahead_of_stream"
            why = (
                f"offset {asked.offset} is ahead of the stream, which is at offset {top.offset}: "
                "nothing was published there yet; check the offset given to --since"
            )
        else:
            reason, why = "history_gap", "history no longer covers the gap"
        show(
            "recovery_failed",
            f"* {event.channel}: could not recover missed publications ({why})",
            channel=event.channel,
            offset=top.offset,
            epoch=top.epoch,
            reason=reason,
        )

    def on_subscribe_error(event: SubscribeErrorEvent) -> None:
        _fail(f"resubscribing to {event.channel} failed: {event.error}")

    client.on("connected", on_connected)
    client.on("disconnected", on_disconnected)
    client.on("join", on_join)
    client.on("leave", on_leave)
    client.on("recovered", on_recovered)
    client.on("recovery_failed", on_recovery_failed)
    client.on("subscribe_error", on_subscribe_error)
    try:
        await client.connect()
    except ReplyError as exc:
        raise CliError(f"server refused the connection: {exc}") from None
    except ClientError as exc:
        raise CliError(str(exc)) from None
    try:
        since = _parse_since(args.since) if args.since else None
        for index, channel in enumerate(args.channel):
            try:
                sub = await client.subscribe(
                    channel, on_publication=on_publication, since=since if index == 0 else None
                )
            except ReplyError as exc:
                raise CliError(f"cannot subscribe to {channel}: {exc.message} ({exc.code})") from None
            position = sub.position
            show(
                "subscribed",
                f"* subscribed to {channel}"
                + (f" (offset {position.offset}, epoch {position.epoch})" if position else ""),
                channel=channel,
                offset=position.offset if position else None,
                epoch=position.epoch if position else None,
            )
        target = args.channel[0]
        lines = _stdin_lines()
        closed = asyncio.ensure_future(_client_closed(client))
        while True:
            getting = asyncio.ensure_future(lines.get())
            await asyncio.wait({getting, closed}, return_when=asyncio.FIRST_COMPLETED)
            if not getting.done():
                getting.cancel()
                error = closed.result()
                raise CliError(f"connection closed by the server: {error.code} {error.reason}".strip())
            line = getting.result()
            if line is None:
                closed.cancel()
                return 0
            if not line.strip():
                continue
            try:
                published = await client.publish(target, _parse_data(line))
            except ReplyError as exc:
                _fail(f"publish to {target} failed: {exc.message} ({exc.code})")
            except ClientError as exc:
                _fail(f"publish to {target} failed: {exc}")
            else:
                if as_json:
                    show("published", "", channel=target, offset=published.offset, epoch=published.epoch)
    finally:
        await client.close()


def _parse_since(text: str) -> tuple[int, str]:
    """``OFFSET:EPOCH`` (as printed by ``* subscribed to ... (offset N, epoch E)``)."""
    offset, sep, epoch = text.partition(":")
    if not sep or not offset.isdigit() or not epoch:
        raise CliError(f"--since must look like OFFSET:EPOCH (e.g. 12:77e0aa12), got {text!r}", 2)
    return int(offset), epoch


async def _client_closed(client: Any) -> ClientClosedError:
    """Wait until ``client`` stopped for good; returns why."""
    while True:
        try:
            await client.wait_for("disconnected", timeout=3600, predicate=lambda e: not e.reconnect)
        except ClientClosedError as exc:
            return exc
        except ClientError:
            continue
        # The event fires just before the client finishes; let it settle.
        await asyncio.sleep(0)
        return ClientClosedError(client.close_code or 1006, client.close_reason)


async def _connect(args: argparse.Namespace) -> int:
    if args.channel:
        return await _connect_protocol(args)
    if args.transport != "websocket":
        raise CliError(f"--transport {args.transport} needs protocol mode (--channel)", 2)
    return await _connect_raw(args)


# ---------------------------------------------------------------- HTTP API commands


def _api(
    args: argparse.Namespace,
    method: str,
    path: str,
    *,
    params: dict[str, Any] | None = None,
    body: Any = None,
) -> Any:
    import httpx

    base = (args.url or os.environ.get("HERALD_URL") or DEFAULT_URL).rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise CliError(f"--url must start with http:// or https://, got {base!r}", 2)
    key = args.api_key or os.environ.get("HERALD_API_KEY")
    headers = {"X-API-Key": key} if key else {}
    url = f"{base}/api{path}"
    try:
        response = httpx.request(method, url, params=params, json=body, headers=headers, timeout=args.timeout)
    except httpx.ConnectError as exc:
        reason = str(exc) or "connection failed"
        if "refused" in reason.lower():
            reason = "connection refused"
        raise CliError(f"cannot reach {base}: {reason}") from None
    except httpx.TimeoutException:
        raise CliError(f"{base} did not answer within {args.timeout:g}s") from None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise CliError(f"request to {url} failed: {exc}") from None
    if response.status_code == 404 and not _is_api_error(response):
        # Herald's API answers its own 404s with a {message, code} detail; anything else
        # means no HTTP API is mounted at this URL.
        raise CliError(
            f"no Herald HTTP API at {base}/api ({url} answered HTTP 404): the app does not mount "
            "Herald's api_router there; pass --url (or set HERALD_URL) with the base URL the "
            "app mounts it under, e.g. --url http://host:8000/prefix for /prefix/api"
        )
    if response.status_code >= 400:
        detail: Any
        try:
            detail = response.json().get("detail", response.text)
        except (ValueError, AttributeError):
            detail = response.text.strip() or response.reason_phrase
        if isinstance(detail, dict):
            detail = f"{detail.get('message', detail)} (code {detail.get('code', '?')})"
        elif isinstance(detail, list) and detail:
            first = detail[0]
            where = ".".join(str(p) for p in first.get("loc", [])[1:]) if isinstance(first, dict) else ""
            message = first.get("msg", first) if isinstance(first, dict) else first
            detail = f"{where}: {message}" if where else str(message)
        message = f"{detail} (HTTP {response.status_code})"
        if response.status_code in (401, 403):
            message += "; pass --api-key or set HERALD_API_KEY"
        raise CliError(message)
    try:
        return response.json()
    except ValueError:
        raise CliError(f"{url} answered with something that is not JSON") from None


def _is_api_error(response: Any) -> bool:
    """Whether an error response comes from Herald's HTTP API (a ``{"detail": {"message",
    "code"}}`` body), not from an app that has no such route."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        return False
    return isinstance(detail, dict) and "code" in detail


def _publish(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.data == "-" else args.data
    data = text if args.string else _parse_data(text)
    body: dict[str, Any] = {"channel": args.channel, "data": data}
    if args.idempotency_key is not None:
        body["idempotency_key"] = args.idempotency_key
    result = _api(args, "POST", "/publish", body=body)
    if args.json:
        _emit(_compact({"channel": args.channel, **result}))
    else:
        _emit(f"published to {args.channel} at offset {result['offset']} (epoch {result['epoch']})")
    return 0


def _presence(args: argparse.Namespace) -> int:
    if args.stats:
        stats = _api(args, "GET", "/presence_stats", params={"channel": args.channel})
        if args.json:
            _emit(_compact({"channel": args.channel, **stats}))
        else:
            _emit(f"{args.channel}: {stats['num_clients']} client(s), {stats['num_users']} user(s)")
        return 0
    clients: dict[str, Any] = _api(args, "GET", "/presence", params={"channel": args.channel})["clients"]
    if args.json:
        for client_id, info in clients.items():
            _emit(_compact({"channel": args.channel, **info, "client": client_id}))
        return 0
    _emit(f"{args.channel}: {len(clients)} client(s)")
    for client_id, info in clients.items():
        user = info.get("user") or "(anonymous)"
        extra = f"  {_compact(info['info'])}" if info.get("info") is not None else ""
        _emit(f"  {client_id}  {user}{extra}")
    return 0


def _history(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"channel": args.channel}
    if args.limit is not None:
        params["limit"] = args.limit
    if args.since_offset is not None:
        params["since_offset"] = args.since_offset
        if args.since_epoch:
            params["since_epoch"] = args.since_epoch
    elif args.since_epoch:
        raise CliError("--since-epoch needs --since-offset", 2)
    if args.reverse:
        params["reverse"] = "true"
    result = _api(args, "GET", "/history", params=params)
    epoch = result["epoch"]
    for pub in result["publications"]:
        if args.json:
            _emit(_compact({"channel": args.channel, "epoch": epoch, **pub}))
        else:
            info = pub.get("info") or {}
            who = info.get("user") or info.get("client") or "server"
            _emit(f"#{pub['offset']}  {who}  {_compact(pub['data'])}")
    if not args.json:
        count = len(result["publications"])
        _emit(f"({count} publication(s); stream at offset {result['offset']}, epoch {epoch})")
    return 0


# ---------------------------------------------------------------- wiring


def _guarded(func: Callable[[argparse.Namespace], Any]) -> Callable[[argparse.Namespace], Any]:
    """Turn :class:`CliError` into one line on stderr and an exit status."""

    if inspect.iscoroutinefunction(func):

        async def run_async(args: argparse.Namespace) -> int:
            try:
                return int(await func(args))
            except CliError as exc:
                _fail(str(exc))
                return exc.status

        return run_async

    def run(args: argparse.Namespace) -> int:
        try:
            return int(func(args))
        except CliError as exc:
            _fail(str(exc))
            return exc.status

    return run


def _http_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help=f"server base URL (HERALD_URL, default {DEFAULT_URL})", default=None)
    parser.add_argument("--api-key", help="API key (HERALD_API_KEY)", default=None)
    parser.add_argument("--json", action="store_true", help="print JSON lines")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the server")


def add_client_commands(commands: Any) -> None:
    """Register ``connect``, ``publish``, ``presence`` and ``history`` on ``commands``."""
    connect = commands.add_parser(
        "connect",
        help="interactive WebSocket client (raw like wscat -c, or protocol v1 with --channel)",
        description="Without --channel: a raw WebSocket client like wscat -c (prints '< text' "
        "for each message, sends each line typed). With --channel: speaks protocol v1 on "
        "URL (e.g. ws://127.0.0.1:8000/connect), prints publications, joins and leaves, and "
        "publishes each typed line to the first channel (JSON if it parses, else a string). "
        "Ctrl-D quits.",
    )
    connect.add_argument(
        "url", help="ws:// or wss:// URL (with --transport http_stream also http:// or https://)"
    )
    connect.add_argument(
        "-c",
        "--channel",
        action="append",
        help="protocol mode: subscribe to this channel (repeatable)",
    )
    connect.add_argument(
        "--since",
        metavar="OFFSET:EPOCH",
        help="protocol mode: resume the first channel after this position (prints what was missed)",
    )
    connect.add_argument("--token", help="protocol mode: connection token (JWT)")
    connect.add_argument(
        "--name",
        help="protocol mode: client name sent in connect (herald serve shows it in presence "
        "as info.name; default herald-cli)",
    )
    connect.add_argument("--json", action="store_true", help="protocol mode: print JSON lines")
    connect.add_argument("--origin", help="Origin header to send")
    connect.add_argument("-H", "--header", action="append", help="extra header 'Name: value' (repeatable)")
    connect.add_argument(
        "--subprotocol", action="append", help="raw mode: subprotocol to request (repeatable)"
    )
    connect.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the server")
    connect.add_argument(
        "--transport",
        choices=("websocket", "http_stream"),
        default="websocket",
        help="protocol mode: websocket (default), or http_stream: the same protocol over HTTP "
        "streaming and POST (bidirectional emulation), for networks that block WebSocket",
    )
    connect.set_defaults(func=_guarded(_connect))

    publish = commands.add_parser(
        "publish",
        help="publish to a channel over the HTTP API",
        description="DATA is sent as JSON when it parses ('{\"a\": 1}', '42', 'true'), else as "
        "a JSON string; '-' reads it from stdin.",
    )
    publish.add_argument("channel", help="channel to publish to, e.g. chat:lobby")
    publish.add_argument("data", help="JSON value or text to publish; '-' reads it from stdin")
    publish.add_argument("--string", action="store_true", help="send DATA as a string, unparsed")
    publish.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help="make the publish safe to retry: the same KEY on the same channel within the "
        "server's idempotency_window publishes once and answers the original offset",
    )
    _http_options(publish)
    publish.set_defaults(func=_guarded(_publish))

    presence = commands.add_parser("presence", help="who is subscribed to a channel")
    presence.add_argument("channel", help="channel to list, e.g. chat:lobby")
    presence.add_argument("--stats", action="store_true", help="counts only")
    _http_options(presence)
    presence.set_defaults(func=_guarded(_presence))

    history = commands.add_parser("history", help="a channel's history")
    history.add_argument("channel", help="channel to read, e.g. chat:lobby")
    history.add_argument("--limit", type=int, help="at most N publications")
    history.add_argument("--since-offset", type=int, help="only publications after this offset")
    history.add_argument("--since-epoch", help="the epoch --since-offset belongs to")
    history.add_argument("--reverse", action="store_true", help="newest first")
    _http_options(history)
    history.set_defaults(func=_guarded(_history))


__all__ = ["CliError", "add_client_commands"]
