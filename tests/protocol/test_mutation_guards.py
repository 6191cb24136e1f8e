"""Guards found by mutation testing (scripts/mutation) in the pure protocol modules.

Each test notices a small planted bug that the other protocol tests let through: the
exact wording of refusals a client reads, the command id an error reply is matched
by, and boundaries of the channel-name and session rules.
"""

from __future__ import annotations

import datetime

import orjson
import pytest
from pydantic import BaseModel

from herald.codes import ErrorCode
from herald.exceptions import CommandError, ProtocolError, ReplyError
from herald.protocol.channels import ChannelRules, allowed_users, namespace_of, validate_channel
from herald.protocol.codec import decode_command, json_depth_exceeds, json_key_count_exceeds
from herald.protocol.decoders import (
    Connected,
    DisconnectNotice,
    RefreshRequest,
    SubRefreshRequest,
    Unsubscribed,
    decode_connect,
    decode_info,
    decode_push,
    decode_subscribed,
    reply_error,
    reply_result,
)
from herald.protocol.encoders import encode_disconnect, encode_rpc_reply
from herald.protocol.gate import CommandGate
from herald.protocol.messages import MAX_ID
from herald.protocol.values import ClientInfo, ClientPublication, StreamPosition

# ---------------------------------------------------------------- channel names


@pytest.mark.parametrize(
    ("name", "rules", "message"),
    [
        ("", ChannelRules(), "channel name must be a non-empty string"),
        (7, ChannelRules(), "channel name must be a non-empty string"),
        ("abcdef", ChannelRules(max_length=5), "channel name longer than 5 characters"),
        ("a b", ChannelRules(), "channel name may contain only letters, digits and _ . : @ = , # ! ~ -"),
    ],
)
def test_channel_refusals_say_why(name: object, rules: ChannelRules, message: str) -> None:
    with pytest.raises(CommandError) as refused:
        validate_channel(name, rules)
    assert (refused.value.code, refused.value.message) == (ErrorCode.INVALID_CHANNEL, message)


def test_internal_names_drop_exactly_one_dollar() -> None:
    assert validate_channel("$a", internal=True) == "$a"
    assert validate_channel("abcde", ChannelRules(max_length=5)) == "abcde"
    with pytest.raises(CommandError):
        validate_channel("$$a", internal=True)


def test_namespace_strips_only_the_reserved_prefix() -> None:
    assert namespace_of("Xy:room") == "Xy"
    assert namespace_of("$$ops:room") == "ops"


def test_user_list_starts_at_the_first_hash() -> None:
    assert allowed_users("dm:room#alice,bob#carol") == frozenset({"alice", "bob#carol"})
    assert allowed_users("dm:room#,alice,,") == frozenset({"alice"})


# ---------------------------------------------------------------- command gate (per-client state)


def refusal(gate: CommandGate, command_id: int | None, kind: str) -> ProtocolError:
    with pytest.raises(ProtocolError) as refused:
        gate.begin(command_id, kind)
    return refused.value


def test_session_refusals_carry_the_command_id() -> None:
    session = CommandGate()
    assert refusal(session, 3, "ping").command_id == 3  # NOT_CONNECTED
    session.begin(4, "connect")
    session.connected()
    assert refusal(session, 5, "connect").command_id == 5  # ALREADY_CONNECTED
    session.begin(6, "ping")
    assert refusal(session, 6, "ping").command_id == 6  # DUPLICATE_ID
    session.close()
    closed = refusal(session, 8, "ping")
    assert (closed.code, closed.message, closed.command_id) == (ErrorCode.BAD_REQUEST, "session is closed", 8)


def test_at_most_128_subscriptions_by_default() -> None:
    assert CommandGate().max_subscriptions == 128
    session = CommandGate({f"chat:{n}" for n in range(127)})
    session.check_subscribe("chat:new")
    full = CommandGate({f"chat:{n}" for n in range(128)})
    with pytest.raises(ProtocolError) as refused:
        full.check_subscribe("chat:new")
    assert refused.value.code == ErrorCode.LIMIT_EXCEEDED
    assert refused.value.message == "at most 128 subscriptions per connection"


# ---------------------------------------------------------------- codec


def decode_error(text: str, **limits: int) -> ProtocolError:
    with pytest.raises(ProtocolError) as refused:
        decode_command(text, **limits)
    return refused.value


@pytest.mark.parametrize(
    ("text", "limits", "code", "message", "command_id"),
    [
        ("[" * 2000, {}, ErrorCode.TOO_DEEP, "JSON nested too deeply", None),  # past orjson's own limit
        (
            "{",
            {},
            ErrorCode.BAD_REQUEST,
            "malformed JSON: unexpected end of data: line 1 column 2 (char 1)",
            None,
        ),
        ("[1]", {}, ErrorCode.BAD_REQUEST, "a frame must be a JSON object", None),
        ('{"id": 4}', {}, ErrorCode.BAD_REQUEST, "missing field: type", 4),
        (
            '{"id": 4, "type": "' + "x" * 32 + '"}',
            {},
            ErrorCode.UNKNOWN_COMMAND,
            "unknown command type: " + "x" * 32,
            4,
        ),
        (
            '{"id": 4, "type": "' + "x" * 33 + '"}',
            {},
            ErrorCode.UNKNOWN_COMMAND,
            "unknown command type: ?",
            4,
        ),
        ('{"id": 4, "type": 7}', {}, ErrorCode.UNKNOWN_COMMAND, "unknown command type: ?", 4),
        ('{"id": 4, "type": "subscribe"}', {}, ErrorCode.BAD_REQUEST, "channels: Field required", 4),
        (
            '{"id": 4, "type": "subscribe", "channels": [{}]}',
            {},
            ErrorCode.BAD_REQUEST,
            "channels.0.channel: Field required",
            4,
        ),
        (
            '{"id": 5, "type": "ping", "x": [[1]]}',
            {"max_depth": 2},
            ErrorCode.TOO_DEEP,
            "JSON nested deeper than 2 levels",
            5,
        ),
        (
            '{"id": 6, "type": "ping", "a": {"b": 1}}',
            {"max_keys": 3},
            ErrorCode.TOO_LARGE,
            "more than 3 object keys in one frame",
            6,
        ),
    ],
)
def test_decode_refusals_say_why_and_carry_the_id(
    text: str, limits: dict[str, int], code: ErrorCode, message: str, command_id: int | None
) -> None:
    error = decode_error(text, **limits)
    assert (error.code, error.message, error.command_id) == (code, message, command_id)


def test_the_largest_id_is_readable() -> None:
    assert decode_error(f'{{"id": {MAX_ID}, "type": "nope"}}').command_id == MAX_ID
    assert decode_error(f'{{"id": {MAX_ID + 1}, "type": "nope"}}').command_id is None


def test_json_depth_at_the_limit_is_allowed() -> None:
    assert not json_depth_exceeds({"a": 1}, 1) and json_depth_exceeds({"a": {}}, 1)
    assert not json_depth_exceeds([1], 1) and json_depth_exceeds([[]], 1)


def test_json_keys_at_the_limit_are_allowed() -> None:
    # Keys of every level count together.
    assert not json_key_count_exceeds({"a": 1, "b": {"c": 2}}, 3)
    assert json_key_count_exceeds({"a": 1, "b": {"c": 2}}, 2)
    assert not json_key_count_exceeds([{"a": 1}, {"b": 2}], 2)
    assert json_key_count_exceeds([{"a": 1}, {"b": 2}], 1)


# ---------------------------------------------------------------- encoders and values


class Tagged(BaseModel):
    tags: set[int]
    after: datetime.timedelta


def test_rpc_results_may_be_pydantic_models_in_json_mode() -> None:
    frame = encode_rpc_reply(1, Tagged(tags={3}, after=datetime.timedelta(seconds=3)))
    assert frame == '{"id":1,"type":"rpc","result":{"data":{"tags":[3],"after":"PT3S"}}}'
    with pytest.raises(TypeError) as refused:
        encode_rpc_reply(1, object())
    assert str(refused.value.__cause__) == "cannot encode object as JSON"


def test_disconnect_push_says_whether_to_reconnect() -> None:
    assert orjson.loads(encode_disconnect(4000, "bye", False)) == {
        "type": "disconnect",
        "code": 4000,
        "reason": "bye",
        "reconnect": False,
    }


def test_client_info_as_and_from_a_dict() -> None:
    info = ClientInfo("c1", "alice", {"role": "admin"})
    assert info.as_dict() == {"client": "c1", "user": "alice", "info": {"role": "admin"}}
    assert ClientInfo.from_dict({"client": 1, "user": 2, "info": [3]}) == ClientInfo("1", "2", [3])
    assert ClientInfo.from_dict({"client": "c", "user": "u"}) == ClientInfo("c", "u", None)


# ---------------------------------------------------------------- decoders: the documented defaults


def error_of(error: ReplyError | None) -> tuple[int, str] | None:
    return None if error is None else (error.code, error.message)


def test_decoders_default_what_a_frame_leaves_out() -> None:
    assert decode_info({}) == ClientInfo("", "", None)
    assert decode_info("not a dict") is None
    assert error_of(reply_error({"error": None})) == (0, "error")
    assert error_of(reply_error({"error": {"code": 110}})) == (110, "error")
    assert reply_error({"result": {}}) is None
    assert reply_result({"result": [1]}) == {} and reply_result({}) == {}
    assert decode_connect({}) == Connected("", "", "", 0.0, 10.0)


def test_subscribe_items_default_what_they_leave_out() -> None:
    refused, bare = decode_subscribed(
        {
            "channels": [
                {"channel": "a", "error": {"x": 1}, "publications": [{"offset": 1, "data": 1}]},
                {"channel": "b"},
            ]
        }
    )
    assert error_of(refused.error) == (0, "")
    assert refused.publications == []  # a refused channel has no publications, whatever is sent
    assert (bare.error, bare.position, bare.recoverable, bare.recovered) == (
        None,
        StreamPosition(0, ""),
        False,
        None,
    )


def test_pushes_default_what_they_leave_out() -> None:
    publication = decode_push({"type": "publication", "channel": "c"})
    assert isinstance(publication, ClientPublication)
    assert (publication.offset, publication.epoch, publication.info) == (0, "", None)
    assert decode_push({"type": "disconnect"}) == DisconnectNotice(1006, "")
    assert decode_push({"type": "refresh"}) == RefreshRequest(0.0)
    assert decode_push({"type": "sub_refresh", "channel": "c"}) == SubRefreshRequest("c", 0.0)
    unsubscribed = decode_push({"type": "unsubscribe", "channel": "c"})
    assert isinstance(unsubscribed, Unsubscribed)
    assert (unsubscribed.channel, error_of(unsubscribed.error)) == ("c", (0, ""))
