"""RFC 6455 conformance: Autobahn|Testsuite's fuzzing client against an echo endpoint
served with Herald's server settings (the uvicorn HTTP protocol class and WebSocket
implementation `herald serve` uses).

The default run plays a core subset (framing, pings, reserved bits, opcodes,
fragmentation, UTF-8, close handling: cases 1-7, about 250 cases in a few seconds), and
the big-message cases (9.*) under the shipped limits (64 KiB, 4096 frames): the 40
cases over 64 KiB fail by design, and each must see the server's 1009 close frame
(uvicorn's protocol lost it now and then, see docs/conformance.md).
``HERALD_AUTOBAHN_FULL=1`` plays every case but compression (1-10), with a 16 MiB
message limit and 131072 frames per message, so that the big-message cases (9.*: 4 MiB
in 64-byte fragments) measure the server instead of Herald's own defaults (64 KiB,
4096 frames).  Results are summarised in docs/conformance.md.

Needs ``wstest`` (Python 2.7): ``tests/conformance/install_autobahn.sh`` installs it in
``~/.cache/herald/autobahn`` (scripts/test runs it); the test is skipped, saying so,
when it is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from starlette.routing import WebSocketRoute

from herald.config import Settings
from herald.transports.asgi import AsgiRoute
from herald.transports.base import Route, Socket
from herald.transports.uvicorn import FRAGMENTS_ENV, abort_for, register_routes, uvicorn_ws_protocol
from herald.transports.uvicorn_protocol import HeaderTimeoutHTTPProtocol

from ..helpers import ThreadServer

FULL = os.environ.get("HERALD_AUTOBAHN_FULL") == "1"
CORE_CASES = ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*"]
#: Cases whose result lies below Herald (uvicorn's WebSocket implementation, which
#: serves ordinary ASGI routes); see docs/conformance.md.  A case listed here may fail
#: on the ASGI path without failing the test.  The native path has no exception.
KNOWN_BELOW_HERALD = {"7.1.5"}
MAX_FRAGMENTS = 1 << 17 if FULL else Settings().max_message_fragments
#: The 9.* cases whose messages fit the shipped 64 KiB limit: 64 KiB in one frame, and
#: many small messages.  Every other 9.* case sends 256 KiB to 16 MiB.
BIG_CASES_WITHIN_LIMITS = {"9.1.1", "9.2.1"} | {f"9.{g}.{n}" for g in (7, 8) for n in range(1, 7)}
ENDPOINTS = pytest.mark.parametrize(
    ("path", "known_failures"),
    [("/native-echo", set()), ("/asgi-echo", KNOWN_BELOW_HERALD), ("/echo", KNOWN_BELOW_HERALD)],
    ids=["native", "asgi-driver", "asgi"],
)


class Echo:
    """An echo session, served like Herald's routes by either driver: natively (Herald's
    own framing, transports/native.py) and through Herald's ASGI driver."""

    subprotocol = None

    def __init__(self, ws: Socket) -> None:
        self.ws = ws

    def started(self) -> None:
        return None

    def message(self, data: str | bytes) -> None:
        self.ws.send_now(data)

    def fail(self, code: int, reason: str) -> None:
        self.ws.close_now(code, reason)

    def lost(self, code: int, reason: str, by_peer: bool) -> None:
        return None


def find_wstest() -> str | None:
    candidates = [
        os.environ.get("HERALD_WSTEST", ""),
        str(Path.home() / ".cache/herald/autobahn/bin/wstest"),
        shutil.which("wstest") or "",
    ]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def echo_app(max_size: int) -> FastAPI:
    app = FastAPI()
    route = Route(Echo, max_size, MAX_FRAGMENTS)
    register_routes(app, {"/native-echo": route})
    # The same route through Herald's ASGI driver (on uvicorn's protocol below it).
    app.router.routes.append(WebSocketRoute("/asgi-echo", AsgiRoute(route, abort_for=abort_for)))

    @app.websocket("/echo")
    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                if message.get("text") is not None:
                    await websocket.send_text(message["text"])
                elif message.get("bytes") is not None:
                    await websocket.send_bytes(message["bytes"])
        except WebSocketDisconnect:
            return

    return app


@pytest.fixture(scope="module")
def echo_server() -> Iterator[ThreadServer]:
    settings = Settings()
    max_size = 16 * 1024 * 1024 if FULL else settings.max_message_size
    saved = os.environ.get(FRAGMENTS_ENV)
    os.environ[FRAGMENTS_ENV] = str(MAX_FRAGMENTS)  # read by the ASGI path's protocol class
    server = ThreadServer(
        echo_app(max_size),
        ws=uvicorn_ws_protocol(settings.ws_impl, settings.fast_path),
        http=HeaderTimeoutHTTPProtocol,
        ws_max_size=max_size,
        ws_ping_interval=20.0,
        ws_ping_timeout=20.0,
    ).start()
    yield server
    server.stop()
    if saved is None:
        os.environ.pop(FRAGMENTS_ENV, None)
    else:
        os.environ[FRAGMENTS_ENV] = saved


def play(url: str, cases: list[str], exclude: list[str], tmp_path: Path) -> dict[str, dict[str, Any]]:
    """Run wstest's fuzzing client on ``url``; returns its index: case id -> outcome
    (``behavior``, ``behaviorClose``, ``remoteCloseCode``...)."""
    wstest = find_wstest()
    if wstest is None:
        pytest.skip(
            "Autobahn|Testsuite (wstest, Python 2.7) is not installed: "
            "run tests/conformance/install_autobahn.sh"
        )
    spec = {
        "outdir": str(tmp_path / "reports"),
        "servers": [{"agent": "herald", "url": url}],
        "cases": cases,
        "exclude-cases": exclude,
        "exclude-agent-cases": {},
    }
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    result = subprocess.run(
        [wstest, "-m", "fuzzingclient", "-s", str(spec_path)],
        cwd=tmp_path,
        capture_output=True,
        timeout=110 if not FULL else 1200,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    index: dict[str, dict[str, Any]] = json.loads((tmp_path / "reports" / "index.json").read_text())["herald"]
    return index


@ENDPOINTS
def test_autobahn_fuzzingclient(
    echo_server: ThreadServer, tmp_path: Path, path: str, known_failures: set[str]
) -> None:
    cases = ["*"] if FULL else CORE_CASES
    # 6.4.*: fragmented invalid UTF-8 with deliberate pauses (~8 s, run in the full set).
    exclude = ["12.*", "13.*"] if FULL else ["12.*", "13.*", "6.4.*"]
    index = play(echo_server.ws(path), cases, exclude, tmp_path)
    behaviours: dict[str, list[str]] = {}
    for case_id, outcome in index.items():
        behaviours.setdefault(outcome["behavior"], []).append(case_id)
    failed = sorted(
        set(behaviours.get("FAILED", [])) - known_failures,
        key=lambda c: [int(p) for p in c.split(".")],
    )
    summary = {k: len(v) for k, v in behaviours.items()}
    print(f"autobahn ({'full' if FULL else 'core'}): {summary}")
    assert len(index) > (290 if FULL else 200)
    assert not failed, f"failed cases: {failed}; summary {summary}"


@ENDPOINTS
def test_autobahn_big_messages_close_1009_under_the_shipped_limits(
    echo_server: ThreadServer, tmp_path: Path, path: str, known_failures: set[str]
) -> None:
    """9.*: what fits 64 KiB is echoed; every bigger message is refused with a 1009 close
    frame that reaches the client (on the ASGI path uvicorn reset the connection with the
    rest of the message unread, and Autobahn sometimes never saw the 1009)."""
    if FULL:
        pytest.skip("the full run raises the limits to 16 MiB: 9.* is played there")
    index = play(echo_server.ws(path), ["9.*"], [], tmp_path)
    assert set(index) >= BIG_CASES_WITHIN_LIMITS and len(index) == 54, sorted(index)
    outcomes = {case: (o["behavior"], o.get("remoteCloseCode")) for case, o in index.items()}
    wrong = {
        case: outcome
        for case, outcome in outcomes.items()
        if outcome != (("OK", 1000) if case in BIG_CASES_WITHIN_LIMITS else ("FAILED", 1009))
    }
    assert not wrong, f"9.* outcomes (behaviour, close code the client received): {wrong}"
