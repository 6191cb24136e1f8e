"""Server -> client frames, as the server writes them.

One function per reply and push of :mod:`herald.protocol.messages`; the models
there are the definition (and the JSON Schema), these functions the fast way to
write it: orjson on plain dicts, no model built per frame.  Every encoder's output
is validated against its model in ``tests/protocol/test_encoders.py``, so the two
cannot drift apart.

Hot frames: a publication's ``data`` is kept as the JSON bytes the publisher sent
(:class:`orjson.Fragment`), so it is never decoded and re-encoded on its way
through the server; the push is built once per channel however many subscribers
receive it.  The ping push is a constant.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import orjson
from pydantic import BaseModel

from .messages import PROTOCOL_VERSION
from .values import ClientInfo, PresenceStats, StreamPosition

#: The ping push: the same bytes every time.
PING_FRAME = '{"type":"ping"}'


class StoredPublication(Protocol):
    """What the encoders read of a publication (the brokers' ``Publication`` is one)."""

    @property
    def offset(self) -> int: ...

    @property
    def data(self) -> bytes: ...  # the JSON the publisher sent

    @property
    def info(self) -> ClientInfo | None: ...


def _dumps(value: Any) -> str:
    return orjson.dumps(value, default=_default).decode()


def _default(value: Any) -> Any:
    # RPC handlers may return pydantic models.
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def _info(info: ClientInfo | None) -> dict[str, Any] | None:
    return None if info is None else {"client": info.client, "user": info.user, "info": info.info}


def _reply(command_id: int, kind: str, result: Any) -> str:
    return _dumps({"id": command_id, "type": kind, "result": result})


# ---------------------------------------------------------------- pushes


def encode_publication(
    channel: str, offset: int, epoch: str, data_json: bytes, info: ClientInfo | None
) -> str:
    """A ``publication`` push; ``data_json`` is embedded without re-encoding."""
    frame: dict[str, Any] = {
        "type": "publication",
        "channel": channel,
        "offset": offset,
        "epoch": epoch,
        "data": orjson.Fragment(data_json),
    }
    if info is not None:
        frame["info"] = {"client": info.client, "user": info.user, "info": info.info}
    return orjson.dumps(frame).decode()


def encode_presence_event(kind: str, channel: str, info: ClientInfo) -> str:
    """A ``join`` or ``leave`` push (``kind``)."""
    return _dumps({"type": kind, "channel": channel, "info": _info(info)})


def encode_disconnect(code: int, reason: str, reconnect: bool) -> str:
    """The ``disconnect`` push sent just before the server closes with ``code``."""
    return _dumps({"type": "disconnect", "code": code, "reason": reason, "reconnect": reconnect})


def encode_refresh(grace: float) -> str:
    """The push asking for a new connection token within ``grace`` seconds."""
    return _dumps({"type": "refresh", "grace": grace})


def encode_sub_refresh(channel: str, grace: float) -> str:
    """The push asking for a new subscription token for ``channel`` within ``grace`` seconds."""
    return _dumps({"type": "sub_refresh", "channel": channel, "grace": grace})


def encode_unsubscribe(channel: str, code: int, reason: str) -> str:
    """The push saying the server ended the subscription to ``channel`` (an error ``code``)."""
    return _dumps({"type": "unsubscribe", "channel": channel, "code": code, "reason": reason})


# ---------------------------------------------------------------- replies


def encode_error(command_id: int | None, kind: str | None, code: int, message: str) -> str:
    """An error reply (``kind`` None when the frame's type could not be read)."""
    return _dumps({"id": command_id, "type": kind, "error": {"code": code, "message": message}})


def encode_connect_reply(
    command_id: int, *, client: str, user: str, version: str, ping_interval: float, pong_timeout: float
) -> str:
    result = {
        "client": client,
        "user": user,
        "version": version,
        "protocol": PROTOCOL_VERSION,
        "ping_interval": ping_interval,
        "pong_timeout": pong_timeout,
    }
    return _reply(command_id, "connect", result)


def publication_items(publications: Iterable[StoredPublication]) -> list[dict[str, Any]]:
    """Publications as history and recovery items, data kept as the raw JSON."""
    return [
        {"offset": p.offset, "data": orjson.Fragment(p.data), "info": _info(p.info)} for p in publications
    ]


def subscribed_item(
    channel: str,
    position: StreamPosition,
    *,
    recoverable: bool,
    recovered: bool | None,
    publications: list[dict[str, Any]],
) -> dict[str, Any]:
    """One channel of a ``subscribe`` reply that was subscribed (``publications`` from
    :func:`publication_items`)."""
    return {
        "channel": channel,
        "epoch": position.epoch,
        "offset": position.offset,
        "recoverable": recoverable,
        "recovered": recovered,
        "publications": publications,
    }


def subscribe_error_item(channel: str, code: int, message: str) -> dict[str, Any]:
    """One channel of a ``subscribe`` reply that was refused (its name cut to 255 characters)."""
    return {"channel": channel[:255], "error": {"code": int(code), "message": message}}


def encode_subscribe_reply(command_id: int, channels: list[dict[str, Any]]) -> str:
    return _reply(command_id, "subscribe", {"channels": channels})


def encode_unsubscribe_reply(command_id: int, channels: list[str]) -> str:
    return _reply(command_id, "unsubscribe", {"channels": channels})


def encode_publish_reply(command_id: int, position: StreamPosition) -> str:
    return _reply(command_id, "publish", {"offset": position.offset, "epoch": position.epoch})


def encode_rpc_reply(command_id: int, data: Any) -> str:
    return _reply(command_id, "rpc", {"data": data})


def encode_presence_reply(command_id: int, clients: Mapping[str, ClientInfo]) -> str:
    return _reply(command_id, "presence", {"clients": {c: _info(i) for c, i in clients.items()}})


def encode_presence_stats_reply(command_id: int, stats: PresenceStats) -> str:
    return _reply(
        command_id, "presence_stats", {"num_clients": stats.num_clients, "num_users": stats.num_users}
    )


def encode_history_reply(
    command_id: int, publications: Iterable[StoredPublication], position: StreamPosition
) -> str:
    result = {
        "publications": publication_items(publications),
        "offset": position.offset,
        "epoch": position.epoch,
    }
    return _reply(command_id, "history", result)


def encode_refresh_reply(command_id: int, expires_at: float | None) -> str:
    return _reply(command_id, "refresh", {"expires_at": expires_at})


def encode_sub_refresh_reply(command_id: int, expires_at: float | None) -> str:
    return _reply(command_id, "sub_refresh", {"expires_at": expires_at})


def encode_ping_reply(command_id: int) -> str:
    # Answered inline, without a task: the id is the only variable part.
    return f'{{"id":{command_id},"type":"ping","result":{{}}}}'
