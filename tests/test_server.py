"""create_app() wiring that needs no network."""

from __future__ import annotations

import pytest

from herald.config import Settings
from herald.server import create_app


def test_openapi_document_builds_and_lists_the_api() -> None:
    # Route annotations under postponed evaluation can break FastAPI's OpenAPI generation.
    spec = create_app(Settings()).openapi()
    for path in (
        "/api/publish",
        "/api/broadcast",
        "/api/presence",
        "/api/history",
        "/api/channels",
        "/api/disconnect",
        "/healthz",
        "/readyz",
    ):
        assert path in spec["paths"], path


def test_module_level_app_is_built_lazily() -> None:
    import herald.server as server

    assert server.app is server.app  # built once, then cached
    paths = {
        name: server.app.url_path_for(name)
        for name in ("herald_connect", "tutorial_echo", "tutorial_json", "tutorial_broadcast")
    }
    assert paths == {
        "herald_connect": "/connect",
        "tutorial_echo": "/ws",
        "tutorial_json": "/ws_json",
        "tutorial_broadcast": "/ws_broadcast",
    }


def test_api_key_rule() -> None:
    from pydantic import SecretStr

    from herald.auth import api_key_allows, is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("10.0.0.5") and not is_loopback(None) and not is_loopback("example.com")
    # No key: loopback only, whatever is supplied.
    assert api_key_allows(None, None, "127.0.0.1")
    assert not api_key_allows(None, "anything", "192.168.1.9")
    # With a key: the key, from anywhere; never without it, not even from loopback.
    key = SecretStr("k3y")
    assert api_key_allows(key, "k3y", "192.168.1.9")
    assert not api_key_allows(key, None, "127.0.0.1")
    assert not api_key_allows(key, "", "127.0.0.1")
    assert not api_key_allows(key, "k3y ", "127.0.0.1")


def test_broker_urls_are_redacted() -> None:
    from herald.urls import redact_url

    assert redact_url("redis://:s3cret@localhost:6379/0") == "redis://***@localhost:6379/0"
    assert redact_url("redis://user:s3cret@h:1/0") == "redis://user:***@h:1/0"
    assert redact_url("nats://tok3n@h:4222") == "nats://***@h:4222"
    assert redact_url("redis://localhost:6379/0") == "redis://localhost:6379/0"
    assert redact_url("memory") == "memory"


def test_herald_config_masks_a_broker_password() -> None:
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "herald", "config", "--broker", "redis://:hunter2@localhost:6379/0"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "hunter2" not in out
    assert json.loads(out)["broker"] == "redis://***@localhost:6379/0"


def test_nats_without_nats_py_is_a_clear_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from herald.engines import engines_for
    from herald.exceptions import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "nats" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"pip install 'herald\[nats\]'"):
        engines_for(Settings(broker="nats://127.0.0.1:4222"))
    with pytest.raises(ConfigError, match="unknown broker"):
        engines_for(Settings(broker="kafka://x"))
