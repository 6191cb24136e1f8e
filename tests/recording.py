"""A Transport that records frames in memory: for hub and connection tests."""

from __future__ import annotations

import asyncio


class RecordingTransport:
    """Records sent frames; ``block()`` makes sends wait, like a peer that stopped reading."""

    def __init__(self) -> None:
        self.frames: list[str] = []
        self.closed: tuple[int, str] | None = None
        self._open = asyncio.Event()
        self._open.set()
        self.sent = asyncio.Event()

    def block(self) -> None:
        self._open.clear()

    def unblock(self) -> None:
        self._open.set()

    async def send(self, frame: str) -> None:
        await self._open.wait()
        if self.closed is not None:
            raise ConnectionError("closed")
        self.frames.append(frame)
        self.sent.set()

    async def close(self, code: int, reason: str) -> None:
        if self.closed is None:
            self.closed = (code, reason)
