"""The HTTP server API under ``/api``: publish from any backend.

Protected by ``HERALD_API_KEY`` (send it as ``X-API-Key: KEY`` or
``Authorization: apikey KEY``).  Without a configured key the API answers only
requests from the loopback interface that name the server by a loopback name,
and says so in its 403.  The key, the ``Host`` and the body's size and time are
checked before the body is read (see :mod:`herald.apiguard`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel, Field

from .apiguard import HttpGate, guarded_route_class
from .brokers.base import StreamPosition
from .codes import CloseCode, ErrorCode
from .exceptions import BrokerError, CommandError, NotAvailableError
from .policy import Grant, Operation, check_epoch, clamp_history_limit, read_history
from .protocol.idempotency import IDEMPOTENCY_KEY_PATTERN, MAX_IDEMPOTENCY_KEY_LENGTH
from .protocol.messages import (
    MAX_ID,
    ClientInfoModel,
    ErrorInfo,
    HistoryResult,
    PresenceResult,
    PresenceStatsResult,
    PublicationModel,
    PublishResult,
)

logger = logging.getLogger("herald.api")

if TYPE_CHECKING:
    from .node import Node


class PublishBody(BaseModel):
    channel: str = Field(max_length=1024, examples=["chat:lobby"])
    data: Any = Field(examples=[{"text": "hello"}])
    idempotency_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_IDEMPOTENCY_KEY_LENGTH,
        pattern=IDEMPOTENCY_KEY_PATTERN,
        examples=["order-42"],
        description="Makes a retry safe: a publish with the same key to the same channel within "
        "the server's idempotency_window (300 s by default) publishes nothing and answers the "
        "original offset and epoch.  1 to 128 visible ASCII characters.",
    )


class BroadcastBody(BaseModel):
    channels: list[str] = Field(min_length=1, max_length=1000)
    data: Any
    idempotency_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_IDEMPOTENCY_KEY_LENGTH,
        pattern=IDEMPOTENCY_KEY_PATTERN,
        description="Applies per channel: a retried broadcast publishes to each channel at "
        "most once within the server's idempotency_window, and answers each channel's "
        "original offset and epoch.",
    )


class DisconnectBody(BaseModel):
    user: str = Field(min_length=1)
    code: int = Field(default=int(CloseCode.FORCE_DISCONNECT), ge=4000, le=4999)
    reason: str = Field(default="disconnected by server", max_length=120)


# The answers that are also protocol replies use the protocol's result models
# (herald.protocol.messages): one definition of the wire for sockets and HTTP.


class BroadcastItem(BaseModel):
    channel: str
    offset: int | None = None
    epoch: str | None = None
    error: ErrorInfo | None = None


class BroadcastOut(BaseModel):
    results: list[BroadcastItem]


class ChannelsOut(BaseModel):
    channels: dict[str, int] = Field(description="Channels with subscribers on this node, and counts.")


class DisconnectOut(BaseModel):
    disconnected: int = Field(
        description="Connections of the user closed on every node that answered (this one included)."
    )
    nodes: int = Field(description="Nodes that answered, this one included.")
    complete: bool = Field(
        description="Every node this node knows alive answered within the wait (2 s).  When false, "
        "`disconnected` lacks the counts of the nodes in `missing`; they still close the user's "
        "connections when the command reaches them."
    )
    missing: list[str] = Field(
        default_factory=list, description="Ids of the live nodes that did not answer in time."
    )


@contextlib.contextmanager
def _broker_errors() -> Iterator[None]:
    """A broker that cannot answer right now is a 503, not a 500."""
    try:
        yield
    except NotAvailableError as exc:
        raise HTTPException(409, detail={"code": int(ErrorCode.NOT_AVAILABLE), "message": str(exc)}) from None
    except BrokerError as exc:
        raise HTTPException(503, detail=f"broker unavailable: {exc}") from None
    except Exception as exc:  # redis/nats client errors that the broker did not wrap
        logger.exception("broker call failed")
        raise HTTPException(503, detail=f"broker unavailable: {type(exc).__name__}") from None


def _error(exc: CommandError) -> HTTPException:
    status = {
        ErrorCode.INVALID_CHANNEL: 400,
        ErrorCode.UNKNOWN_NAMESPACE: 404,
        ErrorCode.NOT_AVAILABLE: 409,
        ErrorCode.UNRECOVERABLE_POSITION: 409,
    }.get(exc.code, 400)
    return HTTPException(status, detail={"code": int(exc.code), "message": exc.message})


def build_api_router(node: Node) -> APIRouter:
    """The HTTP server API (``/api/...``) of ``node`` (its settings: ``node.settings``)."""
    settings = node.settings

    async def trusted_check(operation: Operation, channel: str) -> Grant:
        """The access policy for an API-key holder (trusted: only the channel's validity
        and the namespace's features are checked); HTTP errors on failure."""
        try:
            return await node.policy.check(None, operation, channel, trusted=True)
        except CommandError as exc:
            raise _error(exc) from None

    # Host, API key and the body's bounds are checked before FastAPI reads the body
    # (herald.apiguard), wherever this router is included.
    route_class = guarded_route_class(HttpGate(settings), require_key=True)
    router = APIRouter(prefix="/api", tags=["server API"], route_class=route_class)

    @router.post("/publish", response_model=PublishResult, summary="Publish to a channel")
    async def publish(body: PublishBody) -> PublishResult:
        try:
            position = await node.publish(body.channel, body.data, idempotency_key=body.idempotency_key)
        except CommandError as exc:
            raise _error(exc) from None
        except NotAvailableError as exc:
            raise _error(CommandError(ErrorCode.NOT_AVAILABLE, str(exc))) from None
        except BrokerError as exc:
            raise HTTPException(503, detail=f"broker unavailable: {exc}") from None
        return PublishResult(offset=position.offset, epoch=position.epoch)

    @router.post("/broadcast", response_model=BroadcastOut, summary="Publish one message to many channels")
    async def broadcast(body: BroadcastBody) -> BroadcastOut:
        results: list[BroadcastItem] = []
        for channel in body.channels:
            try:
                position = await node.publish(channel, body.data, idempotency_key=body.idempotency_key)
            except CommandError as exc:
                results.append(
                    BroadcastItem(channel=channel, error=ErrorInfo(code=int(exc.code), message=exc.message))
                )
            except NotAvailableError as exc:
                results.append(
                    BroadcastItem(
                        channel=channel, error=ErrorInfo(code=int(ErrorCode.NOT_AVAILABLE), message=str(exc))
                    )
                )
            except BrokerError as exc:
                results.append(
                    BroadcastItem(
                        channel=channel,
                        error=ErrorInfo(code=int(ErrorCode.BROKER_UNAVAILABLE), message=str(exc)),
                    )
                )
            else:
                results.append(BroadcastItem(channel=channel, offset=position.offset, epoch=position.epoch))
        return BroadcastOut(results=results)

    @router.get("/presence", response_model=PresenceResult, summary="Who is in a channel")
    async def presence(channel: Annotated[str, Query(max_length=1024)]) -> PresenceResult:
        name = (await trusted_check(Operation.PRESENCE, channel)).channel
        with _broker_errors():
            clients = await node.presence_of(name)
        return PresenceResult(clients={c: ClientInfoModel(**i.as_dict()) for c, i in clients.items()})

    @router.get("/presence_stats", response_model=PresenceStatsResult, summary="Presence counts")
    async def presence_stats(channel: Annotated[str, Query(max_length=1024)]) -> PresenceStatsResult:
        name = (await trusted_check(Operation.PRESENCE_STATS, channel)).channel
        with _broker_errors():
            stats = await node.presence_stats(name)
        return PresenceStatsResult(num_clients=stats.num_clients, num_users=stats.num_users)

    @router.get("/history", response_model=HistoryResult, summary="A channel's history")
    async def history(
        channel: Annotated[str, Query(max_length=1024)],
        limit: Annotated[int | None, Query(ge=0)] = None,
        since_offset: Annotated[int | None, Query(description=f"0 to {MAX_ID}")] = None,
        since_epoch: Annotated[str | None, Query(max_length=64)] = None,
        reverse: bool = False,
    ) -> HistoryResult:
        if since_offset is not None and not 0 <= since_offset <= MAX_ID:
            # An offset no stream can reach; the broker would fail on it (503) otherwise.
            raise _error(CommandError(ErrorCode.BAD_REQUEST, f"since_offset must be 0 to {MAX_ID}"))
        name = (await trusted_check(Operation.HISTORY, channel)).channel
        since = None
        if since_offset is not None:
            # Without since_epoch the offset is one of the current stream.
            since = StreamPosition(since_offset, since_epoch or "")
        # The same clamp, read and epoch check as the protocol's history command (herald.policy).
        with _broker_errors():
            result = await read_history(
                node.history,
                name,
                since=since,
                limit=clamp_history_limit(limit, settings.max_history_limit),
                reverse=reverse,
            )
        try:
            check_epoch(since, result.position)
        except CommandError as exc:
            raise _error(exc) from None
        return HistoryResult(
            publications=[
                PublicationModel(
                    offset=p.offset,
                    data=_loads(p.data),
                    info=ClientInfoModel(**p.info.as_dict()) if p.info else None,
                )
                for p in result.publications
            ],
            offset=result.position.offset,
            epoch=result.position.epoch,
        )

    @router.get("/channels", response_model=ChannelsOut, summary="Channels with subscribers on this node")
    async def channels() -> ChannelsOut:
        return ChannelsOut(channels={c: n for c, n in node.hub.channels().items() if not c.startswith("$")})

    @router.post(
        "/disconnect",
        response_model=DisconnectOut,
        summary="Disconnect every connection of a user, on every node",
        description="Closes the user's connections here and asks every node this node knows alive "
        "(heartbeats on the control channel) to close theirs; answers the cluster-wide count once "
        "every such node answered, or after 2 s.",
    )
    async def disconnect(body: DisconnectBody) -> DisconnectOut:
        try:
            result = await node.disconnect_user(body.user, body.code, body.reason)
        except BrokerError as exc:
            # Local connections are closed; other nodes could not be told.
            raise HTTPException(503, detail=f"broker unavailable: {exc}") from None
        return DisconnectOut(
            disconnected=result.disconnected,
            nodes=result.nodes,
            complete=result.complete,
            missing=result.missing,
        )

    return router


def _loads(data: bytes) -> Any:
    import orjson

    return orjson.loads(data)
