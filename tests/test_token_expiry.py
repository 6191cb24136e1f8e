"""TokenExpiry: the refresh pushes, the grace, and what happens when it runs out."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from herald.codes import CloseCode
from herald.token_expiry import TokenExpiry

from .helpers import async_wait_for

GRACE = 0.05


@dataclass
class _Settings:
    token_refresh_grace: float = GRACE


@dataclass
class _Node:
    settings: _Settings = field(default_factory=_Settings)
    rejected: list[str] = field(default_factory=list)

    def record_rejected_command(self, reason: str) -> None:
        self.rejected.append(reason)


@dataclass
class _Connection:
    channels: set[str] = field(default_factory=set)
    is_closing: bool = False
    sent: list[dict[str, Any]] = field(default_factory=list)
    closed: tuple[int, str] | None = None

    def send(self, frame: str) -> None:
        self.sent.append(json.loads(frame))

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)
        self.is_closing = True


async def _after(delay: float) -> None:
    """Return once every loop timer due within ``delay`` seconds has run: the loop runs
    timers in deadline order, so a later one is a deterministic "nothing more happened"."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    loop.call_later(delay, done.set_result, None)
    await done


def _expiry() -> tuple[TokenExpiry, _Node, _Connection, list[str]]:
    node, connection, ended = _Node(), _Connection(), []
    return TokenExpiry(node, connection, ended.append), node, connection, ended  # type: ignore[arg-type]


async def test_connection_token_refresh_push_then_close_4004() -> None:
    expiry, node, connection, _ = _expiry()
    expiry.arm(time.time())
    await async_wait_for(lambda: connection.closed is not None, what="the close")
    assert connection.sent == [{"type": "refresh", "grace": GRACE}]
    assert connection.closed == (CloseCode.TOKEN_EXPIRED, "token expired")
    assert node.rejected == ["token_expired"]


async def test_rearming_in_the_grace_keeps_the_connection() -> None:
    expiry, node, connection, _ = _expiry()
    expiry.arm(time.time())
    await async_wait_for(lambda: connection.sent, what="the refresh push")
    expiry.arm(time.time() + 60)  # the client refreshed in time
    expiry.arm(None)
    await _after(GRACE * 3)  # past the grace the first push started
    assert connection.closed is None and node.rejected == []
    assert connection.sent == [{"type": "refresh", "grace": GRACE}]


async def test_channel_token_sub_refresh_push_then_ends_the_subscription_only() -> None:
    expiry, node, connection, ended = _expiry()
    connection.channels.update({"a", "b"})
    expiry.arm_channel("a", time.time())
    expiry.arm_channel("b", time.time() + 60)
    await async_wait_for(lambda: ended, what="the subscription to end")
    assert ended == ["a"]
    assert connection.sent == [{"type": "sub_refresh", "channel": "a", "grace": GRACE}]
    assert connection.closed is None
    assert node.rejected == ["subscription_token_expired"]
    expiry.cancel()


async def test_disarmed_channel_and_closing_connection_end_nothing() -> None:
    expiry, node, connection, ended = _expiry()
    connection.channels.update({"a", "b"})
    expiry.arm_channel("a", time.time() + 0.01)
    expiry.disarm_channel("a")  # unsubscribed
    expiry.arm_channel("b", time.time())
    await async_wait_for(lambda: connection.sent, what="the sub_refresh push")
    connection.is_closing = True
    await _after(GRACE * 3)
    assert connection.sent == [{"type": "sub_refresh", "channel": "b", "grace": GRACE}]
    assert ended == [] and node.rejected == []


async def test_cancel_stops_every_timer() -> None:
    expiry, _, connection, ended = _expiry()
    connection.channels.add("a")
    expiry.arm(time.time() + 0.01)
    expiry.arm_channel("a", time.time() + 0.01)
    expiry.cancel()
    await _after(0.01 + GRACE * 3)
    assert connection.sent == [] and connection.closed is None and ended == []
