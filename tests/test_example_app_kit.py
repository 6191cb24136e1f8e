"""The example app (examples/chat_app.py) tested as its authors would: with herald.testing,
in process, no server.  docs/testing.md shows these tests.

tests/integration/test_example_app.py runs the same app under a real uvicorn.
"""

from __future__ import annotations

import pytest
from examples import chat_app

from herald.exceptions import ReplyError
from herald.testing import HeraldTestClient, running

ALICE = {"Cookie": "session=s3cret-alice"}
ADMIN = {"Cookie": "session=s3cret-admin"}


async def test_on_connect_authenticates_from_the_session_cookie() -> None:
    async with (
        HeraldTestClient(chat_app.app, headers=ALICE) as alice,
        HeraldTestClient(chat_app.app) as stranger,
    ):
        assert alice.user == "alice"
        assert stranger.user == ""


async def test_on_subscribe_keeps_admin_rooms_for_admins() -> None:
    async with (
        HeraldTestClient(chat_app.app, headers=ALICE) as alice,
        HeraldTestClient(chat_app.app, headers=ADMIN) as admin,
    ):
        with pytest.raises(ReplyError) as refused:
            await alice.subscribe("chat:admin-room")
        assert (refused.value.code, refused.value.message) == (110, "admins only")
        await admin.subscribe("chat:admin-room")


async def test_on_publish_signs_messages_and_refuses_empty_ones() -> None:
    async with (
        HeraldTestClient(chat_app.app, headers=ALICE) as alice,
        HeraldTestClient(chat_app.app, headers=ADMIN) as admin,
    ):
        await admin.subscribe("chat:lobby")
        await alice.publish("chat:lobby", {"text": "  hello  "})
        publication = await admin.expect_publication("chat:lobby")
        assert publication.data == {"text": "hello", "by": "alice"}
        with pytest.raises(ReplyError) as refused:
            await alice.publish("chat:lobby", {"text": "   "})
        assert refused.value.code == 110
        await admin.expect_no_push("publication")


async def test_typed_rpc_validates_its_params() -> None:
    async with HeraldTestClient(chat_app.app) as client:
        rolled = await client.rpc("roll", {"sides": 20})
        assert rolled["sides"] == 20 and 1 <= rolled["value"] <= 20
        assert (await client.rpc("roll", {}))["sides"] == 6
        with pytest.raises(ReplyError) as invalid:
            await client.rpc("roll", {"sides": 1})
        assert invalid.value.code == 114 and "sides" in invalid.value.message


async def test_on_disconnect_has_run_when_the_client_closed() -> None:
    async with HeraldTestClient(chat_app.app, headers=ALICE) as alice:
        client_id = alice.client_id
    assert (client_id, 1000) in chat_app.disconnects


async def test_an_http_route_publishes_to_subscribers() -> None:
    async with running(chat_app.app) as app, app.client() as client, app.http() as http:
        await client.subscribe("orders:new")
        response = await http.post("/orders", json={"item": "book", "quantity": 2})
        assert response.status_code == 200
        publication = await client.expect_publication("orders:new")
        assert publication.data == {"item": "book", "quantity": 2}
        assert publication.offset == response.json()["offset"]
        with pytest.raises(ReplyError) as refused:  # clients may not publish in `orders`
            await client.publish("orders:new", {"item": "free"})
        assert refused.value.code == 110


def test_docs_show_these_tests_verbatim() -> None:
    import inspect
    from pathlib import Path

    docs = (Path(__file__).parent.parent / "docs" / "testing.md").read_text()
    for test in (
        test_on_publish_signs_messages_and_refuses_empty_ones,
        test_on_disconnect_has_run_when_the_client_closed,
        test_an_http_route_publishes_to_subscribers,
    ):
        source = inspect.getsource(test).rstrip("\n")
        assert f"```python\n{source}\n```" in docs, (
            f"docs/testing.md does not show {test.__name__}() as it is"
        )
    assert ALICE == {"Cookie": "session=s3cret-alice"}  # as the page says
