"""Herald's sans-I/O frame reader against websockets' sans-I/O ``ServerProtocol``.

``python -m bench.reader`` parses the same masked client frames with both and
prints the parse cost per message and the memory each keeps per connection (see
docs/architecture.md, "Why Herald reads frames itself").
"""

from __future__ import annotations

import os
import time
import tracemalloc
from collections.abc import Callable

from websockets.server import ServerProtocol

from herald.transports.wsreader import FrameReader

MESSAGES = 100_000
PAYLOAD = 20  # bytes of text per message, like a chat line or a small command

_UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def client_frames(count: int, size: int) -> bytes:
    """``count`` masked, final text frames of ``size`` bytes (as a browser sends them)."""
    out = bytearray()
    payload = b"x" * size
    for _ in range(count):
        mask = os.urandom(4)
        out += bytes([0x81, 0x80 | size]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes(out)


class _CountingReader(FrameReader):
    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0
        self.reset_reader(65536)

    def on_message(self, data: str | bytes) -> None:
        self.count += 1

    def on_ping(self, payload: bytes) -> None:
        pass

    def on_pong(self, payload: bytes) -> None:
        pass

    def on_close_frame(self, code: int, reason: str) -> None:
        pass

    def on_too_big(self, reason: str) -> None:
        pass


def _open_websockets() -> ServerProtocol:
    protocol = ServerProtocol(max_size=65536)
    protocol.receive_data(_UPGRADE)
    request = protocol.events_received()[0]
    protocol.send_response(protocol.accept(request))
    protocol.data_to_send()
    return protocol


def _herald(data: bytes, chunk: int) -> int:
    reader = _CountingReader()
    for start in range(0, len(data), chunk):
        reader.feed(data[start : start + chunk])
    return reader.count


def _websockets(data: bytes, chunk: int) -> int:
    protocol = _open_websockets()
    count = 0
    for start in range(0, len(data), chunk):
        protocol.receive_data(data[start : start + chunk])
        count += len(protocol.events_received())
    return count


def _heap_per_object(make: Callable[[], object], count: int = 1000) -> float:
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    kept = [make() for _ in range(count)]
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del kept
    return (after - before) / count


def main() -> None:
    data = client_frames(MESSAGES, PAYLOAD)
    parsers: list[tuple[str, Callable[[bytes, int], int]]] = [
        ("herald FrameReader", _herald),
        ("websockets ServerProtocol", _websockets),
    ]
    for chunk in (4096, 65536):
        for name, parse in parsers:
            best = float("inf")
            for _ in range(5):
                started = time.perf_counter()
                parsed = parse(data, chunk)
                best = min(best, time.perf_counter() - started)
            assert parsed == MESSAGES, (name, parsed)
            print(f"reads of {chunk:>6} B: {name:26s} {best / MESSAGES * 1e6:5.2f} µs per message")
    print(f"heap per connection: herald FrameReader state {_heap_per_object(_CountingReader):.0f} B")
    print(f"heap per connection: websockets ServerProtocol {_heap_per_object(_open_websockets):.0f} B")


if __name__ == "__main__":
    main()
