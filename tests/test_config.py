"""Configuration: precedence (flags > HERALD_* > TOML file > defaults), `herald config`,
secrets masked, errors that name the field; and JSON logs without payloads or tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from herald.config import Settings

from .helpers import ROOT, ProtocolClient, ServerProcess, http_get


def herald(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
    return subprocess.run(
        [sys.executable, "-m", "herald", *args],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "herald.toml"
    path.write_text(
        "[herald]\n"
        "port = 9001\n"
        "drain_timeout = 1.5\n"
        'log_format = "text"\n'
        'api_key = "file-api-key"\n'
        "[herald.namespaces.news]\n"
        "history_size = 7\n"
    )
    return path


def test_precedence_flags_over_env_over_file_over_defaults(config_file: Path) -> None:
    result = herald(
        "config",
        "--config",
        str(config_file),
        "--log-format",
        "json",
        env={"HERALD_DRAIN_TIMEOUT": "2.5", "HERALD_LOG_FORMAT": "auto"},
    )
    assert result.returncode == 0, result.stderr
    effective = json.loads(result.stdout)
    assert effective["log_format"] == "json"  # flag > env > file
    assert effective["drain_timeout"] == 2.5  # env > file
    assert effective["port"] == 9001  # file > default
    assert effective["ping_interval"] == 25.0  # default
    assert effective["namespaces"]["news"]["history_size"] == 7
    assert "" in effective["namespaces"]  # the default namespace is always there


def test_config_file_from_environment_variable(config_file: Path) -> None:
    result = herald("config", env={"HERALD_CONFIG_FILE": str(config_file)})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["port"] == 9001


def test_secrets_are_masked(config_file: Path) -> None:
    result = herald(
        "config",
        "--config",
        str(config_file),
        env={"HERALD_TOKEN_SECRET": "env-token-secret-value"},
    )
    assert result.returncode == 0, result.stderr
    effective = json.loads(result.stdout)
    assert effective["api_key"] == "**********"
    assert effective["token_secret"] == "**********"
    assert "file-api-key" not in result.stdout
    assert "env-token-secret-value" not in result.stdout


@pytest.mark.parametrize(
    ("args", "env", "field"),
    [
        ([], {"HERALD_PORT": "99999"}, "port"),
        ([], {"HERALD_PING_INTERVAL": "soon"}, "ping_interval"),
        (["--log-format", "json"], {"HERALD_LOG_LEVEL": "loud"}, "log_level"),
        ([], {"HERALD_NAMESPACES": '{"chat": {"history_size": -1}}'}, "namespaces.chat.history_size"),
        ([], {"HERALD_NAMESPACES": '{"chat room": {}}'}, "namespaces"),
        ([], {"HERALD_NAMESPACES": '{"chat:lobby": {}}'}, "namespaces"),
    ],
)
def test_bad_value_fails_at_start_naming_the_field(args: list[str], env: dict[str, str], field: str) -> None:
    result = herald("serve", "--port", "0", *args, env=env)
    assert result.returncode == 2
    assert f"invalid configuration: {field}:" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_file_fails_naming_the_key(tmp_path: Path) -> None:
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("drian_timeout = 3\n")
    result = herald("serve", "--config", str(unknown))
    assert result.returncode == 2
    assert "drian_timeout: Extra inputs are not permitted" in result.stderr

    broken = tmp_path / "broken.toml"
    broken.write_text("port = = 1\n")
    result = herald("config", "--config", str(broken))
    assert result.returncode == 2
    assert "invalid configuration" in result.stderr and "Traceback" not in result.stderr

    result = herald("config", "--config", str(tmp_path / "missing.toml"))
    assert result.returncode == 2
    assert "cannot read the configuration file" in result.stderr


def test_settings_load_in_process(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("HERALD_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HERALD_PORT", "9002")
    settings = Settings.load(config_file, port=None, drain_timeout=4.0)
    assert settings.port == 9002  # env > file; a None override is "not given"
    assert settings.drain_timeout == 4.0  # override > file
    assert settings.log_format == "text"  # file > default


def test_served_app_uses_the_config_file(tmp_path: Path) -> None:
    """`herald serve --config` reaches the application (built from an import string)."""
    path = tmp_path / "serve.toml"
    path.write_text('demos = false\napi_key = "served-key"\n')
    server = ServerProcess(args=["--config", str(path)]).start()
    try:
        assert http_get(server.http + "/")[0] == 404  # demos off
        # The key from the file protects the API even from loopback.
        assert http_get(server.http + "/api/channels")[0] == 401
    finally:
        server.stop()


async def test_json_logs_have_context_but_no_payloads_or_tokens() -> None:
    secret_payload = "PAYLOAD-MARKER-93417"
    import jwt

    secret = "log-test-secret-" + "z" * 32
    secret_token = jwt.encode({"sub": "alice"}, secret, algorithm="HS256")
    env = {
        "HERALD_LOG_FORMAT": "json",
        "HERALD_DEMOS": "false",
        "HERALD_TOKEN_SECRET": secret,
        "HERALD_ACCESS_LOG": "true",  # the per-connection lines are INFO only with it
    }
    server = ServerProcess(env=env).start()
    try:
        client = await ProtocolClient.open(server.ws(f"/connect?token={secret_token}"))
        await client.call("subscribe", channels=[{"channel": "chat:logs"}])
        await client.call("publish", channel="chat:logs", data={"text": secret_payload})
        await client.call("connect", token=secret_token)  # an error reply (already connected)
        client_id = client.client_id
        await client.close()

        def disconnected() -> list[dict[str, object]]:
            return [r for r in _records(server.log()) if r.get("message") == "client disconnected"]

        from .helpers import wait_for

        records = wait_for(disconnected, what="disconnect log line")
        assert records[-1]["conn"] == client_id
        assert records[-1]["code"] == 1000
        connected = [r for r in _records(server.log()) if r.get("message") == "client connected"]
        assert connected and connected[-1]["conn"] == client_id
        assert connected[-1]["user"] == "alice"
    finally:
        server.stop()
    log = server.log()
    assert secret_payload not in log
    assert secret_token not in log
    for record in _records(log):
        assert {"time", "level", "logger", "message"} <= record.keys()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "driver",
    [{}, {"HERALD_NATIVE_ROUTES": "false", "HERALD_FAST_PATH": "false"}],
    ids=["native", "asgi"],
)
async def test_per_connection_log_lines_are_debug_without_the_access_log(driver: dict[str, str]) -> None:
    """Issue 19: three INFO lines per connection cost about a third of a connect storm's CPU;
    by default they are DEBUG (HERALD_ACCESS_LOG turns them back on, test above), on the
    native driver and under uvicorn's own WebSocket protocol."""
    env = {"HERALD_LOG_FORMAT": "json", "HERALD_DEMOS": "false", **driver}
    server = ServerProcess(env=env).start()
    try:
        for path in ("/connect", "/admin/ws"):
            client = await ProtocolClient.open(server.ws(path), connect=path == "/connect")
            await client.close()
        from .helpers import wait_for

        def ended() -> bool:
            _, body = http_get(server.http + "/metrics")
            return b'herald_disconnects_total{code="1000"' in body

        wait_for(ended, what="the disconnect counted")
    finally:
        server.stop()
    messages = [str(r.get("message")) for r in _records(server.log())]
    assert "client connected" not in messages
    assert "client disconnected" not in messages
    assert not [m for m in messages if "[accepted]" in m]
    assert any("Herald" in m or "Application startup" in m for m in messages)


def _records(log: str) -> list[dict[str, object]]:
    records = []
    for line in log.splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
        else:
            # Only the banner of `herald serve` is not JSON.
            assert line.startswith("Herald ") or not line.strip(), line
    return records


def test_every_setting_is_documented() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    missing = [name for name in Settings.model_fields if f"`HERALD_{name.upper()}`" not in text]
    assert missing == [], f"add these settings to docs/configuration.md: {missing}"


def test_broker_settings_come_from_the_broker_url(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 13 item 6: every broker setting is reachable from `herald serve` / HERALD_BROKER."""
    from herald.app import Herald
    from herald.brokers.memory import MemoryBroker
    from herald.brokers.nats import NatsBroker
    from herald.brokers.redis import RedisBroker

    for name in list(os.environ):
        if name.startswith("HERALD_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HERALD_BROKER", "memory?stream_meta_ttl=42")
    memory = Herald(Settings()).node.broker
    assert isinstance(memory, MemoryBroker) and memory.stream_meta_ttl == 42
    monkeypatch.setenv(
        "HERALD_BROKER",
        "redis://:pw@127.0.0.1:6390/2?prefix=app&stream_meta_ttl=600&max_held=50&command_timeout=1.5"
        "&max_connections=7&reconnect_max=9&health_check_interval=30",
    )
    redis = Herald(Settings()).node.broker
    assert isinstance(redis, RedisBroker)
    config = redis.config
    assert (config.prefix, config.stream_meta_ttl, config.max_held) == ("app", 600, 50)
    assert (config.command_timeout, config.max_connections, config.reconnect_max) == (1.5, 7, 9)
    # Herald's options leave the URL; redis-py's own stay for redis-py.
    assert config.url == "redis://:pw@127.0.0.1:6390/2?health_check_interval=30"
    monkeypatch.setenv("HERALD_BROKER", "nats://127.0.0.1:4333?jetstream=1&request_timeout=2")
    nats = Herald(Settings()).node.broker
    assert isinstance(nats, NatsBroker) and nats.config.jetstream and nats.config.request_timeout == 2


@pytest.mark.parametrize(
    ("broker", "complaint"),
    [
        ("memory?stream_meta_ttl=-5", "stream_meta_ttl"),
        ("memory?history=1", "unknown memory broker URL option 'history'"),
        ("redis://:hunter2@127.0.0.1:6390/0?stream_meta_ttl=soon", "stream_meta_ttl"),
        ("redis://:hunter2@127.0.0.1:6390/0?read_meta_ttl=5", "unknown Redis broker URL option"),
        ("redis://:hunter2@127.0.0.1:6390/0?max_held=0", "max_held"),
        ("nats://127.0.0.1:4333?request_timeout=x", "request_timeout"),
    ],
)
def test_a_bad_broker_setting_fails_at_start_without_echoing_secrets(broker: str, complaint: str) -> None:
    result = herald("serve", "--port", "0", env={"HERALD_BROKER": broker})
    assert result.returncode == 2
    assert "invalid configuration: broker:" in result.stderr and complaint in result.stderr
    assert "Traceback" not in result.stderr and "hunter2" not in result.stderr
