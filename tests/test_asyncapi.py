"""The AsyncAPI 3.0 document and its docs page."""

from __future__ import annotations

import asyncio
import functools
import json
import re
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft7Validator, Draft202012Validator
from pydantic import BaseModel

from herald import ClientContext, Herald, Settings
from herald.asyncapi import (
    CLOSE_CODE_MEANINGS,
    COMMAND_DOCS,
    ERROR_CODE_MEANINGS,
    EXAMPLES,
    PUSH_DOCS,
    build_asyncapi,
    render_html,
)
from herald.codes import CloseCode, ErrorCode, should_reconnect
from herald.config import NamespaceOptions
from herald.protocol import messages as m
from herald.server import create_app

from .helpers import DEFAULT_TIMEOUT, ProtocolClient, ThreadServer, http_get

SPEC_PATH = Path(__file__).parent / "schemas" / "asyncapi-3.0.0.json"


@functools.cache
def asyncapi_validator() -> Draft7Validator:
    spec = json.loads(SPEC_PATH.read_text(encoding="utf-8"))
    return Draft7Validator(spec)


def assert_valid_asyncapi(doc: dict[str, Any]) -> None:
    errors = sorted(asyncapi_validator().iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message[:300]}" for e in errors[:5])
    # The spec's JSON Schema cannot check references: every local $ref must resolve.
    for ref in _refs(doc):
        _resolve(doc, ref)


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        for value in node.values():
            found += _refs(value)
        return found
    if isinstance(node, list):
        return [ref for item in node for ref in _refs(item)]
    return []


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        assert isinstance(node, dict) and part in node, f"unresolved $ref {ref}"
        node = node[part]
    return node


def payload_validator(doc: dict[str, Any], message: str) -> Draft202012Validator:
    """A validator for a component message's payload, with the document's schemas."""
    payload = doc["components"]["messages"][message]["payload"]
    return Draft202012Validator({**payload, "components": doc["components"]})


# ---------------------------------------------------------------- a typed app


class Point(BaseModel):
    x: int
    y: int


class Area(BaseModel):
    """The area of a rectangle."""

    square_units: float


def typed_herald() -> Herald:
    herald = Herald(Settings())

    @herald.rpc("geometry.area")
    async def area(params: list[Point], ctx: ClientContext) -> Area:
        """Area of the bounding box of <b>points</b>."""
        xs, ys = [p.x for p in params], [p.y for p in params]
        return Area(square_units=float((max(xs) - min(xs)) * (max(ys) - min(ys))))

    @herald.rpc("untyped")
    async def untyped(params, ctx):  # type: ignore[no-untyped-def]
        return params

    return herald


# ---------------------------------------------------------------- tests


def test_default_document_validates_against_asyncapi_3() -> None:
    doc = build_asyncapi(Settings())
    assert doc["asyncapi"] == "3.0.0"
    assert_valid_asyncapi(doc)


def test_document_with_rpc_methods_and_odd_namespaces_validates() -> None:
    settings = Settings(
        namespaces={
            "": NamespaceOptions(),
            "a.b-c_d": NamespaceOptions(history_size=0, presence=False),
            "secret": NamespaceOptions(allow_anonymous=False, allow_publish=False),
        }
    )
    herald = typed_herald()
    doc = build_asyncapi(settings, herald.node.rpc_methods, host="example.com", secure=True)
    assert_valid_asyncapi(doc)
    assert doc["servers"]["herald"] == {
        "host": "example.com",
        "protocol": "wss",
        "description": doc["servers"]["herald"]["description"],
    }


def test_connect_channel_and_every_frame_has_a_message() -> None:
    doc = build_asyncapi(Settings())
    connect = doc["channels"]["connect"]
    assert connect["address"] == "/connect"
    assert connect["bindings"]["ws"]["headers"]["properties"]["Sec-WebSocket-Protocol"]["const"] == (
        m.SUBPROTOCOL
    )
    schemas = doc["components"]["schemas"]
    messages = doc["components"]["messages"]
    from herald.asyncapi import COMMAND_MODELS, PUSH_MODELS, REPLY_MODELS

    for model in [*COMMAND_MODELS, *REPLY_MODELS, *PUSH_MODELS]:
        name = model.__name__[0].lower() + model.__name__[1:]
        assert messages[name]["payload"] == {"$ref": f"#/components/schemas/{model.__name__}"}
        assert name in connect["messages"]
        assert model.__name__ in schemas
    # Server frames carry their type; replies carry exactly one of result and error.
    assert "type" in schemas["PublicationPush"]["required"]
    assert len(schemas["SubscribeReply"]["oneOf"]) == 2
    # Every command is a receive operation with its reply; every push a send operation.
    operations = doc["operations"]
    for kind in m.COMMAND_TYPES:
        operation = operations[f"command.{kind}"]
        assert operation["action"] == "receive"
        assert kind in COMMAND_DOCS, f"document the {kind} command in COMMAND_DOCS"
        if kind != "pong":
            replies = [ref["$ref"] for ref in operation["reply"]["messages"]]
            assert replies[0].endswith("Reply") and kind.replace("_", "") in replies[0].lower()
    for model in PUSH_MODELS:
        kind = model.model_fields["type"].default
        assert operations[f"push.{kind}"]["action"] == "send"
        assert kind in PUSH_DOCS, f"document the {kind} push in PUSH_DOCS"


def test_tutorial_endpoints_are_channels() -> None:
    doc = build_asyncapi(Settings())
    for key, address in [("ws", "/ws"), ("ws_json", "/ws_json"), ("ws_broadcast", "/ws_broadcast")]:
        assert doc["channels"][key]["address"] == address
        assert doc["operations"][f"tutorial.{key}"]["reply"]
    echo = payload_validator(doc, "ws.out")
    assert echo.is_valid("Message text was: hi")
    assert not echo.is_valid("hi")
    json_out = payload_validator(doc, "ws_json.out")
    assert json_out.is_valid({"message": "Received JSON data", "data": [1]})
    assert json_out.is_valid({"error": {"code": 1007, "message": "malformed JSON"}})
    assert not json_out.is_valid({"message": "other", "data": 1})


def test_namespaces_with_their_semantics() -> None:
    settings = Settings(
        namespaces={
            "chat": NamespaceOptions(history_size=50, history_ttl=3600, join_leave=True),
            "feed": NamespaceOptions(
                history_size=0, presence=False, allow_publish=False, allow_anonymous=False
            ),
        }
    )
    doc = build_asyncapi(settings)
    chat = doc["channels"]["namespace.chat"]
    assert chat["address"] == "chat:{channel}"
    assert "last 50 publications, kept 1 h" in chat["description"]
    assert "join/leave pushes: on" in chat["description"]
    assert chat["x-herald-namespace"]["history_size"] == 50
    assert set(chat["messages"]) == {"publicationPush", "joinPush", "leavePush"}
    feed = doc["channels"]["namespace.feed"]
    assert "History: off" in feed["description"]
    assert "publish: no" in feed["description"]
    assert "anonymous clients (no user id): refused" in feed["description"]
    assert feed["x-herald-namespace"] == {"name": "feed", **settings.namespaces["feed"].model_dump()}
    assert set(feed["messages"]) == {"publicationPush"}
    assert "namespace.feed.join" not in doc["operations"]
    default = doc["channels"]["namespace.default"]
    assert default["address"] == "{channel}"


def test_error_and_close_codes_are_complete() -> None:
    doc = build_asyncapi(Settings())
    errors = {row["code"]: row for row in doc["x-herald-error-codes"]}
    assert set(errors) == {int(code) for code in ErrorCode}
    assert all(errors[int(code)]["meaning"] for code in ErrorCode)
    assert set(ERROR_CODE_MEANINGS) == set(ErrorCode), "give every ErrorCode a meaning"
    closes = {row["code"]: row for row in doc["x-herald-close-codes"]}
    assert set(closes) == {int(code) for code in CloseCode}
    assert set(CLOSE_CODE_MEANINGS) == set(CloseCode), "give every CloseCode a meaning"
    for code, row in closes.items():
        assert row["reconnect"] is should_reconnect(code)
    assert closes[4001]["reconnect"] and not closes[4502]["reconnect"]


def test_rpc_methods_appear_with_their_schemas() -> None:
    herald = typed_herald()
    doc = build_asyncapi(Settings(), herald.node.rpc_methods)
    assert_valid_asyncapi(doc)
    assert doc["x-herald-rpc-methods"] == ["geometry.area", "untyped"]
    operation = doc["operations"]["rpc.geometry.area"]
    assert operation["action"] == "receive"
    assert "`Area`" in operation["description"]
    request = doc["components"]["messages"]["rpc.geometry.area.request"]
    assert request["description"] == "Area of the bounding box of <b>points</b>."
    params = request["payload"]["properties"]["params"]
    assert params == {"items": {"$ref": "#/components/schemas/Point"}, "type": "array"}
    assert doc["components"]["schemas"]["Point"]["required"] == ["x", "y"]
    reply = doc["components"]["messages"]["rpc.geometry.area.reply"]["payload"]
    assert reply["properties"]["result"]["properties"]["data"] == {"$ref": "#/components/schemas/Area"}
    call = payload_validator(doc, "rpc.geometry.area.request")
    assert call.is_valid({"id": 1, "type": "rpc", "method": "geometry.area", "params": [{"x": 1, "y": 2}]})
    assert not call.is_valid({"id": 1, "type": "rpc", "method": "geometry.area", "params": [{"x": 1}]})
    assert not call.is_valid({"id": 1, "type": "rpc", "method": "other", "params": []})
    # Unannotated methods are documented as taking and returning any JSON.
    untyped = doc["components"]["messages"]["rpc.untyped.request"]["payload"]
    assert untyped["properties"]["params"] == {}


def test_example_frames_are_documented() -> None:
    doc = build_asyncapi(Settings())
    messages = doc["components"]["messages"]
    for name, example in EXAMPLES.items():
        assert messages[name]["examples"] == [{"name": name, "payload": example}]
        assert payload_validator(doc, name).is_valid(example), name


def test_html_page_escapes_everything_and_loads_nothing_external() -> None:
    herald = typed_herald()
    settings = Settings(namespaces={"": NamespaceOptions()})
    # Settings refuse such a name at start-up; the page escapes names anyway (defence in
    # depth), so put one in behind validation's back.
    settings.namespaces["x<script>"] = NamespaceOptions()
    page = render_html(build_asyncapi(settings, herald.node.rpc_methods))
    assert page.startswith("<!doctype html>")
    assert "<script" not in page.lower()
    assert "&lt;b&gt;points&lt;/b&gt;" in page
    assert "x&lt;script&gt;" in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), "the page must not load from a CDN"
    for text in (
        "geometry.area",
        "SLOW_CONSUMER",
        "4001",
        "/ws_broadcast",
        "x&lt;script&gt;:{channel}",
        "Point",
    ):
        assert text in page, text


# ---------------------------------------------------------------- over HTTP


@pytest.mark.asyncio
async def test_served_document_and_page_follow_registered_methods() -> None:
    herald = typed_herald()
    server = ThreadServer(create_app(herald=herald)).start()
    try:
        status, body = await asyncio.to_thread(http_get, server.http + "/asyncapi.json")
        assert status == 200
        doc = json.loads(body)
        assert_valid_asyncapi(doc)
        assert doc["servers"]["herald"]["host"] == f"127.0.0.1:{server.port}"
        assert "rpc.geometry.area" in doc["operations"]

        status, page = await asyncio.to_thread(http_get, server.http + "/asyncapi")
        assert status == 200 and b"geometry.area" in page

        # A method registered later appears on the next request.
        @herald.rpc("late")
        async def late(params: Point) -> Point:
            return params

        _, body = await asyncio.to_thread(http_get, server.http + "/asyncapi.json")
        assert "rpc.late" in json.loads(body)["operations"]

        # The documented reply is what the server sends.
        client = await ProtocolClient.open(server.ws("/connect"))
        try:
            reply = await client.call(
                "rpc", method="geometry.area", params=[{"x": 0, "y": 0}, {"x": 2, "y": 3}]
            )
            assert reply["result"] == {"data": {"square_units": 6.0}}
            assert payload_validator(doc, "rpc.geometry.area.reply").is_valid(reply)
            bad = await client.call(
                "rpc", method="geometry.area", params=[{"x": "no"}], timeout=DEFAULT_TIMEOUT
            )
            assert bad["error"]["code"] == ErrorCode.INVALID_PARAMS
            assert payload_validator(doc, "rpc.geometry.area.reply").is_valid(bad)
        finally:
            await client.close()
    finally:
        server.stop()


@pytest.mark.asyncio
async def test_example_app_documents_its_rpc_methods() -> None:
    from examples.asyncapi_app import app

    server = ThreadServer(app).start()
    try:
        status, body = await asyncio.to_thread(http_get, server.http + "/asyncapi.json")
        assert status == 200
        doc = json.loads(body)
        assert_valid_asyncapi(doc)
        schemas = doc["components"]["schemas"]
        assert schemas["Move"]["properties"]["x"]["exclusiveMaximum"] == 100
        assert doc["components"]["messages"]["rpc.game.move.request"]["payload"]["properties"]["params"] == {
            "$ref": "#/components/schemas/Move"
        }
        assert doc["components"]["messages"]["rpc.shout.reply"]["payload"]["properties"]["result"][
            "properties"
        ]["data"] == {"type": "string"}
        client = await ProtocolClient.open(server.ws("/connect"))
        try:
            reply = await client.call("rpc", method="shout", params={"text": "hey"})
            assert reply["result"] == {"data": "HEY"}
            assert payload_validator(doc, "rpc.shout.reply").is_valid(reply)
            moved = await client.call("rpc", method="game.move", params={"x": 3, "y": 4})
            assert moved["result"]["data"]["accepted"] is True
            assert payload_validator(doc, "rpc.game.move.reply").is_valid(moved)
        finally:
            await client.close()
    finally:
        server.stop()
