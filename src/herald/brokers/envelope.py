"""The bytes a broker carries between nodes for one publication or join/leave.

``p<offset>:<epoch>:<len(info)>:<info><data>`` for a publication (``info`` is
the publisher's ClientInfo as JSON, empty when there is none; ``data`` is the
published JSON exactly as received) and ``j<info>`` / ``l<info>`` for a join or
leave.  The channel is not in the envelope: it is the Pub/Sub channel or subject
the envelope travels on.  The Redis publish script builds the same format in Lua.
"""

from __future__ import annotations

import orjson

from .base import ClientInfo, PresenceEvent, Publication


def encode_publication(offset: int, epoch: str, info: ClientInfo | None, data: bytes) -> bytes:
    info_json = orjson.dumps(info.as_dict()) if info is not None else b""
    return b"p%d:%s:%d:%s%s" % (offset, epoch.encode(), len(info_json), info_json, data)


def encode_event(event: PresenceEvent) -> bytes:
    return (b"j" if event.kind == "join" else b"l") + orjson.dumps(event.info.as_dict())


def decode(channel: str, payload: bytes) -> Publication | PresenceEvent:
    """Parse an envelope; raises ``ValueError`` (or a JSON error) when it is malformed."""
    kind = payload[:1]
    if kind == b"p":
        offset, epoch, size, rest = payload[1:].split(b":", 3)
        length = int(size)
        info = ClientInfo.from_dict(orjson.loads(rest[:length])) if length else None
        return Publication(channel, int(offset), epoch.decode(), bytes(rest[length:]), info)
    if kind in (b"j", b"l"):
        info = ClientInfo.from_dict(orjson.loads(payload[1:]))
        return PresenceEvent(channel, "join" if kind == b"j" else "leave", info)
    raise ValueError(f"unknown envelope kind {kind!r}")
