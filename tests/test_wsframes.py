"""RFC 6455 framing helpers (transports/wsframes.py): pure functions, checked against the
RFC's own example and websockets' serializer."""

from __future__ import annotations

import struct

import pytest
from websockets.frames import Frame, Opcode

from herald.transports.wsframes import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    FrameError,
    accept_key,
    close_payload,
    encode_frame,
    parse_close,
    read_header,
    valid_key,
)


def test_accept_key_is_the_rfc_example() -> None:
    # RFC 6455 section 1.3.
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize(
    ("key", "valid"),
    [
        ("dGhlIHNhbXBsZSBub25jZQ==", True),
        ("dGhlIHNhbXBsZSBub25jZQ", False),  # padding missing
        ("dGhlIHNhbXBsZQ==", False),  # 10 bytes
        ("not base64 at all!", False),
        ("", False),
        (None, False),
        ("dGhlIHNhbXBsZSBub25jZQ==é", False),
    ],
)
def test_valid_key(key: str | None, valid: bool) -> None:
    assert valid_key(key) is valid


@pytest.mark.parametrize(
    ("opcode", "theirs", "size"),
    [(OP_BINARY, Opcode.BINARY, size) for size in (0, 125, 126, 65535, 65536)]
    # Control frames are at most 125 bytes.
    + [(OP_PING, Opcode.PING, size) for size in (0, 125)],
)
def test_encode_frame_matches_websockets(opcode: int, theirs: Opcode, size: int) -> None:
    payload = bytes(range(256)) * (size // 256 + 1)
    payload = payload[:size]
    assert encode_frame(opcode, payload) == Frame(theirs, payload).serialize(mask=False)


def masked_header(first: int, length: int) -> bytes:
    if length < 126:
        head = bytes((first, 0x80 | length))
    elif length < 65536:
        head = bytes((first, 0x80 | 126)) + struct.pack("!H", length)
    else:
        head = bytes((first, 0x80 | 127)) + struct.pack("!Q", length)
    return head + b"MASK"


@pytest.mark.parametrize("length", [0, 5, 125, 126, 300, 65535, 65536, 1 << 40])
def test_read_header_lengths_and_offsets(length: int) -> None:
    head = masked_header(0x81, length)
    assert read_header(b"xx" + head, 2) == (0x81, length, 2 + len(head) - 4, 2 + len(head))
    # Any prefix shorter than the header is "not yet".
    for cut in range(len(head) - 4):
        assert read_header(head[:cut], 0) is None


def test_read_header_refuses_unmasked_frames_and_huge_lengths() -> None:
    with pytest.raises(FrameError) as unmasked:
        read_header(bytes((0x81, 5)) + b"hello", 0)
    assert unmasked.value.code == 1002
    with pytest.raises(FrameError) as huge:
        read_header(bytes((0x82, 0x80 | 127)) + struct.pack("!Q", 1 << 63) + b"MASK", 0)
    assert huge.value.code == 1002


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"", (1005, "")),
        (struct.pack("!H", 1000), (1000, "")),
        (struct.pack("!H", 4001) + b"slow consumer", (4001, "slow consumer")),
        (struct.pack("!H", 3000) + "é".encode(), (3000, "é")),
    ],
)
def test_parse_close(payload: bytes, expected: tuple[int, str]) -> None:
    assert parse_close(payload) == expected


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"\x03", 1002),  # one byte
        (struct.pack("!H", 1005), 1002),  # reserved: never on the wire
        (struct.pack("!H", 1006), 1002),
        (struct.pack("!H", 1015), 1002),
        (struct.pack("!H", 999), 1002),
        (struct.pack("!H", 2999), 1002),
        (struct.pack("!H", 5000), 1002),
        (struct.pack("!H", 1000) + b"\xff", 1007),  # reason not UTF-8
    ],
)
def test_parse_close_refuses(payload: bytes, code: int) -> None:
    with pytest.raises(FrameError) as refused:
        parse_close(payload)
    assert refused.value.code == code


def test_close_payload_fits_a_control_frame_without_splitting_a_character() -> None:
    payload = close_payload(1008, "é" * 100)  # 200 bytes of reason
    assert len(payload) <= 125
    code, reason = parse_close(payload)
    assert code == 1008 and reason == "é" * 61
    assert close_payload(1005, "ignored") == b""
    frame = encode_frame(OP_CLOSE, close_payload(1000, "bye"))
    assert frame == Frame(Opcode.CLOSE, struct.pack("!H", 1000) + b"bye").serialize(mask=False)
