"""The presence interface: who is subscribed to a channel, across every node.

Contract (checked by the broker conformance suite):

* :meth:`PresenceManager.add` records a client in a channel; calling it again for
  the same client refreshes its entry (nodes call it periodically so that the
  entries of a node that died expire after ``ttl`` seconds).
* :meth:`PresenceManager.remove` forgets a client at once.  Idempotent.
* :meth:`PresenceManager.presence` returns the live entries by client id.
* :meth:`PresenceManager.stats` counts them with :func:`presence_stats`: every
  connection is a client; users are the distinct *non-empty* user ids, so anonymous
  clients (user ``""``) count as clients and as no user (as Centrifugo counts them,
  and as the admin page counts a node's users).
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence

from ..protocol.values import ClientInfo
from ..protocol.values import PresenceStats as PresenceStats


def presence_stats(entries: Iterable[ClientInfo]) -> PresenceStats:
    """Herald's one definition of a channel's counts: ``num_clients`` is the number of
    entries (connections), ``num_users`` the number of distinct non-empty user ids
    among them; anonymous clients are clients but no user."""
    clients = 0
    users: set[str] = set()
    for info in entries:
        clients += 1
        if info.user:
            users.add(info.user)
    return PresenceStats(clients, len(users))


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

    async def refresh(self, channel: str, infos: Sequence[ClientInfo], ttl: float) -> None:
        """Add or refresh every entry of ``infos`` in ``channel`` (the periodic refresh of one
        node's clients).  Managers with a round trip per call do it in one."""
        for info in infos:
            await self.add(channel, info, ttl)

    async def stats(self, channel: str) -> PresenceStats:
        """``channel``'s counts, as :func:`presence_stats` defines them (every manager)."""
        return presence_stats((await self.presence(channel)).values())

    async def close(self) -> None:  # noqa: B027 - optional for implementations
        """Release resources.  Idempotent."""
