"""JSON Herald cannot carry is refused where it enters, never a 500 (a red-team finding).

Against real ``herald serve`` processes, on both serving drivers:

* HTTP API bodies are parsed strictly, as the WebSocket protocol parses frames: NaN,
  Infinity, numbers past a double, lone UTF-16 surrogates and invalid UTF-8 are 422
  (``json_invalid``, the reason in ``ctx.error``); nesting past ``max_json_depth`` is
  400 code 120, more than ``max_json_keys`` keys 400 code 117, an integer outside 64
  bits 400 code 101.  On ``/api/publish``, ``/api/broadcast`` and ``/api/disconnect``;
  nothing is published, nothing reaches a subscriber as ``null``, the server answers on.
* A token whose claims cannot be re-encoded (an integer past 64 bits, nesting 300 deep,
  a lone surrogate, NaN) is refused like any invalid token (111) on every path that
  takes one: the WebSocket connect command, ``/sse`` and ``/stream`` (header or
  ``?token=``), the emulation's connect and a subscription token; presence answers 200
  and join/leave keep flowing for everyone else, with no traceback in the log.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from ..helpers import ProtocolClient, ServerProcess
from .emulation_kit import RawSession

API_KEY = "strict-json-key"
SECRET = "strict-json-secret-0123456789abcdef-0123456789abcdef"
MAX_DEPTH = 32  # the default max_json_depth
MAX_KEYS = 1000  # the default max_json_keys
CHANNEL = "chat:strict"
API = {"X-API-Key": API_KEY, "Content-Type": "application/json"}


@pytest.fixture(scope="module", params=["native", "asgi"])
def server(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    process = ServerProcess(
        env={
            "HERALD_API_KEY": API_KEY,
            "HERALD_TOKEN_SECRET": SECRET,
            "HERALD_NATIVE_ROUTES": "true" if request.param == "native" else "false",
            "HERALD_LOG_FORMAT": "text",
            "HERALD_LOG_LEVEL": "info",
        }
    ).start()
    yield process
    process.stop()
    # Nothing above may have reached a handler that failed.
    assert "Traceback" not in process.log(), process.log()[-3000:]
    assert "handler failed" not in process.log(), process.log()[-3000:]


def nested(depth: int, inner: str = "") -> str:
    return "[" * depth + inner + "]" * depth


def publish_body(data: str, channel: str = CHANNEL) -> bytes:
    return (f'{{"channel":"{channel}","data":{data}}}').encode()


def broadcast_body(data: str) -> bytes:
    return (f'{{"channels":["{CHANNEL}","chat:strict2"],"data":{data}}}').encode()


BIGINT = "123456789012345678901234567890"

#: (name, route, raw body, status, what the answer must say).
REFUSED: list[tuple[str, str, bytes, int, str]] = [
    ("bigint", "/api/publish", publish_body(BIGINT), 400, "integer out of range"),
    ("negative bigint", "/api/publish", publish_body("-99999999999999999999"), 400, "integer out of range"),
    ("u64 max + 1", "/api/publish", publish_body("18446744073709551616"), 400, "integer out of range"),
    ("5000 digits", "/api/publish", publish_body("9" * 5000), 422, "infinity"),  # past a double
    (
        "nested bigint",
        "/api/publish",
        publish_body(f'{{"a":[1,{{"b":{BIGINT}}}]}}'),
        400,
        "integer out of range",
    ),
    ("1e400", "/api/publish", publish_body("1e400"), 422, "infinity"),
    ("-1e400", "/api/publish", publish_body("-1e400"), 422, "infinity"),
    ("NaN", "/api/publish", publish_body("NaN"), 422, "NaN and Infinity are not JSON"),
    ("Infinity", "/api/publish", publish_body("Infinity"), 422, "NaN and Infinity are not JSON"),
    ("-Infinity", "/api/publish", publish_body("-Infinity"), 422, "NaN and Infinity are not JSON"),
    ("NaN inside", "/api/publish", publish_body('{"x":[1,NaN]}'), 422, "NaN and Infinity are not JSON"),
    ("lone surrogate", "/api/publish", publish_body('"\\ud800"'), 422, "surrogate"),
    ("lone surrogate key", "/api/publish", publish_body('{"\\udfff":1}'), 422, "surrogate"),
    ("surrogate channel", "/api/publish", b'{"channel":"chat:\\ud800","data":1}', 422, "surrogate"),
    ("surrogate channel, no data", "/api/publish", b'{"channel":"chat:\\ud800"}', 422, "surrogate"),
    ("invalid UTF-8", "/api/publish", b'{"channel":"chat:\xff","data":1}', 422, "UTF-8"),
    ("depth limit + 1", "/api/publish", publish_body(nested(MAX_DEPTH)), 400, "nested deeper than 32"),
    ("depth 256", "/api/publish", publish_body(nested(256)), 400, "nested deeper than 32"),
    ("depth 300", "/api/publish", publish_body(nested(300)), 400, "nested deeper than 32"),
    ("depth 5000", "/api/publish", publish_body(nested(5000)), 400, "nested deeper than 32"),
    (
        "too many keys",
        "/api/publish",
        publish_body("{" + ",".join(f'"k{i}":1' for i in range(MAX_KEYS)) + "}"),
        400,
        "more than 1000 object keys",
    ),
    ("broadcast bigint", "/api/broadcast", broadcast_body(BIGINT), 400, "integer out of range"),
    ("broadcast depth 300", "/api/broadcast", broadcast_body(nested(300)), 400, "nested deeper than 32"),
    ("broadcast surrogate", "/api/broadcast", broadcast_body('"\\ud800"'), 422, "surrogate"),
    ("broadcast NaN", "/api/broadcast", broadcast_body("NaN"), 422, "NaN and Infinity are not JSON"),
    ("broadcast 1e400", "/api/broadcast", broadcast_body("1e400"), 422, "infinity"),
    (
        "broadcast surrogate channel",
        "/api/broadcast",
        b'{"channels":["chat:\\ud800"],"data":1}',
        422,
        "surrogate",
    ),
    ("disconnect user surrogate", "/api/disconnect", b'{"user":"\\ud800"}', 422, "surrogate"),
    ("disconnect reason surrogate", "/api/disconnect", b'{"user":"x","reason":"\\ud800"}', 422, "surrogate"),
    (
        "disconnect code bigint",
        "/api/disconnect",
        b'{"user":"x","code":%s}' % BIGINT.encode(),
        400,
        "integer",
    ),
    ("disconnect NaN code", "/api/disconnect", b'{"user":"x","code":NaN}', 422, "NaN"),
]

#: Bodies at the limits, accepted: (name, JSON text of data, the value read back).
ACCEPTED: list[tuple[str, str, Any]] = [
    ("u64 max", "18446744073709551615", 18446744073709551615),
    ("i64 min", "-9223372036854775808", -9223372036854775808),
    ("long digit string", f'"{BIGINT}"', BIGINT),
    ("big float", "1.5e308", 1.5e308),
    ("surrogate pair", '"\\ud83d\\ude00"', "\U0001f600"),
    # The body object is level 1, as a command frame is: data may nest 31 levels.
    ("depth at the limit", nested(MAX_DEPTH - 1, "1"), json.loads(nested(MAX_DEPTH - 1, "1"))),
    (
        "keys at the limit",
        "{" + ",".join(f'"k{i}":1' for i in range(MAX_KEYS - 2)) + "}",
        {f"k{i}": 1 for i in range(MAX_KEYS - 2)},
    ),
]


def post(server: ServerProcess, route: str, body: bytes) -> httpx.Response:
    return httpx.post(server.http + route, content=body, headers=API, timeout=10)


def history(server: ServerProcess, channel: str) -> list[Any]:
    response = httpx.get(
        server.http + "/api/history", params={"channel": channel}, headers={"X-API-Key": API_KEY}
    )
    assert response.status_code == 200, response.text
    return [p["data"] for p in response.json()["publications"]]


def error_text(response: httpx.Response) -> str:
    """The part of an error answer that names the problem."""
    detail = response.json()["detail"]
    if isinstance(detail, list):  # FastAPI's validation errors
        assert detail[0]["type"] == "json_invalid", detail
        return str(detail[0]["ctx"]["error"])
    return str(detail["message"])


@pytest.mark.parametrize(
    ("name", "route", "body", "status", "says"), REFUSED, ids=[case[0] for case in REFUSED]
)
def test_api_refuses_json_it_cannot_carry(
    server: ServerProcess, name: str, route: str, body: bytes, status: int, says: str
) -> None:
    before = history(server, CHANNEL)
    response = post(server, route, body)
    assert response.status_code == status, (name, response.status_code, response.text)
    assert response.headers["content-type"] == "application/json"
    assert says in error_text(response), (name, response.text)
    if status == 400:
        # The protocol's codes: 120 TOO_DEEP, 117 TOO_LARGE, 101 BAD_REQUEST.
        expected = 120 if "nested" in says else 117 if "keys" in says else 101
        assert response.json()["detail"]["code"] == expected, response.text
    # Nothing was published (broadcast: to no channel), and the server answers on.
    assert history(server, CHANNEL) == before
    ok = post(server, "/api/publish", publish_body(f'{{"after":"{name}"}}'))
    assert ok.status_code == 200, ok.text
    assert history(server, CHANNEL)[-1] == {"after": name}


@pytest.mark.parametrize(("name", "data", "value"), ACCEPTED, ids=[case[0] for case in ACCEPTED])
def test_api_accepts_json_at_the_limits(server: ServerProcess, name: str, data: str, value: Any) -> None:
    response = post(server, "/api/publish", publish_body(data, "chat:limits"))
    assert response.status_code == 200, (name, response.text)
    assert history(server, "chat:limits")[-1] == value
    response = post(server, "/api/broadcast", (f'{{"channels":["chat:limits2"],"data":{data}}}').encode())
    assert response.status_code == 200, (name, response.text)
    assert response.json()["results"][0]["error"] is None
    assert history(server, "chat:limits2")[-1] == value


def test_subscribers_never_get_null_for_refused_data(server: ServerProcess) -> None:
    async def scenario() -> None:
        client = await ProtocolClient.open(server.ws("/connect"))
        try:
            reply = await client.call("subscribe", channels=[{"channel": "chat:nulls"}])
            assert "error" not in reply["result"]["channels"][0], reply
            for data in ("NaN", "Infinity", "-Infinity", "1e400", BIGINT, '"\\ud800"', nested(300)):
                refused = post(server, "/api/publish", publish_body(data, "chat:nulls"))
                assert refused.status_code in (400, 422), (data[:20], refused.text)
            assert post(server, "/api/publish", publish_body('"last"', "chat:nulls")).status_code == 200
            publication = await client.push("publication")
            assert publication["data"] == "last"  # the first and only one
        finally:
            await client.close()

    asyncio.run(scenario())


# ---------------------------------------------------------------- tokens


def mint(payload_json: str, secret: str = SECRET) -> str:
    """An HS256 token with ``payload_json`` as its payload, byte for byte."""

    def b64(raw: bytes) -> bytes:
        return base64.urlsafe_b64encode(raw).rstrip(b"=")

    head = b64(b'{"alg":"HS256","typ":"JWT"}') + b"." + b64(payload_json.encode())
    return (head + b"." + b64(hmac.new(secret.encode(), head, hashlib.sha256).digest())).decode()


def good_token(user: str) -> str:
    exp = int(time.time()) + 600
    return mint(f'{{"sub":"{user}","info":{{"name":"{user}"}},"exp":{exp}}}')


#: (name, JSON text of a claim value Herald cannot re-encode).
BAD_CLAIMS = [
    ("bigint", f'{{"n":{BIGINT}}}'),
    ("deep 300", nested(300)),
    ("surrogate", '"\\ud800"'),
    ("NaN", "NaN"),
]


async def event_of(client: ProtocolClient, kind: str, user: str) -> dict[str, Any]:
    """The next ``kind`` push about ``user`` (the bystander also sees its own join)."""
    while True:
        frame = await client.push(kind)
        if frame["info"]["user"] == user:
            return frame


def bad_token(info: str, **extra: str) -> str:
    claims = "".join(f',"{name}":"{value}"' for name, value in extra.items())
    return mint(f'{{"sub":"mallory","info":{info}{claims}}}')


@pytest.mark.parametrize(("name", "info"), BAD_CLAIMS, ids=[n for n, _ in BAD_CLAIMS])
def test_token_with_unencodable_claim_is_refused_everywhere(
    server: ServerProcess, name: str, info: str
) -> None:
    channel = "chat:tokens"
    token = bad_token(info)

    async def scenario() -> None:
        # A bystander with a good token sees the channel's joins and leaves throughout.
        bystander = await ProtocolClient.open(server.ws("/connect"), connect=False)
        assert "result" in await bystander.call("connect", token=good_token("bystander"))
        reply = await bystander.call("subscribe", channels=[{"channel": channel}])
        assert "error" not in reply["result"]["channels"][0], reply
        try:
            # The WebSocket connect command.
            mallory = await ProtocolClient.open(server.ws("/connect"), connect=False)
            reply = await mallory.call("connect", token=token)
            assert reply["error"]["code"] == 111, reply
            assert reply["error"]["message"].startswith("invalid token ("), reply
            await mallory.close()

            # SSE and NDJSON streams, the token in the header or the query.
            async with httpx.AsyncClient(base_url=server.http, timeout=10) as http:
                for route in ("/sse", "/stream"):
                    for kwargs in (
                        {"headers": {"Authorization": f"Bearer {token}"}, "params": {"channel": channel}},
                        {"params": {"channel": channel, "token": token}},
                    ):
                        response = await http.get(route, **kwargs)  # type: ignore[arg-type]
                        assert response.status_code == 401, (route, response.status_code, response.text)
                        assert response.json()["error"]["code"] == 111, response.text

            # The emulation's connect command.
            emulated = await RawSession.open(server.http, connect=False)
            try:
                reply = await emulated.call("connect", token=token)
                assert reply["error"]["code"] == 111, reply
            finally:
                await emulated.close()

            # A subscription token carrying the claim (on a good connection).
            alice = await ProtocolClient.open(server.ws("/connect"), connect=False)
            assert "result" in await alice.call("connect", token=good_token("alice"))
            sub_token = mint(f'{{"sub":"alice","typ":"subscription","channel":"chat:tokens2","info":{info}}}')
            reply = await alice.call("subscribe", channels=[{"channel": "chat:tokens2", "token": sub_token}])
            assert reply["result"]["channels"][0]["error"]["code"] == 111, reply

            # Alice joins the bystander's channel: the join reaches it, presence answers.
            reply = await alice.call("subscribe", channels=[{"channel": channel}])
            assert "error" not in reply["result"]["channels"][0], reply
            await event_of(bystander, "join", "alice")
            async with httpx.AsyncClient(base_url=server.http, headers={"X-API-Key": API_KEY}) as http:
                response = await http.get("/api/presence", params={"channel": channel})
                assert response.status_code == 200, response.text
                users = sorted(c["user"] for c in response.json()["clients"].values())
                assert users == ["alice", "bystander"]
                stats = await http.get("/api/presence_stats", params={"channel": channel})
                assert stats.status_code == 200 and stats.json()["num_users"] == 2
            await alice.close()
            await event_of(bystander, "leave", "alice")
        finally:
            await bystander.close()

    asyncio.run(scenario())


def test_data_past_orjsons_depth_is_refused_when_the_limit_allows_it() -> None:
    """``max_json_depth`` may be set up to 1000, past the 255 levels orjson encodes: such
    data is refused as unencodable (400, code 101), not a 500."""
    process = ServerProcess(env={"HERALD_API_KEY": API_KEY, "HERALD_MAX_JSON_DEPTH": "1000"}).start()
    try:
        for depth, status in ((200, 200), (300, 400), (995, 400)):
            body = publish_body(nested(depth, '"%s"' % ("1" * 25)))  # a digit run: the int check
            response = post(process, "/api/publish", body)
            assert response.status_code == status, (depth, response.text)
            if status == 400:
                assert response.json()["detail"]["code"] == 101, response.text
                assert "cannot be encoded" in response.json()["detail"]["message"], response.text
            response = post(process, "/api/broadcast", broadcast_body(nested(depth)))
            assert response.status_code == status, (depth, response.text)
        assert post(process, "/api/publish", publish_body("1")).status_code == 200
    finally:
        process.stop()
    assert "Traceback" not in process.log(), process.log()[-3000:]


def test_emulation_refuses_commands_nested_past_orjsons_depth(server: ServerProcess) -> None:
    """A POST to ``/emulation`` whose command nests past 255 levels: 400, not a 500."""

    async def scenario() -> None:
        session = await RawSession.open(server.http)
        try:
            body = (
                f'{{"session":"{session.session}","secret":"{session.secret}","commands":'
                f'[{{"id":9,"type":"publish","channel":"chat:a","data":{nested(300)}}}]}}'
            )
            async with httpx.AsyncClient(base_url=server.http) as http:
                response = await http.post(
                    "/emulation", content=body, headers={"content-type": "application/json"}
                )
            assert response.status_code == 400, response.text
            assert "nested too deeply" in response.text
            reply = await session.call("presence_stats", channel="chat:a")  # still served
            assert "result" in reply, reply
        finally:
            await session.close()

    asyncio.run(scenario())
