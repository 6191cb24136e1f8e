"""Peer for Herald's realistic benchmarks (bench/realistic.py: S5, S7, S8).

python-socketio 5 as an ASGI app under uvicorn (``uvicorn app:app``), written as a
python-socketio team would, with its own rooms API:

* ``join`` (a list of rooms): ``enter_room`` for each, acknowledged with ``True``;
* ``pub`` (``{"room": ..., "data": ...}``): ``emit("msg", data, to=room)``,
  acknowledged with ``True`` when the client asked for an acknowledgement.

With ``BENCH_JWT_SECRET`` set, a connection may carry an HS256 token in its
``auth`` (``{"token": ...}``), verified with PyJWT; a bad token is refused.

What it does not offer (Herald does): no history and no recovery of missed
messages after a reconnect; no presence; no bounded per-client outbound queue
(``emit`` awaits each client's send in turn); no per-channel offsets.
"""

from __future__ import annotations

import os
from typing import Any

import jwt
import socketio

SECRET = os.environ.get("BENCH_JWT_SECRET", "")

sio = socketio.AsyncServer(async_mode="asgi", cors_allowed_origins="*", transports=["websocket"])
app = socketio.ASGIApp(sio)


@sio.event
async def connect(sid: str, environ: dict[str, Any], auth: dict[str, Any] | None = None) -> None:
    token = (auth or {}).get("token")
    if token:
        try:
            claims = jwt.decode(token, SECRET, algorithms=["HS256"])
        except jwt.PyJWTError as exc:
            raise socketio.exceptions.ConnectionRefusedError("unauthorized") from exc
        await sio.save_session(sid, {"user": claims.get("sub")})


@sio.event
async def join(sid: str, rooms: list[str]) -> bool:
    for room in rooms:
        await sio.enter_room(sid, room)
    return True


@sio.event
async def pub(sid: str, message: dict[str, Any]) -> bool:
    await sio.emit("msg", message["data"], to=message["room"])
    return True
