"""Client frames -> command models, and the JSON rules every frame obeys.

Decoding is strict and total: any input either becomes a :data:`Command` or
raises :class:`~herald.exceptions.ProtocolError` with a documented code.

The server's frames are written by :mod:`herald.protocol.encoders`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson
from pydantic import TypeAdapter, ValidationError

from ..codes import ErrorCode
from ..exceptions import ProtocolError
from .messages import COMMAND_TYPES, MAX_ID, Command, PongCommand

_COMMAND_ADAPTER: TypeAdapter[Command] = TypeAdapter(Command)

# The pong every Herald client sends, byte for byte: an idle node receives one per
# client per ping interval, and this frame needs no parse (any other spelling of a
# pong is decoded as usual).  Models are frozen: one instance serves every pong.
_PONG_TEXT = '{"type":"pong"}'
_PONG = PongCommand(type="pong")

#: A run of digits as long as any JSON integer outside 64 bits needs (19): orjson reads
#: such an integer as a float, so text without one can skip an exact check.
LONG_DIGITS = re.compile(rb"\d{19}")

#: Default maximum nesting of arrays/objects in a frame.
DEFAULT_MAX_DEPTH = 32
#: Default maximum number of object keys in a frame (all levels together).
DEFAULT_MAX_KEYS = 1000


def json_depth_exceeds(value: Any, max_depth: int) -> bool:
    """Return True when ``value`` nests arrays/objects deeper than ``max_depth``.

    Iterative, so a hostile value cannot exhaust the Python stack.
    """
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            if depth > max_depth:
                return True
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            if depth > max_depth:
                return True
            stack.extend((v, depth + 1) for v in item)
    return False


def json_key_count_exceeds(value: Any, max_keys: int) -> bool:
    """Return True when ``value`` holds more than ``max_keys`` object keys in total."""
    count = 0
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            count += len(item)
            if count > max_keys:
                return True
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _parse(text: str | bytes) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        message = str(exc)
        lowered = message.lower()
        # orjson refuses nesting past its own limit (1024) before we can count it.
        if "recursion" in lowered or "depth limit" in lowered:
            raise ProtocolError(ErrorCode.TOO_DEEP, "JSON nested too deeply") from None
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"malformed JSON: {message}") from None


def _check_limits(
    value: Any,
    max_depth: int,
    max_keys: int | None,
    command_id: int | None,
    text: str | bytes = "",
) -> None:
    # Cheap bounds first (C-speed scans of the frame): every array or object opens with a
    # "[" or "{" and every key is followed by a ":" (the same characters inside strings
    # only raise the counts), so a frame with few of them cannot break a limit and the walks
    # below are skipped.  They were a fifth of a publish command's CPU (issue 19).
    if isinstance(text, str):
        openers, colons = text.count("{") + text.count("["), text.count(":")
    else:
        openers, colons = text.count(b"{") + text.count(b"["), text.count(b":")
    if text and openers <= max_depth and (max_keys is None or colons <= max_keys):
        return
    kind = _readable_type(value)
    if json_depth_exceeds(value, max_depth):
        raise ProtocolError(
            ErrorCode.TOO_DEEP, f"JSON nested deeper than {max_depth} levels", command_id, kind
        )
    if max_keys is not None and json_key_count_exceeds(value, max_keys):
        raise ProtocolError(
            ErrorCode.TOO_LARGE, f"more than {max_keys} object keys in one frame", command_id, kind
        )


def _readable_id(frame: Mapping[str, Any]) -> int | None:
    value = frame.get("id")
    if type(value) is int and 1 <= value <= MAX_ID:
        return value
    return None


def _readable_type(frame: Any) -> str | None:
    """The frame's command type when it is one protocol v1 defines (for the error reply)."""
    if not isinstance(frame, dict):
        return None
    kind = frame.get("type")
    return kind if isinstance(kind, str) and kind in COMMAND_TYPES else None


def _error_code(error: ValidationError) -> ErrorCode:
    """106 for a channel name over the models' length cap (the policy answers 106 for
    names over ``max_channel_length``, which is at most that cap); 101 otherwise."""
    first = error.errors(include_url=False)[0]
    if first["type"] == "string_too_long":
        # The name itself: ``channel`` (a command's, or a subscribe item's), or an item
        # of unsubscribe's ``channels``; not a subscribe item's ``since.epoch`` or token.
        loc = first["loc"]
        if loc[-1] == "channel" or (len(loc) >= 2 and loc[-2] == "channels" and isinstance(loc[-1], int)):
            return ErrorCode.INVALID_CHANNEL
    return ErrorCode.BAD_REQUEST


def _describe(error: ValidationError) -> str:
    first = error.errors(include_url=False)[0]
    location = ".".join(str(part) for part in first["loc"] if part not in COMMAND_TYPES)
    message = first["msg"]
    return f"{location}: {message}" if location else message


def decode_command(
    text: str | bytes, *, max_depth: int = DEFAULT_MAX_DEPTH, max_keys: int = DEFAULT_MAX_KEYS
) -> Command:
    """Decode one client frame into a command model.

    Raises :class:`ProtocolError` with

    * ``BAD_REQUEST`` (101) for malformed JSON, a non-object frame, a missing or
      ill-typed field, an unknown field, or an out-of-range id;
    * ``UNKNOWN_COMMAND`` (102) for a ``type`` protocol v1 does not define;
    * ``TOO_DEEP`` (120) for nesting deeper than ``max_depth``;
    * ``TOO_LARGE`` (117) for more than ``max_keys`` object keys.

    ``ProtocolError.command_id`` and ``command_type`` carry the frame's id and type when
    they were readable (the type only when it is one protocol v1 defines).
    """
    if text == _PONG_TEXT:
        return _PONG
    frame = _parse(text)
    command_id = _readable_id(frame) if isinstance(frame, dict) else None
    # Limits are checked after the id is read, so that the error reply can carry it.
    _check_limits(frame, max_depth, max_keys, command_id, text)
    if not isinstance(frame, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "a frame must be a JSON object")
    kind = frame.get("type")
    if kind is None:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "missing field: type", command_id)
    if not isinstance(kind, str) or kind not in COMMAND_TYPES:
        shown = kind if isinstance(kind, str) and len(kind) <= 32 else "?"
        raise ProtocolError(ErrorCode.UNKNOWN_COMMAND, f"unknown command type: {shown}", command_id)
    try:
        return _COMMAND_ADAPTER.validate_python(frame)
    except ValidationError as exc:
        raise ProtocolError(_error_code(exc), _describe(exc), command_id, kind) from None
