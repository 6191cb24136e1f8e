"""Server-side demo support: the name-as-presence hook and the dashboard publisher."""

from __future__ import annotations

import logging

import orjson
import pytest

from herald.config import NamespaceOptions, Settings
from herald.context import ClientContext
from herald.demos import DASHBOARD_CHANNEL, DEMO_NAMESPACES, DashboardPublisher, install_demos, name_as_info
from herald.node import Node

from .helpers import ProtocolClient, async_wait_for, http_get, running_server


def test_connect_name_becomes_presence_info() -> None:
    ctx = ClientContext(client="c1", name="  Ada \n Lovelace ")
    name_as_info(ctx)
    assert ctx.info == {"name": "Ada Lovelace"}

    long = ClientContext(client="c2", name="x" * 64)
    name_as_info(long)
    assert long.info == {"name": "x" * 32}


def test_name_never_overrides_info_from_a_token_or_hook() -> None:
    ctx = ClientContext(client="c1", name="Mallory", info={"name": "Alice", "role": "admin"})
    name_as_info(ctx)
    assert ctx.info == {"name": "Alice", "role": "admin"}
    for name in (None, "", "   "):
        anonymous = ClientContext(client="c2", name=name)
        name_as_info(anonymous)
        assert anonymous.info is None


async def test_dashboard_publisher_publishes_figures_into_history() -> None:
    node = Node(Settings(namespaces=DEMO_NAMESPACES))
    await node.start()
    publisher = DashboardPublisher(node, interval=0.05)
    try:
        await publisher.start()
        await async_wait_for(lambda: publisher.samples >= 1, what="a first sample")
        node.stats.route("connect").frames_in += 10  # as if clients had sent ten commands now
        await async_wait_for(lambda: publisher.samples >= 3, what="three samples")
        await publisher.stop()
        history = await node.history(DASHBOARD_CHANNEL, limit=100)
        samples = [orjson.loads(p.data) for p in history.publications]
        assert len(samples) == publisher.samples
        first, last = samples[0], samples[-1]
        assert first["node"] == node.id
        assert first["interval"] == 0.05
        assert last["time"] > first["time"]
        for key in (
            "connections",
            "subscriptions",
            "messages_in_per_s",
            "messages_out_per_s",
            "publish_latency_ms",
            "loop_lag_ms",
            "cpu_percent",
        ):
            assert isinstance(last[key], int | float) and last[key] >= 0, key
        # Rates are per second over one interval, not totals: the ten commands show up in
        # exactly one sample, as 10 / (its interval).
        rates = [s["messages_in_per_s"] for s in samples if s["messages_in_per_s"]]
        assert len(rates) == 1, samples
        assert 0.02 < 10 / rates[0] < 1.0
        # Stopped means stopped: no more samples.
        count = publisher.samples
        await publisher.stop()
        assert publisher.samples == count
    finally:
        await publisher.stop()
        await node.close()


def test_a_plain_herald_has_only_the_default_namespace_and_the_demos_add_theirs() -> None:
    from herald import Herald

    plain = Herald(Settings())
    assert set(plain.settings.namespaces) == {""}
    mine = NamespaceOptions(history_size=3)
    served = Herald(Settings(namespaces={"chat": mine}))
    install_demos(served)
    assert set(served.settings.namespaces) == {"", "chat", "dashboard", "game"}
    assert served.settings.namespaces["chat"] is mine  # the application's own options win
    assert served.settings.namespaces["dashboard"] == DEMO_NAMESPACES["dashboard"]
    assert not served.settings.namespaces["dashboard"].allow_publish


async def test_a_dashboard_channel_the_server_cannot_publish_to_is_one_warning_and_no_loop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A node without the dashboard namespace (an application took it out after install_demos).
    node = Node(Settings())
    await node.start()
    broken = DashboardPublisher(node, interval=0.01)
    # A healthy publisher at the same pace is the clock: while it publishes five samples,
    # a broken loop would have failed (and logged) about five times.
    clock = DashboardPublisher(node, channel="ticks", interval=0.01)
    try:
        with caplog.at_level(logging.INFO, logger="herald.demos"):
            assert await broken.start() is False
            assert await clock.start() is True
            await async_wait_for(lambda: clock.samples >= 5, what="five samples of the clock")
        lines = [r for r in caplog.records if r.name == "herald.demos"]
        assert [r.levelno for r in lines] == [logging.WARNING], [r.getMessage() for r in lines]
        message = lines[0].getMessage()
        assert "dashboard demo off" in message and "'dashboard:metrics'" in message
        assert "unknown namespace: dashboard" in message
        assert broken.samples == 0 and broken.failures == 0
    finally:
        await clock.stop()
        await broken.stop()
        await node.close()


async def test_a_publish_that_keeps_failing_is_logged_once_per_outage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    namespaces = dict(DEMO_NAMESPACES)
    node = Node(Settings(namespaces=namespaces))
    await node.start()
    publisher = DashboardPublisher(node, interval=0.01)
    try:
        with caplog.at_level(logging.INFO, logger="herald.demos"):
            assert await publisher.start() is True
            await async_wait_for(lambda: publisher.samples >= 1, what="a first sample")
            dashboard = node.settings.namespaces.pop("dashboard")  # every publish fails from now on
            await async_wait_for(lambda: publisher.failures >= 5, what="five failed samples")
            node.settings.namespaces["dashboard"] = dashboard
            published = publisher.samples
            await async_wait_for(lambda: publisher.samples > published, what="publishing again")
        lines = [r for r in caplog.records if r.name == "herald.demos"]
        assert [r.levelno for r in lines] == [logging.WARNING, logging.INFO], [r.getMessage() for r in lines]
        assert "dashboard publish failed" in lines[0].getMessage()
        assert "unknown namespace" in lines[0].getMessage()
        assert "publishing again after" in lines[1].getMessage()
        assert publisher.failures == 0
    finally:
        await publisher.stop()
        await node.close()


async def test_herald_serve_with_an_unusable_dashboard_channel_warns_once() -> None:
    # "dashboard:metrics" is 17 characters: over this limit the dashboard demo is off.
    env = {"HERALD_MAX_CHANNEL_LENGTH": "10", "HERALD_PING_INTERVAL": "1", "HERALD_LOG_LEVEL": "info"}
    with running_server(env) as server:
        client = await ProtocolClient.open(server.ws("/connect"))
        try:
            # Three server pings a second apart: the publisher would have run three times.
            await async_wait_for(
                lambda: sum(f.get("type") == "ping" for f in client.frames) >= 3, timeout=10, what="3 pings"
            )
        finally:
            await client.close()
        # The other demos still work: the chat page is served and its namespace is there.
        assert http_get(server.http + "/static/chat.html")[0] == 200
        log = server.log()
    lines = [line for line in log.splitlines() if "dashboard" in line]
    assert len(lines) == 1, lines
    assert "dashboard demo off" in lines[0] and "channel name longer than 10 characters" in lines[0]
    assert '"level": "warning"' in lines[0]
