"""The client's HTTP-streaming transport: protocol v1 over Herald's bidirectional emulation.

For networks that break WebSocket upgrades: frames come down one streaming response
(``POST /emulation/connect``, one JSON frame per line) and commands go up in POSTs
(``POST /emulation``), one at a time so that they reach the server in order, several
commands per POST when they queue up meanwhile.  :class:`HttpStreamSocket` has the
shape of a WebSocket (:class:`~herald.client.link.ClientSocket`), so the client's
connection loop, recovery and events are the same over either transport
(docs/transports.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from websockets.exceptions import ConnectionClosed
from websockets.frames import Close

from ..exceptions import ClientConnectionError

#: Transport names a client accepts (``Client(transport=...)``, ``herald connect --transport``).
TRANSPORTS = ("websocket", "http_stream")

#: Commands sent in one POST at most (the server's bound, MAX_COMMANDS_PER_POST).
MAX_BATCH = 100


def emulation_urls(url: str) -> tuple[str, str]:
    """The stream and POST URLs for a ``/connect`` URL (``ws://host/prefix/connect`` ->
    ``http://host/prefix/emulation/connect`` and ``http://host/prefix/emulation``);
    an ``http(s)://`` URL works too."""
    parts = urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    if scheme not in ("http", "https"):
        raise ClientConnectionError(f"invalid URL {url!r}: need ws://, wss://, http:// or https://")
    path = parts.path.rstrip("/")
    if path.endswith("/connect"):
        path = path[: -len("/connect")]
    if not path.endswith("/emulation"):
        path += "/emulation"
    base = urlunsplit((scheme, parts.netloc, path, parts.query, ""))
    return urlunsplit((scheme, parts.netloc, path + "/connect", parts.query, "")), base


class _Abort:
    def __init__(self, socket: HttpStreamSocket) -> None:
        self._socket = socket

    def abort(self) -> None:
        self._socket.abort()


class HttpStreamSocket:
    """One emulated session, with a WebSocket's shape (``send``, ``recv``, ``close``,
    ``close_code``, ``transport.abort()``).  Open it with :meth:`open`."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        response: httpx.Response,
        lines: AsyncIterator[str],
        post_url: str,
        hello: dict[str, Any],
    ) -> None:
        self._http = http
        self._response = response
        self._lines = lines
        self._post_url = post_url
        self.session = str(hello["session"])
        self.node = str(hello.get("node") or "")
        self._secret = str(hello["secret"])
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.transport = _Abort(self)
        self._outbox: list[tuple[str, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._ended = False

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        timeout: float,
        headers: Mapping[str, str] | None = None,
        origin: str | None = None,
    ) -> HttpStreamSocket:
        """Open the stream and read its first frame.  Raises ``OSError``/``TimeoutError``
        when the server cannot be reached, :class:`httpx.HTTPStatusError` when it refuses."""
        stream_url, post_url = emulation_urls(url)
        all_headers = dict(headers or {})
        if origin:
            all_headers["Origin"] = origin
        all_headers["Accept"] = "application/x-ndjson"
        http = httpx.AsyncClient(timeout=httpx.Timeout(timeout, read=None), headers=all_headers)
        try:
            async with asyncio.timeout(timeout):
                request = http.build_request("POST", stream_url, content=b"")
                response = await http.send(request, stream=True)
                if response.status_code != 200:
                    await response.aread()
                    response.raise_for_status()
                lines = response.aiter_lines()
                hello: dict[str, Any] = {}
                async for line in lines:
                    if line.strip():
                        hello = json.loads(line)
                        break
                if hello.get("type") != "emulation":
                    raise OSError(f"not a Herald emulation stream: {str(hello)[:100]}")
        except httpx.TransportError as exc:
            await http.aclose()
            raise OSError(str(exc) or type(exc).__name__) from exc
        except BaseException:
            await http.aclose()
            raise
        return cls(http, response, lines, post_url, hello)

    # ------------------------------------------------------------ down

    async def recv(self) -> str:
        """The next frame; raises ``ConnectionClosed`` once the stream ended."""
        try:
            async for line in self._lines:
                if not line.strip():
                    continue  # a heartbeat
                if line.startswith('{"type":"disconnect"'):
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        frame = json.loads(line)
                        self.close_code, self.close_reason = int(frame["code"]), str(frame["reason"])
                return line
        except (httpx.HTTPError, OSError):
            pass
        await self._end()
        raise self._closed()

    def _closed(self) -> ConnectionClosed:
        if self.close_code is None:
            self.close_code, self.close_reason = 1006, ""
        return ConnectionClosed(Close(self.close_code, self.close_reason or ""), None)

    # ------------------------------------------------------------ up

    async def send(self, message: str) -> None:
        """Send one command; returns once the server's session queued it.  Commands
        sent while a POST is in flight go together in the next one, in order."""
        if self._ended:
            raise self._closed()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._outbox.append((message, future))
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())
        await future

    async def _flush(self) -> None:
        try:
            while self._outbox:
                batch, self._outbox = self._outbox[:MAX_BATCH], self._outbox[MAX_BATCH:]
                error = await self._post([json.loads(text) for text, _ in batch])
                for _, future in batch:
                    if future.done():
                        continue
                    if error is None:
                        future.set_result(None)
                    else:
                        future.set_exception(error)
                        future.exception()
        finally:
            self._flusher = None

    async def _post(self, commands: list[Any]) -> BaseException | None:
        body = {"session": self.session, "node": self.node, "secret": self._secret, "commands": commands}
        try:
            response = await self._http.post(self._post_url, json=body)
        except (httpx.HTTPError, OSError) as exc:
            return ConnectionClosed(None, None) if self._ended else ClientConnectionError(str(exc))
        if response.status_code == 204:
            return None
        if response.status_code in (403, 404):
            # The session is gone (or was never ours): the stream is over.
            self.abort()
            return self._closed()
        return ClientConnectionError(
            f"POST {self._post_url}: HTTP {response.status_code} {response.text[:200]}"
        )

    # ------------------------------------------------------------ end

    async def _end(self) -> None:
        if self._ended:
            return
        self._ended = True
        for _, future in self._outbox:
            if not future.done():
                future.set_exception(self._closed())
                future.exception()
        self._outbox.clear()
        with contextlib.suppress(Exception):
            await self._response.aclose()
        with contextlib.suppress(Exception):
            await self._http.aclose()

    def abort(self) -> None:
        """Drop the stream now (the next ``recv`` raises ``ConnectionClosed``)."""
        if self._ended:
            return
        if self.close_code is None:
            self.close_code, self.close_reason = 1006, ""
        task = asyncio.get_running_loop().create_task(self._end())
        task.add_done_callback(lambda _: None)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """End the session: the server sees its stream closed."""
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
        await self._end()


__all__ = ["MAX_BATCH", "TRANSPORTS", "HttpStreamSocket", "emulation_urls"]
