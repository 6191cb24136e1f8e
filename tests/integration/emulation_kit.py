"""A raw client of Herald's bidirectional emulation, for the emulation tests: one stream
(``POST /emulation/connect``) read into a queue of frames, and POSTs to ``/emulation``."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from typing import Any

import httpx

from ..helpers import DEFAULT_TIMEOUT


class RawSession:
    """One emulated session, driven by hand: ``post`` answers the HTTP status, ``call``
    sends one command and waits for its reply on the stream."""

    def __init__(self, base: str, *, post_base: str | None = None) -> None:
        self.base = base
        self.post_base = post_base or base
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(DEFAULT_TIMEOUT, read=None))
        self.frames: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.hello: dict[str, Any] = {}
        self.ended = asyncio.Event()
        self.ids = itertools.count(1)
        self.replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._response: httpx.Response | None = None

    @classmethod
    async def open(
        cls, base: str, *, post_base: str | None = None, connect: bool = True, **headers: str
    ) -> RawSession:
        session = cls(base, post_base=post_base)
        await session.start(headers)
        if connect:
            reply = await session.call("connect", name="raw")
            assert "result" in reply, reply
        return session

    async def start(self, headers: dict[str, str]) -> None:
        request = self.http.build_request("POST", self.base + "/emulation/connect", headers=headers)
        response = await self.http.send(request, stream=True)
        assert response.status_code == 200, (response.status_code, await response.aread())
        assert response.headers["content-type"].startswith("application/x-ndjson")
        self._response = response
        lines = response.aiter_lines()
        async with asyncio.timeout(DEFAULT_TIMEOUT):
            async for line in lines:
                if line.strip():
                    self.hello = json.loads(line)
                    break
        assert self.hello["type"] == "emulation", self.hello
        self._reader = asyncio.get_running_loop().create_task(self._read(lines))

    async def _read(self, lines: Any) -> None:
        try:
            async for line in lines:
                if not line.strip():
                    continue
                frame = json.loads(line)
                if frame.get("type") == "ping" and frame.get("id") is None:
                    # Answer pings as a client must (a POST), unless the test stopped.
                    asyncio.get_running_loop().create_task(self.post([{"type": "pong"}]))
                    continue
                waiting = self.replies.pop(frame["id"], None) if frame.get("id") is not None else None
                if waiting is not None and not waiting.done():
                    waiting.set_result(frame)
                else:
                    await self.frames.put(frame)
        except (httpx.HTTPError, OSError):
            pass
        finally:
            self.ended.set()

    @property
    def session(self) -> str:
        return str(self.hello["session"])

    @property
    def secret(self) -> str:
        return str(self.hello["secret"])

    def body(self, commands: list[Any], **overrides: Any) -> dict[str, Any]:
        return {"session": self.session, "secret": self.secret, "commands": commands, **overrides}

    async def post(self, commands: list[Any], **overrides: Any) -> int:
        with contextlib.suppress(httpx.HTTPError, RuntimeError):
            response = await self.http.post(
                self.post_base + "/emulation", json=self.body(commands, **overrides)
            )
            return response.status_code
        return 0

    async def call(self, kind: str, timeout: float = DEFAULT_TIMEOUT, **fields: Any) -> dict[str, Any]:
        command_id = next(self.ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.replies[command_id] = future
        status = await self.post([{"id": command_id, "type": kind, **fields}])
        assert status == 204, status
        async with asyncio.timeout(timeout):
            return await future

    async def push(self, kind: str, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.frames.get()
                if frame.get("type") == kind:
                    return frame

    async def close(self) -> None:
        if self._response is not None:
            with contextlib.suppress(Exception):
                await self._response.aclose()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader
        await self.http.aclose()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus text exposition (0 when absent)."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        head, _, rest = sample.partition("{")
        if head != name:
            continue
        found = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
        if found == wanted:
            return float(value)
    return 0.0
