"""The HTTP server API under ``/api``: publish from any backend.

Protected by ``HERALD_API_KEY`` (send it as ``X-API-Key: KEY`` or
``Authorization: apikey KEY``).  Without a configured key the API answers only
requests from the loopback interface that name the server by a loopback name,
and says so in its 403.  The key, the ``Host`` and the body's size and time are
checked before the body is read (see :mod:`herald.apiguard`).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, cast

import orjson
from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field

from .apiguard import HttpGate, guarded_route_class
from .brokers.base import StreamPosition
from .codes import CloseCode, ErrorCode
from .exceptions import BrokerError, CommandError, NotAvailableError
from .policy import Grant, Operation, check_epoch, clamp_history_limit, read_history
from .protocol.codec import LONG_DIGITS, json_depth_exceeds, json_key_count_exceeds
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
    from .config import Settings
    from .node import Node


# ---------------------------------------------------------------- request bodies
#
# A body is parsed once, by orjson, strictly: what the WebSocket protocol refuses in a
# frame, the API refuses in a body (docs/http-api.md#errors), so that a publication
# always reaches every subscriber as the JSON it was sent as, and never fails to encode
# on its way out.  Python's json module (FastAPI's parser) accepts
# NaN, Infinity, lone UTF-16 surrogates and integers of any size, which orjson then
# cannot encode or encodes as null.

#: The integers a publication may carry: those orjson encodes (and parses) exactly.
MIN_JSON_INT = -(2**63)
MAX_JSON_INT = 2**64 - 1
_NON_NUMBERS = ("NaN", "Infinity", "-Infinity")


def _refuse(code: ErrorCode, message: str) -> HTTPException:
    return HTTPException(400, detail={"code": int(code), "message": message})


def _explained(exc: orjson.JSONDecodeError) -> str:
    """orjson's message for a body it refused, with what a sender may not know."""
    message = exc.msg
    doc = exc.doc if isinstance(exc.doc, str) else ""
    if doc.startswith(_NON_NUMBERS, max(exc.pos - 1, 0)) or doc.startswith(_NON_NUMBERS, exc.pos):
        return f"{message} (NaN and Infinity are not JSON numbers)"
    if "infinity" in message:
        return f"{message} (a JSON number must fit in a 64-bit float)"
    if "surrogate" in message:
        return f"{message} (a lone UTF-16 surrogate escape is not Unicode text)"
    return message


def _check_int(text: str) -> int:
    value = int(text)  # ValueError past Python's 4300 digits: out of range too
    if not MIN_JSON_INT <= value <= MAX_JSON_INT:
        raise ValueError(text)
    return value


def _has_huge_int(body: bytes) -> bool:
    """Whether ``body`` (strict JSON, within the depth limit) holds an integer outside
    :data:`MIN_JSON_INT`..:data:`MAX_JSON_INT` (orjson would parse it as a float)."""
    try:
        json.loads(body, parse_int=_check_int)
    except ValueError:
        return True
    except RecursionError:
        # Nesting past ~990 levels (max_json_depth allows 1000): orjson cannot encode
        # such data either, and _encode_data refuses it.
        return False
    return False


def parse_api_json(body: bytes, *, max_depth: int, max_keys: int) -> Any:
    """Parse an HTTP API body as the WebSocket protocol parses a frame: strict JSON
    (orjson), within ``max_json_depth`` and ``max_json_keys``, integers within 64 bits.

    Raises ``json.JSONDecodeError`` (FastAPI's 422 ``json_invalid``) for what is not
    JSON (NaN, Infinity, numbers past a double, lone surrogates, invalid UTF-8, bad
    syntax) and ``HTTPException`` 400 with code 120 (nested too deeply), 117 (too many
    keys) or 101 (an integer out of range).
    """
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if "depth limit" in exc.msg or "recursion" in exc.msg.lower():
            raise _refuse(
                ErrorCode.TOO_DEEP, f"JSON nested deeper than {max_depth} levels (max_json_depth)"
            ) from None
        raise json.JSONDecodeError(_explained(exc), exc.doc, exc.pos) from None
    # The same cheap bounds as the protocol codec: every array or object opens with "["
    # or "{" and every key is followed by ":", so a body with few of them skips the walks.
    if body.count(b"{") + body.count(b"[") > max_depth and json_depth_exceeds(value, max_depth):
        raise _refuse(ErrorCode.TOO_DEEP, f"JSON nested deeper than {max_depth} levels (max_json_depth)")
    if body.count(b":") > max_keys and json_key_count_exceeds(value, max_keys):
        raise _refuse(ErrorCode.TOO_LARGE, f"more than {max_keys} object keys in the body (max_json_keys)")
    if LONG_DIGITS.search(body) is not None and _has_huge_int(body):
        raise _refuse(
            ErrorCode.BAD_REQUEST,
            f"integer out of range: JSON integers must be {MIN_JSON_INT} to {MAX_JSON_INT}",
        )
    return value


class _StrictJSONRequest(Request):
    """A request whose ``json()`` is :func:`parse_api_json` (FastAPI parses a route's
    body with ``request.json()``)."""

    settings: Settings

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            settings = self.settings
            self._json = parse_api_json(
                await self.body(), max_depth=settings.max_json_depth, max_keys=settings.max_json_keys
            )
        return self._json


class _StrictJSONRoute(APIRoute):
    """Routes whose JSON bodies are parsed by :func:`parse_api_json` (mixed into the
    guarded route class, see :func:`_api_route_class`)."""

    json_settings: ClassVar[Settings | None] = None

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        settings = self.json_settings
        if settings is None:
            return handler

        async def strict_handler(request: Request) -> Response:
            strict = _StrictJSONRequest(request.scope, request.receive)
            strict.settings = settings
            return await handler(strict)

        return strict_handler


def _api_route_class(settings: Settings) -> type[APIRoute]:
    """The API's route class: the gate's checks before the body is read
    (:mod:`herald.apiguard`), then the body parsed strictly."""
    guarded = guarded_route_class(HttpGate(settings), require_key=True)
    return cast(
        "type[APIRoute]",
        type("HeraldApiRoute", (_StrictJSONRoute, guarded), {"json_settings": settings}),
    )


def _encode_data(data: Any) -> bytes:
    """``data`` as JSON, once (broadcast reuses it for every channel).  A strictly parsed
    body always encodes, unless ``max_json_depth`` is set past orjson's 255 levels."""
    try:
        return orjson.dumps(data)
    except orjson.JSONEncodeError as exc:
        raise _refuse(ErrorCode.BAD_REQUEST, f"data cannot be encoded as JSON: {exc}") from None


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
    # Then the body is parsed strictly, within the protocol's JSON limits (parse_api_json).
    router = APIRouter(prefix="/api", tags=["server API"], route_class=_api_route_class(settings))

    @router.post("/publish", response_model=PublishResult, summary="Publish to a channel")
    async def publish(body: PublishBody) -> PublishResult:
        data_json = _encode_data(body.data)
        try:
            name, options = node.check_channel(body.channel)
            position = await node.publish_json(name, data_json, options, idempotency_key=body.idempotency_key)
        except CommandError as exc:
            raise _error(exc) from None
        except NotAvailableError as exc:
            raise _error(CommandError(ErrorCode.NOT_AVAILABLE, str(exc))) from None
        except BrokerError as exc:
            raise HTTPException(503, detail=f"broker unavailable: {exc}") from None
        return PublishResult(offset=position.offset, epoch=position.epoch)

    @router.post("/broadcast", response_model=BroadcastOut, summary="Publish one message to many channels")
    async def broadcast(body: BroadcastBody) -> BroadcastOut:
        data_json = _encode_data(body.data)  # once for every channel
        results: list[BroadcastItem] = []
        for channel in body.channels:
            try:
                name, options = node.check_channel(channel)
                position = await node.publish_json(
                    name, data_json, options, idempotency_key=body.idempotency_key
                )
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
