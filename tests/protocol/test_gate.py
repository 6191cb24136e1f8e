"""The command gate: every illegal transition."""

from __future__ import annotations

import pytest

from herald.codes import ErrorCode
from herald.exceptions import ProtocolError
from herald.protocol.gate import CommandGate, Phase


def _code(session: CommandGate, command_id: int | None, kind: str) -> ErrorCode | None:
    try:
        session.begin(command_id, kind)
    except ProtocolError as exc:
        return exc.code
    return None


@pytest.mark.parametrize(
    "kind", ["subscribe", "unsubscribe", "publish", "rpc", "presence", "presence_stats", "history", "ping"]
)
def test_commands_before_connect_are_refused(kind: str) -> None:
    assert _code(CommandGate(), 1, kind) == ErrorCode.NOT_CONNECTED


def test_connect_twice_is_refused() -> None:
    session = CommandGate()
    assert _code(session, 1, "connect") is None
    session.finish(1)
    session.connected()
    assert session.phase is Phase.CONNECTED
    assert _code(session, 2, "connect") == ErrorCode.ALREADY_CONNECTED


def test_duplicate_in_flight_id_is_refused_and_released_after_finish() -> None:
    session = CommandGate()
    session.begin(1, "connect")
    session.connected()
    session.finish(1)
    assert _code(session, 5, "rpc") is None
    assert _code(session, 5, "rpc") == ErrorCode.DUPLICATE_ID
    session.finish(5)
    assert _code(session, 5, "ping") is None


def test_subscription_checks_read_the_connections_channels() -> None:
    channels: set[str] = set()  # the connection's set: the session reads it, never writes it
    session = CommandGate(channels, max_subscriptions=2)
    session.check_subscribe("a")
    assert channels == set()
    channels.add("a")
    with pytest.raises(ProtocolError) as caught:
        session.check_subscribe("a")
    assert caught.value.code == ErrorCode.ALREADY_SUBSCRIBED
    channels.add("b")
    with pytest.raises(ProtocolError) as caught:
        session.check_subscribe("c")
    assert caught.value.code == ErrorCode.LIMIT_EXCEEDED
    channels.discard("a")
    session.check_subscribe("c")


def test_closed_session_refuses_everything() -> None:
    session = CommandGate()
    session.close()
    assert _code(session, 1, "connect") == ErrorCode.BAD_REQUEST
