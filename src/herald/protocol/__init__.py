"""Herald protocol v1: the wire, pure.

This package imports no asyncio, FastAPI or broker code: it turns bytes into
models and models into bytes, validates channel names and tracks what a
session may do next.  See ``docs/protocol.md``.
"""

from __future__ import annotations

from .channels import ChannelRules, namespace_of, validate_channel
from .codec import decode_command
from .encoders import encode_publication
from .gate import CommandGate, Phase
from .messages import (
    PROTOCOL_VERSION,
    SUBPROTOCOL,
    ClientInfoModel,
    Command,
    Push,
    StreamPositionModel,
)
from .values import ClientInfo, PresenceStats, StreamPosition

__all__ = [
    "PROTOCOL_VERSION",
    "SUBPROTOCOL",
    "ChannelRules",
    "ClientInfo",
    "ClientInfoModel",
    "Command",
    "CommandGate",
    "Phase",
    "PresenceStats",
    "Push",
    "StreamPosition",
    "StreamPositionModel",
    "decode_command",
    "encode_publication",
    "namespace_of",
    "validate_channel",
]
