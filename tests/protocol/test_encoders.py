"""The server's encoders write exactly the frames the protocol models define.

Each encoder's output is validated against its reply or push model (the models
forbid unknown fields), so the fast encoders and the schema cannot drift apart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from pydantic import BaseModel, TypeAdapter

from herald.protocol import encoders as e
from herald.protocol import messages as m
from herald.protocol.values import ClientInfo, PresenceStats, StreamPosition

PUSH: TypeAdapter[m.Push] = TypeAdapter(m.Push)
ALICE = ClientInfo("c1", "alice", {"role": "admin"})


@dataclass(frozen=True, slots=True)
class _Stored:
    offset: int
    data: bytes
    info: ClientInfo | None = None


def _reply(frame: str) -> m._Reply:
    value = json.loads(frame)
    model = m.REPLY_MODELS[value["type"]]
    return model.model_validate(value)


def test_publication_push_keeps_data_bytes_verbatim() -> None:
    data = orjson.dumps({"text": "héllo", "n": 1})
    frame = e.encode_publication("chat:lobby", 7, "ep", data, ClientInfo("c", "u"))
    assert data in frame.encode()
    push = PUSH.validate_python(json.loads(frame))
    assert isinstance(push, m.PublicationPush)
    assert (push.channel, push.offset, push.epoch) == ("chat:lobby", 7, "ep")
    assert push.data == {"text": "héllo", "n": 1}
    assert push.info == m.ClientInfoModel(client="c", user="u", info=None)
    no_info = json.loads(e.encode_publication("a", 1, "e", b"null", None))
    assert "info" not in no_info and no_info["data"] is None


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        (
            e.encode_presence_event("join", "a", ALICE),
            m.JoinPush(
                channel="a", info=m.ClientInfoModel(client="c1", user="alice", info={"role": "admin"})
            ),
        ),
        (
            e.encode_presence_event("leave", "a", ClientInfo("c2", "")),
            m.LeavePush(channel="a", info=m.ClientInfoModel(client="c2", user="")),
        ),
        (
            e.encode_disconnect(4001, "slow consumer", True),
            m.DisconnectPush(code=4001, reason="slow consumer", reconnect=True),
        ),
        (e.encode_refresh(2.5), m.RefreshPush(grace=2.5)),
        (e.encode_sub_refresh("a", 3.0), m.SubRefreshPush(channel="a", grace=3.0)),
        (
            e.encode_unsubscribe("a", 112, "expired"),
            m.UnsubscribePush(channel="a", code=112, reason="expired"),
        ),
        (e.PING_FRAME, m.PingPush()),
    ],
)
def test_pushes_match_their_models(frame: str, expected: BaseModel) -> None:
    assert PUSH.validate_python(json.loads(frame)) == expected


def test_replies_match_their_models() -> None:
    stored = [_Stored(4, b'{"x":1}', ALICE), _Stored(5, b"[1,2]")]
    info_model = m.ClientInfoModel(client="c1", user="alice", info={"role": "admin"})
    cases: list[tuple[str, Any]] = [
        (
            e.encode_connect_reply(
                1, client="c", user="u", version="9", ping_interval=25.0, pong_timeout=10.0
            ),
            m.ConnectResult(client="c", user="u", version="9", ping_interval=25.0, pong_timeout=10.0),
        ),
        (e.encode_unsubscribe_reply(2, ["a", "b"]), m.UnsubscribeResult(channels=["a", "b"])),
        (e.encode_publish_reply(3, StreamPosition(8, "ep")), m.PublishResult(offset=8, epoch="ep")),
        (e.encode_rpc_reply(4, {"ok": [1]}), m.RpcResult(data={"ok": [1]})),
        (e.encode_presence_reply(5, {"c1": ALICE}), m.PresenceResult(clients={"c1": info_model})),
        (
            e.encode_presence_stats_reply(6, PresenceStats(3, 2)),
            m.PresenceStatsResult(num_clients=3, num_users=2),
        ),
        (
            e.encode_history_reply(7, stored, StreamPosition(5, "ep")),
            m.HistoryResult(
                publications=[
                    m.PublicationModel(offset=4, data={"x": 1}, info=info_model),
                    m.PublicationModel(offset=5, data=[1, 2]),
                ],
                offset=5,
                epoch="ep",
            ),
        ),
        (e.encode_refresh_reply(8, 123.5), m.RefreshResult(expires_at=123.5)),
        (e.encode_sub_refresh_reply(9, None), m.SubRefreshResult(expires_at=None)),
        (e.encode_ping_reply(10), m.PingResult()),
    ]
    for number, (frame, result) in enumerate(cases, start=1):
        reply = _reply(frame)
        assert (reply.id, reply.error) == (number, None)
        assert reply.result == result, frame


def test_subscribe_reply_items() -> None:
    ok = e.subscribed_item(
        "a",
        StreamPosition(5, "ep"),
        recoverable=True,
        recovered=True,
        publications=e.publication_items([_Stored(5, b'"hi"', ALICE)]),
    )
    refused = e.subscribe_error_item("x" * 300, 103, "permission denied")
    reply = _reply(e.encode_subscribe_reply(11, [ok, refused]))
    assert isinstance(reply, m.SubscribeReply) and reply.result is not None
    first, second = reply.result.channels
    assert (first.channel, first.offset, first.epoch, first.recoverable, first.recovered) == (
        "a",
        5,
        "ep",
        True,
        True,
    )
    assert [(p.offset, p.data, p.info and p.info.user) for p in first.publications] == [(5, "hi", "alice")]
    assert second.channel == "x" * 255
    assert second.error == m.ErrorInfo(code=103, message="permission denied")


def test_error_replies() -> None:
    error = json.loads(e.encode_error(3, "publish", 110, "permission denied"))
    assert m.PublishReply.model_validate(error).error == m.ErrorInfo(code=110, message="permission denied")
    anonymous = json.loads(e.encode_error(None, None, 101, "bad request"))
    assert m.ErrorReply.model_validate(anonymous).id is None


def test_rpc_reply_encodes_pydantic_models() -> None:
    class Point(BaseModel):
        x: int

    assert json.loads(e.encode_rpc_reply(1, Point(x=2)))["result"] == {"data": {"x": 2}}


def test_every_reply_model_has_an_encoder() -> None:
    # A new command type needs its encoder here (and a case above).
    encoders = {
        name.removeprefix("encode_").removesuffix("_reply")
        for name in dir(e)
        if name.startswith("encode_") and name.endswith("_reply")
    }
    assert encoders == set(m.REPLY_MODELS)
