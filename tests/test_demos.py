"""Server-side demo support: the name-as-presence hook and the dashboard publisher."""

from __future__ import annotations

import orjson

from herald.demos import DASHBOARD_CHANNEL, DashboardPublisher, name_as_info
from herald.node import ClientContext, Node

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
    node = Node()
    await node.start()
    publisher = DashboardPublisher(node, interval=0.05)
    try:
        await publisher.start()
        await async_wait_for(lambda: publisher.samples >= 1, what="a first sample")
        node.stats["messages_in"] += 10  # as if clients had sent ten commands now
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
