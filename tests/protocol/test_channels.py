"""Channel name syntax and namespaces."""

from __future__ import annotations

import pytest

from herald.codes import ErrorCode
from herald.exceptions import CommandError
from herald.protocol.channels import ChannelRules, allowed_users, namespace_of, validate_channel


@pytest.mark.parametrize(
    "name", ["chat:lobby", "lobby", "game:room-1", "a.b_c:d@e=f,g", "dm:chat#alice,bob", "x" * 255]
)
def test_valid_names(name: str) -> None:
    assert validate_channel(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "x" * 256,
        "chat lobby",
        "chat/../etc",
        "tab\there",
        "nul\x00",
        "newline\n",
        "ünïcode",
        "$tutorial:broadcast",
        "a/b",
        None,
        5,
        ["a"],
    ],
)
def test_invalid_names(name: object) -> None:
    with pytest.raises(CommandError) as caught:
        validate_channel(name)
    assert caught.value.code == ErrorCode.INVALID_CHANNEL


def test_internal_names_need_internal_flag() -> None:
    assert validate_channel("$tutorial:broadcast", internal=True) == "$tutorial:broadcast"
    with pytest.raises(CommandError):
        validate_channel("$", internal=True)


def test_custom_length() -> None:
    with pytest.raises(CommandError):
        validate_channel("abcdef", ChannelRules(max_length=5))


def test_namespaces() -> None:
    assert namespace_of("chat:lobby") == "chat"
    assert namespace_of("chat:lobby:sub") == "chat"
    assert namespace_of("lobby") == ""
    assert namespace_of("$tutorial:broadcast") == "tutorial"


def test_user_limited_channels() -> None:
    assert allowed_users("dm:chat#alice,bob") == frozenset({"alice", "bob"})
    assert allowed_users("dm:chat") is None
    assert allowed_users("dm:#") == frozenset()
