"""herald.client.Client against real servers: a `herald serve` process and in-process apps."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import httpx
import jwt
import pytest
from pydantic import BaseModel

from herald import ClientContext, Herald, Settings
from herald.brokers.base import StreamPosition
from herald.client import (
    Client,
    ClientPublication,
    ClientState,
    DisconnectedEvent,
    JoinEvent,
    LeaveEvent,
    RecoveredEvent,
)
from herald.codes import ErrorCode
from herald.demos import DEMO_NAMESPACES
from herald.exceptions import (
    ClientClosedError,
    ClientConnectionError,
    ClientError,
    ClientTimeoutError,
    ReplyError,
)
from herald.server import create_app

from .helpers import ServerProcess, ThreadServer, async_wait_for, free_port

SECRET = "client-test-secret-0123456789abcdef"


def channel(prefix: str = "chat") -> str:
    return f"{prefix}:t{uuid.uuid4().hex[:12]}"


def token(user: str) -> str:
    return jwt.encode({"sub": user}, SECRET, algorithm="HS256")


class Add(BaseModel):
    a: int
    b: int


@pytest.fixture(scope="module")
def app_server() -> Iterator[ThreadServer]:
    """An in-process app with RPC handlers, JWT auth and fast server pings."""
    settings = Settings(
        token_secret=SECRET,
        api_key="app-key",
        ping_interval=0.2,
        pong_timeout=0.4,
        demos=False,
        namespaces=DEMO_NAMESPACES,
    )
    herald = Herald(settings)

    @herald.rpc("add")
    async def add(params: Add, ctx: ClientContext) -> dict[str, int]:
        return {"sum": params.a + params.b}

    @herald.rpc("whoami")
    async def whoami(params: None, ctx: ClientContext) -> str:
        return ctx.user

    @herald.rpc("slow")
    async def slow(params: float) -> str:
        await asyncio.sleep(params)
        return "done"

    server = ThreadServer(create_app(settings, herald=herald)).start()
    yield server
    server.stop()


@pytest.fixture
async def pair(server: ServerProcess) -> AsyncIterator[tuple[Client, Client]]:
    async with Client(server.ws("/connect")) as a, Client(server.ws("/connect")) as b:
        yield a, b


async def test_subscribe_publish_and_iterate(pair: tuple[Client, Client]) -> None:
    a, b = pair
    name = channel()
    sub = await a.subscribe(name)
    assert sub.position is not None and sub.position.offset == 0
    positions = [await b.publish(name, {"n": n}) for n in range(5)]
    assert [p.offset for p in positions] == [1, 2, 3, 4, 5]
    received: list[ClientPublication] = []
    async for pub in sub:
        received.append(pub)
        if len(received) == 5:
            break
    assert [p.data for p in received] == [{"n": n} for n in range(5)]
    assert [p.position for p in received] == positions
    assert all(p.info is not None and p.info.client == b.client_id for p in received)
    assert sub.position == positions[-1]
    with pytest.raises(ClientTimeoutError):
        await sub.next(timeout=0.1)


async def test_callback_receives_in_order(pair: tuple[Client, Client]) -> None:
    a, b = pair
    name = channel()
    got: list[int] = []
    done = asyncio.Event()

    async def on_publication(pub: ClientPublication) -> None:
        await asyncio.sleep(0)  # an async callback is awaited one publication at a time
        got.append(pub.data)
        if len(got) == 30:
            done.set()

    await a.subscribe(name, on_publication=on_publication)
    for n in range(30):
        await b.publish(name, n)
    await asyncio.wait_for(done.wait(), 5)
    assert got == list(range(30))


async def test_client_events_for_publications_joins_and_leaves(
    pair: tuple[Client, Client],
) -> None:
    a, b = pair
    name = channel()
    events: list[object] = []
    a.on("publication", events.append)
    a.on("leave", events.append)
    await a.subscribe(name)
    join_waiter = asyncio.ensure_future(
        a.wait_for("join", timeout=5, predicate=lambda e: e.info.client == b.client_id)
    )
    await asyncio.sleep(0)
    await b.subscribe(name)
    joined: JoinEvent = await join_waiter
    assert joined.channel == name
    presence = await a.presence(name)
    assert set(presence) == {a.client_id, b.client_id}
    stats = await a.presence_stats(name)
    assert stats.num_clients == 2
    await b.publish(name, "hi")
    leave_waiter = asyncio.ensure_future(a.wait_for("leave", timeout=5))
    await asyncio.sleep(0)
    await b.unsubscribe(name)
    left: LeaveEvent = await leave_waiter
    assert left.info.client == b.client_id
    assert set(await a.presence(name)) == {a.client_id}
    # Handlers run in order on the event task, after wait_for futures resolve.
    await async_wait_for(lambda: len(events) >= 2, what="both handlers ran")
    assert [type(e) for e in events] == [ClientPublication, LeaveEvent]


async def test_subscription_join_and_leave_callbacks(pair: tuple[Client, Client]) -> None:
    a, b = pair
    first, second = channel(), channel()
    seen: list[tuple[str, str, str]] = []  # (who, event, channel) in the order they ran
    own_joins: list[JoinEvent] = []

    async def first_join(event: JoinEvent) -> None:
        await asyncio.sleep(0)  # an async callback is awaited before the next event
        seen.append(("first", "join", event.channel))
        if event.info.client == a.client_id:
            own_joins.append(event)

    sub = await a.subscribe(
        first, on_join=first_join, on_leave=lambda e: seen.append(("first", "leave", e.channel))
    )
    assert sub.on_join is first_join
    # The second subscription listens to leaves only; no client-wide handler yet.
    await a.subscribe(second, on_leave=lambda e: seen.append(("second", "leave", e.channel)))
    await async_wait_for(lambda: own_joins, what="a's own join on the first channel")
    assert own_joins[0].channel == first

    a.on("join", lambda e: seen.append(("client", "join", e.channel)))
    a.on("leave", lambda e: seen.append(("client", "leave", e.channel)))
    seen.clear()
    await b.subscribe(first)
    await b.subscribe(second)
    await b.unsubscribe(first)
    await b.unsubscribe(second)
    await async_wait_for(lambda: len(seen) >= 7, what="every callback ran")
    # Per channel: its own callbacks only, each before the client-wide handler.
    assert [(who, kind) for who, kind, name in seen if name == first] == [
        ("first", "join"),
        ("client", "join"),
        ("first", "leave"),
        ("client", "leave"),
    ]
    assert [(who, kind) for who, kind, name in seen if name == second] == [
        ("client", "join"),
        ("second", "leave"),
        ("client", "leave"),
    ]


async def test_history(pair: tuple[Client, Client]) -> None:
    a, _ = pair
    name = channel()
    for n in range(1, 4):
        await a.publish(name, {"n": n})
    page = await a.history(name)
    assert [p.data["n"] for p in page.publications] == [1, 2, 3]
    assert page.position.offset == 3
    epoch = page.position.epoch
    assert [p.offset for p in (await a.history(name, limit=2)).publications] == [1, 2]
    assert [p.offset for p in (await a.history(name, reverse=True, limit=2)).publications] == [3, 2]
    after = await a.history(name, since=(1, epoch))
    assert [p.offset for p in after.publications] == [2, 3]
    assert [p.offset for p in (await a.history(name, since={"offset": 2, "epoch": epoch})).publications] == [
        3
    ]
    with pytest.raises(ReplyError) as caught:
        await a.history(name, since=StreamPosition(1, "other-epoch"))
    assert caught.value.code == ErrorCode.UNRECOVERABLE_POSITION


async def test_subscribe_since_recovers_an_earlier_session(server: ServerProcess) -> None:
    name = channel()
    async with Client(server.ws("/connect")) as first:
        sub = await first.subscribe(name)
        await first.publish(name, "one")
        assert (await sub.next(timeout=5)).data == "one"
        remembered = sub.position
    assert remembered is not None
    async with Client(server.ws("/connect")) as publisher:
        await publisher.publish(name, "two")
        await publisher.publish(name, "three")
    async with Client(server.ws("/connect")) as second:
        recovered = asyncio.ensure_future(second.wait_for("recovered", timeout=5))
        sub = await second.subscribe(name, since=remembered)
        assert sub.recovered is True
        event: RecoveredEvent = await recovered
        assert (event.channel, event.missed) == (name, 2)
        assert [(await sub.next(timeout=5)).data for _ in range(2)] == ["two", "three"]
        # A stale epoch cannot be recovered: the client is told, and starts from the top.
        other = channel()
        await second.publish(other, "x")
        sub2 = await second.subscribe(other, since=StreamPosition(5, "gone"))
        assert sub2.recovered is False
        assert sub2.position is not None and sub2.position.offset == 1


async def test_error_replies(pair: tuple[Client, Client]) -> None:
    a, _ = pair
    cases = [
        (a.subscribe("nosuchnamespace:x"), ErrorCode.UNKNOWN_NAMESPACE),
        (a.subscribe("chat:bad channel!"), ErrorCode.INVALID_CHANNEL),
        (a.publish(channel("dashboard"), 1), ErrorCode.PERMISSION_DENIED),
        (a.rpc("no-such-method"), ErrorCode.METHOD_NOT_FOUND),
        (a.unsubscribe("chat:never"), ErrorCode.NOT_SUBSCRIBED),
    ]
    for call, code in cases:
        with pytest.raises(ReplyError) as caught:
            await call
        assert caught.value.code == code, caught.value
    assert a.subscriptions == {}
    name = channel()
    await a.subscribe(name)
    with pytest.raises(ReplyError) as caught:
        await a.subscribe(name)
    assert caught.value.code == ErrorCode.ALREADY_SUBSCRIBED
    assert await a.ping() < 5  # still usable after errors


async def test_unsubscribe_and_close_end_iteration(server: ServerProcess) -> None:
    client = Client(server.ws("/connect"))
    await client.connect(timeout=5)
    name = channel()
    sub = await client.subscribe(name)
    await client.publish(name, 1)
    await client.unsubscribe(name)
    # What arrived before the unsubscribe is still readable, then iteration ends.
    assert [pub.data async for pub in sub] == [1]
    with pytest.raises(StopAsyncIteration):
        await sub.next(timeout=1)
    sub2 = await client.subscribe(name)
    await client.close()
    assert client.state is ClientState.CLOSED
    assert [pub async for pub in sub2] == []
    with pytest.raises(ClientClosedError):
        await client.publish(name, 2)


async def test_rpc(app_server: ThreadServer) -> None:
    async with Client(app_server.ws("/connect"), token=token("alice")) as client:
        assert client.user == "alice"
        assert await client.rpc("add", {"a": 2, "b": 3}) == {"sum": 5}
        assert await client.rpc("whoami") == "alice"
        with pytest.raises(ReplyError) as caught:
            await client.rpc("add", {"a": "x"})
        assert caught.value.code == ErrorCode.INVALID_PARAMS
        with pytest.raises(ClientTimeoutError):
            await client.rpc("slow", 2.0, timeout=0.2)
        assert await client.rpc("slow", 0.01) == "done"


async def test_token_callable_and_bad_token(app_server: ThreadServer) -> None:
    calls = 0

    async def get_token() -> str:
        nonlocal calls
        calls += 1
        return token("bob")

    async with Client(app_server.ws("/connect"), token=get_token) as client:
        assert client.user == "bob"
        assert calls == 1
    client = Client(app_server.ws("/connect"), token="not-a-jwt")
    with pytest.raises(ReplyError) as caught:
        await client.connect(timeout=5)
    assert caught.value.code == ErrorCode.UNAUTHORIZED
    assert client.state is ClientState.CLOSED


async def test_expired_token_is_refreshed_from_the_callable_without_reconnecting() -> None:
    settings = Settings(token_secret=SECRET, token_refresh_grace=1.0, demos=False, namespaces=DEMO_NAMESPACES)
    server = ThreadServer(create_app(settings)).start()
    issued: list[float] = []

    def short_lived_token() -> str:
        # The first token expires in a second; the refreshed one in an hour.
        expires = time.time() + (1 if not issued else 3600)
        issued.append(expires)
        return jwt.encode({"sub": "dora", "exp": int(expires) + 1}, SECRET, algorithm="HS256")

    try:
        async with Client(server.ws("/connect"), token=short_lived_token) as client:
            first_id = client.client_id
            # At expiry the server pushes `refresh`; the client answers with a new token.
            await async_wait_for(lambda: len(issued) == 2, timeout=5, what="a second token")
            # Without the refresh the server would close with 4004 after the 1 s grace.
            with pytest.raises(ClientTimeoutError):
                await client.wait_for("disconnected", timeout=2.0)
            assert client.connected and client.connections == 1 and client.client_id == first_id
            expires_at = await client.refresh()  # refreshing by hand works too
            assert expires_at is not None and expires_at > time.time() + 3000
            assert len(issued) == 3
    finally:
        await asyncio.to_thread(server.stop)


async def test_answers_server_pings(app_server: ThreadServer) -> None:
    # The server pings every 0.2 s and closes a client that does not pong within 0.4 s.
    async with Client(app_server.ws("/connect")) as client:
        with pytest.raises(ClientTimeoutError):
            await client.wait_for("disconnected", timeout=1.5)
        assert client.connected and client.connections == 1


async def test_server_disconnect_codes(app_server: ThreadServer) -> None:
    api = httpx.AsyncClient(base_url=app_server.http, headers={"X-API-Key": "app-key"})
    name = channel()
    client = Client(app_server.ws("/connect"), token=token("carol"), backoff_min=0.05, backoff_max=0.2)
    await client.connect(timeout=5)
    try:
        sub = await client.subscribe(name)
        # 4000-4499: reconnect and resubscribe (recovering nothing missed).
        recovered = asyncio.ensure_future(client.wait_for("recovered", timeout=5))
        await asyncio.sleep(0)
        reply = await api.post("/api/disconnect", json={"user": "carol", "code": 4000})
        assert reply.json()["disconnected"] == 1
        event: RecoveredEvent = await recovered
        assert event.missed == 0 and client.connections == 2 and client.connected
        await client.publish(name, "after")
        assert (await sub.next(timeout=5)).data == "after"
        # 4500-4999: do not reconnect; waits fail with ClientClosedError.
        disconnected = asyncio.ensure_future(client.wait_for("disconnected", timeout=5))
        await asyncio.sleep(0)
        await api.post("/api/disconnect", json={"user": "carol", "code": 4502, "reason": "bye"})
        gone: DisconnectedEvent = await disconnected
        assert (gone.code, gone.reconnect) == (4502, False)
        with pytest.raises(ClientClosedError) as caught:
            await sub.next(timeout=5)
        assert caught.value.code == 4502
        assert client.state is ClientState.CLOSED
        with pytest.raises(ClientClosedError):
            await client.publish(name, "no")
    finally:
        await client.close()
        await api.aclose()


async def test_connect_failures(app_server: ThreadServer) -> None:
    dead = f"ws://127.0.0.1:{free_port()}/connect"
    with pytest.raises(ClientConnectionError) as refused:
        await Client(dead, reconnect=False).connect(timeout=5)
    assert "connection refused" in str(refused.value)
    retrying = Client(dead, backoff_min=0.05, backoff_max=0.1)
    with pytest.raises(ClientTimeoutError) as timed_out:
        await retrying.connect(timeout=0.5)
    assert "last error: connection refused" in str(timed_out.value)
    assert retrying.state is ClientState.CLOSED
    # A foreign Origin is refused before accept (HTTP 403): no retry, a clear error.
    foreign = Client(app_server.ws("/connect"), origin="https://evil.example")
    with pytest.raises(ClientConnectionError) as forbidden:
        await foreign.connect(timeout=5)
    assert "HTTP 403" in str(forbidden.value)
    with pytest.raises(ClientError):
        await Client(dead).publish("chat:x", 1)  # before connect()


def test_client_needs_sane_backoff() -> None:
    with pytest.raises(ValueError):
        Client("ws://x/connect", backoff_min=2, backoff_max=1)


# ---------------------------------------------------------------- the documented examples

EXAMPLES = [
    "hello",
    "callbacks",
    "presence_and_history",
    "call_rpc",
    "stay_in_sync",
    "resume_later",
    "in_a_test",
]


def test_docs_show_the_examples_verbatim() -> None:
    import inspect
    from pathlib import Path

    from examples import python_client

    docs = (Path(__file__).parent.parent / "docs" / "clients.md").read_text()
    for name in EXAMPLES:
        source = inspect.getsource(getattr(python_client, name)).rstrip("\n")
        assert f"```python\n{source}\n```" in docs, f"docs/clients.md does not show {name}() as it is"


async def test_examples_run(server: ServerProcess, app_server: ThreadServer) -> None:
    from examples import python_client as ex

    url = server.ws("/connect")
    assert await ex.hello(url) == {"text": "hello"}
    assert await ex.callbacks(url) == ["one", "two"]
    assert await ex.presence_and_history(url) == (1, ["second"])
    assert await ex.call_rpc(app_server.ws("/connect")) == {"sum": 5}
    await ex.stay_in_sync(url)
    assert await ex.resume_later(url) == ["missed"]
    await ex.in_a_test(url)
