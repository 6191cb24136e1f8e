"""The control channel: commands one node sends other nodes through the broker.

Two kinds of command travel here:

* ``disconnect`` (the HTTP API's ``/api/disconnect``): the node that receives the
  request closes its own connections of the user at once and publishes the command on
  :data:`CONTROL_CHANNEL`, a reserved ``$`` channel every node subscribes to at start;
  the other nodes close theirs when it arrives.
* ``deliver`` (bidirectional emulation, :mod:`herald.emulation`): an HTTP POST carries
  commands for an emulated session whose stream another node holds.  The node that got
  the POST publishes them on the owning node's own channel (:func:`node_channel`, which
  each node subscribes to at start), and that node answers on the sender's channel with
  a :class:`DeliveryStatus` (``delivered``).  The POST is answered once the status
  arrives, so the client learns whether its commands reached the session.

A node ignores its own broadcast commands and logs (never raises on) malformed ones.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
from collections.abc import Sequence
from typing import Protocol

import orjson

from .brokers.base import Broker, PublishOptions
from .hub import Hub

logger = logging.getLogger("herald.node")

#: Node-to-node commands (cross-node disconnect) travel on this reserved broker channel.
CONTROL_CHANNEL = "$herald:control"

#: Seconds a node waits for the owning node's answer to a cross-node delivery.
DELIVERY_TIMEOUT = 5.0


def node_channel(node_id: str) -> str:
    """The reserved broker channel of one node (cross-node deliveries to it)."""
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


class ControlChannel:
    """Sends and handles this node's control commands."""

    __slots__ = ("_answers", "_broker", "_hub", "_node_id", "_targets", "_tasks", "node_channel")

    def __init__(self, node_id: str, broker: Broker, hub: Hub) -> None:
        self._node_id = node_id
        self._broker = broker
        self._hub = hub
        #: This node's own channel, which the node subscribes to at start.
        self.node_channel = node_channel(node_id)
        #: Emulated sessions whose stream this node holds: session id -> session.
        self._targets: dict[str, DeliveryTarget] = {}
        #: Cross-node deliveries waiting for the owning node's answer: request id -> future.
        self._answers: dict[str, asyncio.Future[DeliveryStatus]] = {}
        #: Answers being published (the loop keeps only weak references to tasks).
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------ disconnect

    async def disconnect_user(self, user: str, code: int, reason: str) -> int:
        """Close every connection of ``user`` on every node; returns how many were local.

        Other nodes get the command through the broker and close theirs asynchronously.
        Raises ``BrokerError`` when the broker cannot carry it (the local connections
        are closed anyway).
        """
        count = self.disconnect_local(user, code, reason)
        command = {"op": "disconnect", "node": self._node_id, "user": user, "code": code, "reason": reason}
        await self._broker.publish(CONTROL_CHANNEL, orjson.dumps(command), PublishOptions())
        return count

    def disconnect_local(self, user: str, code: int, reason: str) -> int:
        connections = self._hub.user_connections(user)
        for connection in connections:
            connection.close(code, reason)
        return len(connections)

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
            "node": self._node_id,
            "request": request,
            "session": session_id,
            "secret": secret,
            "commands": list(commands),
        }
        try:
            await self._broker.publish(node_channel(node_id), orjson.dumps(message), PublishOptions())
            async with asyncio.timeout(DELIVERY_TIMEOUT):
                return await answer
        except TimeoutError:
            return DeliveryStatus.TIMEOUT
        finally:
            self._answers.pop(request, None)

    async def _answer(self, to_node: str, request: str, status: DeliveryStatus) -> None:
        message = {"op": "delivered", "node": self._node_id, "request": request, "status": status.value}
        try:
            await self._broker.publish(node_channel(to_node), orjson.dumps(message), PublishOptions())
        except Exception as exc:  # the sender times out and answers 504
            logger.warning("cannot answer a cross-node delivery: %r", exc)

    # ------------------------------------------------------------ broker side

    def on_message(self, data: bytes) -> None:
        """Handle a command another node published on :data:`CONTROL_CHANNEL` or on this
        node's own channel (called from the broker handler, which never awaits)."""
        try:
            command = orjson.loads(data)
            if command.get("node") == self._node_id:
                return
            op = command.get("op")
            if op == "disconnect":
                self.disconnect_local(str(command["user"]), int(command["code"]), str(command["reason"]))
            elif op == "deliver":
                commands = command["commands"]
                if not isinstance(commands, list) or not all(isinstance(c, str) for c in commands):
                    raise TypeError("commands must be a list of strings")
                status = self.deliver_local(str(command["session"]), str(command["secret"]), commands)
                answer = self._answer(str(command["node"]), str(command["request"]), status)
                task = asyncio.get_running_loop().create_task(answer)
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            elif op == "delivered":
                waiting = self._answers.get(str(command["request"]))
                if waiting is not None and not waiting.done():
                    waiting.set_result(DeliveryStatus(command["status"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            logger.warning("ignoring malformed control message: %r", exc)


__all__ = [
    "CONTROL_CHANNEL",
    "DELIVERY_TIMEOUT",
    "ControlChannel",
    "DeliveryStatus",
    "DeliveryTarget",
    "node_channel",
]
