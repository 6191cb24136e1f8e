"""Every flag and argument of every `herald` command explains itself in --help."""

from __future__ import annotations

import argparse
import contextlib
import io

import pytest

from herald.cli import build_parser, main
from herald.config import Settings


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    [subparsers] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(subparsers.choices)


def test_every_command_is_covered() -> None:
    assert set(_commands()) >= {"serve", "config", "bench", "connect", "publish", "presence", "history"}


@pytest.mark.parametrize("command", sorted(_commands()))
def test_every_flag_has_help(command: str) -> None:
    parser = _commands()[command]
    missing = [
        "/".join(action.option_strings) or action.dest
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction)
        and (not action.help or not action.help.strip() or action.help == argparse.SUPPRESS)
    ]
    assert missing == [], f"herald {command}: no help for {missing}"


@pytest.mark.parametrize("command", ["serve", "config"])
def test_server_flags_explain_the_setting_they_override(command: str) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    text = " ".join(out.getvalue().split())  # argparse wraps lines
    broker = Settings.model_fields["broker"].description
    assert broker is not None and " ".join(broker.split()) in text  # from config.py
    for name, default in (("host", "127.0.0.1"), ("port", "8000"), ("reload", "false"), ("broker", "memory")):
        assert f"HERALD_{name.upper()}, default {default})" in text
    assert "Port to listen on." in text


def test_connect_name_says_where_the_name_shows() -> None:
    connect = _commands()["connect"]
    [name] = [a for a in connect._actions if "--name" in a.option_strings]
    assert name.help is not None and "info.name" in name.help and "server logs" not in name.help
