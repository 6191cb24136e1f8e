"""The opening handshake's rules (transports/wshandshake.py), byte for byte.

The native driver's refusals on a real socket are in tests/test_native.py; these
check each rule of the pure functions alone.
"""

from __future__ import annotations

import base64
import hashlib

import pytest

from herald.transports.wshandshake import (
    Refusal,
    accept_response,
    header,
    http_response,
    offered_subprotocols,
    parse_request,
    request_headers,
    upgrade_refusal,
    websocket_upgrade,
)

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
GOOD = [
    (b"host", b"example.com"),
    (b"upgrade", b"websocket"),
    (b"connection", b"keep-alive, Upgrade"),
    (b"sec-websocket-key", KEY.encode()),
    (b"sec-websocket-version", b"13"),
]


def test_the_request_line_and_headers_are_read() -> None:
    request = parse_request(
        b"GET /a%20b?token=x&y=1 HTTP/1.1\r\nHost: h\r\nSec-WebSocket-Protocol:  v1 , v2\r\n"
        b"sec-websocket-protocol: v3\r\n\r\nleftover"
    )
    assert (request.method, request.path, request.query) == (b"GET", "/a b", b"token=x&y=1")
    headers = request_headers(request.lines)
    assert headers[0] == (b"host", b"h")
    assert header(headers, b"host") == "h" and header(headers, b"origin") is None
    assert offered_subprotocols(headers) == ["v1", "v2", "v3"]


def test_a_malformed_request_line_gives_the_root_path() -> None:
    assert parse_request(b"GARBAGE\r\n\r\n").path == "/"


def test_a_valid_upgrade_gives_the_key() -> None:
    assert upgrade_refusal(b"GET", GOOD) == KEY


@pytest.mark.parametrize(
    ("method", "change", "status"),
    [
        (b"POST", {}, 405),
        (b"GET", {b"connection": b"keep-alive"}, 400),
        (b"GET", {b"sec-websocket-version": b"8"}, 426),
        (b"GET", {b"sec-websocket-key": b"short"}, 400),
        (b"GET", {b"sec-websocket-key": None}, 400),
    ],
)
def test_each_broken_rule_has_its_status(
    method: bytes, change: dict[bytes, bytes | None], status: int
) -> None:
    headers = [(k, change.get(k, v)) for k, v in GOOD if change.get(k, v) is not None]
    refusal = upgrade_refusal(method, headers)  # type: ignore[arg-type]
    assert isinstance(refusal, Refusal) and refusal.status == status
    if status == 426:
        assert refusal.headers == [(b"sec-websocket-version", b"13")]


def test_the_accept_response_carries_the_rfc_digest_and_the_chosen_subprotocol() -> None:
    digest = base64.b64encode(hashlib.sha1((KEY + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
    response = accept_response(KEY, "herald.v1", [(b"server", b"x")])
    lines = response.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 101 Switching Protocols"
    assert b"sec-websocket-accept: " + digest in lines
    assert b"sec-websocket-protocol: herald.v1" in lines and b"server: x" in lines
    assert response.endswith(b"\r\n\r\n")
    assert b"sec-websocket-protocol" not in accept_response(KEY, None)


def test_an_http_response_closes_and_counts_its_body() -> None:
    response = http_response(403, "nö", [(b"x-a", b"1")])
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == b"HTTP/1.1 403 Forbidden"
    assert body == "nö".encode()
    assert b"content-length: 3" in head and b"connection: close" in head and b"x-a: 1" in head


# ---------------------------------------------------------------- exact bytes (mutation guards)
# What a client reads from a refused or accepted handshake is part of the contract: the
# tests below pin it byte for byte, so that a changed reason or header is noticed.


def test_refusals_say_exactly_why() -> None:
    from herald.transports.wshandshake import Refusal

    good = [
        (b"connection", b"Upgrade"),
        (b"sec-websocket-version", b"13"),
        (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="),
    ]
    assert upgrade_refusal(b"POST", good) == Refusal(405, "WebSocket handshakes use GET", [])
    assert upgrade_refusal(b"GET", good[1:]) == Refusal(400, "missing Connection: Upgrade", [])
    assert upgrade_refusal(b"GET", [good[0], good[2]]) == Refusal(
        426, "only WebSocket version 13 is supported", [(b"sec-websocket-version", b"13")]
    )
    assert upgrade_refusal(b"GET", good[:2]) == Refusal(400, "missing or invalid Sec-WebSocket-Key", [])
    # "keep-alive, Upgrade" (Firefox) is an upgrade; the comparison ignores case.
    assert upgrade_refusal(b"GET", [(b"connection", b"keep-alive, UPGRADE"), *good[1:]]) == (
        "dGhlIHNhbXBsZSBub25jZQ=="
    )


def test_the_answers_byte_for_byte() -> None:
    assert accept_response("dGhlIHNhbXBsZSBub25jZQ==", "herald.v1", [(b"server", b"h")]) == (
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
        b"sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nsec-websocket-protocol: herald.v1\r\n"
        b"server: h\r\n\r\n"
    )
    assert http_response(403, "no", [(b"server", b"h")]) == (
        b"HTTP/1.1 403 Forbidden\r\nserver: h\r\ncontent-type: text/plain; charset=utf-8\r\n"
        b"content-length: 2\r\nconnection: close\r\n\r\nno"
    )


def test_only_the_head_is_read_and_values_keep_their_colons() -> None:
    from herald.transports.wshandshake import header_values

    # Bytes after the head (a client that sent its first frame at once) are not headers.
    data = b"GET /a%20b?x=1 HTTP/1.1\r\nHost: h:80\r\nOrigin: http://o:1\r\n\r\nGARBAGE\r\n\r\nMORE"
    request = parse_request(data)
    assert request.method == b"GET" and request.path == "/a b" and request.query == b"x=1"
    assert request.lines == [b"Host: h:80", b"Origin: http://o:1"]
    headers = request_headers(request.lines)
    assert headers == [(b"host", b"h:80"), (b"origin", b"http://o:1")]
    assert header(headers, b"origin") == "http://o:1"
    assert header_values([(b"x", b"\xe9")], b"x") == ["\xe9"]  # Latin-1, as HTTP says
    assert header([(b"x", b"\xe9")], b"x") == "\xe9"
    assert parse_request(b"GET /\xe9 HTTP/1.1\r\n\r\n").path == "/\xe9"
    # Two spaces in the request line: the target is empty, so no route matches it (it is
    # not read leniently as "/x").
    assert parse_request(b"GET  /x HTTP/1.1\r\n\r\n").path == ""


UPGRADE_HEAD = (
    b"GET /connect?token=a%20b HTTP/1.1\r\nHost: h\r\nUpgrade: WebSocket\r\n"
    b"Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: " + KEY.encode() + b"\r\n"
    b"Sec-WebSocket-Version: 13\r\nX-Note: a:b \t\xe9\r\n\r\n"
)


def test_a_whole_upgrade_head_is_parsed_for_the_native_route() -> None:
    parsed = websocket_upgrade(UPGRADE_HEAD)
    assert parsed is not None
    request, headers = parsed
    assert (request.method, request.path, request.query) == (b"GET", "/connect", b"token=a%20b")
    assert headers[1] == (b"upgrade", b"WebSocket")
    assert header(headers, b"x-note") == "a:b \t\xe9"
    assert upgrade_refusal(request.method, headers) == KEY


@pytest.mark.parametrize(
    "head",
    [
        UPGRADE_HEAD[:-2],  # not complete yet
        UPGRADE_HEAD + b"\x81\x80abcd",  # a frame sent before the 101
        UPGRADE_HEAD.replace(b"GET ", b"POST "),
        UPGRADE_HEAD.replace(b"GET ", b"get "),
        UPGRADE_HEAD.replace(b"HTTP/1.1", b"HTTP/1.0"),
        UPGRADE_HEAD.replace(b"GET /connect", b"GET http://h/connect"),  # absolute form
        UPGRADE_HEAD.replace(b"Host: h", b"Host h"),  # no colon
        UPGRADE_HEAD.replace(b"Host: h", b"Ho st: h"),  # not a token
        UPGRADE_HEAD.replace(b"Host: h", b"Host : h"),
        UPGRADE_HEAD.replace(b"Host: h\r\n", b"Host: h\r\n folded\r\n"),  # obs-fold
        UPGRADE_HEAD.replace(b"Host: h", b"Host: h\x00"),
        UPGRADE_HEAD.replace(b"Host: h", b"Host: h\x7f"),
        UPGRADE_HEAD.replace(b"Host: h\r\n", b"Host: h\n"),  # bare LF
        UPGRADE_HEAD.replace(b"Host: h\r\n", b"Host: h\r\nContent-Length: 0\r\n"),
        UPGRADE_HEAD.replace(b"Host: h\r\n", b"Host: h\r\nTransfer-Encoding: chunked\r\n"),
        UPGRADE_HEAD.replace(b"Upgrade: WebSocket", b"Upgrade: h2c"),
        UPGRADE_HEAD.replace(b"Upgrade: WebSocket\r\n", b""),
        UPGRADE_HEAD.replace(b"keep-alive, Upgrade", b"keep-alive"),
        # The last Connection and Upgrade lines decide, as in uvicorn.
        UPGRADE_HEAD[:-2] + b"Connection: close\r\n\r\n",
        UPGRADE_HEAD[:-2] + b"Upgrade: h2c\r\n\r\n",
    ],
)
def test_anything_else_is_left_to_uvicorns_parser(head: bytes) -> None:
    assert websocket_upgrade(head) is None


def test_the_last_upgrade_lines_decide_as_in_uvicorn() -> None:
    head = UPGRADE_HEAD.replace(b"Host: h\r\n", b"Host: h\r\nUpgrade: h2c\r\nConnection: close\r\n")
    assert websocket_upgrade(head) is not None
