"""create_app() wiring that needs no network."""

from __future__ import annotations

from typing import Any

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


def _exchange(port: int, requests: list[tuple[str, str]], headers: str = "") -> bytes:
    """Send ``requests`` (method, path) pipelined on one keep-alive connection; return
    every byte the server sent until it closed (the last request asks it to)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        for index, (method, path) in enumerate(requests):
            close = "Connection: close\r\n" if index == len(requests) - 1 else ""
            request = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{headers}{close}\r\n"
            sock.sendall(request.encode())
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def _head(response: bytes) -> tuple[int, dict[str, str]]:
    status_line, *lines = response.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines if ": " in line)
    return int(status_line.split()[1]), {k.lower(): v for k, v in headers.items()}


@pytest.mark.parametrize(
    "path", ["/healthz", "/readyz", "/", "/admin", "/asyncapi", "/docs", "/redoc", "/static/herald.js"]
)
def test_head_answers_like_get_without_a_body(server: Any, path: str) -> None:
    # HEAD then GET on one connection: if HEAD sent a body, the GET's status line would
    # not start right after HEAD's headers.
    received = _exchange(server.port, [("HEAD", path), ("GET", path)])
    head_part, _, rest = received.partition(b"\r\n\r\n")
    assert rest.startswith(b"HTTP/1.1 "), (path, received[:300])
    get_part, _, get_body = rest.partition(b"\r\n\r\n")
    head_status, head_headers = _head(head_part)
    get_status, get_headers = _head(get_part)
    assert head_status == get_status and head_status in (200, 307), (path, head_status)
    assert head_headers.get("content-type") == get_headers.get("content-type")
    # The length a GET would have: the page's size (HEAD describes the GET's body).
    assert head_headers.get("content-length") == get_headers.get("content-length") == str(len(get_body))


def test_head_on_metrics_and_on_a_post_only_route(server: Any) -> None:
    requests = [("HEAD", "/metrics"), ("HEAD", "/api/publish"), ("GET", "/healthz")]
    received = _exchange(server.port, requests, headers="X-API-Key: test-key\r\n")
    metrics_part, _, rest = received.partition(b"\r\n\r\n")
    status, headers = _head(metrics_part)
    assert status == 200 and headers["content-type"].startswith("text/plain"), metrics_part
    publish_part, _, rest = rest.partition(b"\r\n\r\n")
    status, headers = _head(publish_part)
    assert status == 405 and headers["allow"] == "POST", publish_part  # no GET there, no HEAD
    assert rest.startswith(b"HTTP/1.1 200"), rest[:200]


async def test_head_as_get_drops_every_body_message_and_keeps_the_servers_scope() -> None:
    from herald.server import HeadAsGet

    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["method"])
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"10")]})
        await send({"type": "http.response.body", "body": b"01234", "more_body": True})
        await send({"type": "http.response.body", "body": b"56789"})

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    scope = {"type": "http", "method": "HEAD", "path": "/"}
    await HeadAsGet(app)(scope, receive, send)
    assert seen == ["GET"] and scope["method"] == "HEAD"
    assert [m.get("body") for m in sent] == [None, b"", b""]
    assert sent[1]["more_body"] is True and sent[0]["headers"] == [(b"content-length", b"10")]

    sent.clear()
    await HeadAsGet(app)({"type": "http", "method": "GET", "path": "/"}, receive, send)
    assert b"".join(m.get("body", b"") for m in sent) == b"0123456789"
