"""The stream's event ids and framing, without a server (the rules the socket tests rely on)."""

from __future__ import annotations

import json

import pytest

from herald.protocol.messages import MAX_ID
from herald.sse import (
    MAX_EVENT_ID_LENGTH,
    ResumableFraming,
    SharedFrames,
    StreamPositions,
    channels_tag,
    epoch_digest,
    stream_frame,
)
from herald.transports.sse import HEARTBEAT_FRAME, NdjsonFraming, SseFraming, frame_type


def test_id_round_trips_every_channel_position() -> None:
    channels = ["news:a", "news:b", "live:c"]
    positions = StreamPositions(channels)
    positions.update("news:a", 7, "e1")
    positions.update("news:b", 0, "e1")
    positions.update("live:c", 42, "e2")
    event_id = positions.event_id()
    assert event_id == f"1.{channels_tag(channels)}.{epoch_digest('e1')}~{epoch_digest('e2')}.7,0,42:1"
    assert StreamPositions.parse(event_id, channels) == {
        "news:a": (7, epoch_digest("e1")),
        "news:b": (0, epoch_digest("e1")),
        "live:c": (42, epoch_digest("e2")),
    }
    positions.update("live:c", 43, "e2")  # same epoch: only the entry changes
    assert positions.event_id().endswith(".7,0,43:1")
    positions.update("news:a", 1, "e3")  # a new epoch rebuilds the digest table
    assert StreamPositions.parse(positions.event_id(), channels) == {
        "news:a": (1, epoch_digest("e3")),
        "news:b": (0, epoch_digest("e1")),
        "live:c": (43, epoch_digest("e2")),
    }
    positions.update("other:x", 5, "e1")  # not a channel of the stream: ignored
    assert positions.position("news:a") == (1, "e3")


def test_id_length_is_bounded_per_channel() -> None:
    channels = [f"news:{n}" for n in range(128)]
    positions = StreamPositions(channels)
    for n, channel in enumerate(channels):
        positions.update(channel, MAX_ID, f"epoch-{n}")  # worst case: every epoch differs
    event_id = positions.event_id()
    assert len(event_id) <= 11 + 31 * len(channels)
    assert len(event_id) <= MAX_EVENT_ID_LENGTH
    assert StreamPositions.parse(event_id, channels) is not None


@pytest.mark.parametrize(
    "text",
    [
        "",
        "garbage",
        "2.{tag}.AAAAAAAA.1",  # another version
        "1.00000000.AAAAAAAA.1",  # another channel list
        "1.{tag}.AAAA.1",  # a digest of the wrong size
        "1.{tag}.AAAAAAAA.1,2",  # more entries than channels
        "1.{tag}.AAAAAAAA.x",
        "1.{tag}.AAAAAAAA.-1",
        "1.{tag}.AAAAAAAA.1:1",  # a digest index out of range
        "1.{tag}.AAAAAAAA.9007199254740992",  # above MAX_ID
        "1.{tag}.AAAAAAAA." + "1" * 17,
        "1.{tag}.AAAAAAAA.1.",
    ],
)
def test_garbled_ids_name_no_position(text: str) -> None:
    channels = ["news:a"]
    assert StreamPositions.parse(text.format(tag=channels_tag(channels)), channels) is None


def test_an_id_too_long_is_garbled() -> None:
    channels = ["news:a"]
    good = f"1.{channels_tag(channels)}.AAAAAAAA.1"
    assert StreamPositions.parse(good, channels) == {"news:a": (1, "AAAAAAAA")}
    padded = good.replace(".1", "." + "0" * (MAX_EVENT_ID_LENGTH - len(good) + 10) + "1")
    assert StreamPositions.parse(padded, channels) is None


def test_channel_order_is_part_of_the_tag() -> None:
    assert channels_tag(["a", "b"]) != channels_tag(["b", "a"])
    assert len(epoch_digest("x")) == 8 and epoch_digest("x") != epoch_digest("y")


def test_frames_carry_the_stream_id_and_share_the_encoded_part() -> None:
    body = '{"type":"publication","channel":"news:a","offset":3,"epoch":"e","data":{"x":1}}'
    frame = stream_frame("news:a", 3, "e", body)
    positions = StreamPositions(["news:a"])
    sse = ResumableFraming(SseFraming(), positions)
    out = sse.encode(frame).decode()
    assert out == f"data: {body}\nid: {positions.event_id()}\n\n"
    assert positions.position("news:a") == (3, "e")
    ndjson = ResumableFraming(NdjsonFraming(), StreamPositions(["news:a"]))
    line = json.loads(ndjson.encode(frame))
    assert line["data"] == {"x": 1} and line["id"] == ndjson.positions.event_id()
    cache = SharedFrames(ndjson=False, size=2)
    first = cache.get(frame)
    assert cache.get(frame) is first  # made once, reused by every stream
    cache.get(stream_frame("news:a", 4, "e", body))
    cache.get(stream_frame("news:a", 5, "e", body))
    assert cache.get(frame) is not first  # the oldest was dropped (bounded)


def test_other_frames_become_named_events_or_lines() -> None:
    disconnect = '{"type":"disconnect","code":4001,"reason":"slow consumer","reconnect":true}'
    assert frame_type(disconnect) == "disconnect" and frame_type("text") is None
    assert SseFraming().encode(disconnect).decode() == f"event: disconnect\ndata: {disconnect}\n\n"
    assert SseFraming(named_events=False).encode(disconnect).decode() == f"data: {disconnect}\n\n"
    assert NdjsonFraming().encode(disconnect) == (disconnect + "\n").encode()
    assert SseFraming().encode(HEARTBEAT_FRAME) == b":\n\n"
    assert NdjsonFraming().encode(HEARTBEAT_FRAME) == b"\n"
    assert SseFraming(retry_ms=2500).preamble() == b": herald\nretry: 2500\n\n"
    subscribed = '{"type":"subscribed","channels":[]}'
    framing = ResumableFraming(SseFraming(), StreamPositions(["news:a"]))
    assert framing.encode(subscribed).decode() == (
        f"event: subscribed\ndata: {subscribed}\nid: {framing.positions.event_id()}\n\n"
    )
