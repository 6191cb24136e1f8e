"""Join/leave pushes scale (issue 19): off by default, and bounded where they are on.

Every join is pushed to every subscriber, so a channel of n members costs n² pushes
to fill: 10,000 clients in 2,000 channels produced ~23 million join pushes with
join/leave on by default.  Now the default namespace has them off (as Centrifugo),
and a namespace that turns them on stops them on a node while the channel has more
than ``join_leave_max_subscribers`` subscribers there.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from ..helpers import ProtocolClient, ServerProcess

pytestmark = pytest.mark.asyncio

NAMESPACES = {
    "": {},  # the defaults
    "room": {"join_leave": True, "join_leave_max_subscribers": 2},
    "open": {"join_leave": True, "join_leave_max_subscribers": 0},
}


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    server = ServerProcess(env={"HERALD_DEMOS": "false", "HERALD_NAMESPACES": json.dumps(NAMESPACES)}).start()
    try:
        yield server
    finally:
        server.stop()


async def subscribed(server: ServerProcess, channel: str) -> ProtocolClient:
    client = await ProtocolClient.open(server.ws("/connect"))
    reply = await client.call("subscribe", channels=[{"channel": channel}])
    assert "result" in reply, reply
    return client


async def no_join_before_marker(client: ProtocolClient, marker: ProtocolClient, channel: str) -> None:
    """Publish a marker and assert the first push ``client`` gets after it is the marker:
    pushes are in order, so no join/leave was queued before it."""
    await marker.call("publish", channel=channel, data="marker")
    push = await client.push()
    assert push["type"] == "publication" and push["data"] == "marker", push


async def test_default_namespace_pushes_no_join_or_leave(server: ServerProcess) -> None:
    first = await subscribed(server, "lobby")
    second = await subscribed(server, "lobby")
    await no_join_before_marker(first, second, "lobby")
    await second.close()
    await no_join_before_marker(first, first, "lobby")
    await first.close()


async def test_join_leave_stop_above_the_bound_and_resume_below_it(server: ServerProcess) -> None:
    a = await subscribed(server, "room:r1")
    assert (await a.push("join"))["info"]["client"] == a.client_id  # a client sees its own join
    b = await subscribed(server, "room:r1")  # two subscribers: at the bound, pushed
    assert (await a.push("join"))["info"]["client"] == b.client_id
    assert (await b.push("join"))["info"]["client"] == b.client_id
    c = await subscribed(server, "room:r1")  # three: over the bound, nothing pushed
    await no_join_before_marker(a, c, "room:r1")
    await no_join_before_marker(b, c, "room:r1")
    await c.close()  # back to two subscribers when c's leave arrives: pushed again
    assert (await a.push("leave"))["info"]["client"] == c.client_id
    await b.close()
    assert (await a.push("leave"))["info"]["client"] == b.client_id
    await a.close()


async def test_zero_means_no_bound(server: ServerProcess) -> None:
    clients = [await subscribed(server, "open:r")]
    assert (await clients[0].push("join"))["info"]["client"] == clients[0].client_id
    for _ in range(3):
        clients.append(await subscribed(server, "open:r"))
        join = await clients[0].push("join")
        assert join["info"]["client"] == clients[-1].client_id
    for client in clients:
        await client.close()
