"""Every WebSocket route is in the metrics, under its own ``route`` label, on both drivers.

One server per serving driver (Herald's native routes, and the ASGI path any other
server uses).  Per route, real clients exchange ten messages; ``/metrics`` must then
show exactly those frames and bytes in, exactly the frames the clients received out,
the open connections, and, once the clients have left, their disconnects by code,
all under that route's label and no other's.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection

from herald import Herald
from herald.config import Settings
from herald.server import create_app
from herald.stats import ROUTE_LABELS
from herald.transports.uvicorn import uvicorn_ws_protocol
from herald.transports.uvicorn_protocol import HeaderTimeoutHTTPProtocol

from ..helpers import DEFAULT_TIMEOUT, ThreadServer, http_get

API_KEY = "route-metrics-key"
MESSAGES = 10

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

PER_ROUTE = (
    "herald_connections_open",
    "herald_connections_total",
    "herald_messages_in_total",
    "herald_bytes_in_total",
    "herald_messages_out_total",
    "herald_bytes_out_total",
)


@pytest.fixture(scope="module", params=["native", "asgi"])
def server(request: pytest.FixtureRequest) -> Iterator[ThreadServer]:
    config = Settings(
        api_key=API_KEY,
        demos=False,
        ping_interval=0,  # no pings: every frame out is one the test expects
        rate_limit=1000,
        rate_limit_burst=1000,
        native_routes=request.param == "native",
    )
    app = create_app(herald=Herald(config))
    server = ThreadServer(
        app,
        ws=uvicorn_ws_protocol(config.ws_impl, config.fast_path),
        http=HeaderTimeoutHTTPProtocol,
        ws_max_size=config.max_message_size,
    ).start()
    try:
        yield server
    finally:
        server.stop()


def scrape(server: ThreadServer) -> Samples:
    status, body = http_get(server.http + "/metrics")
    assert status == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape_until(
    server: ThreadServer, check: Callable[[Samples], bool], what: str, timeout: float = DEFAULT_TIMEOUT
) -> Samples:
    """Scrape until ``check`` holds: frames are counted as the server handles them,
    which may be a moment after the client sent them."""
    deadline = time.monotonic() + timeout
    while True:
        samples = await asyncio.to_thread(scrape, server)
        if check(samples):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@dataclass
class Exchange:
    """What the clients of one route did: their sockets, frames and characters sent, and
    frames and characters received (every frame the server wrote to them)."""

    sockets: list[ClientConnection]
    sent: int = 0
    sent_chars: int = 0
    received: int = 0
    received_chars: int = 0

    async def send(self, ws: ClientConnection, text: str) -> None:
        await ws.send(text)
        self.sent += 1
        self.sent_chars += len(text)

    async def recv(self, ws: ClientConnection) -> str:
        frame = await asyncio.wait_for(ws.recv(), DEFAULT_TIMEOUT)
        assert isinstance(frame, str)
        self.received += 1
        self.received_chars += len(frame)
        return frame


async def open_ws(server: ThreadServer, path: str) -> ClientConnection:
    return await websockets.connect(server.ws(path), open_timeout=DEFAULT_TIMEOUT)


async def echo(server: ThreadServer) -> Exchange:
    ws = await open_ws(server, "/ws")
    exchange = Exchange([ws])
    for n in range(MESSAGES):
        await exchange.send(ws, f"hello {n}")
        assert await exchange.recv(ws) == f"Message text was: hello {n}"
    return exchange


async def json_echo(server: ThreadServer) -> Exchange:
    ws = await open_ws(server, "/ws_json")
    exchange = Exchange([ws])
    for n in range(MESSAGES):
        await exchange.send(ws, json.dumps({"n": n, "text": "é" * n}))
        assert json.loads(await exchange.recv(ws))["data"]["n"] == n
    return exchange


async def broadcast(server: ThreadServer) -> Exchange:
    listener = await open_ws(server, "/ws_broadcast")
    sender = await open_ws(server, "/ws_broadcast")
    exchange = Exchange([listener, sender])
    for n in range(MESSAGES):
        await exchange.send(sender, f"to all {n}")
    for n in range(MESSAGES):
        assert await exchange.recv(listener) == f"New message: to all {n}"
    return exchange


async def protocol(server: ThreadServer) -> Exchange:
    ws = await open_ws(server, "/connect")
    exchange = Exchange([ws])
    await exchange.send(ws, json.dumps({"id": 1, "type": "connect"}))
    assert "result" in json.loads(await exchange.recv(ws))
    for n in range(2, MESSAGES + 1):
        command = {"id": n, "type": "publish", "channel": "chat:route-metrics", "data": n}
        await exchange.send(ws, json.dumps(command))
        assert json.loads(await exchange.recv(ws))["id"] == n
    return exchange


async def admin(server: ThreadServer) -> Exchange:
    ws = await open_ws(server, "/admin/ws")
    exchange = Exchange([ws])
    await exchange.send(ws, json.dumps({"api_key": API_KEY}))
    snapshot = json.loads(await exchange.recv(ws))
    assert "num_connections" in snapshot["data"], snapshot
    for n in range(MESSAGES - 1):  # the page's later frames are read and ignored
        await exchange.send(ws, f"ignored {n}")
    return exchange


ROUTES: dict[str, Callable[[ThreadServer], Awaitable[Exchange]]] = {
    "ws": echo,
    "ws_json": json_echo,
    "ws_broadcast": broadcast,
    "connect": protocol,
    "admin": admin,
}


def grew(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@pytest.mark.parametrize("route", list(ROUTES))
async def test_route_is_counted_under_its_label(server: ThreadServer, route: str) -> None:
    before = await asyncio.to_thread(scrape, server)
    exchange = await ROUTES[route](server)
    label = {"route": route}
    clients = len(exchange.sockets)
    try:
        during = await scrape_until(
            server,
            lambda s: grew(before, s, "herald_messages_in_total", **label) >= exchange.sent,
            f"{exchange.sent} messages in on {route}",
        )
        assert grew(before, during, "herald_messages_in_total", **label) == exchange.sent == MESSAGES
        assert grew(before, during, "herald_bytes_in_total", **label) == exchange.sent_chars
        assert grew(before, during, "herald_connections_total", **label) == clients
        assert value(during, "herald_connections_open", **label) == clients
        out = grew(before, during, "herald_messages_out_total", **label)
        if route == "admin":  # snapshots keep coming, whether the page reads them or not
            assert out >= exchange.received
            assert grew(before, during, "herald_bytes_out_total", **label) >= exchange.received_chars
        else:
            assert out == exchange.received >= MESSAGES
            assert grew(before, during, "herald_bytes_out_total", **label) == exchange.received_chars
        # Nothing was counted under another route.
        for other in ROUTE_LABELS:
            if other != route:
                assert grew(before, during, "herald_messages_in_total", route=other) == 0, other
                assert grew(before, during, "herald_connections_total", route=other) == 0, other
    finally:
        for ws in exchange.sockets:
            await ws.close()

    after = await scrape_until(
        server,
        lambda s: value(s, "herald_connections_open", **label) == 0,
        f"{route} connections to close",
    )
    assert grew(before, after, "herald_disconnects_total", route=route, code="1000") == clients
    # The totals over every route are those of this route alone: summing over the label
    # gives the node's figures, as before the label existed.
    for name in ("herald_messages_in_total", "herald_connections_total", "herald_disconnects_total"):
        total = sum(v for (n, _), v in after.items() if n == name) - sum(
            v for (n, _), v in before.items() if n == name
        )
        per_route = sum(v for (n, labels), v in after.items() if n == name and ("route", route) in labels)
        per_route -= sum(v for (n, labels), v in before.items() if n == name and ("route", route) in labels)
        assert total == per_route, name


async def test_route_label_values_are_the_fixed_set(server: ThreadServer) -> None:
    samples = await asyncio.to_thread(scrape, server)
    for name in PER_ROUTE:
        routes = {dict(labels).get("route") for (n, labels) in samples if n == name}
        assert routes == set(ROUTE_LABELS), name
    disconnect_routes = {dict(labels)["route"] for (n, labels) in samples if n == "herald_disconnects_total"}
    assert disconnect_routes <= set(ROUTE_LABELS)


async def test_unaccepted_protocol_client_counts_with_its_code(server: ThreadServer) -> None:
    """A ``/connect`` socket that never sent ``connect`` is open, then ends with Herald's
    code when Herald closes it (here a binary frame: 1003), not the client's."""
    before = await asyncio.to_thread(scrape, server)
    ws = await open_ws(server, "/connect")
    await ws.send(b"\x00binary")
    with pytest.raises(websockets.ConnectionClosed):
        while True:  # a disconnect push, then the close
            await asyncio.wait_for(ws.recv(), DEFAULT_TIMEOUT)
    assert ws.close_code == 1003
    after = await scrape_until(
        server,
        lambda s: grew(before, s, "herald_disconnects_total", route="connect", code="1003") == 1,
        "the 1003 disconnect",
    )
    assert grew(before, after, "herald_messages_in_total", route="connect") == 1
    assert grew(before, after, "herald_bytes_in_total", route="connect") == len(b"\x00binary")
    assert grew(before, after, "herald_connections_total", route="connect") == 1
    assert value(after, "herald_connections_open", route="connect") == 0
