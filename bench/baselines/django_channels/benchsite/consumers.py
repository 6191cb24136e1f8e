"""The Django Channels peer of Herald's realistic benchmarks (bench/realistic.py).

A consumer written as a Channels team would, with Channels' own groups: it speaks
a small JSON protocol shaped like Herald's protocol v1 so that the same load
generator drives it (``proto=herald`` in bench/loadgen.c):

* ``{"id":1,"type":"connect"[,"token":T]}``: an HS256 token (``BENCH_JWT_SECRET``)
  is verified with PyJWT; a bad one is refused and the socket closed;
* ``{"id":N,"type":"subscribe","channels":[{"channel":C},...]}``: ``group_add``;
* ``{"id":N,"type":"publish","channel":C,"data":D}``: ``group_send`` to the group;
  every member is sent ``{"type":"publication","channel":C,"data":D}``.

Each command is answered ``{"id":N,"type":...,"result":{}}``.

What it does not offer (Herald does): no history and no recovery, no presence;
the in-memory layer is one process only, and drops a message silently when a
consumer's channel holds its capacity (100 by default), so a burst can be lost.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jwt
from channels.generic.websocket import AsyncWebsocketConsumer

SECRET = os.environ.get("BENCH_JWT_SECRET", "")


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


class BenchConsumer(AsyncWebsocketConsumer):
    async def connect(self) -> None:
        self.groups_joined: list[str] = []
        wanted = "herald.v1" if "herald.v1" in self.scope.get("subprotocols", []) else None
        await self.accept(wanted)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        message = json.loads(text_data or "{}")
        kind, command_id = message.get("type"), message.get("id")
        if kind == "connect":
            token = message.get("token")
            if token:
                try:
                    jwt.decode(token, SECRET, algorithms=["HS256"])
                except jwt.PyJWTError:
                    await self.send(
                        _dumps({"id": command_id, "type": kind, "error": {"message": "unauthorized"}})
                    )
                    await self.close()
                    return
        elif kind == "subscribe":
            for entry in message["channels"]:
                await self.channel_layer.group_add(entry["channel"], self.channel_name)
                self.groups_joined.append(entry["channel"])
        elif kind == "publish":
            await self.channel_layer.group_send(
                message["channel"],
                {"type": "publication", "channel": message["channel"], "data": message["data"]},
            )
        else:
            return
        await self.send(_dumps({"id": command_id, "type": kind, "result": {}}))

    async def publication(self, event: dict[str, Any]) -> None:
        await self.send(_dumps({"type": "publication", "channel": event["channel"], "data": event["data"]}))

    async def disconnect(self, code: int) -> None:
        for group in self.groups_joined:
            await self.channel_layer.group_discard(group, self.channel_name)
