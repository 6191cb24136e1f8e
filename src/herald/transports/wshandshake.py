"""The WebSocket opening handshake (RFC 6455 section 4), without I/O: bytes in, bytes out.

:func:`parse_request` reads an upgrade request's head; :func:`upgrade_refusal` says
whether it is a valid WebSocket upgrade; :func:`accept_response` and
:func:`http_response` are the two answers.  The native driver
(:mod:`herald.transports.native`) does the I/O around them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from http import HTTPStatus
from typing import NamedTuple
from urllib.parse import unquote

from .wsframes import accept_key, valid_key

Headers = list[tuple[bytes, bytes]]


class Request(NamedTuple):
    """An upgrade request's head: the method, the path (percent-decoded), the raw query
    string, and the header lines (parsed by :func:`request_headers` when needed)."""

    method: bytes
    path: str
    query: bytes
    lines: list[bytes]


def parse_request(data: bytes) -> Request:
    """The request line of ``data`` (an HTTP/1.1 request head; tolerant: a malformed
    line gives path ``/``, refused later by :func:`upgrade_refusal`)."""
    head = data.split(b"\r\n\r\n", 1)[0]
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    target = parts[1] if len(parts) >= 3 else b"/"
    raw_path, _, query = target.partition(b"?")
    return Request(parts[0], unquote(raw_path.decode("latin-1")), query, lines[1:])


def request_headers(lines: Iterable[bytes]) -> Headers:
    """Header lines as ``(lower-case name, value)`` pairs, in order."""
    headers: Headers = []
    for line in lines:
        name, _, value = line.partition(b":")
        headers.append((name.strip().lower(), value.strip()))
    return headers


# One HTTP/1.1 GET head and nothing after it: an origin-form target of visible ASCII,
# header names that are RFC 9110 tokens, values of visible characters, spaces, tabs and
# obs-text.  What this refuses is left to uvicorn's parser (httptools), as before.
_PLAIN_GET_HEAD = re.compile(
    rb"GET /[!-~]* HTTP/1\.1\r\n"
    rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*\r\n)*\r\n\Z"
)


def websocket_upgrade(data: bytes) -> tuple[Request, Headers] | None:
    """``data`` parsed, when it is exactly one well-formed HTTP/1.1 ``GET`` head that
    asks to upgrade to WebSocket the way uvicorn decides it (the last ``Connection``
    header lists ``upgrade``, the last ``Upgrade`` header is ``websocket``) and has no
    body; None for anything else.

    The native driver uses it to take such a request straight from the first bytes
    of a connection; everything else goes through uvicorn's HTTP parser, whose
    answers (400 for a malformed request, the ASGI app for a plain one) stay as
    they were.  The request is not validated as a handshake here:
    :func:`upgrade_refusal` does that, on either path.
    """
    if _PLAIN_GET_HEAD.match(data) is None:
        return None
    request = parse_request(data)
    headers = request_headers(request.lines)
    connection: list[bytes] = []
    upgrade = b""
    for name, value in headers:
        if name == b"connection":
            connection = [token.strip().lower() for token in value.split(b",")]
        elif name == b"upgrade":
            upgrade = value.lower()
        elif name == b"content-length" or name == b"transfer-encoding":
            return None
    if upgrade != b"websocket" or b"upgrade" not in connection:
        return None
    return request, headers


def header(headers: Sequence[tuple[bytes, bytes]], key: bytes) -> str | None:
    """The first value of header ``key`` (lower case), decoded as Latin-1."""
    for name, value in headers:
        if name == key:
            return value.decode("latin-1")
    return None


def header_values(headers: Sequence[tuple[bytes, bytes]], key: bytes) -> list[str]:
    return [value.decode("latin-1") for name, value in headers if name == key]


def offered_subprotocols(headers: Sequence[tuple[bytes, bytes]]) -> list[str]:
    """The subprotocols the client offered (``Sec-WebSocket-Protocol``, every line), in order."""
    offered: list[str] = []
    for line in header_values(headers, b"sec-websocket-protocol"):
        offered.extend(token.strip() for token in line.split(",") if token.strip())
    return offered


class Refusal(NamedTuple):
    status: int
    reason: str
    headers: Headers


def upgrade_refusal(method: bytes, headers: Sequence[tuple[bytes, bytes]]) -> Refusal | str:
    """Why this is not a valid WebSocket upgrade (a :class:`Refusal`), or the client's
    ``Sec-WebSocket-Key`` when it is."""
    if method != b"GET":
        return Refusal(405, "WebSocket handshakes use GET", [])
    if "upgrade" not in (header(headers, b"connection") or "").lower():
        return Refusal(400, "missing Connection: Upgrade", [])
    if header(headers, b"sec-websocket-version") != "13":
        return Refusal(426, "only WebSocket version 13 is supported", [(b"sec-websocket-version", b"13")])
    key = header(headers, b"sec-websocket-key")
    if key is None or not valid_key(key):
        return Refusal(400, "missing or invalid Sec-WebSocket-Key", [])
    return key


def http_response(status: int, body: str, headers: Iterable[tuple[bytes, bytes]] = ()) -> bytes:
    """A plain-text HTTP response that closes the connection."""
    payload = body.encode()
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}".encode()]
    lines.extend(name + b": " + value for name, value in headers)
    lines += [
        b"content-type: text/plain; charset=utf-8",
        b"content-length: " + str(len(payload)).encode(),
        b"connection: close",
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n" + payload


def accept_response(key: str, subprotocol: str | None, headers: Iterable[tuple[bytes, bytes]] = ()) -> bytes:
    """The ``101 Switching Protocols`` answer to a client's ``key``."""
    lines = [
        b"HTTP/1.1 101 Switching Protocols",
        b"upgrade: websocket",
        b"connection: Upgrade",
        b"sec-websocket-accept: " + accept_key(key).encode(),
    ]
    if subprotocol:
        lines.append(b"sec-websocket-protocol: " + subprotocol.encode())
    lines.extend(name + b": " + value for name, value in headers)
    return b"\r\n".join(lines) + b"\r\n\r\n"


__all__ = [
    "Refusal",
    "Request",
    "accept_response",
    "header",
    "header_values",
    "http_response",
    "offered_subprotocols",
    "parse_request",
    "request_headers",
    "upgrade_refusal",
    "websocket_upgrade",
]
