"""``GET /sse`` and ``GET /stream``: Herald's channels over plain HTTP, one way.

A browser's ``EventSource`` (``/sse``, Server-Sent Events) or ``curl -N`` (either
route; ``/stream`` writes newline-delimited JSON) subscribes to channels and receives
their publications, with nothing weaker than ``/connect``:

* **Admission** is the WebSocket routes' own (:func:`herald.admission.stream_refusal`:
  ``Host``, ``Origin``, the per-IP limit, counted across the cluster on a Redis broker),
  then the client's token (``Authorization: Bearer``, the ``token`` query parameter, or
  the ``herald_token`` cookie) goes through the same
  ``connect`` code as a ``/connect`` client (authentication, ``on_connect`` hooks, the
  per-user limit), and every channel through the same ``subscribe`` code
  (:class:`~herald.policy.ChannelPolicy`, ``on_subscribe`` hooks, ``max_subscriptions``,
  recovery bounded by the reply budget).  A refusal is an HTTP error with a JSON body
  ``{"error": {"code": <Herald error code>, "message": ...}}`` (:func:`http_status`).
* **The stream** is a :class:`~herald.connection.Connection` over an
  :class:`~herald.transports.sse.HttpStreamTransport`: same queue bound, a client that
  does not read is cut with 4001 (a ``disconnect`` event, then the end of the
  response), and it is counted under the route labels ``sse`` and ``http_stream``.
* **Ids and resumption.**  Every publication event carries an ``id`` that names the
  position (offset and epoch) of *every* channel of the stream (:class:`StreamPositions`).
  A browser that reconnects by itself sends it back as ``Last-Event-ID``; Herald then
  subscribes each channel with ``since`` = its position, exactly like a ``subscribe``
  with ``since`` on ``/connect``, and says in a ``recovery`` event which channels were
  recovered.  docs/transports.md is the reference.

Encoding: the hub renders a publication once per renderer; the stream renderer
(:func:`render_stream_publication`) is shared by every stream of the node, and the
bytes around the id are cached per frame (:class:`SharedFrames`), so a stream only
formats its own id suffix per publication.  Under Herald's own HTTP protocol (``herald
serve``) with ``fast_path`` on, events are written straight to the socket, batched per
loop turn (:meth:`~herald.transports.sse.HttpStreamTransport.write_directly`).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
import zlib
from collections.abc import MutableMapping, Sequence
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import parse_qsl

import orjson
from pydantic import ValidationError

from .admission import release_ip, stream_refusal
from .brokers.base import Publication
from .codes import CloseCode, ErrorCode
from .commands import CommandHandler
from .connection import Connection, new_client_id
from .context import AsgiHandshake
from .exceptions import BrokerError, CommandError, DisconnectError
from .node import Node
from .policy import reply_byte_budget
from .protocol import messages as m
from .protocol.encoders import encode_publication
from .protocol.messages import MAX_ID
from .transports.sse import (
    STREAM_HEADERS,
    ASGIReceive,
    ASGISend,
    HttpStreamTransport,
    NdjsonFraming,
    SseFraming,
    is_head,
    uvicorn_cycle,
)
from .transports.uvicorn import abort_for
from .transports.uvicorn_protocol import HeaderTimeoutHTTPProtocol

logger = logging.getLogger("herald.sse")

#: The cookie a stream's token may come in (after ``Authorization`` and ``?token=``).
TOKEN_COOKIE = "herald_token"

#: The reconnection delay a browser is told (SSE ``retry:``), in milliseconds.
RETRY_MS = 1000

#: The longest ``Last-Event-ID`` read; a longer one is treated as garbled.
MAX_EVENT_ID_LENGTH = 8192

#: Route name -> (path, framing, metrics ``route`` label): what ``Herald.router`` serves.
STREAM_ROUTES: dict[str, tuple[str, str, str]] = {
    "herald_sse": ("/sse", "sse", "sse"),
    "herald_stream": ("/stream", "ndjson", "http_stream"),
}

#: Frames of the stream renderer start with this mark, then ``channel``, ``epoch`` and
#: ``offset`` separated by :data:`_SEP`, then the mark again and the publication's JSON.
_MARK = "\x1e"
_SEP = "\x1f"
_SUBSCRIBED_PREFIX = '{"type":"subscribed"'


# ---------------------------------------------------------------- errors


class StreamRefused(Exception):
    """A stream refused before it started: answered with an HTTP error."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, int(code), message


#: Herald error code -> HTTP status of a refused stream.
_STATUS: dict[int, int] = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.INVALID_CHANNEL: 400,
    ErrorCode.UNKNOWN_NAMESPACE: 404,
    ErrorCode.ALREADY_SUBSCRIBED: 400,
    ErrorCode.PERMISSION_DENIED: 403,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.TOKEN_EXPIRED: 401,
    ErrorCode.LIMIT_EXCEEDED: 429,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.NOT_AVAILABLE: 400,
    ErrorCode.BROKER_UNAVAILABLE: 503,
    CloseCode.CONNECTION_LIMIT: 429,
    CloseCode.SERVICE_RESTART: 503,
}


def http_status(code: int) -> int:
    """The HTTP status a stream refused with Herald error (or close) ``code`` answers:
    401 bad or expired token, 403 not allowed, 404 unknown namespace, 400 bad request,
    429 a limit, 503 unavailable; anything else 403."""
    return _STATUS.get(int(code), 403)


async def respond_error(send: ASGISend, status: int, code: int, message: str) -> None:
    """An HTTP error with the documented body ``{"error": {"code", "message"}}``."""
    body = orjson.dumps({"error": {"code": int(code), "message": message}})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 405:
        headers.append((b"allow", b"GET"))
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="herald"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


# ---------------------------------------------------------------- event ids


def epoch_digest(epoch: str) -> str:
    """8 characters (base64url) that stand for ``epoch`` in an event id: recovery only
    asks whether the stream is still the same, and a digest keeps the id short."""
    digest = hashlib.blake2b(epoch.encode(), digest_size=6).digest()
    return base64.urlsafe_b64encode(digest).decode()


def channels_tag(channels: Sequence[str]) -> str:
    """8 hex digits naming a stream's channel list (an id of another list is not ours)."""
    return f"{zlib.crc32(chr(10).join(channels).encode()):08x}"


_DIGEST = re.compile(r"[A-Za-z0-9_-]{8}")
_ENTRY = re.compile(r"(\d{1,16})(?::(\d{1,4}))?")


class StreamPositions:
    """The position (offset, epoch) of every channel of one stream, as an event id.

    The id is ``1.<tag>.<digests>.<entries>``:

    * ``tag``: :func:`channels_tag` of the stream's channels, in the stream's order;
    * ``digests``: the distinct epochs of the channels, as :func:`epoch_digest`,
      joined with ``~`` (usually one: a broker's channels share an epoch format);
    * ``entries``: one per channel, in the stream's order, joined with ``,``: the
      offset, then ``:k`` when its epoch is the ``k``-th digest (not the first).

    Its length is bounded: at most 11 characters plus 31 per channel, and a stream has at
    most ``max_subscriptions`` channels.  Formatting an id costs one join of the
    entries, rebuilt only when a channel's epoch changes.
    """

    __slots__ = ("_digests", "_entries", "_epochs", "_id", "_index", "_offsets", "channels", "tag")

    def __init__(self, channels: Sequence[str]) -> None:
        self.channels = list(channels)
        self.tag = channels_tag(self.channels)
        self._index = {channel: i for i, channel in enumerate(self.channels)}
        self._offsets = [0] * len(self.channels)
        self._epochs = [""] * len(self.channels)
        self._digests: list[str] = []  # the distinct epochs' digests, in first-use order
        self._entries: list[str] = ["0"] * len(self.channels)
        self._id: str | None = None

    def position(self, channel: str) -> tuple[int, str]:
        i = self._index[channel]
        return self._offsets[i], self._epochs[i]

    def update(self, channel: str, offset: int, epoch: str) -> None:
        """``channel`` is now at ``offset`` of ``epoch`` (a channel not in the stream is ignored)."""
        i = self._index.get(channel)
        if i is None:
            return
        self._offsets[i] = offset
        self._id = None
        if epoch == self._epochs[i]:
            entry = self._entries[i]
            cut = entry.find(":")
            self._entries[i] = str(offset) if cut < 0 else f"{offset}{entry[cut:]}"
            return
        self._epochs[i] = epoch
        self._rebuild()

    def _rebuild(self) -> None:
        digests: list[str] = []
        entries: list[str] = []
        for offset, epoch in zip(self._offsets, self._epochs, strict=True):
            digest = epoch_digest(epoch)
            if digest not in digests:
                digests.append(digest)
            k = digests.index(digest)
            entries.append(str(offset) if k == 0 else f"{offset}:{k}")
        self._digests, self._entries = digests, entries

    def event_id(self) -> str:
        event_id = self._id
        if event_id is None:
            event_id = self._id = f"1.{self.tag}.{'~'.join(self._digests)}.{','.join(self._entries)}"
        return event_id

    @staticmethod
    def parse(text: str, channels: Sequence[str]) -> dict[str, tuple[int, str]] | None:
        """The positions (offset, epoch digest) an id names for ``channels``; None when
        ``text`` is not an id of a stream of exactly these channels (garbled, too long,
        another version or channel list)."""
        if len(text) > MAX_EVENT_ID_LENGTH:
            return None
        parts = text.split(".")
        if len(parts) != 4 or parts[0] != "1" or parts[1] != channels_tag(channels):
            return None
        digests = parts[2].split("~")
        if not all(_DIGEST.fullmatch(d) for d in digests):
            return None
        entries = parts[3].split(",")
        if len(entries) != len(channels):
            return None
        positions: dict[str, tuple[int, str]] = {}
        for channel, entry in zip(channels, entries, strict=True):
            match = _ENTRY.fullmatch(entry)
            if match is None:
                return None
            offset, k = int(match[1]), int(match[2] or 0)
            if offset > MAX_ID or k >= len(digests):
                return None
            positions[channel] = (offset, digests[k])
        return positions


# ---------------------------------------------------------------- rendering


def render_stream_publication(publication: Publication) -> str:
    """The frame a stream's connection receives for ``publication`` (the hub renders it
    once per node and shares it): a small header with its position, then the
    protocol's ``publication`` push."""
    body = encode_publication(
        publication.channel, publication.offset, publication.epoch, publication.data, publication.info
    )
    return stream_frame(publication.channel, publication.offset, publication.epoch, body)


def stream_frame(channel: str, offset: int, epoch: str, body: str) -> str:
    """A stream publication frame: position header, then the push's JSON ``body``."""
    return f"{_MARK}{channel}{_SEP}{epoch}{_SEP}{offset}{_MARK}{body}"


def _split_frame(frame: str) -> tuple[str, str, int, str]:
    end = frame.index(_MARK + "{", 1)
    head = frame[1:end]
    channel, _, rest = head.partition(_SEP)
    epoch, _, offset = rest.rpartition(_SEP)
    return channel, epoch, int(offset), frame[end + 1 :]


class SharedFrames:
    """The bytes of a publication frame around its per-stream id, made once per frame.

    Fan-out hands the same frame (one str object) to every stream; each stream's writer
    encodes it later, so a small cache by frame (the str's hash is cached on the object,
    and equality starts with identity) lets every stream after the first reuse the
    bytes.  ``size`` frames are kept, the oldest dropped first.
    """

    __slots__ = ("_frames", "ndjson", "size")

    def __init__(self, *, ndjson: bool, size: int = 256) -> None:
        self.ndjson = ndjson
        self.size = size
        self._frames: dict[str, tuple[str, str, int, bytes]] = {}

    def get(self, frame: str) -> tuple[str, str, int, bytes]:
        """(channel, epoch, offset, the bytes before the id) of ``frame``."""
        found = self._frames.get(frame)
        if found is not None:
            return found
        channel, epoch, offset, body = _split_frame(frame)
        head = (body[:-1] + ',"id":"').encode() if self.ndjson else f"data: {body}\nid: ".encode()
        found = (channel, epoch, offset, head)
        frames = self._frames
        frames[frame] = found
        if len(frames) > self.size:
            try:
                del frames[next(iter(frames))]
            except (KeyError, RuntimeError, StopIteration):  # another server thread got there first
                pass
        return found


_SSE_FRAMES = SharedFrames(ndjson=False)
_NDJSON_FRAMES = SharedFrames(ndjson=True)


class ResumableFraming:
    """A stream's framing: SSE or NDJSON, with the stream's id on its publications and
    on its ``subscribed`` event (:class:`StreamPositions`, updated as frames are written)."""

    __slots__ = ("base", "media_type", "ndjson", "positions", "shared")

    def __init__(self, base: SseFraming | NdjsonFraming, positions: StreamPositions) -> None:
        self.base = base
        self.media_type = base.media_type
        self.positions = positions
        self.ndjson = isinstance(base, NdjsonFraming)
        self.shared = _NDJSON_FRAMES if self.ndjson else _SSE_FRAMES

    def preamble(self) -> bytes:
        return self.base.preamble()

    def closing(self, code: int, reason: str, reconnect: bool) -> bytes:
        return self.base.closing(code, reason, reconnect)

    def encode(self, frame: str) -> bytes:
        if frame.startswith(_MARK):
            channel, epoch, offset, head = self.shared.get(frame)
            positions = self.positions
            positions.update(channel, offset, epoch)
            end = b'"}\n' if self.ndjson else b"\n\n"
            return b"".join((head, positions.event_id().encode(), end))
        if frame.startswith(_SUBSCRIBED_PREFIX):
            event_id = self.positions.event_id()
            if self.ndjson:
                return f'{frame[:-1]},"id":"{event_id}"}}\n'.encode()
            assert isinstance(self.base, SseFraming)
            return self.base.event(frame, event_id).encode()
        return self.base.encode(frame)


# ---------------------------------------------------------------- the request


class StreamRequest(AsgiHandshake):
    """An HTTP request as admission and the connect code read a handshake
    (:class:`~herald.context.Handshake`, plus what :func:`herald.admission.stream_refusal` asks)."""

    __slots__ = ()

    def query(self) -> list[tuple[str, str]]:
        return parse_qsl(self.query_string.decode("latin-1"), keep_blank_values=True)

    def token(self) -> str | None:
        """The client's token: ``Authorization: Bearer``, else ``?token=``, else the cookie."""
        authorization = self.header("authorization")
        if authorization:
            scheme, _, value = authorization.strip().partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                return value.strip()
        for key, value in self.query():
            if key == "token" and value:
                return value
        raw = self.header("cookie")
        if raw:
            jar: SimpleCookie = SimpleCookie()
            try:
                jar.load(raw)
            except CookieError:
                return None
            morsel = jar.get(TOKEN_COOKIE)
            if morsel is not None and morsel.value:
                return morsel.value
        return None

    def cors_headers(self) -> list[tuple[bytes, bytes]]:
        """CORS headers for a request whose ``Origin`` passed admission (so it is the
        server's own or an allowed one): a page of another allowed origin may read the
        stream, with ``withCredentials`` (cookies) too."""
        origin = self.header("origin")
        if not origin:
            return []
        return [
            (b"access-control-allow-origin", origin.encode("latin-1")),
            (b"access-control-allow-credentials", b"true"),
            (b"vary", b"Origin"),
        ]

    def last_event_id(self) -> str | None:
        """``Last-Event-ID`` (the browser's reconnect), else ``?last_event_id=``."""
        value = self.header("last-event-id")
        if value:
            return value.strip()
        for key, value in self.query():
            if key == "last_event_id" and value:
                return value.strip()
        return None


def requested_channels(request: StreamRequest, claims_channels: list[str] | None, limit: int) -> list[str]:
    """The stream's channels: ``?channel=`` (repeated), else the connection token's
    ``channels`` claim (its exact names; a ``prefix*`` grant names no channel).
    Duplicates are dropped, order kept; raises :class:`StreamRefused` when none is
    named or more than ``limit`` (``max_subscriptions``) are."""
    named = [value for key, value in request.query() if key == "channel"]
    if not named and claims_channels:
        named = [name for name in claims_channels if not name.endswith("*")]
    channels = list(dict.fromkeys(named))
    if not channels:
        raise StreamRefused(400, ErrorCode.BAD_REQUEST, "no channel: name one with ?channel=")
    if len(channels) > limit:
        raise StreamRefused(429, ErrorCode.LIMIT_EXCEEDED, f"at most {limit} channels per stream")
    if any(len(channel) > 1024 for channel in channels):
        raise StreamRefused(400, ErrorCode.INVALID_CHANNEL, "channel name too long")
    return channels


# ---------------------------------------------------------------- the route


class StreamRoute:
    """The ASGI app of ``/sse`` (``kind="sse"``) or ``/stream`` (``kind="ndjson"``)."""

    __slots__ = ("kind", "label", "node")

    def __init__(self, node: Node, kind: str, label: str) -> None:
        if kind not in ("sse", "ndjson"):
            raise ValueError(f"unknown stream kind {kind!r}")
        self.node = node
        self.kind = kind
        self.label = label

    async def __call__(self, scope: MutableMapping[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        if scope["type"] != "http":  # pragma: no cover - mounted as an HTTP route
            return
        if scope.get("method") != "GET":
            await respond_error(send, 405, ErrorCode.BAD_REQUEST, "method not allowed: use GET")
            return
        node = self.node
        if is_head(scope):
            # A HEAD that a middleware (herald serve's HeadAsGet) turned into a GET: the
            # head of a stream, without opening one.
            framing = SseFraming() if self.kind == "sse" else NdjsonFraming()
            headers = [(b"content-type", framing.media_type), *STREAM_HEADERS]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        request = StreamRequest(scope)
        # Host, Origin and the per-IP lease (counted across the cluster on a Redis broker).
        refused = await stream_refusal(node, request)  # type: ignore[arg-type]  # reads only the handshake part of a Socket
        if refused is not None:
            logger.warning("refused stream %s from %s: %s", request.path, request.remote, refused)
            await respond_error(send, 403, ErrorCode.PERMISSION_DENIED, refused)
            return
        try:
            await StreamSession(self, request, receive, send).run()
        finally:
            release_ip(node, request.client_ip)


class StreamSession:
    """One stream: connect, subscribe (with recovery), serve, clean up."""

    #: Seconds a stream that failed waits for its closing event to be written.
    transport_close_wait = 2.0

    __slots__ = (
        "connection",
        "framing",
        "handler",
        "held",
        "receive",
        "request",
        "route",
        "send",
        "transport",
    )

    def __init__(
        self, route: StreamRoute, request: StreamRequest, receive: ASGIReceive, send: ASGISend
    ) -> None:
        self.route = route
        self.request = request
        self.receive = receive
        self.send = send
        settings = route.node.settings
        base = SseFraming(retry_ms=RETRY_MS) if route.kind == "sse" else NdjsonFraming()
        # The positions are filled in once the channels are known (open()).
        self.framing = ResumableFraming(base, StreamPositions(()))
        self.transport = HttpStreamTransport(send, self.framing, abort=abort_for(receive))
        self.connection = Connection(
            self.transport,
            new_client_id(),
            renderer=render_stream_publication,
            echo_own=True,
            events=False,  # no join/leave pushes, no protocol pings (heartbeats instead)
            max_queue_messages=settings.max_queue_messages,
            max_queue_bytes=settings.max_queue_bytes,
            remote=request.remote,
            write_delay=settings.write_delay,
        )
        self.handler = CommandHandler(route.node, self.connection, request)
        #: (channel, offset its subscription carried it to, epoch) per subscribed channel.
        self.held: list[tuple[str, int, str]] = []

    async def run(self) -> None:
        node, connection, transport = self.route.node, self.connection, self.transport
        try:
            opening = await self.open()
        except StreamRefused as exc:
            await self._discard()
            await respond_error(self.send, exc.status, exc.code, exc.message)
            return
        except BaseException:
            await self._discard()
            raise
        stats = node.stats.route(self.route.label)
        stats.accepted += 1
        stats.live.add(connection)
        code = 1000
        try:
            try:
                await transport.start(self.request.cors_headers())
            except Exception:
                connection.peer_closed(1006)
                raise
            if self._may_write_directly():
                transport.write_directly(self.receive)
            connection.start()
            self._send_opening(opening)
            transport.start_heartbeats(connection, node.settings.ping_interval)
            for channel, _, _ in self.held:
                if channel in connection.channels:
                    await node.join(channel, node.namespace(channel), connection)
            await transport.watch(self.receive)
        except Exception:
            if connection.close_code is None:  # not the client leaving: Herald failed
                logger.exception("stream %s failed", connection.client_id)
                connection.close(CloseCode.INTERNAL_ERROR, "internal error")
                await connection.wait_closed(self.transport_close_wait)
        finally:
            transport.stop_heartbeats()
            if connection.close_code is None:
                connection.peer_closed(1000)
            try:
                await self.handler.close()
            finally:
                await connection.stop()
                code = connection.close_code if connection.close_code is not None else code
                stats.record_end(code, connection)
                if node.settings.access_log:
                    logger.info(
                        "stream ended",
                        extra={"conn": connection.client_id, "user": connection.user, "code": code},
                    )

    def _may_write_directly(self) -> bool:
        """Whether events may bypass the ASGI ``send`` chain (written straight to the
        socket, batched per loop turn): with ``fast_path`` on, when the server runs
        Herald's own HTTP protocol (``herald serve``, whose middleware only add headers).
        Under any other server the app's middleware see every event."""
        if not self.route.node.settings.fast_path:
            return False
        cycle = uvicorn_cycle(self.receive)
        protocol = getattr(getattr(cycle, "on_response", None), "__self__", None)
        return isinstance(protocol, HeaderTimeoutHTTPProtocol)

    async def _discard(self) -> None:
        """Undo a refused stream's subscriptions and admission (no response was started)."""
        connection = self.connection
        connection.peer_closed(1000)
        try:
            await self.handler.close()
        finally:
            await connection.stop()

    async def open(self) -> list[tuple[str, Any]]:
        """Connect and subscribe as ``/connect`` would; returns what to send first.

        Raises :class:`StreamRefused` for any refusal (no response has started yet).
        """
        node, handler, request = self.route.node, self.handler, self.request
        token = request.token()
        try:
            connect = m.ConnectRequest(type="connect", id=1, token=token, name=self.route.label)
        except ValidationError:
            raise StreamRefused(400, ErrorCode.BAD_REQUEST, "token too long") from None
        try:
            # The connect command's own code: token, on_connect hooks, per-user limit.
            await handler._cmd_connect(connect)
        except CommandError as exc:
            raise StreamRefused(http_status(exc.code), exc.code, exc.message) from None
        except DisconnectError as exc:
            raise StreamRefused(http_status(exc.code), exc.code, exc.reason) from None
        claims = handler.context.claims
        channels = requested_channels(
            request, claims.channels if claims is not None else None, node.settings.max_subscriptions
        )
        positions = StreamPositions(channels)
        self.framing.positions = positions
        last_id = request.last_event_id()
        resume = StreamPositions.parse(last_id, channels) if last_id else None
        budget = reply_byte_budget(node.settings.max_queue_bytes)
        items: list[dict[str, Any]] = []
        publications: list[tuple[str, str, dict[str, Any]]] = []
        held = self.held
        for index, channel in enumerate(channels):
            if index:
                await asyncio.sleep(0)  # many channels: let other clients' work run between them
            since = await self._since(channel, resume)
            try:
                subscription = m.ChannelSubscription(channel=channel, since=since)
                # The subscribe command's own code: policy, hooks, limits, bounded recovery.
                result, top, used = await handler._subscribe_one(subscription, budget)
            except ValidationError:
                raise StreamRefused(
                    400, ErrorCode.INVALID_CHANNEL, f"invalid channel {channel[:255]!r}"
                ) from None
            except CommandError as exc:
                raise StreamRefused(
                    http_status(exc.code), exc.code, f"{channel[:255]}: {exc.message}"
                ) from None
            except DisconnectError as exc:
                raise StreamRefused(http_status(exc.code), exc.code, exc.reason) from None
            except BrokerError:
                raise StreamRefused(503, ErrorCode.BROKER_UNAVAILABLE, "broker unavailable") from None
            budget -= used
            name, epoch = result["channel"], result["epoch"]
            recovered = result["recovered"]
            if recovered and since is not None:
                positions.update(name, since.offset, epoch)
            else:
                positions.update(name, result["offset"], epoch)
            for item in result.pop("publications"):
                publications.append((name, epoch, item))
            items.append(result)
            held.append((name, top, epoch))
        opening: list[tuple[str, Any]] = [("subscribed", items)]
        if last_id is not None:
            opening.append(
                (
                    "recovery",
                    (resume is not None, {item["channel"]: bool(item["recovered"]) for item in items}),
                )
            )
        opening.append(("publications", publications))
        return opening

    async def _since(
        self, channel: str, resume: dict[str, tuple[int, str]] | None
    ) -> m.StreamPositionModel | None:
        """The ``since`` of ``channel``'s subscription: its position in the client's
        ``Last-Event-ID`` when the stream still has that epoch (the id names it by a
        digest); an epoch that changed gives an empty one (not recovered)."""
        if resume is None or channel not in resume:
            return None
        offset, digest = resume[channel]
        node = self.route.node
        try:
            name, _ = node.check_channel(channel)
            current = (await node.history(name, limit=0)).position.epoch
        except (CommandError, BrokerError):
            return None  # the subscribe refuses it (or fails) with the right error
        epoch = current if epoch_digest(current) == digest else ""
        return m.StreamPositionModel(offset=offset, epoch=epoch)

    def _send_opening(self, opening: list[tuple[str, Any]]) -> None:
        """Queue the ``subscribed`` (and ``recovery``) events and the recovered
        publications, then let the live publications held during subscribe follow."""
        connection = self.connection
        for kind, value in opening:
            if kind == "subscribed":
                connection.send(
                    orjson.dumps(
                        {
                            "type": "subscribed",
                            "client": connection.client_id,
                            "user": connection.user,
                            "channels": value,
                        }
                    ).decode()
                )
            elif kind == "recovery":
                accepted, recovered = value
                connection.send(
                    orjson.dumps(
                        {
                            "type": "recovery",
                            "last_event_id": "accepted" if accepted else "invalid",
                            "recovered": recovered,
                        }
                    ).decode()
                )
            else:
                for channel, epoch, item in value:
                    frame: dict[str, Any] = {
                        "type": "publication",
                        "channel": channel,
                        "offset": item["offset"],
                        "epoch": epoch,
                        "data": item["data"],
                    }
                    if item["info"] is not None:
                        frame["info"] = item["info"]
                    connection.send(
                        stream_frame(channel, item["offset"], epoch, orjson.dumps(frame).decode())
                    )
        # Live publications that raced the history reads follow, skipping those sent.
        for channel, top, epoch in self.held:
            connection.release(channel, top, epoch)


__all__ = [
    "MAX_EVENT_ID_LENGTH",
    "RETRY_MS",
    "STREAM_ROUTES",
    "TOKEN_COOKIE",
    "SharedFrames",
    "StreamPositions",
    "StreamRefused",
    "StreamRequest",
    "StreamRoute",
    "epoch_digest",
    "http_status",
    "render_stream_publication",
    "requested_channels",
    "stream_frame",
]
