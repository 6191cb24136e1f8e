"""The client's decoders read exactly what the server's encoders write."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import orjson

from herald.exceptions import ReplyError
from herald.protocol import decoders as d
from herald.protocol import encoders as e
from herald.protocol.values import (
    ClientInfo,
    ClientPublication,
    HistoryPage,
    JoinEvent,
    LeaveEvent,
    PresenceStats,
    StreamPosition,
)

ALICE = ClientInfo("c1", "alice", {"role": "admin"})


@dataclass(frozen=True, slots=True)
class _Stored:
    offset: int
    data: bytes
    info: ClientInfo | None = None


def _frame(text: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(text)
    return value


def _result(text: str) -> dict[str, Any]:
    reply = _frame(text)
    assert d.reply_error(reply) is None
    return d.reply_result(reply)


def test_pushes_round_trip() -> None:
    data = orjson.dumps({"text": "hi"})
    assert d.decode_push(_frame(e.encode_publication("a", 3, "ep", data, ALICE))) == ClientPublication(
        "a", 3, "ep", {"text": "hi"}, ALICE
    )
    assert d.decode_push(_frame(e.encode_publication("a", 4, "ep", b"1", None))) == ClientPublication(
        "a", 4, "ep", 1, None
    )
    assert d.decode_push(_frame(e.encode_presence_event("join", "a", ALICE))) == JoinEvent("a", ALICE)
    assert d.decode_push(_frame(e.encode_presence_event("leave", "a", ALICE))) == LeaveEvent("a", ALICE)
    assert d.decode_push(_frame(e.encode_disconnect(4503, "bye", False))) == d.DisconnectNotice(4503, "bye")
    assert d.decode_push(_frame(e.encode_refresh(2.0))) == d.RefreshRequest(2.0)
    assert d.decode_push(_frame(e.encode_sub_refresh("a", 3.0))) == d.SubRefreshRequest("a", 3.0)
    unsubscribed = d.decode_push(_frame(e.encode_unsubscribe("a", 112, "expired")))
    assert isinstance(unsubscribed, d.Unsubscribed) and unsubscribed.channel == "a"
    assert (unsubscribed.error.code, unsubscribed.error.message) == (112, "expired")


def test_unknown_and_incomplete_pushes_are_ignored() -> None:
    assert d.decode_push({"type": "future_push", "x": 1}) is None
    assert d.decode_push({"type": "join", "channel": "a"}) is None  # no info: nobody joined


def test_replies_round_trip() -> None:
    connected = d.decode_connect(
        _result(
            e.encode_connect_reply(1, client="c", user="u", version="9", ping_interval=25, pong_timeout=5)
        )
    )
    assert connected == d.Connected("c", "u", "9", 25.0, 5.0)
    assert d.decode_position(_result(e.encode_publish_reply(2, StreamPosition(7, "ep")))) == StreamPosition(
        7, "ep"
    )
    assert d.decode_rpc(_result(e.encode_rpc_reply(3, [1, {"a": None}]))) == [1, {"a": None}]
    assert d.decode_presence(_result(e.encode_presence_reply(4, {"c1": ALICE}))) == {"c1": ALICE}
    assert d.decode_presence_stats(
        _result(e.encode_presence_stats_reply(5, PresenceStats(3, 2)))
    ) == PresenceStats(3, 2)
    history = d.decode_history(
        "a",
        _result(
            e.encode_history_reply(6, [_Stored(4, b'"x"', ALICE), _Stored(5, b"2")], StreamPosition(5, "ep"))
        ),
    )
    assert history == HistoryPage(
        [ClientPublication("a", 4, "ep", "x", ALICE), ClientPublication("a", 5, "ep", 2, None)],
        StreamPosition(5, "ep"),
    )
    assert d.decode_expiry(_result(e.encode_refresh_reply(7, 99.5))) == 99.5
    assert d.decode_expiry(_result(e.encode_sub_refresh_reply(8, None))) is None
    assert d.reply_result(_frame(e.encode_ping_reply(9))) == {}


def test_connect_defaults_when_the_server_sends_no_pings() -> None:
    assert d.decode_connect({"client": "c", "user": "u", "version": "1"}) == d.Connected(
        "c", "u", "1", 0.0, 10.0
    )


def test_subscribe_result_round_trip() -> None:
    ok = e.subscribed_item(
        "a",
        StreamPosition(5, "ep"),
        recoverable=True,
        recovered=True,
        publications=e.publication_items([_Stored(5, b'"hi"', ALICE)]),
    )
    plain = e.subscribed_item(
        "b", StreamPosition(0, "e2"), recoverable=False, recovered=None, publications=[]
    )
    refused = e.subscribe_error_item("c", 103, "permission denied")
    first, second, third = d.decode_subscribed(_result(e.encode_subscribe_reply(1, [ok, plain, refused])))
    assert first == d.SubscribedChannel(
        "a", None, StreamPosition(5, "ep"), True, True, [ClientPublication("a", 5, "ep", "hi", ALICE)]
    )
    assert second == d.SubscribedChannel("b", None, StreamPosition(0, "e2"), False, None, [])
    assert third.channel == "c" and third.publications == []
    assert third.error is not None and (third.error.code, third.error.message) == (103, "permission denied")


def test_error_reply() -> None:
    error = d.reply_error(_frame(e.encode_error(3, "publish", 110, "permission denied")))
    assert isinstance(error, ReplyError) and (error.code, error.message) == (110, "permission denied")
    assert d.reply_error({"id": 1, "type": "ping", "result": {}}) is None
