"""A real FastAPI backend for the proxy tests, served by uvicorn on its own port.

Each event's endpoint (``POST /proxy/<event>``) records the call (body and headers)
and answers with what the test scripted for that event: a JSON value, or a
:class:`Raw` answer (any status and bytes).  A script may block on a
``threading.Event`` (the backend runs in its own thread and loop) to be slow.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from ..helpers import ThreadServer


@dataclass(frozen=True)
class Raw:
    """An answer as it is: status, body bytes."""

    status: int = 200
    body: bytes = b""


@dataclass(frozen=True)
class Call:
    event: str
    path: str
    body: dict[str, Any]
    headers: dict[str, str]


Script = Callable[[dict[str, Any]], Any]


@dataclass
class Backend:
    server: ThreadServer
    calls: list[Call] = field(default_factory=list)
    scripts: dict[str, Script] = field(default_factory=dict)
    #: Set to let blocked ("slow") answers go.
    release: threading.Event = field(default_factory=threading.Event)
    #: Calls currently blocked on ``release``.
    blocked: int = 0

    def url(self, event: str, prefix: str = "/proxy") -> str:
        return f"{self.server.http}{prefix}/{event}"

    def reset(self) -> None:
        self.calls.clear()
        self.scripts.clear()
        self.release.set()  # let anything still blocked go
        self.release = threading.Event()
        self.blocked = 0

    def of(self, event: str) -> list[Call]:
        return [call for call in self.calls if call.event == event]

    def answer(self, event: str, script: Script | Any) -> None:
        """Answer ``event`` with ``script(body)`` or, when not callable, the value itself."""
        if callable(script):
            self.scripts[event] = script
            return

        def constant(body: dict[str, Any]) -> Any:
            return script

        self.scripts[event] = constant

    def block(self, event: str, then: Any = None) -> None:
        """Answer ``event`` only once :attr:`release` is set (then with ``then``)."""
        release = self.release

        async def slow(body: dict[str, Any]) -> Any:
            self.blocked += 1
            await asyncio.to_thread(release.wait, 30)
            return {"result": {}} if then is None else then

        self.scripts[event] = slow


def start_backend() -> Backend:
    app = FastAPI()
    backend = Backend(ThreadServer(app))

    async def handle(request: Request, event: str, prefix: str) -> Response:
        body = await request.json()
        backend.calls.append(Call(event, f"{prefix}/{event}", body, dict(request.headers)))
        script = backend.scripts.get(event)
        answer = script(body) if script is not None else {"result": {}}
        if asyncio.iscoroutine(answer):
            answer = await answer
        if isinstance(answer, Raw):
            return Response(answer.body, status_code=answer.status, media_type="application/json")
        return JSONResponse(answer)

    @app.post("/proxy/{event}")
    async def proxy(event: str, request: Request) -> Response:
        return await handle(request, event, "/proxy")

    @app.post("/other/{event}")
    async def other(event: str, request: Request) -> Response:
        return await handle(request, event, "/other")

    backend.server.start()
    return backend


@contextlib.contextmanager
def running_backend() -> Iterator[Backend]:
    """:func:`start_backend` for a fixture: held calls released and the server stopped after."""
    backend = start_backend()
    try:
        yield backend
    finally:
        backend.release.set()
        backend.server.stop()
