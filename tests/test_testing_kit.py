"""herald.testing: the in-process client an app's own test suite uses (no server, no port)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi import FastAPI, Request, WebSocket

from herald import ClientContext, Herald, NamespaceOptions, PermissionDeniedError, Settings
from herald.exceptions import ClientConnectionError, ClientTimeoutError, ReplyError
from herald.testing import AppError, HeraldTestClient, LifespanError, running


class Shop:
    """A small app with Herald mounted, counting its lifespan runs."""

    def __init__(self) -> None:
        self.herald = Herald(
            Settings(
                allowed_origins=["https://shop.example"],
                # Join/leave pushes are off by default; this suite asserts on them.
                namespaces={"": NamespaceOptions(join_leave=True)},
            )
        )
        self.startups = 0
        self.shutdowns = 0
        self.left: list[tuple[str | None, int]] = []

        @contextlib.asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
            self.startups += 1
            async with self.herald.lifespan(app):
                yield {"shop": "open"}
            self.shutdowns += 1

        self.app = FastAPI(lifespan=lifespan)
        self.app.include_router(self.herald.router)
        self.app.include_router(self.herald.api_router)

        @self.herald.on_disconnect
        async def gone(ctx: ClientContext, code: int, reason: str) -> None:
            await asyncio.sleep(0.05)  # a hook that takes a moment: close() must wait for it
            self.left.append((ctx.user, code))

        @self.herald.on_connect
        async def name_user(ctx: ClientContext) -> None:
            ctx.user = ctx.header("x-user") or ""

        @self.herald.on_publish
        async def no_shouting(ctx: ClientContext, channel: str, data: Any) -> Any:
            if isinstance(data, str) and data.isupper():
                raise PermissionDeniedError("no shouting")
            return data

        @self.app.websocket("/broken")
        async def broken(websocket: WebSocket) -> None:
            await websocket.accept()
            await websocket.receive_text()
            raise RuntimeError("the route is broken")

        @self.app.get("/state")
        async def state(request: Request) -> dict[str, Any]:
            return {"shop": request.state.shop}


@pytest.fixture
def shop() -> Shop:
    return Shop()


async def test_lifespan_runs_once_for_every_client_and_ends_with_the_last(shop: Shop) -> None:
    first = HeraldTestClient(shop.app, headers={"X-User": "ann"})
    second = HeraldTestClient(shop.app, headers={"X-User": "bob"})
    await asyncio.gather(first.connect(), second.connect())
    assert (shop.startups, shop.shutdowns) == (1, 0)
    assert shop.herald.node.started
    await first.close()
    assert shop.shutdowns == 0 and shop.herald.node.started
    await second.close()
    assert (shop.startups, shop.shutdowns) == (1, 1)
    assert not shop.herald.node.started
    # A later client starts it again (the app's lifespan is re-entrant, Herald's too).
    async with HeraldTestClient(shop.app) as third:
        assert third.connected and shop.startups == 2
    assert shop.shutdowns == 2


async def test_running_holds_the_lifespan_and_calls_http_routes_in_process(shop: Shop) -> None:
    async with running(shop.app) as live:
        assert shop.startups == 1 and live.state == {"shop": "open"}
        async with live.client(headers={"X-User": "ann"}) as ann, live.http() as http:
            assert shop.startups == 1  # the client shares the running lifespan
            await ann.subscribe("news")
            sent = await http.post("/api/publish", json={"channel": "news", "data": {"n": 1}})
            assert sent.status_code == 200, sent.text
            publication = await ann.expect_publication("news")
            assert (publication.data, publication.offset) == ({"n": 1}, sent.json()["offset"])
            assert (await http.get("/state")).json() == {"shop": "open"}
        assert shop.shutdowns == 0
    assert shop.shutdowns == 1


async def test_commands_pushes_and_hooks(shop: Shop) -> None:
    async with (
        HeraldTestClient(shop.app, headers={"X-User": "ann"}) as ann,
        HeraldTestClient(shop.app, headers={"X-User": "bob"}) as bob,
    ):
        assert (ann.user, bob.user) == ("ann", "bob")
        await ann.subscribe("room")
        assert (await ann.expect_join("room")).info.user == "ann"
        await bob.subscribe("room")
        assert (await ann.expect_join("room")).info.user == "bob"
        assert {info.user for info in (await ann.presence("room")).values()} == {"ann", "bob"}

        position = await bob.publish("room", "hello")
        publication = await ann.expect_publication("room")
        assert (
            publication.data,
            publication.offset,
            publication.info.user if publication.info else None,
        ) == (
            "hello",
            position.offset,
            "bob",
        )
        with pytest.raises(ReplyError) as refused:
            await bob.publish("room", "HELLO")
        assert (refused.value.code, refused.value.message) == (110, "no shouting")
        await ann.expect_no_push("publication", within=0.1)

        await bob.unsubscribe("room")
        assert (await ann.expect_leave("room")).info.user == "bob"
        await bob.close()
        assert ("bob", 1000) in shop.left  # the disconnect hook ran before close() returned


async def test_next_push_is_in_order_and_expect_push_leaves_the_others(shop: Shop) -> None:
    async with HeraldTestClient(shop.app) as client:
        await client.subscribe("a")
        await client.subscribe("b")
        assert (await client.next_push())["type"] == "join"
        assert (await client.next_push())["channel"] == "b"
        for channel, n in (("a", 1), ("b", 2), ("a", 3)):
            await shop.herald.publish(channel, n)
        assert (await client.expect_publication("b")).data == 2
        assert [(await client.next_push())["data"] for _ in range(2)] == [1, 3]
        with pytest.raises(ClientTimeoutError, match=r"no push within 0\.05s"):
            await client.next_push(timeout=0.05)
        await shop.herald.publish("a", 4)
        with pytest.raises(AssertionError, match="unexpected push"):
            await client.expect_no_push(channel="a", within=1.0)
        await client.expect_no_push(channel="b")  # the push on "a" does not count
        assert [p["data"] for p in client.pushes] == [4]  # expect_no_push takes nothing


async def test_server_side_disconnect_is_reported(shop: Shop) -> None:
    async with HeraldTestClient(shop.app, headers={"X-User": "ann"}) as ann:
        await shop.herald.node.disconnect_user("ann", 4503, "banned")
        event = await ann.expect_disconnect()
        assert (event.code, event.reason, event.reconnect) == (4503, "banned", False)
        assert not ann.connected
    assert ("ann", 4503) in shop.left


async def test_refused_handshakes_say_why(shop: Shop) -> None:
    with pytest.raises(ClientConnectionError, match="refused the WebSocket handshake on /nowhere"):
        await HeraldTestClient(shop.app, "/nowhere").connect()
    with pytest.raises(ClientConnectionError, match="origin"):
        await HeraldTestClient(shop.app, origin="https://evil.example").connect()
    async with HeraldTestClient(shop.app, origin="https://shop.example") as allowed:
        assert allowed.connected
    assert shop.startups == shop.shutdowns == 3  # a refused client released the lifespan too


async def test_an_app_error_fails_the_test(shop: Shop) -> None:
    client = HeraldTestClient(shop.app, "/broken")
    # /broken is no Herald route: it takes the `connect` command, then raises.
    with pytest.raises(AppError, match=r"while serving /broken: RuntimeError\('the route is broken'\)"):
        await client.connect(timeout=1)
    await client.close()  # reported once
    assert shop.startups == shop.shutdowns == 1


async def test_lifespan_startup_failure_is_clear() -> None:
    @contextlib.asynccontextmanager
    async def failing(app: FastAPI) -> AsyncIterator[None]:
        raise RuntimeError("database unreachable")
        yield

    app = FastAPI(lifespan=failing)
    with pytest.raises(LifespanError, match=r"startup failed: RuntimeError: database unreachable$"):
        await HeraldTestClient(app).connect()
    with pytest.raises(LifespanError):  # and nothing is left half-started
        async with running(app):
            pass


async def test_path_must_be_absolute(shop: Shop) -> None:
    with pytest.raises(ValueError, match="must start with '/'"):
        HeraldTestClient(shop.app, "connect")
