"""The presence interface: who is subscribed to a channel, across every node.

Contract (checked by the broker conformance suite):

* :meth:`PresenceManager.add` records a client in a channel; calling it again for
  the same client refreshes its entry (nodes call it periodically so that the
  entries of a node that died expire after ``ttl`` seconds).
* :meth:`PresenceManager.remove` forgets a client at once.  Idempotent.
* :meth:`PresenceManager.presence` returns the live entries by client id.
"""

from __future__ import annotations

import abc

from ..protocol.values import ClientInfo
from ..protocol.values import PresenceStats as PresenceStats


class PresenceManager(abc.ABC):
    @abc.abstractmethod
    async def add(self, channel: str, info: ClientInfo, ttl: float) -> None:
        """Add or refresh ``info.client`` in ``channel`` for ``ttl`` seconds."""

    @abc.abstractmethod
    async def remove(self, channel: str, client: str) -> None:
        """Remove ``client`` from ``channel``."""

    @abc.abstractmethod
    async def presence(self, channel: str) -> dict[str, ClientInfo]:
        """Live entries of ``channel`` by client id."""

    async def stats(self, channel: str) -> PresenceStats:
        entries = await self.presence(channel)
        return PresenceStats(len(entries), len({info.user for info in entries.values()}))

    async def close(self) -> None:  # noqa: B027 - optional for implementations
        """Release resources.  Idempotent."""
