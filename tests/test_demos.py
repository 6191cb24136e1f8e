"""Server-side demo support: the name-as-presence hook and the dashboard publisher."""

from __future__ import annotations

import orjson

from herald.config import NamespaceOptions, Settings
from herald.context import ClientContext
from herald.demos import DASHBOARD_CHANNEL, DEMO_NAMESPACES, DashboardPublisher, install_demos, name_as_info
from herald.node import Node

from .helpers import async_wait_for


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
        node.stats.frames_in += 10  # as if clients had sent ten commands now
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
