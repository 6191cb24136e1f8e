"""WebSocket framing for the server side of RFC 6455: pure functions, no I/O.

Used by :mod:`herald.transports.native`.  Only what a server needs: reading masked
client frames and writing unmasked server frames.  No extension is negotiated, so
the reserved bits must be clear.
"""

from __future__ import annotations

import base64
import hashlib
import struct

try:  # websockets ships a C implementation; its pure-Python one is the fallback.
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - platforms without the compiled extension
    from websockets.utils import apply_mask

__all__ = [
    "OP_BINARY",
    "OP_CLOSE",
    "OP_CONT",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "FrameError",
    "accept_key",
    "apply_mask",
    "close_payload",
    "encode_frame",
    "frame_text",
    "parse_close",
    "valid_key",
]

OP_CONT, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA
DATA_OPCODES = frozenset((OP_CONT, OP_TEXT, OP_BINARY))
CONTROL_OPCODES = frozenset((OP_CLOSE, OP_PING, OP_PONG))

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_pack_short = struct.Struct("!BBH").pack
_pack_long = struct.Struct("!BBQ").pack
_unpack_short = struct.Struct("!H").unpack_from
_unpack_long = struct.Struct("!Q").unpack_from


class FrameError(Exception):
    """The peer broke the framing rules: fail the connection with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def valid_key(key: str | None) -> bool:
    """``Sec-WebSocket-Key`` must be the base64 encoding of 16 bytes (RFC 6455 section 4.2.1)."""
    if not key:
        return False
    try:
        return len(base64.b64decode(key.encode("ascii"), validate=True)) == 16
    except (ValueError, UnicodeEncodeError):
        return False


def accept_key(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` value for a client's key (RFC 6455 section 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _GUID).digest()).decode("ascii")


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """A complete, unmasked, final frame (RFC 6455 section 5.2)."""
    length = len(payload)
    first = 0x80 | opcode
    if length < 126:
        return bytes((first, length)) + payload
    if length < 65536:
        return _pack_short(first, 126, length) + payload
    return _pack_long(first, 127, length) + payload


def frame_text(payload: bytes) -> bytes:
    """A text frame carrying ``payload`` (UTF-8 already)."""
    return encode_frame(OP_TEXT, payload)


# Codes a peer may send (RFC 6455 section 7.4; 1004-1006 and 1015 are reserved and
# 1012-1014 are registered with IANA since).
_VALID_CLOSE = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014))


def parse_close(payload: bytes) -> tuple[int, str]:
    """The code and reason of a close frame's payload; 1005 when it has none."""
    if not payload:
        return 1005, ""
    if len(payload) == 1:
        raise FrameError(1002, "close frame with a one-byte payload")
    code = _unpack_short(payload)[0]
    if not (code in _VALID_CLOSE or 3000 <= code <= 4999):
        raise FrameError(1002, f"invalid close code {code}")
    try:
        reason = payload[2:].decode()
    except UnicodeDecodeError:
        raise FrameError(1007, "invalid UTF-8 in close reason") from None
    return code, reason


def close_payload(code: int, reason: str) -> bytes:
    """A close frame's payload; the reason is cut to fit the 125-byte control frame limit."""
    if code == 1005:
        return b""
    data = reason.encode()
    if len(data) > 123:
        data = data[:123].decode(errors="ignore").encode()
    return struct.pack("!H", code) + data


def read_header(buf: bytes | bytearray, start: int) -> tuple[int, int, int, int] | None:
    """Parse the frame header at ``buf[start:]``.

    Returns ``(first_byte, payload_length, header_length, ...)`` as
    ``(first, length, mask_start, payload_start)``, or None when the header is not
    complete yet.  Raises :class:`FrameError` for an unmasked frame or a 64-bit length
    with the top bit set.
    """
    available = len(buf) - start
    if available < 2:
        return None
    first = buf[start]
    second = buf[start + 1]
    if not second & 0x80:
        raise FrameError(1002, "frames from a client must be masked")
    length = second & 0x7F
    mask_start = start + 2
    if length == 126:
        if available < 4:
            return None
        length = _unpack_short(buf, start + 2)[0]
        mask_start = start + 4
    elif length == 127:
        if available < 10:
            return None
        length = _unpack_long(buf, start + 2)[0]
        if length >> 63:
            raise FrameError(1002, "invalid frame length")
        mask_start = start + 10
    return first, length, mask_start, mask_start + 4
