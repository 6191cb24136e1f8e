"""Pure tests of the protocol codec: round trips and every malformed frame's code."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import TypeAdapter

from herald.codes import ErrorCode
from herald.exceptions import ProtocolError
from herald.protocol import messages as m
from herald.protocol.codec import decode_command, json_depth_exceeds

COMMANDS: list[dict[str, Any]] = [
    {"id": 1, "type": "connect"},
    {"id": 2, "type": "connect", "token": "t", "name": "cli", "version": "1"},
    {"id": 3, "type": "subscribe", "channels": [{"channel": "chat:lobby"}]},
    {
        "id": 4,
        "type": "subscribe",
        "channels": [{"channel": "a", "since": {"offset": 3, "epoch": "e"}}, {"channel": "b"}],
    },
    {"id": 5, "type": "unsubscribe", "channels": ["chat:lobby"]},
    {"id": 6, "type": "publish", "channel": "chat:lobby", "data": {"text": "hi", "n": [1, 2.5, None]}},
    {"id": 7, "type": "rpc", "method": "move", "params": {"x": 1}},
    {"id": 8, "type": "presence", "channel": "chat:lobby"},
    {"id": 9, "type": "presence_stats", "channel": "chat:lobby"},
    {
        "id": 10,
        "type": "history",
        "channel": "chat:lobby",
        "since": {"offset": 0, "epoch": "x"},
        "limit": 10,
        "reverse": True,
    },
    {"id": 11, "type": "ping"},
    {"type": "pong"},
]

COMMAND_ADAPTER: TypeAdapter[m.Command] = TypeAdapter(m.Command)


@pytest.mark.parametrize("frame", COMMANDS, ids=lambda f: str(f["type"]))
def test_every_command_round_trips(frame: dict[str, Any]) -> None:
    command = decode_command(json.dumps(frame))
    assert command.type == frame["type"]
    dumped = command.model_dump(mode="json", exclude_defaults=True)
    assert decode_command(json.dumps(dumped)) == command
    for key, value in frame.items():
        if key in ("channels",) and isinstance(value[0], dict):
            continue
        assert dumped.get(key, value) == value


def test_the_clients_pong_is_answered_without_a_parse() -> None:
    # The exact frame Herald's clients send: one shared model, no JSON parse.
    first, second = decode_command('{"type":"pong"}'), decode_command('{"type":"pong"}')
    assert first == m.PongCommand(type="pong")
    assert first is second
    # Any other spelling is decoded (and checked) as usual.
    assert decode_command('{ "type": "pong" }') == m.PongCommand(type="pong")
    assert decode_command('{ "type": "pong" }') is not first
    with pytest.raises(ProtocolError) as caught:
        decode_command('{"type":"pong","x":1}')
    assert caught.value.code is ErrorCode.BAD_REQUEST


def test_bytes_input_accepted() -> None:
    assert decode_command(b'{"id": 1, "type": "ping"}') == m.PingRequest(type="ping", id=1)


@pytest.mark.parametrize(
    ("text", "code", "command_id"),
    [
        ("not json", ErrorCode.BAD_REQUEST, None),
        ('{"id": 1, "type": "ping"', ErrorCode.BAD_REQUEST, None),  # truncated
        ("", ErrorCode.BAD_REQUEST, None),
        ("[1, 2]", ErrorCode.BAD_REQUEST, None),
        ('"just a string"', ErrorCode.BAD_REQUEST, None),
        ("null", ErrorCode.BAD_REQUEST, None),
        ('{"id": 1}', ErrorCode.BAD_REQUEST, 1),  # missing type
        ('{"id": 2, "type": "teleport"}', ErrorCode.UNKNOWN_COMMAND, 2),
        ('{"id": 2, "type": 5}', ErrorCode.UNKNOWN_COMMAND, 2),
        ('{"type": "ping"}', ErrorCode.BAD_REQUEST, None),  # missing id
        ('{"id": "1", "type": "ping"}', ErrorCode.BAD_REQUEST, None),  # id of the wrong type
        ('{"id": 0, "type": "ping"}', ErrorCode.BAD_REQUEST, None),
        ('{"id": -5, "type": "ping"}', ErrorCode.BAD_REQUEST, None),
        ('{"id": 9007199254740992, "type": "ping"}', ErrorCode.BAD_REQUEST, None),  # 2**53
        ('{"id": 1e400, "type": "ping"}', ErrorCode.BAD_REQUEST, None),  # float overflow
        ('{"id": 123456789012345678901234567890, "type": "ping"}', ErrorCode.BAD_REQUEST, None),
        ('{"id": 3, "type": "publish", "channel": "a"}', ErrorCode.BAD_REQUEST, 3),  # no data field
        ('{"id": 3, "type": "publish", "channel": 5, "data": 1}', ErrorCode.BAD_REQUEST, 3),
        ('{"id": 4, "type": "subscribe", "channels": []}', ErrorCode.BAD_REQUEST, 4),
        ('{"id": 4, "type": "subscribe", "channels": "chat"}', ErrorCode.BAD_REQUEST, 4),
        (
            '{"id": 4, "type": "subscribe", "channels": [{"channel": "a", "since": {"offset": -1, "epoch": "e"}}]}',
            ErrorCode.BAD_REQUEST,
            4,
        ),
        ('{"id": 5, "type": "ping", "extra": true}', ErrorCode.BAD_REQUEST, 5),  # unknown field
        ('{"id": 6, "type": "history", "channel": "a", "limit": "ten"}', ErrorCode.BAD_REQUEST, 6),
        ('{"id": 7, "type": "rpc", "method": ""}', ErrorCode.BAD_REQUEST, 7),
    ],
)
def test_malformed_frames_get_their_code(text: str, code: ErrorCode, command_id: int | None) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_command(text)
    assert caught.value.code == code
    assert caught.value.command_id == command_id
    assert caught.value.message


@pytest.mark.parametrize(
    ("text", "command_type"),
    [
        ('{"id": 5, "type": "history", "channel": "a", "limit": -5}', "history"),
        ('{"id": 5, "type": "ping", "extra": true}', "ping"),
        ('{"type": "ping"}', "ping"),  # no id: still a ping
        ('{"id": 2, "type": "teleport"}', None),  # not a command type: not echoed
        ('{"id": 2, "type": "publication"}', None),  # a push's name is not a command's
        ('{"id": 2, "type": 5}', None),
        ("not json", None),
        ('{"id": 9, "type": "ping", "x": ' + "[" * 40 + "]" * 40 + "}", "ping"),  # too deep
    ],
)
def test_errors_carry_the_command_type_when_it_is_one(text: str, command_type: str | None) -> None:
    """A reply carries the command's type (protocol.md: "the same id and type") unless the
    frame's type is not a command type protocol v1 defines."""
    with pytest.raises(ProtocolError) as caught:
        decode_command(text)
    assert caught.value.command_type == command_type


@pytest.mark.parametrize(
    "frame",
    [
        {"id": 1, "type": "publish", "channel": "c" * 1025, "data": 1},
        {"id": 1, "type": "history", "channel": "c" * 5000},
        {"id": 1, "type": "subscribe", "channels": [{"channel": "c" * 1025}]},
        {"id": 1, "type": "unsubscribe", "channels": ["c" * 1025]},
        {"id": 1, "type": "presence", "channel": "c" * 1025},
    ],
)
def test_channel_names_over_the_cap_are_invalid_channels(frame: dict[str, Any]) -> None:
    """Over the models' 1024-character cap a name gets 106, as names over
    max_channel_length (at most 1024) do from the policy, not 101."""
    with pytest.raises(ProtocolError) as caught:
        decode_command(json.dumps(frame))
    assert caught.value.code == ErrorCode.INVALID_CHANNEL
    assert caught.value.command_id == 1


@pytest.mark.parametrize(
    "frame",
    [
        {"id": 1, "type": "connect", "name": "n" * 65},
        {
            "id": 1,
            "type": "subscribe",
            "channels": [{"channel": "a", "since": {"offset": 1, "epoch": "e" * 65}}],
        },
        {"id": 1, "type": "subscribe", "channels": [{"channel": "a", "token": "t" * 8193}]},
        {"id": 1, "type": "sub_refresh", "channel": "a", "token": "t" * 8193},
    ],
)
def test_a_long_value_that_is_not_a_channel_name_stays_a_bad_request(frame: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_command(json.dumps(frame))
    assert caught.value.code == ErrorCode.BAD_REQUEST


def test_deep_nesting_rejected_without_recursion() -> None:
    deep = '{"id": 1, "type": "publish", "channel": "a", "data": ' + "[" * 10_000 + "]" * 10_000 + "}"
    with pytest.raises(ProtocolError) as caught:
        decode_command(deep)
    assert caught.value.code in (ErrorCode.TOO_DEEP, ErrorCode.BAD_REQUEST)
    nested = {"id": 1, "type": "publish", "channel": "a", "data": [[[[[[1]]]]]]}
    with pytest.raises(ProtocolError) as caught:
        decode_command(json.dumps(nested), max_depth=4)
    assert caught.value.code == ErrorCode.TOO_DEEP
    assert decode_command(json.dumps(nested), max_depth=8).type == "publish"


def test_json_depth_counts_containers_only() -> None:
    assert not json_depth_exceeds({"a": {"b": [1, "x"]}}, 3)
    assert json_depth_exceeds({"a": {"b": [1, "x"]}}, 2)
    assert not json_depth_exceeds("scalar", 0)


def test_brackets_and_colons_inside_strings_do_not_trip_the_limits() -> None:
    """The cheap pre-check counts "{", "[" and ":" anywhere in the frame; when strings hold
    many of them the real walk decides, and a shallow frame still passes (issue 19)."""
    data = "{[:" * 500
    text = json.dumps({"id": 1, "type": "publish", "channel": "chat:x", "data": data})
    command = decode_command(text, max_depth=2, max_keys=5)
    assert command.type == "publish"
    deep = json.dumps({"id": 2, "type": "publish", "channel": "chat:x", "data": {"a": {"b": 1}}})
    with pytest.raises(ProtocolError) as caught:
        decode_command(deep, max_depth=2, max_keys=5)
    assert caught.value.code == ErrorCode.TOO_DEEP
    many = json.dumps(
        {"id": 3, "type": "publish", "channel": "chat:x", "data": {str(k): k for k in range(4)}}
    )
    with pytest.raises(ProtocolError) as caught:
        decode_command(many, max_depth=5, max_keys=5)
    assert caught.value.code == ErrorCode.TOO_LARGE
