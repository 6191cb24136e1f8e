"""Herald protocol v1: the wire, pure.

This package imports no asyncio, FastAPI or broker code: it turns bytes into
models and models into bytes, validates channel names and tracks what a
session may do next.  See ``docs/protocol.md``.
"""

from __future__ import annotations

from .channels import ChannelRules, namespace_of, validate_channel
from .codec import decode_command, encode_frame, encode_publication
from .messages import (
    PROTOCOL_VERSION,
    SUBPROTOCOL,
    ClientInfoModel,
    Command,
    Push,
    StreamPositionModel,
)
from .session import Session, SessionState

__all__ = [
    "PROTOCOL_VERSION",
    "SUBPROTOCOL",
    "ChannelRules",
    "ClientInfoModel",
    "Command",
    "Push",
    "Session",
    "SessionState",
    "StreamPositionModel",
    "decode_command",
    "encode_frame",
    "encode_publication",
    "namespace_of",
    "validate_channel",
]
