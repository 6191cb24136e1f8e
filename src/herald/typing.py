"""Identifier types shared across Herald.

``NewType`` ids let mypy catch a user id passed where a client id is expected.
"""

from __future__ import annotations

from typing import Any, NewType, TypeAlias

ChannelName = NewType("ChannelName", str)
ClientId = NewType("ClientId", str)
UserId = NewType("UserId", str)

#: Any value that JSON can represent once decoded.
JSON: TypeAlias = Any

__all__ = ["JSON", "ChannelName", "ClientId", "UserId"]
