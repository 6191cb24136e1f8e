"""The Transport protocol: the only thing a Connection knows about the network."""

from __future__ import annotations

from typing import Protocol


class Transport(Protocol):
    """Sends text frames to one peer and closes it.

    ``send`` may wait while the peer's socket buffer is full (flow control);
    it raises any exception when the peer is gone.  ``close`` never raises.
    """

    async def send(self, frame: str) -> None: ...

    async def close(self, code: int, reason: str) -> None: ...
