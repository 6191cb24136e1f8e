"""The replies of one client's commands still in flight, sent in command order.

Protocol v1 answers every command but ``rpc`` in the order the commands were sent.
A node handles a client's commands one after another; but a publish through a broker
that keeps call order (:attr:`~herald.brokers.base.Broker.pipelines_publishes`: one
Redis) spends most of its time waiting for the broker's round trip, and a client's
publishes handled strictly one at a time never share one.  So the command handler
starts a publish, puts its reply's future here and goes on with the next command;
this pipeline sends each reply once every reply before it is out.

Rules (the handler keeps them, :mod:`herald.commands`):

* Only publishes overlap one another.  Any other command with a reply waits until the
  pipeline is empty before it starts, so it sees the effects of the publishes before it
  and its reply follows theirs.
* A reply known at once (an error) while replies are pending joins the queue
  (:meth:`ReplyPipeline.add_ready`) instead of overtaking them.
* Bounded: at most :data:`PIPELINE_DEPTH` commands in flight; the handler waits for
  room (:meth:`ReplyPipeline.wait_until`) before it reads the client's next frame.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

logger = logging.getLogger("herald.commands")

#: Commands of one client in flight in its pipeline at most (one socket read can hold
#: a thousand publishes: the first 32 share a round trip, the rest wait their turn).
PIPELINE_DEPTH = 32


class ReplyPipeline:
    """Replies to send in command order (see the module docstring).

    ``send(frame)`` queues a reply on the connection; ``finish(command_id)`` releases
    the command's id once its reply is queued (``CommandGate.finish``).
    """

    __slots__ = ("_entries", "_finish", "_send", "_waiter")

    def __init__(self, send: Callable[[str], object], finish: Callable[[int | None], None]) -> None:
        self._send = send
        self._finish = finish
        # (command id, the reply's future or None, the reply when known); oldest first.
        self._entries: deque[tuple[int | None, asyncio.Future[str | None] | None, str | None]] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, command_id: int | None, reply: asyncio.Future[str | None]) -> None:
        """Send ``reply``'s result (a frame; None: nothing) after the replies before it.

        The future must not fail: the handler maps errors to error replies first.  A
        cancelled one (the connection is gone) sends nothing but still frees its id.
        """
        self._entries.append((command_id, reply, None))
        reply.add_done_callback(self._advance)

    def add_ready(self, command_id: int | None, frame: str) -> None:
        """Send ``frame`` now if nothing is pending, else after the pending replies."""
        if not self._entries:
            self._send(frame)
            self._finish(command_id)
            return
        self._entries.append((command_id, None, frame))

    async def wait_until(self, pending: int) -> None:
        """Return once at most ``pending`` replies are still to be sent."""
        entries = self._entries
        while len(entries) > pending:
            waiter = self._waiter
            if waiter is None or waiter.done():
                waiter = self._waiter = asyncio.get_running_loop().create_future()
            await waiter

    def _advance(self, _done: object = None) -> None:
        entries = self._entries
        while entries:
            command_id, reply, frame = entries[0]
            if reply is not None:
                if not reply.done():
                    break
                if reply.cancelled():
                    frame = None
                elif (error := reply.exception()) is not None:
                    logger.error("pipelined command %s failed", command_id, exc_info=error)
                    frame = None
                else:
                    frame = reply.result()
            entries.popleft()
            if frame is not None:
                self._send(frame)
            self._finish(command_id)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
