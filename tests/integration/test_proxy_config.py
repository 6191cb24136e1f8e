"""Proxy settings: checked at start-up, and read from the config file and the environment
by a real ``herald serve`` process that then asks a real backend."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from herald import Herald
from herald.config import NamespaceOptions, Settings
from herald.hooks import HOOK_EVENTS
from herald.server import create_app

from ..helpers import ProtocolClient, ServerProcess, ThreadServer
from .proxy_backend import Backend, running_backend


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"proxy_connect_url": "ftp://backend/connect"}, "http:// or https://"),
        ({"proxy_subscribe_url": "/relative"}, "http:// or https://"),
        ({"proxy_headers": ["authorization", "host"]}, "cannot be forwarded to the proxy backend: host"),
        ({"proxy_headers": "cookie"}, "forward cookies with proxy_cookies"),
        ({"proxy_headers": ["bad header"]}, "invalid header name"),
        ({"proxy_timeout": 0}, "proxy_timeout"),
        ({"proxy_max_in_flight": 0}, "proxy_max_in_flight"),
        (
            {"namespaces": {"chat": NamespaceOptions(proxy_subscribe=True)}},
            "namespace 'chat': proxy_subscribe = true needs proxy_subscribe_url",
        ),
        ({"namespaces": {"chat": {"proxy_publish": "not a url"}}}, "http:// or https://"),
    ],
)
def test_bad_proxy_settings_fail_at_start_up(values: dict[str, object], complaint: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(**values)  # type: ignore[arg-type]
    assert complaint in str(caught.value)


def test_proxy_lists_and_namespace_choices_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERALD_PROXY_HEADERS", "Authorization, X-Request-Id")
    monkeypatch.setenv("HERALD_PROXY_COOKIES", '["session", "csrf"]')
    monkeypatch.setenv(
        "HERALD_NAMESPACES",
        json.dumps({"a": {"proxy_subscribe": False}, "b": {"proxy_publish": "https://x.example/p"}}),
    )
    settings = Settings()
    assert settings.proxy_headers == ["authorization", "x-request-id"]
    assert settings.proxy_cookies == ["session", "csrf"]
    assert settings.namespaces["a"].proxy_subscribe is False
    assert settings.namespaces["b"].proxy_publish == "https://x.example/p"
    assert settings.namespaces["b"].proxy_subscribe is None


def test_hook_events_include_every_proxy_event() -> None:
    from herald.proxy import PROXY_EVENTS

    assert set(PROXY_EVENTS) <= set(HOOK_EVENTS)


@pytest.fixture
def backend() -> Iterator[Backend]:
    with running_backend() as backend:
        yield backend


async def test_herald_serve_reads_proxy_settings_from_file_and_environment(
    backend: Backend, tmp_path: Path
) -> None:
    config = tmp_path / "herald.toml"
    config.write_text(
        "[herald]\n"
        f'proxy_connect_url = "{backend.url("connect")}"\n'
        f'proxy_subscribe_url = "{backend.url("subscribe")}"\n'
    )
    # The namespaces come from the environment (which beats the file's).
    namespaces = json.dumps({"public": {"proxy_subscribe": False}, "members": {}})
    backend.answer("connect", lambda body: {"result": {"user": "from-backend", "info": {"plan": "pro"}}})
    backend.answer("subscribe", {"error": {"code": 110, "message": "members only"}})
    server = ServerProcess(
        env={"HERALD_PROXY_COOKIES": "session", "HERALD_NAMESPACES": namespaces, "HERALD_DEMOS": "false"},
        args=["--config", str(config)],
    ).start()
    try:
        client = await ProtocolClient.open(
            server.ws("/connect"), connect=False, additional_headers={"Cookie": "session=abc; other=1"}
        )
        try:
            reply = await client.call("connect")
            assert reply["result"]["user"] == "from-backend"
            assert backend.of("connect")[0].headers["cookie"] == "session=abc"
            reply = await client.call("subscribe", channels=[{"channel": "members:room"}])
            assert reply["result"]["channels"][0]["error"] == {"code": 110, "message": "members only"}
            reply = await client.call("subscribe", channels=[{"channel": "public:room"}])
            assert "error" not in reply["result"]["channels"][0]
            assert [c.body["channel"] for c in backend.of("subscribe")] == ["members:room"]
        finally:
            await client.close()
    finally:
        server.stop()


# ---------------------------------------------------------------- docs/backends.md

DOC = Path(__file__).resolve().parents[2] / "docs" / "backends.md"


def doc_block(after_heading: str, language: str) -> str:
    """The first ``language`` code block after ``after_heading`` in the page."""
    text = DOC.read_text()
    start = text.index(after_heading)
    opening = text.index(f"```{language}\n", start) + len(f"```{language}\n")
    return text[opening : text.index("```", opening)]


@pytest.fixture(scope="module")
def doc_backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadServer]:
    """The page's FastAPI backend, as written, imported as a module, on its own port."""
    path = tmp_path_factory.mktemp("doc") / "backend.py"
    path.write_text(doc_block("## A complete backend in FastAPI", "python"))
    spec = importlib.util.spec_from_file_location("proxy_doc_backend", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the models' annotations there
    spec.loader.exec_module(module)
    server = ThreadServer(module.app).start()
    try:
        yield server
    finally:
        server.stop()
        sys.modules.pop(spec.name, None)


def _without_times(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: "<time>" if k == "expires_at" else _without_times(v) for k, v in value.items()}
    return value


def test_the_pages_curl_commands_answer_as_shown(doc_backend: ThreadServer) -> None:
    lines = doc_block("## Trying a backend with curl", "console").strip().splitlines()
    commands = [(line[2:], lines[n + 1]) for n, line in enumerate(lines) if line.startswith("$ ")]
    assert len(commands) == 5
    for command, shown in commands:
        command = command.replace("127.0.0.1:9000", f"127.0.0.1:{doc_backend.port}")
        done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=20)
        assert done.returncode == 0, done.stderr
        assert _without_times(json.loads(done.stdout)) == _without_times(json.loads(shown)), command


async def test_herald_with_the_pages_backend_and_configuration(
    doc_backend: ThreadServer, tmp_path: Path
) -> None:
    config = tmp_path / "herald.toml"
    config.write_text(
        doc_block("## Configuration", "toml").replace("127.0.0.1:9000", f"127.0.0.1:{doc_backend.port}")
    )
    settings = Settings.load(config, demos=False)
    herald = Herald(settings)
    server = ThreadServer(create_app(herald=herald)).start()
    opened: list[ProtocolClient] = []

    async def connect(session: str | None) -> tuple[ProtocolClient, dict[str, Any]]:
        headers = {"Cookie": f"session={session}; theme=dark"} if session else None
        client = await ProtocolClient.open(server.ws("/connect"), connect=False, additional_headers=headers)
        opened.append(client)
        reply = await client.call("connect")
        client.client_id = reply.get("result", {}).get("client", "")
        return client, reply

    try:
        alice, reply = await connect("s3cr3t")
        assert reply["result"]["user"] == "alice"
        _, reply = await connect(None)
        assert reply["error"] == {"code": 111, "message": "log in first"}
        mallory, reply = await connect("m4l")
        await asyncio.wait_for(mallory.closed.wait(), 5)
        assert (mallory.ws.close_code, mallory.ws.close_reason) == (4501, "banned")
        bob, reply = await connect("b0b")
        reply = await bob.call("subscribe", channels=[{"channel": "team:red"}, {"channel": "team:blue"}])
        red, blue = reply["result"]["channels"]
        assert red["error"] == {"code": 110, "message": "not a member of this team"} and "error" not in blue
        reply = await alice.call("subscribe", channels=[{"channel": "team:blue"}, {"channel": "news:today"}])
        assert all("error" not in item for item in reply["result"]["channels"])
        assert "result" in await alice.call("publish", channel="team:blue", data={"text": "  hi  "})
        publication = await bob.push("publication")
        assert publication["data"] == {"text": "hi", "from": "alice"}
        assert publication["info"]["info"] == {"name": "Alice"}
        assert (await alice.call("publish", channel="team:blue", data=3))["error"]["code"] == 1001
        reply = await alice.call("rpc", method="whoami")
        assert reply["result"]["data"] == {"user": "alice", "client": alice.client_id}
        assert (await alice.call("rpc", method="nope"))["error"]["code"] == 113
    finally:
        for client in opened:
            await client.close()
        server.stop()
