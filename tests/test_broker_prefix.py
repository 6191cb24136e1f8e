"""The broker's name prefix is set from the broker URL alike for Redis and NATS, and said so.

``HERALD_BROKER='redis://host/0?prefix=acme'`` names every Redis key and Pub/Sub channel
``acme...``; ``HERALD_BROKER='nats://host?prefix=acme'`` every NATS subject ``acme.``.
Checked on real servers, through ``herald serve``, so several deployments can share one
Redis or one NATS.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator

import pytest

from .helpers import ROOT, ServerProcess
from .servers import NatsServer, RedisServer, nats_server_fixture, redis_server_fixture

API_KEY = "prefix-key"


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    yield from redis_server_fixture()


@pytest.fixture(scope="module")
def nats_server() -> Iterator[NatsServer]:
    yield from nats_server_fixture()


def _publish(server: ServerProcess, channel: str, data: object) -> None:
    request = urllib.request.Request(
        server.http + "/api/publish",
        data=json.dumps({"channel": channel, "data": data}).encode(),
        headers={"Content-Type": "application/json", "X-API-Key": API_KEY},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200


def _serve(broker: str) -> ServerProcess:
    return ServerProcess(
        env={"HERALD_BROKER": broker, "HERALD_API_KEY": API_KEY, "HERALD_DEMOS": "false"}
    ).start()


def test_serve_help_shows_the_prefix_option_of_both_brokers() -> None:
    shown = subprocess.run(
        [sys.executable, "-m", "herald", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert shown.returncode == 0, shown.stderr
    assert "redis://host:6379/0?prefix=app" in shown.stdout
    assert "nats://host:4222?jetstream=1&prefix=app" in shown.stdout


@pytest.mark.redis
def test_the_redis_key_prefix_comes_from_the_url(redis_server: RedisServer) -> None:
    import redis

    server = _serve(f"{redis_server.url}?prefix=acme")
    try:
        # chat keeps history: a stream key, the offset/epoch keys, and a Pub/Sub message.
        _publish(server, "chat:prefixed", {"n": 1})
    finally:
        server.stop()
    client = redis.Redis.from_url(redis_server.url)
    try:
        keys = [key.decode() for key in client.keys("*")]
    finally:
        client.close()
    assert keys, "the publication stored nothing"
    assert all(key.startswith("acme") for key in keys), keys
    assert not any(key.startswith("herald") for key in keys), keys


@pytest.mark.nats
async def test_the_nats_subject_prefix_comes_from_the_url(nats_server: NatsServer) -> None:
    nats = pytest.importorskip("nats")

    seen: list[str] = []
    published = asyncio.Event()

    async def record(message: object) -> None:
        subject: str = message.subject  # type: ignore[attr-defined]
        seen.append(subject)
        if ".c." in subject:
            published.set()

    watcher = await nats.connect(nats_server.url)
    try:
        await watcher.subscribe(">", cb=record)
        await watcher.flush()
        server = await asyncio.to_thread(_serve, f"{nats_server.url}?prefix=acme")
        try:
            await asyncio.to_thread(_publish, server, "chat:prefixed", {"n": 1})
            await asyncio.wait_for(published.wait(), 5)
        finally:
            await asyncio.to_thread(server.stop)
    finally:
        await watcher.close()
    herald_subjects = [subject for subject in seen if not subject.startswith("_INBOX.")]
    assert f"acme.c.{b'chat:prefixed'.hex()}" in herald_subjects
    assert all(subject.startswith("acme.") for subject in herald_subjects), herald_subjects
