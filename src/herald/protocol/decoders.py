"""Server -> client frames, as the client reads them: typed values instead of dicts.

The counterpart of :mod:`herald.protocol.encoders` (``tests/protocol/test_decoders.py``
decodes what the encoders write).  Tolerant where the protocol may grow: unknown
fields are ignored, optional ones take their documented default; a reply missing
a field the protocol requires raises ``KeyError``/``ValueError``/``TypeError``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeAlias

from ..exceptions import ReplyError
from .values import (
    ClientInfo,
    ClientPublication,
    HistoryPage,
    JoinEvent,
    LeaveEvent,
    PresenceStats,
    StreamPosition,
)

Frame: TypeAlias = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Connected:
    """The result of ``connect``."""

    client: str
    user: str
    version: str
    ping_interval: float  # seconds between server pings; 0 when off
    pong_timeout: float


@dataclass(frozen=True, slots=True)
class SubscribedChannel:
    """One channel of a ``subscribe`` result: subscribed at ``position``, or refused (``error``)."""

    channel: str
    error: ReplyError | None
    position: StreamPosition
    recoverable: bool
    recovered: bool | None  # None unless ``since`` was sent
    publications: list[ClientPublication]


@dataclass(frozen=True, slots=True)
class DisconnectNotice:
    """The ``disconnect`` push the server sends before it closes."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class RefreshRequest:
    """The ``refresh`` push: the connection token expired."""

    grace: float


@dataclass(frozen=True, slots=True)
class SubRefreshRequest:
    """The ``sub_refresh`` push: the subscription token of ``channel`` expired."""

    channel: str
    grace: float


@dataclass(frozen=True, slots=True)
class Unsubscribed:
    """The ``unsubscribe`` push: the server ended the subscription to ``channel``."""

    channel: str
    error: ReplyError


#: What :func:`decode_push` returns; ``None`` for a push this client does not know.
ServerPush: TypeAlias = (
    ClientPublication
    | JoinEvent
    | LeaveEvent
    | DisconnectNotice
    | RefreshRequest
    | SubRefreshRequest
    | Unsubscribed
)


def decode_info(value: Any) -> ClientInfo | None:
    if not isinstance(value, dict):
        return None
    return ClientInfo(str(value.get("client", "")), str(value.get("user", "")), value.get("info"))


def _publications(channel: str, epoch: str, items: Any) -> list[ClientPublication]:
    return [
        ClientPublication(
            channel, int(item["offset"]), epoch, item.get("data"), decode_info(item.get("info"))
        )
        for item in items or ()
    ]


def reply_error(reply: Frame) -> ReplyError | None:
    """The error of a reply, or None for a successful one."""
    if "error" not in reply:
        return None
    error = reply.get("error") or {}
    return ReplyError(int(error.get("code", 0)), str(error.get("message", "error")))


def reply_result(reply: Frame) -> Frame:
    """The result object of a successful reply (empty when absent)."""
    result = reply.get("result")
    return result if isinstance(result, dict) else {}


def decode_connect(result: Frame) -> Connected:
    return Connected(
        client=str(result.get("client", "")),
        user=str(result.get("user", "")),
        version=str(result.get("version", "")),
        ping_interval=float(result.get("ping_interval") or 0),
        pong_timeout=float(result.get("pong_timeout") or 10.0),
    )


def decode_position(result: Frame) -> StreamPosition:
    """The result of ``publish``."""
    return StreamPosition(int(result["offset"]), str(result["epoch"]))


def decode_rpc(result: Frame) -> Any:
    return result.get("data")


def decode_presence(result: Frame) -> dict[str, ClientInfo]:
    clients = result.get("clients") or {}
    return {client: info for client, value in clients.items() if (info := decode_info(value)) is not None}


def decode_presence_stats(result: Frame) -> PresenceStats:
    return PresenceStats(int(result["num_clients"]), int(result["num_users"]))


def decode_history(channel: str, result: Frame) -> HistoryPage:
    epoch = str(result["epoch"])
    return HistoryPage(
        publications=_publications(channel, epoch, result.get("publications")),
        position=StreamPosition(int(result["offset"]), epoch),
    )


def decode_expiry(result: Frame) -> float | None:
    """The result of ``refresh`` and ``sub_refresh``: the new token's expiry, or None."""
    expires_at = result.get("expires_at")
    return float(expires_at) if expires_at is not None else None


def decode_subscribed(result: Frame) -> list[SubscribedChannel]:
    """The channels of a ``subscribe`` result, in the order they were asked for."""
    channels: list[SubscribedChannel] = []
    for item in result.get("channels") or ():
        channel = str(item.get("channel"))
        error = item.get("error")
        epoch = str(item.get("epoch") or "")
        channels.append(
            SubscribedChannel(
                channel=channel,
                error=(
                    ReplyError(int(error.get("code", 0)), str(error.get("message", ""))) if error else None
                ),
                position=StreamPosition(int(item.get("offset") or 0), epoch),
                recoverable=bool(item.get("recoverable")),
                recovered=item.get("recovered"),
                publications=[] if error else _publications(channel, epoch, item.get("publications")),
            )
        )
    return channels


def decode_push(frame: Frame) -> ServerPush | None:
    """A push (a frame without ``id``) as a typed value; None for an unknown ``type``."""
    kind = frame.get("type")
    if kind == "publication":
        return ClientPublication(
            channel=str(frame.get("channel")),
            offset=int(frame.get("offset", 0)),
            epoch=str(frame.get("epoch", "")),
            data=frame.get("data"),
            info=decode_info(frame.get("info")),
        )
    if kind == "join" or kind == "leave":
        info = decode_info(frame.get("info"))
        if info is None:
            return None
        return (JoinEvent if kind == "join" else LeaveEvent)(str(frame.get("channel")), info)
    if kind == "disconnect":
        return DisconnectNotice(int(frame.get("code", 1006)), str(frame.get("reason", "")))
    if kind == "refresh":
        return RefreshRequest(float(frame.get("grace") or 0))
    if kind == "sub_refresh":
        return SubRefreshRequest(str(frame.get("channel")), float(frame.get("grace") or 0))
    if kind == "unsubscribe":
        error = ReplyError(int(frame.get("code", 0)), str(frame.get("reason", "")))
        return Unsubscribed(str(frame.get("channel")), error)
    return None
