"""Pydantic models of every frame in protocol v1.

Client -> server frames are *commands*: ``{"id": 1, "type": "subscribe", ...}``.
Each command with an ``id`` gets exactly one *reply* with the same ``id`` and
``type`` and either ``result`` or ``error``.  ``pong`` is the one command without
an id and without a reply (it answers a server ``ping`` push).

Server -> client frames without an ``id`` are *pushes*, discriminated on
``type``: ``publication``, ``join``, ``leave``, ``disconnect``, ``ping``, ``refresh``,
``sub_refresh`` and ``unsubscribe``.

All models forbid unknown fields so that typos fail loudly.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .idempotency import IDEMPOTENCY_KEY_PATTERN, MAX_IDEMPOTENCY_KEY_LENGTH

PROTOCOL_VERSION = "1"
#: The WebSocket subprotocol a client may request on ``/connect``.
SUBPROTOCOL = "herald.v1"

#: Largest id a client may choose: ids must survive a round trip through JavaScript numbers.
MAX_ID = 2**53 - 1

# strict: a JSON string "1" or true must not pass as id 1 (the reply would echo a different
# id than the client keys its pending commands by); the exported JSON Schema says "integer".
CommandId = Annotated[
    int, Field(ge=1, le=MAX_ID, strict=True, description="Client-chosen id, echoed in the reply.")
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- shared parts


class StreamPositionModel(_Model):
    """A place in a channel's stream: publications after ``offset`` in stream ``epoch``."""

    offset: int = Field(ge=0, le=MAX_ID, strict=True)
    epoch: str = Field(max_length=64)


class ClientInfoModel(_Model):
    """Who published, joined or left."""

    client: str
    user: str
    info: Any = None


class ErrorInfo(_Model):
    code: int
    message: str


class PublicationModel(_Model):
    """One publication as found in history and in recovery results."""

    offset: int
    data: Any
    info: ClientInfoModel | None = None


# ---------------------------------------------------------------- commands


class ConnectRequest(_Model):
    type: Literal["connect"]
    id: CommandId
    token: str | None = Field(default=None, max_length=8192)
    name: str | None = Field(default=None, max_length=64, description="Client name, for logs.")
    version: str | None = Field(default=None, max_length=64)


class ChannelSubscription(_Model):
    channel: str = Field(max_length=1024)
    since: StreamPositionModel | None = None
    token: str | None = Field(default=None, max_length=8192, description="Subscription token.")


class SubscribeRequest(_Model):
    type: Literal["subscribe"]
    id: CommandId
    channels: list[ChannelSubscription] = Field(min_length=1, max_length=256)


class UnsubscribeRequest(_Model):
    type: Literal["unsubscribe"]
    id: CommandId
    channels: list[Annotated[str, Field(max_length=1024)]] = Field(min_length=1, max_length=256)


#: A publication's idempotency key (herald.protocol.idempotency has the same rules).
IdempotencyKey = Annotated[
    str, Field(min_length=1, max_length=MAX_IDEMPOTENCY_KEY_LENGTH, pattern=IDEMPOTENCY_KEY_PATTERN)
]


class PublishRequest(_Model):
    type: Literal["publish"]
    id: CommandId
    channel: str = Field(max_length=1024)
    data: Any
    idempotency_key: IdempotencyKey | None = Field(
        default=None,
        description=(
            "Makes a retry safe: a publish with the same key on the same channel within the "
            "server's idempotency_window (300 s by default) publishes nothing and is answered "
            "with the original publication's offset and epoch.  1 to 128 visible ASCII characters."
        ),
    )


class RpcRequest(_Model):
    type: Literal["rpc"]
    id: CommandId
    method: str = Field(min_length=1, max_length=128)
    params: Any = None


class PresenceRequest(_Model):
    type: Literal["presence"]
    id: CommandId
    channel: str = Field(max_length=1024)


class PresenceStatsRequest(_Model):
    type: Literal["presence_stats"]
    id: CommandId
    channel: str = Field(max_length=1024)


class HistoryRequest(_Model):
    type: Literal["history"]
    id: CommandId
    channel: str = Field(max_length=1024)
    since: StreamPositionModel | None = None
    limit: int | None = Field(default=None, ge=0, le=MAX_ID, strict=True)
    reverse: bool = Field(default=False, strict=True, description="Newest first when true.")


class RefreshRequest(_Model):
    """Replace the connection token before it expires (or within the grace period after
    the server's ``refresh`` push).  The new token must name the same user."""

    type: Literal["refresh"]
    id: CommandId
    token: str = Field(min_length=1, max_length=8192)


class SubRefreshRequest(_Model):
    """Replace the subscription token of ``channel`` before it expires (or within the
    grace period after the server's ``sub_refresh`` push).  The new token must be a
    subscription token (``typ: "subscription"``) of the same user granting ``channel``."""

    type: Literal["sub_refresh"]
    id: CommandId
    channel: str = Field(max_length=1024)
    token: str = Field(min_length=1, max_length=8192)


class PingRequest(_Model):
    type: Literal["ping"]
    id: CommandId


class PongCommand(_Model):
    """Answer to a server ``ping`` push.  Has no id and gets no reply."""

    type: Literal["pong"]


#: The commands that carry an id and get exactly one reply (every command but ``pong``).
Request = (
    ConnectRequest
    | SubscribeRequest
    | UnsubscribeRequest
    | PublishRequest
    | RpcRequest
    | PresenceRequest
    | PresenceStatsRequest
    | HistoryRequest
    | PingRequest
    | RefreshRequest
    | SubRefreshRequest
)

Command = Annotated[Request | PongCommand, Field(discriminator="type")]

COMMAND_TYPES: frozenset[str] = frozenset(
    {
        "connect",
        "subscribe",
        "unsubscribe",
        "publish",
        "rpc",
        "presence",
        "presence_stats",
        "history",
        "ping",
        "refresh",
        "sub_refresh",
        "pong",
    }
)

# ---------------------------------------------------------------- results


class ConnectResult(_Model):
    client: str
    user: str
    version: str
    protocol: str = PROTOCOL_VERSION
    ping_interval: float = Field(description="Seconds between server pings; 0 when off.")
    pong_timeout: float


class ChannelSubscribeResult(_Model):
    channel: str
    epoch: str | None = None
    offset: int | None = Field(default=None, description="Stream top when subscribed.")
    recoverable: bool = False
    recovered: bool | None = Field(
        default=None, description="Set when `since` was given: were all missed publications sent?"
    )
    publications: list[PublicationModel] = Field(default_factory=list)
    error: ErrorInfo | None = None


class SubscribeResult(_Model):
    channels: list[ChannelSubscribeResult]


class UnsubscribeResult(_Model):
    channels: list[str]


class PublishResult(_Model):
    offset: int
    epoch: str


class RpcResult(_Model):
    data: Any = None


class PresenceResult(_Model):
    clients: dict[str, ClientInfoModel]


class PresenceStatsResult(_Model):
    num_clients: int
    num_users: int


class HistoryResult(_Model):
    publications: list[PublicationModel]
    offset: int
    epoch: str


class RefreshResult(_Model):
    expires_at: float | None = Field(
        default=None, description="When the new token expires (Unix time); null: never."
    )


class SubRefreshResult(_Model):
    expires_at: float | None = Field(
        default=None, description="When the new subscription token expires (Unix time); null: never."
    )


class PingResult(_Model):
    pass


class _Reply(_Model):
    id: int
    error: ErrorInfo | None = None


class ConnectReply(_Reply):
    type: Literal["connect"] = "connect"
    result: ConnectResult | None = None


class SubscribeReply(_Reply):
    type: Literal["subscribe"] = "subscribe"
    result: SubscribeResult | None = None


class UnsubscribeReply(_Reply):
    type: Literal["unsubscribe"] = "unsubscribe"
    result: UnsubscribeResult | None = None


class PublishReply(_Reply):
    type: Literal["publish"] = "publish"
    result: PublishResult | None = None


class RpcReply(_Reply):
    type: Literal["rpc"] = "rpc"
    result: RpcResult | None = None


class PresenceReply(_Reply):
    type: Literal["presence"] = "presence"
    result: PresenceResult | None = None


class PresenceStatsReply(_Reply):
    type: Literal["presence_stats"] = "presence_stats"
    result: PresenceStatsResult | None = None


class HistoryReply(_Reply):
    type: Literal["history"] = "history"
    result: HistoryResult | None = None


class RefreshReply(_Reply):
    type: Literal["refresh"] = "refresh"
    result: RefreshResult | None = None


class SubRefreshReply(_Reply):
    type: Literal["sub_refresh"] = "sub_refresh"
    result: SubRefreshResult | None = None


class PingReply(_Reply):
    type: Literal["ping"] = "ping"
    result: PingResult | None = None


class ErrorReply(_Model):
    """Reply to a frame whose type could not be read (the id could)."""

    id: int | None
    type: None = None
    error: ErrorInfo


# ---------------------------------------------------------------- pushes


class PublicationPush(_Model):
    type: Literal["publication"] = "publication"
    channel: str
    offset: int
    epoch: str
    data: Any
    info: ClientInfoModel | None = None


class JoinPush(_Model):
    type: Literal["join"] = "join"
    channel: str
    info: ClientInfoModel


class LeavePush(_Model):
    type: Literal["leave"] = "leave"
    channel: str
    info: ClientInfoModel


class DisconnectPush(_Model):
    type: Literal["disconnect"] = "disconnect"
    code: int
    reason: str
    reconnect: bool


class PingPush(_Model):
    """Sent every ``ping_interval`` seconds; answer with ``{"type": "pong"}``."""

    type: Literal["ping"] = "ping"


class RefreshPush(_Model):
    """The connection token expired: send a ``refresh`` command with a new token within
    ``grace`` seconds, or the server closes the connection with 4004 (TOKEN_EXPIRED)."""

    type: Literal["refresh"] = "refresh"
    grace: float


class SubRefreshPush(_Model):
    """The subscription token of ``channel`` expired: send a ``sub_refresh`` command with
    a new one within ``grace`` seconds, or the server ends the subscription (an
    ``unsubscribe`` push with code 112)."""

    type: Literal["sub_refresh"] = "sub_refresh"
    channel: str
    grace: float


class UnsubscribePush(_Model):
    """The server ended the subscription to ``channel`` (the connection stays open).

    ``code`` is an error code: 112 (TOKEN_EXPIRED) when the subscription token expired
    and no ``sub_refresh`` came within the grace period; subscribe again with a new token.
    """

    type: Literal["unsubscribe"] = "unsubscribe"
    channel: str
    code: int
    reason: str


Push = Annotated[
    PublicationPush
    | JoinPush
    | LeavePush
    | DisconnectPush
    | PingPush
    | RefreshPush
    | SubRefreshPush
    | UnsubscribePush,
    Field(discriminator="type"),
]

Reply = (
    ConnectReply
    | SubscribeReply
    | UnsubscribeReply
    | PublishReply
    | RpcReply
    | PresenceReply
    | PresenceStatsReply
    | HistoryReply
    | PingReply
    | RefreshReply
    | SubRefreshReply
    | ErrorReply
)

REPLY_MODELS: dict[str, type[_Reply]] = {
    "connect": ConnectReply,
    "subscribe": SubscribeReply,
    "unsubscribe": UnsubscribeReply,
    "publish": PublishReply,
    "rpc": RpcReply,
    "presence": PresenceReply,
    "presence_stats": PresenceStatsReply,
    "history": HistoryReply,
    "ping": PingReply,
    "refresh": RefreshReply,
    "sub_refresh": SubRefreshReply,
}
