"""RFC 6455 framing helpers (transports/wsframes.py): pure functions, checked against the
RFC's own example and websockets' serializer; and the frame reader (transports/wsreader.py),
driven with bytes."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from websockets.frames import Frame, Opcode

from herald.codes import TOO_MANY_FRAGMENTS
from herald.config import Settings
from herald.transports.wsframes import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameError,
    accept_key,
    close_payload,
    encode_frame,
    frame_text,
    parse_close,
    read_header,
    valid_key,
)
from herald.transports.wsreader import DEFAULT_MAX_FRAGMENTS, FrameReader


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


# ---------------------------------------------------------------- FrameReader (transports/wsreader.py)
#
# The frame, fragmentation and UTF-8 rules, driven with bytes: no server, no Autobahn.

MASK = b"\x37\xfa\x21\x3d"


def client_frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0) -> bytes:
    """A masked client frame, built by hand (websockets refuses to build reserved bits)."""
    first = (0x80 if fin else 0) | rsv | opcode
    length = len(payload)
    if length < 126:
        head = bytes((first, 0x80 | length))
    elif length < 65536:
        head = bytes((first, 0x80 | 126)) + struct.pack("!H", length)
    else:
        head = bytes((first, 0x80 | 127)) + struct.pack("!Q", length)
    return head + MASK + bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))


class Recorder(FrameReader):
    """Records every callback; ``discard_on`` makes it start closing on that message."""

    def __init__(self, max_size: int = 1 << 20, max_fragments: int = DEFAULT_MAX_FRAGMENTS) -> None:
        self.events: list[tuple[str, Any]] = []
        self.reset_reader(max_size, max_fragments)

    def on_message(self, data: str | bytes) -> None:
        self.events.append(("message", data))

    def on_ping(self, payload: bytes) -> None:
        self.events.append(("ping", payload))

    def on_pong(self, payload: bytes) -> None:
        self.events.append(("pong", payload))

    def on_close_frame(self, code: int, reason: str) -> None:
        self.events.append(("close", (code, reason)))

    def on_too_big(self, reason: str) -> None:
        self.events.append(("too_big", reason))


def feed_fails(reader: Recorder, data: bytes) -> FrameError:
    with pytest.raises(FrameError) as failed:
        reader.feed(data)
    # A failed reader reads nothing more, not even a valid frame.
    before = list(reader.events)
    reader.feed(client_frame(OP_TEXT, b"after"))
    assert reader.events == before
    return failed.value


def test_reader_delivers_whole_messages_and_control_frames() -> None:
    reader = Recorder()
    reader.feed(
        client_frame(OP_TEXT, "héllo".encode())
        + client_frame(OP_BINARY, b"\x00\xff")
        + client_frame(OP_TEXT, b"")
        + client_frame(OP_PING, b"p")
        + client_frame(OP_PONG, b"q")
        + client_frame(OP_CLOSE, struct.pack("!H", 1000) + b"bye")
    )
    assert reader.events == [
        ("message", "héllo"),
        ("message", b"\x00\xff"),
        ("message", ""),
        ("ping", b"p"),
        ("pong", b"q"),
        ("close", (1000, "bye")),
    ]


def test_reader_assembles_fragments_around_control_frames() -> None:
    reader = Recorder()
    euro = "€".encode()  # three bytes, split across two fragments
    reader.feed(
        client_frame(OP_TEXT, b"ab" + euro[:1], fin=False)
        + client_frame(OP_PING, b"mid")
        + client_frame(OP_CONT, b"", fin=False)
        + client_frame(OP_CONT, euro[1:] + b"cd")
        + client_frame(OP_BINARY, b"\x01", fin=False)
        + client_frame(OP_CONT, b"\x02", fin=False)
        + client_frame(OP_CONT, b"\x03")
    )
    assert reader.events == [("ping", b"mid"), ("message", "ab€cd"), ("message", b"\x01\x02\x03")]
    assert isinstance(reader.events[2][1], bytes)


def test_reader_gives_the_same_events_fed_a_byte_at_a_time() -> None:
    stream = (
        client_frame(OP_TEXT, b"x" * 300, fin=False)
        + client_frame(OP_CONT, b"y" * 70000)
        + client_frame(OP_PING, b"")
        + client_frame(OP_BINARY, b"z")
    )
    whole, bytewise = Recorder(), Recorder()
    whole.feed(stream)
    for i in range(len(stream)):
        bytewise.feed(stream[i : i + 1])
    assert whole.events == [("message", "x" * 300 + "y" * 70000), ("ping", b""), ("message", b"z")]
    assert bytewise.events == whole.events


@pytest.mark.parametrize("rsv", [0x40, 0x20, 0x10])
def test_reader_refuses_reserved_bits(rsv: int) -> None:
    # RSV1 is permessage-deflate's bit: never negotiated here, so never allowed.
    reader = Recorder()
    assert feed_fails(reader, client_frame(OP_TEXT, b"hi", rsv=rsv)).code == 1002
    assert reader.events == []


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_reader_refuses_reserved_opcodes(opcode: int) -> None:
    assert feed_fails(Recorder(), client_frame(opcode, b"")).code == 1002


@pytest.mark.parametrize(
    "frame",
    [
        client_frame(OP_PING, b"", fin=False),  # control frames cannot be fragmented
        client_frame(OP_PING, b"x" * 126),  # nor longer than 125 bytes
        client_frame(OP_CLOSE, b"x" * 126),
    ],
)
def test_reader_refuses_bad_control_frames(frame: bytes) -> None:
    assert feed_fails(Recorder(), frame).code == 1002


@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY])
def test_reader_refuses_a_new_message_inside_a_fragmented_one(opcode: int) -> None:
    reader = Recorder()
    reader.feed(client_frame(OP_TEXT, b"first", fin=False))
    error = feed_fails(reader, client_frame(opcode, b"second"))
    assert error.code == 1002
    assert reader.events == []


def test_reader_refuses_a_continuation_without_a_message() -> None:
    reader = Recorder()
    reader.feed(client_frame(OP_TEXT, b"whole"))
    assert feed_fails(reader, client_frame(OP_CONT, b"more")).code == 1002
    assert reader.events == [("message", "whole")]


def test_reader_refuses_a_text_message_that_ends_inside_a_character() -> None:
    # The last fragment is decoded as final: "ab" + half of "€" is not a text message.
    reader = Recorder()
    reader.feed(client_frame(OP_TEXT, b"ab\xe2", fin=False))
    error = feed_fails(reader, client_frame(OP_CONT, b"\x82"))
    assert (error.code, reader.events) == (1007, [])


@pytest.mark.parametrize(
    "frames",
    [
        [client_frame(OP_TEXT, b"ab\xff")],
        [client_frame(OP_TEXT, b"ab\xe2")],  # ends inside a character
        # Invalid UTF-8 fails at once, before the message's last fragment.
        [client_frame(OP_TEXT, b"ok", fin=False), client_frame(OP_CONT, b"\xc0\xaf", fin=False)],
    ],
)
def test_reader_refuses_invalid_utf8(frames: list[bytes]) -> None:
    reader = Recorder()
    for frame in frames[:-1]:
        reader.feed(frame)
    assert feed_fails(reader, frames[-1]).code == 1007


def test_reader_refuses_an_invalid_close_frame() -> None:
    assert feed_fails(Recorder(), client_frame(OP_CLOSE, struct.pack("!H", 1005))).code == 1002


def test_reader_refuses_a_message_over_max_size_before_its_payload_arrives() -> None:
    reader = Recorder(max_size=100)
    reader.feed(client_frame(OP_TEXT, b"x" * 100))  # exactly the limit: fine
    # Only the header of a 1 GiB frame: refused at once; its payload is skipped, not kept.
    reader.feed(bytes((0x82, 0x80 | 127)) + struct.pack("!Q", 1 << 30) + MASK)
    assert reader.events == [("message", "x" * 100), ("too_big", "message larger than 100 bytes")]
    reader.feed(b"y" * 65536)
    assert len(reader.events) == 2 and reader._buf is None

    small = Recorder(max_size=100)
    small.feed(client_frame(OP_BINARY, b"y" * 101) + client_frame(OP_TEXT, b"dropped"))
    small.feed(client_frame(OP_PING, b"still"))
    # Data frames are skipped from now on (the connection is closing); control frames are read.
    assert small.events == [("too_big", "message larger than 100 bytes"), ("ping", b"still")]


def test_reader_counts_every_fragment_against_max_size() -> None:
    reader = Recorder(max_size=100)
    reader.feed(client_frame(OP_TEXT, b"a" * 60, fin=False) + client_frame(OP_CONT, b"b" * 41))
    assert reader.events == [("too_big", "message larger than 100 bytes")]


def test_reader_bounds_the_frames_of_one_message() -> None:
    reader = Recorder(max_fragments=3)
    reader.feed(
        client_frame(OP_TEXT, b"a", fin=False)
        + client_frame(OP_CONT, b"", fin=False)
        + client_frame(OP_CONT, b"b")  # three frames: the limit
    )
    assert reader.events == [("message", "ab")]
    reader.feed(client_frame(OP_BINARY, b"", fin=False) + client_frame(OP_CONT, b"", fin=False) * 2)
    # The fourth frame fails on its header, before its payload.
    error = feed_fails(reader, client_frame(OP_CONT, b"late")[:6])
    assert (error.code, error.reason) == (1009, TOO_MANY_FRAGMENTS.format(limit=3))
    assert error.reason == "message in more than 3 fragments"
    assert reader.events == [("message", "ab")]


def test_reader_keeps_no_object_per_empty_fragment() -> None:
    # A text frame with FIN=0 and thousands of empty continuations: the message held so
    # far stays one part, whatever the number of frames.
    reader = Recorder(max_fragments=5000)
    reader.feed(client_frame(OP_TEXT, b"a", fin=False) + client_frame(OP_CONT, b"", fin=False) * 4000)
    assert reader._frag_parts == ["a"]
    reader.feed(client_frame(OP_CONT, b"z"))
    assert reader.events == [("message", "az")]
    reader.feed(client_frame(OP_BINARY, b"a", fin=False) + client_frame(OP_CONT, b"", fin=False) * 4000)
    assert reader._frag_bytes == bytearray(b"a")
    assert DEFAULT_MAX_FRAGMENTS == Settings().max_message_fragments == 4096


def test_reader_discards_data_frames_once_closing() -> None:
    reader = Recorder()
    reader.feed(client_frame(OP_TEXT, b"half", fin=False))
    reader.discard_data()
    reader.feed(
        client_frame(OP_CONT, b"rest")
        + client_frame(OP_TEXT, b"new")
        + client_frame(OP_CLOSE, struct.pack("!H", 1001))
    )
    assert reader.events == [("close", (1001, ""))]
    reader.stop_reading()
    reader.feed(client_frame(OP_PING, b""))
    assert reader.events == [("close", (1001, ""))]


# ---------------------------------------------------------------- guards found by mutation testing
#
# scripts/mutation plants small bugs in wsframes.py and wsreader.py; each test below is
# the one that notices a mutant the tests above let through.


def test_frame_error_carries_its_close_code_and_reason() -> None:
    error = FrameError(1007, "invalid UTF-8 in a text message")
    assert (error.code, error.reason, str(error)) == (
        1007,
        "invalid UTF-8 in a text message",
        "invalid UTF-8 in a text message",
    )


def test_frame_text_is_a_final_text_frame() -> None:
    payload = "héllo".encode()
    assert frame_text(payload) == Frame(Opcode.TEXT, payload).serialize(mask=False)


@pytest.mark.parametrize("length", [5, 300, 65536])
def test_read_header_answers_as_soon_as_the_length_is_known(length: int) -> None:
    # The length is known before the mask key arrives, so that a frame over the limit is
    # refused on its first bytes; at another start in the buffer too.
    head = masked_header(0x82, length)[:-4]
    expected = (0x82, length, len(head), len(head) + 4)
    assert read_header(head, 0) == expected
    assert read_header(b"xyz" + head, 3) == (0x82, length, 3 + len(head), 3 + len(head) + 4)
    for cut in range(len(head)):
        assert read_header(b"xyz" + head[:cut], 3) is None


def test_read_header_refusals_say_why() -> None:
    with pytest.raises(FrameError, match=r"^frames from a client must be masked$"):
        read_header(bytes((0x81, 5)), 0)
    with pytest.raises(FrameError, match=r"^invalid frame length$"):
        read_header(bytes((0x82, 0x80 | 127)) + struct.pack("!Q", 1 << 63), 0)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\x03", "close frame with a one-byte payload"),
        (struct.pack("!H", 1005), "invalid close code 1005"),
        (struct.pack("!H", 5000), "invalid close code 5000"),
        (struct.pack("!H", 1000) + b"\xff", "invalid UTF-8 in close reason"),
    ],
)
def test_parse_close_refusals_say_why(payload: bytes, reason: str) -> None:
    with pytest.raises(FrameError) as refused:
        parse_close(payload)
    assert refused.value.reason == reason


def test_parse_close_accepts_the_whole_application_range() -> None:
    assert parse_close(struct.pack("!H", 4999)) == (4999, "")
    assert parse_close(struct.pack("!H", 3000)) == (3000, "")


def test_close_payload_keeps_a_reason_that_fits() -> None:
    assert close_payload(1000, "r" * 123) == struct.pack("!H", 1000) + b"r" * 123
    assert close_payload(1000, "r" * 124) == struct.pack("!H", 1000) + b"r" * 123


@pytest.mark.parametrize(
    ("stream", "reason"),
    [
        (client_frame(OP_TEXT, b"hi", rsv=0x40), "reserved bits set (no extension was negotiated)"),
        (client_frame(3, b""), "reserved opcode 3"),
        (client_frame(0xB, b""), "reserved opcode 11"),
        (client_frame(OP_PING, b"", fin=False), "control frames must be final and at most 125 bytes"),
        (client_frame(OP_CONT, b"x"), "continuation frame without a message to continue"),
        (
            client_frame(OP_TEXT, b"a", fin=False) + client_frame(OP_TEXT, b"b"),
            "a new message began before the last one ended",
        ),
        (client_frame(OP_TEXT, b"\xff"), "invalid UTF-8 in a text message"),
        (
            client_frame(OP_TEXT, b"a", fin=False) + client_frame(OP_CONT, b"\xff"),
            "invalid UTF-8 in a text message",
        ),
    ],
)
def test_reader_refusals_say_why(stream: bytes, reason: str) -> None:
    # The reason is the close frame's reason on the wire.
    assert feed_fails(Recorder(), stream).reason == reason


def test_reader_accepts_control_frames_of_exactly_125_bytes() -> None:
    reader = Recorder()
    reader.feed(client_frame(OP_PING, b"p" * 125) + client_frame(OP_PONG, b"q" * 125))
    assert reader.events == [("ping", b"p" * 125), ("pong", b"q" * 125)]


def test_reader_keeps_the_unread_end_of_a_feed() -> None:
    # A whole frame then the start of the next one, in one read: the start is kept.
    reader = Recorder()
    second = client_frame(OP_BINARY, b"second")
    reader.feed(client_frame(OP_TEXT, b"first") + second[:-2])
    reader.feed(second[-2:])
    assert reader.events == [("message", "first"), ("message", b"second")]


def test_reader_reads_on_after_a_refused_message_in_the_same_feed() -> None:
    # The refused message's payload is skipped and the control frame after it is read at
    # once, also when the payload arrives in pieces that start inside a read.
    reader = Recorder(max_size=10)
    big = client_frame(OP_BINARY, b"z" * 200)
    reader.feed(client_frame(OP_TEXT, b"ok") + big[:50])
    assert reader.events == [("message", "ok"), ("too_big", "message larger than 10 bytes")]
    reader.feed(big[50:120])
    reader.feed(big[120:] + client_frame(OP_PING, b"after"))
    assert reader.events[2:] == [("ping", b"after")]
    whole = Recorder(max_size=10)
    whole.feed(big + client_frame(OP_PING, b"now"))
    assert whole.events == [("too_big", "message larger than 10 bytes"), ("ping", b"now")]


def test_reader_accepts_a_fragmented_message_of_exactly_max_size() -> None:
    reader = Recorder(max_size=100)
    reader.feed(
        client_frame(OP_TEXT, b"a" * 40, fin=False)
        + client_frame(OP_CONT, b"b" * 40, fin=False)
        + client_frame(OP_CONT, b"c" * 20)
    )
    assert reader.events == [("message", "a" * 40 + "b" * 40 + "c" * 20)]
    # Every fragment counts, not only the first and the last: 40 + 40 + 21 is too big.
    reader.feed(
        client_frame(OP_BINARY, b"a" * 40, fin=False)
        + client_frame(OP_CONT, b"b" * 40, fin=False)
        + client_frame(OP_CONT, b"c" * 21)
    )
    assert reader.events[1:] == [("too_big", "message larger than 100 bytes")]


def test_reader_delivers_a_fragmented_text_of_one_non_empty_part() -> None:
    reader = Recorder()
    reader.feed(client_frame(OP_TEXT, b"whole", fin=False) + client_frame(OP_CONT, b""))
    reader.feed(client_frame(OP_TEXT, b"", fin=False) + client_frame(OP_CONT, b"late"))
    assert reader.events == [("message", "whole"), ("message", "late")]
