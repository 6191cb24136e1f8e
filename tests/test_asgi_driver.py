"""The ASGI driver (transports/asgi.py) and the admission step (admission.py), in process.

The routes on real servers through this driver: the hostile, admin, channels and
tutorial suites with ``native_routes=False`` (test_hostile runs on both drivers) and
Autobahn's ``asgi-driver`` case.  These tests pin the driver's own contract with a fake
ASGI server: one ``lost`` per socket with the right code and side, a ``close_now``
that ends the wait for the next message, the size bound, replies before the close
frame, and a session error closing 1011.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

import pytest

from herald.admission import HandshakeTimeout, choose_subprotocol, opener
from herald.app import ROUTE_PATHS
from herald.config import Settings
from herald.node import Node
from herald.sessions import SESSIONS
from herald.transports.asgi import AsgiRoute, AsgiSocket
from herald.transports.base import Route, Socket

from .helpers import DEFAULT_TIMEOUT, async_wait_for


class FakeServer:
    """One ASGI WebSocket connection: what the client sends, what the app answered."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.sent: list[dict[str, Any]] = []
        self.inbox.put_nowait({"type": "websocket.connect"})
        self.scope: dict[str, Any] = {
            "type": "websocket",
            "path": "/t",
            "headers": [(b"host", b"localhost")],
            "client": ("127.0.0.1", 5000),
            "server": ("127.0.0.1", 8000),
            "scheme": "ws",
            "subprotocols": ["herald.v1"],
        }

    async def receive(self) -> dict[str, Any]:
        return await self.inbox.get()

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    def kinds(self) -> list[str]:
        return [m["type"] for m in self.sent]


class Recorder:
    """A session that records what the driver tells it."""

    subprotocol: str | None = "herald.v1"

    def __init__(self, socket: Socket, behaviour: str = "echo") -> None:
        self.socket = socket
        self.behaviour = behaviour
        self.messages: list[str | bytes] = []
        self.failed: list[tuple[int, str]] = []
        self.lost_calls: list[tuple[int, str, bool]] = []

    def started(self) -> None:
        return None

    def message(self, data: str | bytes) -> Awaitable[None] | None:
        self.messages.append(data)
        if self.behaviour == "raise":
            raise RuntimeError("boom")
        if data == "reply-then-close":
            self.socket.send_now("bye")
            self.socket.close_now(4000, "done")
            return None
        self.socket.send_now(data)
        return None

    def fail(self, code: int, reason: str) -> None:
        self.failed.append((code, reason))
        self.socket.close_now(code, reason)

    def lost(self, code: int, reason: str, by_peer: bool) -> None:
        self.lost_calls.append((code, reason, by_peer))


def serve(
    server: FakeServer, session: list[Recorder], *, max_size: int = 100, behaviour: str = "echo"
) -> Any:
    def open_session(socket: Socket) -> Recorder | str:
        if behaviour == "refuse":
            return "no entry"
        made = Recorder(socket, behaviour)
        session.append(made)
        return made

    app = AsgiRoute(Route(open_session, max_size))
    return asyncio.get_running_loop().create_task(app(server.scope, server.receive, server.send))


async def test_messages_are_answered_and_the_peer_close_is_reported_once() -> None:
    server, made = FakeServer(), []
    task = serve(server, made)
    await server.inbox.put({"type": "websocket.receive", "text": "hi"})
    await server.inbox.put({"type": "websocket.receive", "bytes": b"\x01"})
    await server.inbox.put({"type": "websocket.disconnect", "code": 1001, "reason": "away"})
    await asyncio.wait_for(task, DEFAULT_TIMEOUT)
    assert server.sent[0] == {"type": "websocket.accept", "subprotocol": "herald.v1"}
    assert server.sent[1:] == [
        {"type": "websocket.send", "text": "hi"},
        {"type": "websocket.send", "bytes": b"\x01"},
    ]
    assert made[0].lost_calls == [(1001, "away", True)]


async def test_a_refused_handshake_is_closed_before_accept() -> None:
    server, made = FakeServer(), []
    await asyncio.wait_for(serve(server, made, behaviour="refuse"), DEFAULT_TIMEOUT)
    assert server.sent == [{"type": "websocket.close", "code": 1008, "reason": "no entry"}]
    assert made == []


async def test_close_now_while_waiting_ends_the_wait_and_reports_herald_s_code() -> None:
    server, made = FakeServer(), []
    task = serve(server, made)
    await async_wait_for(lambda: bool(made) and made[0].socket._receiving)  # type: ignore[attr-defined]
    made[0].socket.close_now(4505, "handshake timeout")
    await asyncio.wait_for(task, DEFAULT_TIMEOUT)  # no message from the peer was needed
    assert made[0].lost_calls == [(4505, "handshake timeout", False)]
    assert server.sent[-1] == {"type": "websocket.close", "code": 4505, "reason": "handshake timeout"}
    assert not task.cancelled()


async def test_replies_queued_before_close_now_leave_before_the_close_frame() -> None:
    server, made = FakeServer(), []
    task = serve(server, made)
    await server.inbox.put({"type": "websocket.receive", "text": "reply-then-close"})
    await asyncio.wait_for(task, DEFAULT_TIMEOUT)
    assert server.sent[1:] == [
        {"type": "websocket.send", "text": "bye"},
        {"type": "websocket.close", "code": 4000, "reason": "done"},
    ]
    assert made[0].lost_calls == [(4000, "done", False)]


@pytest.mark.parametrize("message", [{"text": "é" * 51}, {"bytes": b"x" * 101}])
async def test_a_message_over_the_bound_fails_the_session_with_1009(message: dict[str, Any]) -> None:
    server, made = FakeServer(), []
    task = serve(server, made)
    await server.inbox.put({"type": "websocket.receive", "text": "é" * 50})  # 100 bytes: fits
    await server.inbox.put({"type": "websocket.receive", **message})
    await asyncio.wait_for(task, DEFAULT_TIMEOUT)
    assert made[0].messages == ["é" * 50]
    assert made[0].failed == [(1009, "message larger than 100 bytes")]
    assert server.sent[-1]["code"] == 1009


async def test_a_session_that_raises_is_closed_with_1011() -> None:
    server, made = FakeServer(), []
    task = serve(server, made, behaviour="raise")
    await server.inbox.put({"type": "websocket.receive", "text": "x"})
    await asyncio.wait_for(task, DEFAULT_TIMEOUT)
    assert made[0].lost_calls == [(1011, "internal error", False)]
    assert server.sent[-1] == {"type": "websocket.close", "code": 1011, "reason": "internal error"}


async def test_a_socket_reads_its_handshake_from_the_scope() -> None:
    server = FakeServer()
    socket = AsgiSocket(server.scope, server.send)
    assert (socket.path, socket.client_ip, socket.remote, socket.local_address) == (
        "/t",
        "127.0.0.1",
        "127.0.0.1:5000",
        "127.0.0.1",
    )
    assert socket.header("Host") == "localhost" and socket.subprotocols == ["herald.v1"]
    # After the peer left nothing more is sent.
    socket.peer_gone()
    with pytest.raises(ConnectionResetError):
        await socket.send("late")


# ------------------------------------------------------------------ admission


async def test_admission_refuses_a_foreign_origin_and_the_ip_limit_and_counts_them() -> None:
    node = Node(Settings(max_connections_per_ip=1))
    server = FakeServer()
    opened: list[Socket] = []

    class FakeSession:
        ip_slot = False  # set by admission when the session holds a per-IP lease

    session = FakeSession()

    def make(socket: Socket) -> FakeSession:
        opened.append(socket)
        return session

    open_session = opener(node, make)
    foreign = FakeServer()
    foreign.scope["headers"] = [(b"host", b"localhost"), (b"origin", b"https://evil.example")]
    assert open_session(AsgiSocket(foreign.scope, foreign.send)) == "origin https://evil.example not allowed"
    assert open_session(AsgiSocket(server.scope, server.send)) is session and len(opened) == 1
    assert open_session(AsgiSocket(server.scope, server.send)) == "too many connections from this address"
    assert len(opened) == 1
    assert node.rejected_handshakes == {"origin": 1, "ip_limit": 1}
    assert session.ip_slot
    node.leases.release("ip", "127.0.0.1")
    assert open_session(AsgiSocket(server.scope, server.send)) is session


async def test_admission_gives_the_slot_back_when_the_session_cannot_be_made() -> None:
    node = Node(Settings(max_connections_per_ip=1))
    server = FakeServer()

    def broken(socket: Socket) -> str:
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        opener(node, broken)(AsgiSocket(server.scope, server.send))
    assert node.leases.try_acquire("ip", "127.0.0.1", 1)  # the slot is free again


def test_the_subprotocol_is_chosen_only_when_offered() -> None:
    assert choose_subprotocol(["x", "herald.v1"], "herald.v1") == "herald.v1"
    assert choose_subprotocol(["x"], "herald.v1") is None


class _Timed(HandshakeTimeout):
    timeout_code = 4505
    timeout_reason = "late"

    def __init__(self, socket: Any) -> None:
        self.socket = socket
        self.timer: asyncio.TimerHandle | None = None
        self.pending = True
        self.armed = 0
        self.failures: list[tuple[int, str]] = []

    def arm_handshake_timeout(self, delay: float) -> None:
        self.armed += 1
        super().arm_handshake_timeout(min(delay, 0.01))

    def handshake_pending(self) -> bool:
        return self.pending

    def fail(self, code: int, reason: str) -> None:
        self.failures.append((code, reason))


async def test_the_handshake_timeout_waits_for_a_busy_socket() -> None:
    socket = type("S", (), {"busy": True})()
    timed = _Timed(socket)
    timed.arm_handshake_timeout(10.0)
    await async_wait_for(lambda: timed.armed >= 3)  # expired twice while busy: re-armed
    assert timed.failures == []
    socket.busy = False
    await async_wait_for(lambda: timed.failures == [(4505, "late")])
    assert timed.timer is None


async def test_the_handshake_timeout_spares_a_finished_handshake() -> None:
    timed = _Timed(type("S", (), {"busy": False})())
    timed.arm_handshake_timeout(10.0)
    timed.pending = False
    await async_wait_for(lambda: timed.timer is None)  # it fired and found nothing to do
    assert timed.failures == [] and timed.armed == 1


def test_every_route_path_has_a_session() -> None:
    assert set(ROUTE_PATHS.values()) == set(SESSIONS)
