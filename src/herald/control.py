"""The control channel: commands one node sends other nodes through the broker.

Channels.  :data:`CONTROL_CHANNEL`, a reserved ``$`` channel every node subscribes
to at start, carries commands for every node and the heartbeats of
:mod:`herald.membership`; each node's own channel (:func:`node_channel`) carries
requests for that node and answers to it.  Both keep a short history
(:data:`CONTROL_HISTORY`, :data:`NODE_HISTORY`), so a node whose broker link
blipped reads what it missed (the Redis and NATS JetStream brokers re-read a
subscribed channel's stream after a reconnection).  When the history no longer
covers the blip (or the broker keeps none: core NATS) the broker reports a
:class:`~herald.brokers.base.StreamGap`: it is logged at ERROR and counted
(``herald_control_events_total{event="gaps"}``); what it held is lost.

Every command carries an ``id``; a node handles an id once (the last
:data:`SEEN_COMMANDS` are remembered), so a command re-read after a blip, or
delivered twice, does not run twice.

* ``disconnect`` (``/api/disconnect``): the node that receives the request closes
  its own connections of the user, publishes the command on the control channel
  and waits (up to :data:`DISCONNECT_TIMEOUT`) for the answer of every node its
  membership view holds alive; each node closes its connections of the user and
  answers how many on the asking node's channel.  The result sums the answers
  (:class:`DisconnectResult`).  A node that re-reads the command after a link
  blip closes the user's connections then; its late answer is dropped.
* ``deliver`` (bidirectional emulation, :mod:`herald.emulation`): commands for an
  emulated session whose stream another node holds go to that node's channel; it
  answers with a :class:`DeliveryStatus`.  A request carries the sender's wall
  clock; one older than ``DELIVERY_TIMEOUT - DELIVERY_MARGIN`` (its sender has
  answered, or is about to answer, ``timeout``) is dropped unrun.  Its age is
  measured with the clock offset :mod:`herald.membership` estimates per peer, so
  skewed clocks do not matter.

A node ignores its own broadcasts and logs (never raises on) malformed messages.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from .brokers.base import Broker, PublishOptions, StreamGap
from .hub import Hub
from .membership import Membership

logger = logging.getLogger("herald.node")

#: Node-to-node commands and heartbeats travel on this reserved broker channel.
CONTROL_CHANNEL = "$herald:control"

#: The control channel's history: the last 10,000 messages for 60 s.  Heartbeats go
#: there too (one per node per second, which keeps the stream from expiring), so a
#: link blip of up to 60 s is covered while fewer than 10,000 messages were published
#: meanwhile (with 100 nodes: 6,000 heartbeats a minute, room for 4,000 commands).
CONTROL_HISTORY = PublishOptions(history_size=10_000, history_ttl=60.0)
#: A node channel's history: deliveries are dropped after DELIVERY_TIMEOUT anyway.
NODE_HISTORY = PublishOptions(history_size=1_000, history_ttl=30.0)

#: Seconds a node waits for the owning node's answer to a cross-node delivery.
DELIVERY_TIMEOUT = 5.0
#: A delivery older than DELIVERY_TIMEOUT minus this is dropped unrun: its answer
#: would come after the sender gave up.
DELIVERY_MARGIN = 1.0
#: Seconds ``/api/disconnect`` waits for the answers of the other live nodes.
DISCONNECT_TIMEOUT = 2.0
#: Command ids remembered per node, so none runs twice.
SEEN_COMMANDS = 10_000


def node_channel(node_id: str) -> str:
    """The reserved broker channel of one node (requests to it, answers to it)."""
    return f"$herald:node:{node_id}"


class DeliveryStatus(enum.StrEnum):
    """What became of commands handed to an emulated session."""

    #: Queued on the session, to be handled in order.
    DELIVERED = "delivered"
    #: No such session (never opened, ended, or its node is gone).
    UNKNOWN = "unknown"
    #: The session exists but the secret is not the one its stream was given.
    FORBIDDEN = "forbidden"
    #: The session's queue of commands not yet handled is full.
    OVERLOADED = "overloaded"
    #: The owning node did not answer within :data:`DELIVERY_TIMEOUT`.
    TIMEOUT = "timeout"


class DeliveryTarget(Protocol):
    """A session that takes commands from HTTP POSTs (:class:`herald.emulation.EmulationSession`)."""

    @property
    def secret(self) -> str: ...

    def accept(self, commands: Sequence[str]) -> DeliveryStatus:
        """Queue ``commands`` (text frames) in order; never awaits."""


@dataclass(slots=True)
class DisconnectResult:
    """What ``/api/disconnect`` did across the cluster."""

    #: Connections closed, summed over this node and every node that answered.
    disconnected: int
    #: Nodes that answered, this one included.
    nodes: int
    #: Nodes this node held alive that did not answer in time (their count is missing;
    #: they still close the user's connections when the command reaches them).
    missing: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Every node known alive answered."""
        return not self.missing


@dataclass(slots=True, eq=False)
class _Tally:
    """The answers to one disconnect command."""

    expected: set[str]
    done: asyncio.Event = field(default_factory=asyncio.Event)
    answered: set[str] = field(default_factory=set)
    count: int = 0

    def settle(self) -> None:
        if self.expected <= self.answered:
            self.done.set()


class ControlChannel:
    """Sends and handles this node's control commands."""

    def __init__(self, node_id: str, broker: Broker, hub: Hub) -> None:
        self._node_id = node_id
        self._broker = broker
        self._hub = hub
        #: This node's own channel, which the node subscribes to at start.
        self.node_channel = node_channel(node_id)
        #: The live nodes, from heartbeats on the control channel.
        self.members = Membership(node_id, self._publish_control, on_gone=self._forget)
        #: Emulated sessions whose stream this node holds: session id -> session.
        self._targets: dict[str, DeliveryTarget] = {}
        #: Cross-node deliveries waiting for the owning node's answer: request id -> future.
        self._answers: dict[str, asyncio.Future[DeliveryStatus]] = {}
        #: Disconnect commands waiting for the other nodes' answers: command id -> tally.
        self._tallies: dict[str, _Tally] = {}
        #: Ids of the commands handled, oldest first (bounded by SEEN_COMMANDS).
        self._seen: OrderedDict[str, None] = OrderedDict()
        #: Answers being published (the loop keeps only weak references to tasks).
        self._tasks: set[asyncio.Task[None]] = set()
        #: Events by name, exported as ``herald_control_events_total{event=...}``.
        self.events: dict[str, int] = {
            "gaps": 0,  # StreamGap on a control channel: messages lost
            "duplicates": 0,  # a command id seen before (re-read or re-delivered): not re-run
            "expired": 0,  # a delivery older than its sender waits: dropped unrun
            "incomplete": 0,  # a disconnect some live node did not answer in time
        }

    def counters(self) -> dict[str, int]:
        return dict(self.events)

    async def _publish_control(self, data: bytes) -> None:
        await self._broker.publish(CONTROL_CHANNEL, data, CONTROL_HISTORY)

    async def _publish_to(self, node_id: str, message: dict[str, Any]) -> None:
        await self._broker.publish(node_channel(node_id), orjson.dumps(message), NODE_HISTORY)

    def _spawn_answer(self, node_id: str, message: dict[str, Any]) -> None:
        task = asyncio.get_running_loop().create_task(self._answer(node_id, message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, node_id: str, message: dict[str, Any]) -> None:
        try:
            await self._publish_to(node_id, message)
        except Exception as exc:  # the sender times out
            logger.warning("cannot answer node %s: %r", node_id, exc)

    def _first_time(self, command_id: object) -> bool:
        """Whether command ``command_id`` was not handled yet (and remember it)."""
        if not isinstance(command_id, str):
            return True  # a node of an older version: no id to de-duplicate on
        if command_id in self._seen:
            self.events["duplicates"] += 1
            return False
        self._seen[command_id] = None
        if len(self._seen) > SEEN_COMMANDS:
            self._seen.popitem(last=False)
        return True

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Heartbeat until cancelled (the node runs this as a task)."""
        await self.members.run()

    async def leave(self) -> None:
        """Announce that this node leaves (best effort; on a clean close)."""
        await self.members.leave()

    # ------------------------------------------------------------ disconnect

    async def disconnect_user(
        self, user: str, code: int, reason: str, *, timeout: float = DISCONNECT_TIMEOUT
    ) -> DisconnectResult:
        """Close every connection of ``user`` on every node; returns the cluster-wide
        count, summed from the answers of the nodes alive (waiting up to ``timeout``).

        Raises ``BrokerError`` when the broker cannot carry the command (the local
        connections are closed anyway).
        """
        local = self.disconnect_local(user, code, reason)
        command_id = secrets.token_hex(8)
        tally = _Tally(set(self.members.live()))
        self._tallies[command_id] = tally
        command = {
            "op": "disconnect",
            "id": command_id,
            "node": self._node_id,
            "user": user,
            "code": code,
            "reason": reason,
        }
        try:
            await self._publish_control(orjson.dumps(command))
            tally.settle()
            try:
                async with asyncio.timeout(timeout):
                    await tally.done.wait()
            except TimeoutError:
                self.events["incomplete"] += 1
        finally:
            self._tallies.pop(command_id, None)
        missing = sorted(tally.expected - tally.answered)
        return DisconnectResult(local + tally.count, len(tally.answered) + 1, missing)

    def disconnect_local(self, user: str, code: int, reason: str) -> int:
        connections = self._hub.user_connections(user)
        for connection in connections:
            connection.close(code, reason)
        return len(connections)

    def _forget(self, node_id: str) -> None:
        """``node_id`` left: no disconnect waits for its answer any more."""
        for tally in self._tallies.values():
            tally.expected.discard(node_id)
            tally.settle()

    # ------------------------------------------------------------ emulated sessions

    def register(self, session_id: str, target: DeliveryTarget) -> None:
        """Make ``target`` reachable by :meth:`deliver` (from any node) as ``session_id``."""
        self._targets[session_id] = target

    def unregister(self, session_id: str) -> None:
        self._targets.pop(session_id, None)

    @property
    def sessions(self) -> int:
        """Emulated sessions whose stream this node holds."""
        return len(self._targets)

    def deliver_local(self, session_id: str, secret: str, commands: Sequence[str]) -> DeliveryStatus:
        """Hand ``commands`` to a session of this node, if ``secret`` is its secret."""
        target = self._targets.get(session_id)
        if target is None:
            return DeliveryStatus.UNKNOWN
        # Constant time: the secret is all that stands between a session and injected commands.
        if not secrets.compare_digest(target.secret.encode(), secret.encode()):
            return DeliveryStatus.FORBIDDEN
        return target.accept(commands)

    async def deliver(
        self, node_id: str, session_id: str, secret: str, commands: Sequence[str]
    ) -> DeliveryStatus:
        """Hand ``commands`` to session ``session_id`` held by node ``node_id`` (this one
        or another, through the broker); returns what became of them.

        Raises ``BrokerError`` when the broker cannot carry the request.
        """
        if node_id == self._node_id:
            return self.deliver_local(session_id, secret, commands)
        request = secrets.token_hex(8)
        answer: asyncio.Future[DeliveryStatus] = asyncio.get_running_loop().create_future()
        self._answers[request] = answer
        message = {
            "op": "deliver",
            "id": request,
            "node": self._node_id,
            "request": request,
            "sent": self.members.wall(),
            "session": session_id,
            "secret": secret,
            "commands": list(commands),
        }
        try:
            await self._publish_to(node_id, message)
            async with asyncio.timeout(DELIVERY_TIMEOUT):
                return await answer
        except TimeoutError:
            return DeliveryStatus.TIMEOUT
        finally:
            self._answers.pop(request, None)

    # ------------------------------------------------------------ broker side

    def on_gap(self, gap: StreamGap) -> None:
        """The broker lost messages of a control channel (see the module docstring)."""
        self.events["gaps"] += 1
        if gap.channel == CONTROL_CHANNEL:
            lost = (
                "disconnect commands in it were not run here (their users' connections on this "
                "node stay open until disconnected again)"
            )
        else:
            lost = "cross-node deliveries to this node in it were not run (their senders answered timeout)"
        logger.error(
            "control channel %s: messages after offset %d lost by the broker (a link blip longer "
            "than its history, or a broker without history); %s",
            gap.channel,
            gap.last.offset,
            lost,
        )

    def on_message(self, data: bytes) -> None:
        """Handle a message another node published on :data:`CONTROL_CHANNEL` or on this
        node's own channel (called from the broker handler, which never awaits)."""
        try:
            message = orjson.loads(data)
            sender = message.get("node")
            if sender == self._node_id:
                return
            op = message.get("op")
            if op == "alive":
                watching = message.get("watching")
                self.members.on_alive(
                    str(sender),
                    float(message["sent"]),
                    bool(message.get("hello")),
                    [str(name) for name in watching] if isinstance(watching, list) else (),
                )
            elif op == "leave":
                self.members.on_leave(str(sender))
            elif op == "disconnect":
                if self._first_time(message.get("id")):
                    count = self.disconnect_local(
                        str(message["user"]), int(message["code"]), str(message["reason"])
                    )
                    if "id" in message:
                        answer = {"op": "disconnected", "node": self._node_id, "request": message["id"]}
                        self._spawn_answer(str(sender), {**answer, "count": count})
            elif op == "disconnected":
                tally = self._tallies.get(str(message["request"]))
                if tally is not None and sender not in tally.answered:
                    tally.answered.add(str(sender))
                    tally.count += int(message["count"])
                    tally.settle()
            elif op == "deliver":
                self._on_deliver(str(sender), message)
            elif op == "delivered":
                waiting = self._answers.get(str(message["request"]))
                if waiting is not None and not waiting.done():
                    waiting.set_result(DeliveryStatus(message["status"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            logger.warning("ignoring malformed control message: %r", exc)

    def _on_deliver(self, sender: str, message: dict[str, Any]) -> None:
        commands = message["commands"]
        if not isinstance(commands, list) or not all(isinstance(c, str) for c in commands):
            raise TypeError("commands must be a list of strings")
        if not self._first_time(message.get("id")):
            return
        sent = message.get("sent")
        if sent is not None and self.members.age(sender, float(sent)) > DELIVERY_TIMEOUT - DELIVERY_MARGIN:
            # Re-read after a blip, too late: the sender has told its client "timeout".
            self.events["expired"] += 1
            logger.warning("dropping a cross-node delivery from node %s: its sender gave up", sender)
            return
        status = self.deliver_local(str(message["session"]), str(message["secret"]), commands)
        answer = {"op": "delivered", "node": self._node_id, "request": str(message["request"])}
        self._spawn_answer(sender, {**answer, "status": status.value})


__all__ = [
    "CONTROL_CHANNEL",
    "CONTROL_HISTORY",
    "DELIVERY_TIMEOUT",
    "DISCONNECT_TIMEOUT",
    "NODE_HISTORY",
    "ControlChannel",
    "DeliveryStatus",
    "DeliveryTarget",
    "DisconnectResult",
    "node_channel",
]
