"""Channel names: syntax, namespaces, user-limited channels.

A channel name is 1..``max_length`` characters from ``[A-Za-z0-9_.:@=,#!~-]``.
The part before the first ``:`` is the *namespace* (``chat:lobby`` is in
namespace ``chat``); a name without ``:`` is in the default namespace ``""``.
Names starting with ``$`` are reserved for Herald itself and refused from clients.
A ``#`` introduces the users allowed to read a channel: ``chat:dm#alice,bob``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..codes import ErrorCode
from ..exceptions import CommandError

_NAME = re.compile(r"[A-Za-z0-9_.:@=,#!~\-]+")
DEFAULT_MAX_LENGTH = 255


@dataclass(frozen=True, slots=True)
class ChannelRules:
    """Syntax limits for channel names."""

    max_length: int = DEFAULT_MAX_LENGTH


def validate_channel(name: object, rules: ChannelRules = ChannelRules(), *, internal: bool = False) -> str:
    """Return ``name`` if it is a valid channel name, else raise ``CommandError(INVALID_CHANNEL)``.

    ``internal`` allows the reserved ``$`` prefix (server-side use only).
    """
    if not isinstance(name, str) or not name:
        raise CommandError(ErrorCode.INVALID_CHANNEL, "channel name must be a non-empty string")
    if len(name) > rules.max_length:
        raise CommandError(
            ErrorCode.INVALID_CHANNEL, f"channel name longer than {rules.max_length} characters"
        )
    body = name[1:] if internal and name.startswith("$") else name
    if not body or not _NAME.fullmatch(body):
        raise CommandError(
            ErrorCode.INVALID_CHANNEL,
            "channel name may contain only letters, digits and _ . : @ = , # ! ~ -",
        )
    return name


def namespace_of(name: str) -> str:
    """The namespace of a channel: the part before the first ``:``, or ``""``."""
    head, sep, _ = name.lstrip("$").partition(":")
    return head if sep else ""


def allowed_users(name: str) -> frozenset[str] | None:
    """Users allowed in a user-limited channel (``ns:room#alice,bob``), or None if unrestricted."""
    _, sep, users = name.partition("#")
    if not sep:
        return None
    return frozenset(user for user in users.split(",") if user)
