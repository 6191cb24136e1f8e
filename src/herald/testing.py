"""A testing kit for applications that use Herald as a library: no server, no port.

::

    from herald.testing import HeraldTestClient

    async def test_chat(app):                       # your FastAPI app, with Herald mounted
        async with HeraldTestClient(app, headers={"Cookie": "session=abc"}) as alice:
            await alice.subscribe("chat:lobby")
            await alice.publish("chat:lobby", {"text": "hi"})
            pub = await alice.expect_publication("chat:lobby")
            assert pub.data == {"text": "hi", "by": "alice"}

:class:`HeraldTestClient` is Herald's Python client (:class:`herald.client.Client`:
``subscribe``, ``publish``, ``rpc``, ``presence``, ``history``, events) whose WebSocket
is the app's ASGI callable driven in process: a WebSocket scope and two queues instead
of a socket.  The app's own routes, middleware, hooks and RPC handlers run as in
production, on the test's event loop.  It adds what a test asserts on: every push the
server sent (:meth:`HeraldTestClient.next_push`, :meth:`~HeraldTestClient.expect_publication`,
:meth:`~HeraldTestClient.expect_no_push`) and how the connection ended
(:meth:`~HeraldTestClient.expect_disconnect`).

The app's lifespan (startup, shutdown: where Herald starts its node) runs once per app
while any client or :func:`running` block holds it: the first one in starts it, the last
one out shuts it down.  Contract and examples: docs/testing.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from typing import Any, TypeVar

import httpx
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, ConnectionClosedOK
from websockets.frames import Close

from .client import Client, ClientPublication, DisconnectedEvent, Event, JoinEvent, LeaveEvent, Token
from .client.link import ClientSocket, FatalError, Link, RetryableError
from .exceptions import ClientConnectionError, ClientTimeoutError
from .protocol.decoders import decode_push
from .protocol.messages import SUBPROTOCOL

logger = logging.getLogger("herald.testing")

T = TypeVar("T")

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]

#: The host name the in-process requests use: a loopback name, which Herald's Host check
#: always accepts.
TEST_HOST = "localhost"


class LifespanError(RuntimeError):
    """The app's lifespan startup or shutdown failed (its message says why)."""


class AppError(RuntimeError):
    """The app raised while serving an in-process WebSocket (the cause is its exception)."""


# ---------------------------------------------------------------- lifespan


class _Lifespan:
    """One run of an app's ASGI lifespan, shared by everyone who holds it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.users = 0
        #: The lifespan state (``scope["state"]``), copied into every request's scope.
        self.state: dict[str, Any] = {}
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._replies: asyncio.Queue[Message] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def _await_reply(self, step: str, timeout: float) -> None:
        """Wait for ``lifespan.<step>.complete``; raise :class:`LifespanError` otherwise."""
        assert self._task is not None
        reply = asyncio.ensure_future(self._replies.get())
        try:
            done, _ = await asyncio.wait({reply, self._task}, timeout=timeout, return_when="FIRST_COMPLETED")
        finally:
            if not reply.done():
                reply.cancel()
        if reply in done:
            message = reply.result()
            if message["type"] == f"lifespan.{step}.complete":
                return
            # Starlette's message is a whole traceback: its last line says what failed.
            lines = [line for line in str(message.get("message") or "").splitlines() if line.strip()]
            raise LifespanError(
                f"the app's lifespan {step} failed: {lines[-1] if lines else 'no reason given'}"
            )
        if self._task in done:
            error = self._task.exception()
            if error is None:  # the app does not speak the lifespan protocol: nothing to run
                return
            raise LifespanError(f"the app's lifespan {step} failed: {error!r}") from error
        raise LifespanError(f"the app's lifespan {step} did not finish within {timeout:g}s")

    async def startup(self, timeout: float) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": self.state}

        async def receive() -> Message:
            return await self._inbox.get()

        async def send(message: Message) -> None:
            self._replies.put_nowait(message)

        self._inbox.put_nowait({"type": "lifespan.startup"})
        self._task = asyncio.ensure_future(self.app(scope, receive, send))
        try:
            await self._await_reply("startup", timeout)
        except BaseException:
            await self._stop_task()
            raise

    async def shutdown(self, timeout: float) -> None:
        if self._task is None or self._task.done():
            return
        self._inbox.put_nowait({"type": "lifespan.shutdown"})
        try:
            await self._await_reply("shutdown", timeout)
        finally:
            await self._stop_task()

    async def _stop_task(self) -> None:
        task = self._task
        if task is None:
            return
        if not task.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), 1.0)
        if not task.done():
            task.cancel()
        with contextlib.suppress(BaseException):
            await task


# The lifespan of each app currently held (by id: an app need not be hashable).
_lifespans: dict[int, _Lifespan] = {}


async def _acquire(app: ASGIApp, timeout: float) -> _Lifespan:
    """Hold ``app``'s lifespan, starting it if nobody holds it yet."""
    lifespan = _lifespans.get(id(app))
    if lifespan is None or lifespan.app is not app:
        lifespan = _lifespans[id(app)] = _Lifespan(app)
        try:
            await lifespan.startup(timeout)
        except BaseException as exc:
            del _lifespans[id(app)]
            lifespan.ready.set_exception(exc if isinstance(exc, Exception) else LifespanError("cancelled"))
            lifespan.ready.exception()
            raise
        lifespan.ready.set_result(None)
    else:
        await asyncio.shield(lifespan.ready)
    lifespan.users += 1
    return lifespan


async def _release(lifespan: _Lifespan, timeout: float) -> None:
    """Let go of a lifespan; the last holder shuts the app down."""
    lifespan.users -= 1
    if lifespan.users > 0:
        return
    if _lifespans.get(id(lifespan.app)) is lifespan:
        del _lifespans[id(lifespan.app)]
    await lifespan.shutdown(timeout)


class RunningApp:
    """An app whose lifespan is running (see :func:`running`)."""

    def __init__(self, app: ASGIApp, state: dict[str, Any]) -> None:
        self.app = app
        #: The lifespan state the app's startup left (``request.state`` in its routes).
        self.state = state

    def client(self, path: str = "/connect", **options: Any) -> HeraldTestClient:
        """A :class:`HeraldTestClient` for this app (same options)."""
        return HeraldTestClient(self.app, path, **options)

    def http(self, **options: Any) -> httpx.AsyncClient:
        """An ``httpx.AsyncClient`` that calls the app in process (base URL
        ``http://localhost``), for its HTTP routes and Herald's ``/api``::

            async with running.http() as http:
                await http.post("/orders", json={"item": "book"})
        """
        options.setdefault("base_url", f"http://{TEST_HOST}")
        app, state = self.app, self.state

        async def with_state(scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
            # httpx does not know the lifespan: hand its state to each request, as servers do.
            await app({**scope, "state": dict(state)}, receive, send)

        return httpx.AsyncClient(transport=httpx.ASGITransport(app=with_state), **options)


@contextlib.asynccontextmanager
async def running(app: Any, *, timeout: float = 10.0) -> AsyncIterator[RunningApp]:
    """Run ``app``'s lifespan for the duration of the block (once, however many clients
    and blocks hold it at the same time)::

        async with running(app) as live:
            async with live.http() as http, live.client() as ws: ...

    Raises :class:`LifespanError` when the startup fails.
    """
    lifespan = await _acquire(app, timeout)
    try:
        yield RunningApp(app, lifespan.state)
    finally:
        await _release(lifespan, timeout)


# ---------------------------------------------------------------- the in-process socket


class InProcessWebSocket:
    """The client end of one WebSocket served by an ASGI app in process.

    It is a :class:`herald.client.link.ClientSocket`: ``send``/``recv``/``close`` as a
    websockets connection has them.  The app runs as a task fed by a receive queue;
    what it sends lands in the queue ``recv`` reads.
    """

    def __init__(self, app: ASGIApp, scope: MutableMapping[str, Any]) -> None:
        self.app = app
        self.scope = scope
        #: How the socket ended: the close code and reason (1006: no close frame).
        self.close_code: int | None = None
        self.close_reason: str | None = None
        #: The subprotocol the app accepted.
        self.subprotocol: str | None = None
        #: What the app raised while serving this socket, if anything.
        self.error: BaseException | None = None
        self._to_app: asyncio.Queue[Message] = asyncio.Queue()
        self._from_app: asyncio.Queue[Message | None] = asyncio.Queue()
        self._disconnected: Message | None = None  # given to every receive once the client left
        self._task: asyncio.Task[None] | None = None

    @property
    def transport(self) -> InProcessWebSocket:
        return self  # what the client aborts

    async def open(self, timeout: float) -> None:
        """Run the handshake; raises :class:`FatalError` when the app refuses it."""
        self._to_app.put_nowait({"type": "websocket.connect"})
        task = self._task = asyncio.ensure_future(self.app(self.scope, self._receive, self._send))
        task.add_done_callback(self._app_done)
        try:
            first = await asyncio.wait_for(self._from_app.get(), timeout)
        except TimeoutError:
            self.abort()
            raise RetryableError(f"the app did not accept the WebSocket within {timeout:g}s") from None
        path = self.scope["path"]
        if first is not None and first["type"] == "websocket.accept":
            self.subprotocol = first.get("subprotocol")
            return
        await self.wait_finished(timeout)
        if first is not None and first["type"] == "websocket.close":
            # Before accept, a close is the server's refusal (HTTP 403 on a real socket).
            reason = str(first.get("reason") or "")
            if not reason and first.get("code", 1000) == 1000:
                reason = "no WebSocket route there?"
            message = f"the app refused the WebSocket handshake on {path}: {reason}"
            raise FatalError(ClientConnectionError(message), 1008, reason)
        if self.error is not None:
            message = f"the app raised during the WebSocket handshake on {path}: {self.error!r}"
            raise FatalError(ClientConnectionError(message), 1011, "app error") from self.error
        message = f"the app ended the WebSocket handshake on {path} without accepting"
        raise FatalError(ClientConnectionError(message), 1006, "")

    # -- the app's side

    async def _receive(self) -> Message:
        if self._disconnected is not None and self._to_app.empty():
            return self._disconnected
        return await self._to_app.get()

    async def _send(self, message: Message) -> None:
        if self._disconnected is not None or self.close_code is not None:
            # As uvicorn does: sending to a client that left raises.
            raise OSError("the in-process WebSocket is closed")
        self._from_app.put_nowait(dict(message))

    def _app_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.error = task.exception()
            logger.error("the app raised while serving %s", self.scope["path"], exc_info=self.error)
        self._from_app.put_nowait(None)  # wakes a reader: the socket is gone

    async def wait_finished(self, timeout: float) -> None:
        """Wait until the app finished serving this socket (cancel it after ``timeout``)."""
        task = self._task
        if task is None or task.done():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), timeout)
        if not task.done():
            logger.warning("the app did not finish serving %s within %gs", self.scope["path"], timeout)
            task.cancel()

    def _tell_app_gone(self, code: int, reason: str) -> None:
        if self._disconnected is None:
            self._disconnected = {"type": "websocket.disconnect", "code": code, "reason": reason}
            self._to_app.put_nowait(self._disconnected)

    # -- the client's side (ClientSocket)

    async def send(self, message: str) -> None:
        if self.close_code is not None or self._disconnected is not None:
            raise ConnectionClosedError(None, None)
        self._to_app.put_nowait({"type": "websocket.receive", "text": message})

    async def recv(self) -> str | bytes:
        if self.close_code is not None:
            raise self._closed_error()
        message = await self._from_app.get()
        if message is None:
            self._from_app.put_nowait(None)  # every later recv ends too
            if self.close_code is None:
                self.close_code, self.close_reason = 1006, ""
            raise self._closed_error()
        kind = message["type"]
        if kind == "websocket.send":
            text = message.get("text")
            return text if text is not None else bytes(message.get("bytes") or b"")
        if kind == "websocket.close":
            code = int(message.get("code") or 1000)
            reason = str(message.get("reason") or "")
            self.close_code, self.close_reason = code, reason
            self._tell_app_gone(code, reason)  # the client's half of the closing handshake
            self._from_app.put_nowait(None)
            raise self._closed_error()
        return await self.recv()  # a message the client has no use for

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close from the client and wait (a few seconds at most) until the app finished
        with the socket: its disconnect hooks have run when this returns."""
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
            self._tell_app_gone(code, reason)
        await self.wait_finished(5.0)
        self._from_app.put_nowait(None)

    def abort(self) -> None:
        """Drop the connection without a closing handshake (the app sees 1006)."""
        if self.close_code is None:
            self.close_code, self.close_reason = 1006, ""
        self._tell_app_gone(1006, "")
        self._from_app.put_nowait(None)

    def _closed_error(self) -> ConnectionClosed:
        code = self.close_code if self.close_code is not None else 1006
        if code == 1006:
            return ConnectionClosedError(None, None)
        frame = Close(code, self.close_reason or "")
        if code in (1000, 1001):
            return ConnectionClosedOK(frame, frame, True)
        return ConnectionClosedError(frame, frame, True)


# ---------------------------------------------------------------- the test client


_client_ports = itertools.count(50000)


class HeraldTestClient(Client):
    """Herald's Python client, connected to ``app`` in process (no server, no port).

    ``path`` is where the app mounted Herald's ``/connect`` route (a query string may
    follow).  ``token``, ``name``, ``headers`` (cookies included) and ``origin`` are
    sent as a real client sends them; every request comes from ``127.0.0.1`` with
    ``Host: localhost``.  ``reconnect`` is off by default, so that a server close ends
    the client (see :meth:`expect_disconnect`).  ``timeout`` is the default of every
    wait.

    Use it as an async context manager (or call :meth:`connect` and :meth:`close`):
    entering holds the app's lifespan (started once, see :func:`running`) and connects.
    :meth:`close` raises :class:`AppError` when the app raised while serving the socket.
    """

    def __init__(
        self,
        app: Any,
        path: str = "/connect",
        *,
        token: Token = None,
        name: str | None = None,
        headers: Mapping[str, str] | None = None,
        origin: str | None = None,
        reconnect: bool = False,
        timeout: float = 5.0,
    ) -> None:
        if not path.startswith("/"):
            raise ValueError(f"path must start with '/', got {path!r}")
        super().__init__(
            f"ws://{TEST_HOST}{path}",
            token,
            name,
            reconnect=reconnect,
            timeout=timeout,
            origin=origin,
            headers=headers,
            backoff_min=0.05,
            backoff_max=0.5,
        )
        self.app = app
        self.path = path
        #: Pushes received and not taken yet by :meth:`next_push` or an ``expect_*``
        #: method, oldest first: the frames as the server sent them.
        self.pushes: list[dict[str, Any]] = []
        #: Every ``disconnected`` event so far (code, reason, reconnect), oldest first.
        self.disconnects: list[DisconnectedEvent] = []
        #: The in-process sockets opened so far (one per connection).
        self.sockets: list[InProcessWebSocket] = []
        self._lifespan: _Lifespan | None = None
        self._news: asyncio.Event | None = None
        self._address = ("127.0.0.1", next(_client_ports))

    # -- lifecycle

    async def connect(self, timeout: float | None = None) -> None:
        """Hold the app's lifespan (starting it if needed) and connect."""
        if self._news is None:
            self._news = asyncio.Event()
        if self._lifespan is None:
            self._lifespan = await _acquire(self.app, self.timeout if timeout is None else timeout)
        await super().connect(timeout)

    async def close(self, timeout: float = 5.0) -> None:
        """Close the connection, release the app's lifespan (the last holder shuts it
        down) and raise :class:`AppError` if the app raised while serving the socket."""
        try:
            await super().close(timeout)
            # The server may still be ending a socket it closed itself: let it finish (its
            # disconnect hooks included) before the lifespan may shut the app down.
            for socket in self.sockets:
                await socket.wait_finished(timeout)
        finally:
            lifespan, self._lifespan = self._lifespan, None
            if lifespan is not None:
                await _release(lifespan, timeout)
        for socket in self.sockets:
            if socket.error is not None:
                error, socket.error = socket.error, None
                raise AppError(f"the app raised while serving {socket.scope['path']}: {error!r}") from error

    async def _open_socket(self) -> ClientSocket:
        path, _, query = self.path.partition("?")
        headers: list[tuple[bytes, bytes]] = [
            (b"host", TEST_HOST.encode()),
            (b"connection", b"Upgrade"),
            (b"upgrade", b"websocket"),
            (b"sec-websocket-version", b"13"),
            (b"sec-websocket-key", b"aGVyYWxkLXRlc3Rpbmc9PQ=="),
            (b"sec-websocket-protocol", SUBPROTOCOL.encode()),
        ]
        if self.origin:
            headers.append((b"origin", self.origin.encode()))
        for name, value in self.headers.items():
            headers.append((name.lower().encode("latin-1"), value.encode("latin-1")))
        scope: dict[str, Any] = {
            "type": "websocket",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "scheme": "ws",
            "server": ("127.0.0.1", 80),
            "client": self._address,
            "root_path": "",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query.encode(),
            "headers": headers,
            "subprotocols": [SUBPROTOCOL],
            "state": dict(self._lifespan.state) if self._lifespan is not None else {},
            "extensions": {},
        }
        socket = InProcessWebSocket(self.app, scope)
        self.sockets.append(socket)
        await socket.open(self.timeout)
        return socket

    # -- what the server pushed

    def _handle(self, link: Link, frame: dict[str, Any]) -> None:
        if frame.get("id") is None:
            self.pushes.append(frame)
            self._notify()
        super()._handle(link, frame)

    def _emit(self, event: Event, callback: Callable[[Any], Any] | None = None) -> None:
        if isinstance(event, DisconnectedEvent):
            self.disconnects.append(event)
            self._notify()
        super()._emit(event, callback)

    def _notify(self) -> None:
        if self._news is not None:
            self._news.set()

    async def _until(self, found: Callable[[], T | None], what: str, timeout: float | None) -> T:
        """Wait until ``found()`` returns something other than None; return it."""
        wait = self.timeout if timeout is None else timeout
        if self._news is None:
            self._news = asyncio.Event()
        news = self._news
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            result = found()
            if result is not None:
                return result
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ClientTimeoutError(f"no {what} within {wait:g}s")
            news.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(news.wait(), remaining)

    def _take(self, kind: str | None, channel: str | None) -> dict[str, Any] | None:
        for index, frame in enumerate(self.pushes):
            if (kind is None or frame.get("type") == kind) and (
                channel is None or frame.get("channel") == channel
            ):
                return self.pushes.pop(index)
        return None

    async def next_push(self, timeout: float | None = None) -> dict[str, Any]:
        """The oldest push not taken yet (any type), as the server sent it; waits up to
        ``timeout`` seconds for one, then raises :class:`ClientTimeoutError`."""
        return await self._until(lambda: self._take(None, None), "push", timeout)

    async def expect_push(
        self, kind: str, channel: str | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        """The oldest push of type ``kind`` (on ``channel``, when given) not taken yet;
        other pushes stay for later.  Raises :class:`ClientTimeoutError` when none comes."""
        where = f" on {channel}" if channel is not None else ""
        return await self._until(lambda: self._take(kind, channel), f"{kind} push{where}", timeout)

    async def expect_publication(self, channel: str, timeout: float | None = None) -> ClientPublication:
        """The oldest publication pushed on ``channel`` not taken yet (publications
        recovered in a subscribe reply are not pushes: read them from the subscription)."""
        publication = decode_push(await self.expect_push("publication", channel, timeout))
        assert isinstance(publication, ClientPublication)
        return publication

    async def expect_join(self, channel: str, timeout: float | None = None) -> JoinEvent:
        """The oldest ``join`` push on ``channel`` not taken yet."""
        join = decode_push(await self.expect_push("join", channel, timeout))
        assert isinstance(join, JoinEvent)
        return join

    async def expect_leave(self, channel: str, timeout: float | None = None) -> LeaveEvent:
        """The oldest ``leave`` push on ``channel`` not taken yet."""
        leave = decode_push(await self.expect_push("leave", channel, timeout))
        assert isinstance(leave, LeaveEvent)
        return leave

    async def expect_no_push(
        self, kind: str | None = None, channel: str | None = None, within: float = 0.1
    ) -> None:
        """Assert that no push (of type ``kind``, on ``channel``) is waiting or arrives
        within ``within`` seconds: a bounded look, as Phoenix's ``refute_push``.  It
        takes nothing."""

        def matching() -> dict[str, Any] | None:
            for frame in self.pushes:
                if (kind is None or frame.get("type") == kind) and (
                    channel is None or frame.get("channel") == channel
                ):
                    return frame
            return None

        with contextlib.suppress(ClientTimeoutError):
            frame = await self._until(matching, "push", within)
            raise AssertionError(f"unexpected push: {frame}")

    async def expect_disconnect(self, timeout: float | None = None) -> DisconnectedEvent:
        """The oldest ``disconnected`` event not taken yet (the server closed the
        connection, or it broke): its ``code`` and ``reason``."""

        def first() -> DisconnectedEvent | None:
            return self.disconnects.pop(0) if self.disconnects else None

        return await self._until(first, "disconnect", timeout)


__all__ = [
    "AppError",
    "HeraldTestClient",
    "InProcessWebSocket",
    "LifespanError",
    "RunningApp",
    "running",
]
