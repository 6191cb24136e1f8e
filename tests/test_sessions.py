"""ProtocolSession's pacing of one client's commands (issue 19), without a server.

A socket read can hold a thousand commands; the session hands every
``COMMANDS_BETWEEN_YIELDS``-th one back as an awaitable that first lets the event
loop turn, so the frames a burst fans out are written between (the drivers await
it before the next command).  Pongs need no task otherwise, which makes the pacing
visible: only the paced commands come back as awaitables.
"""

from __future__ import annotations

import asyncio

import pytest

from herald import Herald, Settings
from herald.context import AsgiHandshake
from herald.sessions import COMMANDS_BETWEEN_YIELDS, ProtocolSession


class StubSocket(AsgiHandshake):
    """The handshake part of a socket; nothing is ever written in these tests."""

    def __init__(self) -> None:
        super().__init__(
            {
                "type": "websocket",
                "path": "/connect",
                "headers": [],
                "client": ("127.0.0.1", 50000),
                "server": ("127.0.0.1", 8000),
                "scheme": "ws",
            }
        )

    def send_now(self, message: str | bytes) -> None:
        raise AssertionError("nothing is sent")

    async def send(self, frame: str) -> None:
        raise AssertionError("nothing is sent")

    async def close(self, code: int, reason: str) -> None:
        raise AssertionError("nothing is closed")

    def close_now(self, code: int, reason: str) -> None:
        raise AssertionError("nothing is closed")


@pytest.mark.asyncio
async def test_every_nth_command_of_a_burst_waits_for_the_next_loop_turn() -> None:
    session = ProtocolSession(Herald(Settings(demos=False, rate_limit=0)).node, StubSocket())
    loop = asyncio.get_running_loop()
    turned = False

    def mark() -> None:
        nonlocal turned
        turned = True

    deferred = []
    for n in range(1, 3 * COMMANDS_BETWEEN_YIELDS + 1):
        result = session.on_text('{"type":"pong"}')
        if result is None:
            continue
        deferred.append(n)
        turned = False
        loop.call_soon(mark)
        await result
        assert turned, "the paced command did not let the loop turn first"
    assert deferred == [COMMANDS_BETWEEN_YIELDS * k for k in (1, 2, 3)]
