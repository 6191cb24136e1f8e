"""Which nodes are alive: heartbeats on the control channel, the same on every broker.

Every node publishes ``{"op": "alive", "node": ID, "sent": WALL_CLOCK}`` on the
control channel (:data:`herald.control.CONTROL_CHANNEL`) every
:data:`HEARTBEAT_INTERVAL` seconds, and ``{"op": "leave", ...}`` when it closes
cleanly.  Its first heartbeat says ``"hello": true``: every node that did not know
it answers at once with its own heartbeat, so a new node learns its peers within a
broker round trip instead of an interval.

A peer is **alive** while its newest heartbeat is younger than :data:`PEER_TIMEOUT`
(three intervals, so two lost heartbeats do not drop it).  A node killed with
``kill -9`` therefore drops out of every view at most :data:`PEER_TIMEOUT` seconds
after its last heartbeat; one that leaves cleanly drops out at once.

Clocks.  Heartbeats are kept in the control channel's history, so a node whose
link blipped re-reads old ones; their age must not count as "just seen".  Each
heartbeat carries the sender's wall clock, and each node keeps, per peer, the
smallest ``receipt - sent`` of its last :data:`CLOCK_SAMPLES` heartbeats: the
clock offset between the two nodes plus the smallest transit time.  The age of
anything that peer stamped is then ``now - sent - offset``, true to within that
transit time **whatever the skew between the two clocks**.  Until a peer's first
heartbeat arrives its offset is taken as 0 (clocks assumed to agree, NTP-close).
A peer clock stepped backwards makes its messages look older for at most
:data:`CLOCK_SAMPLES` heartbeats, until the smaller samples leave the window.

Watching.  A heartbeat also says what the node's own clients are watching that other
nodes must feed (``"watching": ["admin"]``: an admin page is open there, so every
node publishes its snapshot).  :meth:`Membership.watch` changes it and beats at
once; :meth:`Membership.watched` says whether any live peer watches a name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

logger = logging.getLogger("herald.node")

#: Seconds between two heartbeats of a node.
HEARTBEAT_INTERVAL = 1.0
#: A peer not heard from for this many seconds is taken for dead (3 heartbeats).
PEER_TIMEOUT = 3.0 * HEARTBEAT_INTERVAL
#: Heartbeats per peer whose ``receipt - sent`` the clock offset is the minimum of.
CLOCK_SAMPLES = 16


@dataclass(slots=True)
class _Peer:
    """What this node knows of one peer."""

    #: Monotonic time (this node's) at which the peer's newest heartbeat was sent.
    seen: float
    #: Recent ``local wall clock at receipt - sender's wall clock at sending``.
    samples: deque[float] = field(default_factory=lambda: deque(maxlen=CLOCK_SAMPLES))
    #: What the peer's newest heartbeat said it watches.
    watching: frozenset[str] = frozenset()


class Membership:
    """This node's view of the live nodes, kept by heartbeats (see the module docstring).

    ``publish`` sends bytes on the control channel (raises on broker failure).
    ``on_gone`` is called with a peer's id when it announces that it leaves.
    """

    def __init__(
        self,
        node_id: str,
        publish: Callable[[bytes], Awaitable[None]],
        *,
        interval: float = HEARTBEAT_INTERVAL,
        timeout: float = PEER_TIMEOUT,
        on_gone: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.node_id = node_id
        self.interval = interval
        self.timeout = timeout
        self._publish = publish
        self._on_gone = on_gone
        self._clock = clock
        self._wall = wall
        self._peers: dict[str, _Peer] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._greeted = False
        self._watching: set[str] = set()

    # ------------------------------------------------------------ this node

    def wall(self) -> float:
        """This node's wall clock (what it stamps its messages with)."""
        return self._wall()

    def heartbeat(self, *, hello: bool = False) -> bytes:
        message: dict[str, Any] = {"op": "alive", "node": self.node_id, "sent": self._wall()}
        if hello:
            message["hello"] = True
        if self._watching:
            message["watching"] = sorted(self._watching)
        return orjson.dumps(message)

    def watch(self, name: str, watching: bool) -> None:
        """Say in this node's heartbeats whether its clients watch ``name``; a change is
        announced at once (when the loop runs), not at the next interval."""
        if (name in self._watching) == watching:
            return
        if watching:
            self._watching.add(name)
        else:
            self._watching.discard(name)
        self._spawn(self.beat())

    async def beat(self, *, hello: bool = False) -> None:
        """Publish one heartbeat; a broker failure is logged (the next one retries)."""
        try:
            await self._publish(self.heartbeat(hello=hello))
        except Exception as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # The client library turned our cancellation into another error (nats-py's
                # request does, on Python 3.11): honour it, or the loop would beat forever.
                raise asyncio.CancelledError from exc
            logger.debug("heartbeat not published: %r", exc)
            return
        if hello:
            self._greeted = True

    async def run(self) -> None:
        """Heartbeat every ``interval`` until cancelled (the first one says hello)."""
        task = asyncio.current_task()
        while True:
            await self.beat(hello=not self._greeted)
            if task is not None and task.cancelling():
                # A cancellation a client library swallowed while it answered anyway
                # (asyncio.wait_for on Python 3.11 can): stop now, not never.
                raise asyncio.CancelledError
            await asyncio.sleep(self.interval)

    async def leave(self, timeout: float = 1.0) -> None:
        """Tell the peers this node is gone (best effort, bounded by ``timeout``)."""
        message = orjson.dumps({"op": "leave", "node": self.node_id, "sent": self._wall()})
        with contextlib.suppress(Exception):
            async with asyncio.timeout(timeout):
                await self._publish(message)

    # ------------------------------------------------------------ peers

    def on_alive(self, node: str, sent: float, hello: bool, watching: Iterable[str] = ()) -> None:
        """A heartbeat of ``node`` stamped ``sent`` on its wall clock arrived (saying it
        watches ``watching``)."""
        peer = self._peers.get(node)
        known = peer is not None and self._clock() - peer.seen < self.timeout
        if peer is None:
            peer = self._peers[node] = _Peer(seen=float("-inf"))
        peer.samples.append(self._wall() - sent)
        stamped = self._clock() - self.age(node, sent)
        if stamped >= peer.seen:  # the newest heartbeat (an old one re-read says nothing new)
            peer.seen = stamped
            peer.watching = frozenset(watching)
        if hello and not known:
            # A new node: tell it who we are now rather than at our next heartbeat.
            self._spawn(self.beat())

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def watched(self, name: str) -> bool:
        """Whether a live peer (not this node) said it watches ``name``."""
        return any(name in self._peers[node].watching for node in self.live())

    def on_leave(self, node: str) -> None:
        if self._peers.pop(node, None) is not None and self._on_gone is not None:
            self._on_gone(node)

    def age(self, node: str, sent: float) -> float:
        """Seconds since ``node`` stamped ``sent`` (its wall clock), corrected for the
        offset between its clock and this node's (0 until it was heard from)."""
        peer = self._peers.get(node)
        offset = min(peer.samples) if peer is not None and peer.samples else 0.0
        return max(self._wall() - sent - offset, 0.0)

    def live(self) -> list[str]:
        """The peers alive now (this node not included); forgets the dead ones."""
        now = self._clock()
        dead = [node for node, peer in self._peers.items() if now - peer.seen >= self.timeout]
        for node in dead:
            del self._peers[node]
        return list(self._peers)

    def count(self) -> int:
        """Nodes alive now, this one included."""
        return len(self.live()) + 1


__all__ = ["CLOCK_SAMPLES", "HEARTBEAT_INTERVAL", "PEER_TIMEOUT", "Membership"]
