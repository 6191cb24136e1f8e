"""The proxy hooks' metrics on a real server's ``/metrics``, while a real backend
(``proxy_backend.py``, its own uvicorn) allows, denies, disconnects, answers garbage,
answers too late, fails with HTTP 500, or is not there at all.

The scrapes are parsed with prometheus_client's parser and compared call by call:
every (event, outcome) pair that moved must have moved by exactly what the test did
(a call counted twice, under a swapped label, or not copied at scrape time fails), the
duration histogram must count each call that reached the backend once, and the
in-flight gauge must show the calls the backend holds, then 0.
"""

from __future__ import annotations

import asyncio
import time

from prometheus_client.parser import text_string_to_metric_families

from herald.codes import CloseCode
from herald.config import Settings
from herald.metrics import Metrics
from herald.node import Node
from herald.proxy import PROXY_EVENTS, PROXY_OUTCOMES

from ..helpers import ProtocolClient, async_until, http_get
from . import test_proxy
from .proxy_backend import Raw
from .test_proxy import (
    INTERNAL,
    MAX_IN_FLIGHT,
    PROXY_TIMEOUT,
    Env,
    close_of,
    connected,
    hold_subscribes,
    item_of,
    opened,
    saturating,
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
Calls = dict[tuple[str, str], float]


# The proxy tests' backend, servers (both drivers) and clients; the in-process RPC method
# those servers also register is never called here, so it changes no count.
backend, env_server, env, clients = (
    test_proxy.backend,
    test_proxy.env_server,
    test_proxy.env,
    test_proxy.clients,
)


# ---------------------------------------------------------------- reading a scrape


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


async def scrape(env: Env) -> Samples:
    status, body = await asyncio.to_thread(http_get, env.server.http + "/metrics")
    assert status == 200, body
    return parse(body.decode())


def calls(samples: Samples) -> Calls:
    """``herald_proxy_calls_total`` by (event, outcome)."""
    found: Calls = {}
    for (name, labels), count in samples.items():
        if name == "herald_proxy_calls_total":
            label = dict(labels)
            found[(label["event"], label["outcome"])] = count
    return found


def grown(before: Samples, after: Samples) -> Calls:
    """The (event, outcome) pairs that moved between two scrapes, and by how much."""
    was = calls(before)
    return {key: count - was.get(key, 0.0) for key, count in calls(after).items() if count != was.get(key)}


def timed(samples: Samples, event: str, part: str = "count") -> float:
    """``herald_proxy_call_duration_seconds_<part>{event=...}`` (count or sum)."""
    return samples[(f"herald_proxy_call_duration_seconds_{part}", frozenset({("event", event)}))]


def in_flight(samples: Samples) -> float:
    return samples[("herald_proxy_in_flight", frozenset())]


# ---------------------------------------------------------------- the tests


async def test_each_call_is_counted_once_under_its_outcome_and_timed(
    env: Env, clients: list[ProtocolClient]
) -> None:
    before = await scrape(env)
    # Every configured event shows every outcome from the start (at 0 on a new node), so
    # a rate over a failure outcome counts its first failure too.
    assert set(calls(before)) == {(event, outcome) for event in PROXY_EVENTS for outcome in PROXY_OUTCOMES}
    counted_before = {event: timed(before, event) for event in PROXY_EVENTS}

    # connect: allowed (three clients)
    alice = await connected(env, clients, "alice")
    bob = await connected(env, clients, "bob")

    # subscribe: allowed, denied, unavailable (nothing listens at the "down" namespace's URL)
    def decide(body: dict[str, object]) -> object:
        if body["channel"] == "px:secret":
            return {"error": {"code": 110, "message": "not for you"}}
        return {"result": {}}

    env.backend.answer("subscribe", decide)
    assert "error" not in item_of(await alice.call("subscribe", channels=[{"channel": "px:room"}]))
    reply = await alice.call("subscribe", channels=[{"channel": "px:secret"}])
    assert item_of(reply)["error"] == {"code": 110, "message": "not for you"}
    reply = await alice.call("subscribe", channels=[{"channel": "down:room"}])
    assert item_of(reply)["error"] == {"code": INTERNAL, "message": "proxy unavailable"}

    # publish (on a subscribed channel: only the publish endpoint is asked): HTTP 500 is
    # unavailable; a result the publish answer cannot have is invalid, and only invalid.
    env.backend.answer("publish", Raw(500, b'{"result": {}}'))
    reply = await alice.call("publish", channel="px:room", data=1)
    assert reply["error"] == {"code": INTERNAL, "message": "proxy unavailable"}
    env.backend.answer("publish", {"result": {"unknown": 1}})
    reply = await alice.call("publish", channel="px:room", data=2)
    assert reply["error"] == {"code": INTERNAL, "message": "proxy answer invalid"}

    # rpc: the backend disconnects the client
    env.backend.answer("rpc", {"disconnect": {"code": 4502, "reason": "go away"}})
    await bob.call("rpc", method="anything")
    assert await close_of(bob) == (4502, "go away")

    # refresh: {"result": {"expired": true}} is a refresh's deny
    env.backend.answer("connect", {"result": {"user": "carol", "expires_at": time.time() + 0.3}})
    env.backend.answer("refresh", {"result": {"expired": True}})
    carol, reply = await opened(env, clients)
    assert "result" in reply, reply
    assert (await carol.push("disconnect", timeout=5))["code"] == CloseCode.TOKEN_EXPIRED

    # subscribe: a backend slower than proxy_timeout
    env.backend.block("subscribe")
    started = time.monotonic()
    reply = await alice.call("subscribe", channels=[{"channel": "px:slow"}])
    assert item_of(reply)["error"] == {"code": INTERNAL, "message": "proxy timeout"}
    assert time.monotonic() - started >= PROXY_TIMEOUT * 0.9

    # Each outcome is counted before the client hears of it: one scrape now is exact.
    after = await scrape(env)
    assert grown(before, after) == {
        ("connect", "allowed"): 3,
        ("subscribe", "allowed"): 1,
        ("subscribe", "denied"): 1,
        ("subscribe", "unavailable"): 1,
        ("subscribe", "timeout"): 1,
        ("publish", "unavailable"): 1,
        ("publish", "invalid"): 1,
        ("rpc", "disconnect"): 1,
        ("refresh", "denied"): 1,
    }
    # One observation per call, whatever its outcome (none was busy).
    counts = {event: timed(after, event) - counted_before[event] for event in PROXY_EVENTS}
    assert counts == {"connect": 3, "refresh": 1, "subscribe": 4, "sub_refresh": 0, "publish": 2, "rpc": 1}
    # The timed-out call was timed until its timeout, not until it was sent.
    assert timed(after, "subscribe", "sum") - timed(before, "subscribe", "sum") >= PROXY_TIMEOUT * 0.9
    assert in_flight(after) == 0  # the timed-out call is no longer waited for


async def test_in_flight_shows_held_calls_and_a_busy_call_is_counted_not_timed(
    env: Env, clients: list[ProtocolClient]
) -> None:
    async with saturating(env, clients) as (holders, client):
        before = await scrape(env)
        assert in_flight(before) == 0
        held = await hold_subscribes(env, holders)
        holding = await scrape(env)
        assert in_flight(holding) == MAX_IN_FLIGHT

        reply = await client.call("subscribe", channels=[{"channel": "px:one-more"}])
        assert item_of(reply)["error"] == {"code": INTERNAL, "message": "proxy busy"}
        refused = await scrape(env)
        assert grown(before, refused) == {("subscribe", "busy"): 1}
        # The busy call never reached the backend, and the held ones are not over: none timed.
        assert timed(refused, "subscribe") == timed(before, "subscribe")

        env.backend.release.set()
        for task in held:
            assert "error" not in item_of(await task)
        latest: list[Samples] = []

        async def drained() -> bool:
            latest[:] = [await scrape(env)]
            return in_flight(latest[0]) == 0

        await async_until(drained, what="herald_proxy_in_flight back to 0")
        after = latest[0]
        assert grown(before, after) == {("subscribe", "busy"): 1, ("subscribe", "allowed"): MAX_IN_FLIGHT}
        assert timed(after, "subscribe") - timed(before, "subscribe") == MAX_IN_FLIGHT


def test_a_node_without_a_proxy_exports_the_families_empty() -> None:
    """Like the outbox's metrics, the proxy's are registered on every node: at 0 (no
    series for the labelled ones) without a proxy, so dashboards and rules parse alike."""
    node = Node(Settings(demos=False))
    assert node.proxy is None
    text = Metrics(node).render().decode()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert families["herald_proxy_calls"].type == "counter"
    assert families["herald_proxy_calls"].samples == []
    assert families["herald_proxy_call_duration_seconds"].type == "histogram"
    assert families["herald_proxy_call_duration_seconds"].samples == []
    assert parse(text)[("herald_proxy_in_flight", frozenset())] == 0
