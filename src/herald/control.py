"""The control channel: commands one node sends every other node through the broker.

Today one command exists, ``disconnect`` (the HTTP API's ``/api/disconnect``): the
node that receives the request closes its own connections of the user at once and
publishes the command on :data:`CONTROL_CHANNEL`, a reserved ``$`` channel every node
subscribes to at start; the other nodes close theirs when it arrives.  A node ignores
its own commands and logs (never raises on) malformed ones.
"""

from __future__ import annotations

import logging

import orjson

from .brokers.base import Broker, PublishOptions
from .hub import Hub

logger = logging.getLogger("herald.node")

#: Node-to-node commands (cross-node disconnect) travel on this reserved broker channel.
CONTROL_CHANNEL = "$herald:control"


class ControlChannel:
    """Sends and handles this node's control commands."""

    __slots__ = ("_broker", "_hub", "_node_id")

    def __init__(self, node_id: str, broker: Broker, hub: Hub) -> None:
        self._node_id = node_id
        self._broker = broker
        self._hub = hub

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

    def on_message(self, data: bytes) -> None:
        """Handle a command another node published (called from the broker handler)."""
        try:
            command = orjson.loads(data)
            if command.get("node") == self._node_id:
                return
            if command.get("op") == "disconnect":
                self.disconnect_local(str(command["user"]), int(command["code"]), str(command["reason"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            logger.warning("ignoring malformed control message: %r", exc)
