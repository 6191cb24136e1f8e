"""Property-based tests: whatever a client sends, the codec returns a command or raises
ProtocolError with a documented code, and never anything else."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from herald.codes import ErrorCode
from herald.exceptions import ProtocolError
from herald.protocol.codec import decode_command
from herald.protocol.messages import COMMAND_TYPES

DOCUMENTED = {
    ErrorCode.BAD_REQUEST,
    ErrorCode.UNKNOWN_COMMAND,
    ErrorCode.TOO_DEEP,
    ErrorCode.TOO_LARGE,
}

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def decode_or_protocol_error(frame: str | bytes, **limits: Any) -> None:
    try:
        command = decode_command(frame, **limits)
    except ProtocolError as exc:
        assert exc.code in DOCUMENTED, exc
        assert exc.command_id is None or (isinstance(exc.command_id, int) and exc.command_id >= 1)
        assert len(exc.message) < 1000  # error replies stay small whatever came in
    else:
        assert command.type in COMMAND_TYPES


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=12,
)

field_names = st.sampled_from(
    [
        "id",
        "type",
        "channel",
        "channels",
        "data",
        "token",
        "since",
        "offset",
        "epoch",
        "limit",
        "method",
        "params",
        "reverse",
        "name",
    ]
)
command_types = st.sampled_from([*sorted(COMMAND_TYPES), "", "CONNECT", "nope", "__class__"])

# Frames that look like commands, so that validation (not just JSON parsing) is exercised.
command_like = st.fixed_dictionaries(
    {"type": command_types},
    optional={"id": json_values | st.integers(min_value=-5, max_value=2**60)},
).flatmap(
    lambda base: st.dictionaries(field_names, json_values, max_size=6).map(lambda extra: {**extra, **base})
)


@FAST
@given(st.binary(max_size=300))
def test_arbitrary_bytes(frame: bytes) -> None:
    decode_or_protocol_error(frame)


@FAST
@given(st.text(max_size=300))
def test_arbitrary_text(frame: str) -> None:
    decode_or_protocol_error(frame)


@FAST
@given(json_values)
def test_arbitrary_json(value: Any) -> None:
    decode_or_protocol_error(json.dumps(value))


@FAST
@given(command_like)
def test_command_shaped_json(value: dict[str, Any]) -> None:
    decode_or_protocol_error(json.dumps(value))


@FAST
@given(command_like, st.integers(min_value=0, max_value=200))
def test_truncated_frames(value: dict[str, Any], cut: int) -> None:
    text = json.dumps(value)
    decode_or_protocol_error(text[: min(cut, len(text))])


@FAST
@given(st.integers(min_value=1, max_value=3000), st.sampled_from(["[", '{"a":']))
def test_deep_nesting_is_too_deep_not_a_crash(depth: int, opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    frame = '{"id":1,"type":"publish","channel":"a","data":' + opener * depth + "1" + closer * depth + "}"
    try:
        decode_command(frame, max_depth=32)
    except ProtocolError as exc:
        assert exc.code is ErrorCode.TOO_DEEP
        assert depth + 1 > 32
    else:
        assert depth + 1 <= 32


@FAST
@given(st.integers(min_value=0, max_value=50), st.integers(min_value=1, max_value=40))
def test_key_count_limit(keys: int, limit: int) -> None:
    data = {f"k{i}": i for i in range(keys)}
    frame = json.dumps({"id": 1, "type": "publish", "channel": "a", "data": data})
    try:
        decode_command(frame, max_keys=limit)
    except ProtocolError as exc:
        assert exc.code is ErrorCode.TOO_LARGE
        assert keys + 4 > limit
    else:
        assert keys + 4 <= limit


def test_ten_thousand_deep_is_too_deep() -> None:
    for frame in ("[" * 10_000 + "]" * 10_000, '{"a":' * 10_000 + "1" + "}" * 10_000):
        try:
            decode_command(frame)
        except ProtocolError as exc:
            assert exc.code is ErrorCode.TOO_DEEP
        else:  # pragma: no cover
            raise AssertionError("accepted 10,000-deep JSON")


def test_lone_surrogates_and_invalid_utf8() -> None:
    for frame in ('{"id":1,"type":"ping","x":"\ud800"}', b"\xff\xfe", b'{"id":1,"type":"p\xffng"}'):
        decode_or_protocol_error(frame)
