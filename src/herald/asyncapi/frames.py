"""The frames of protocol v1 as the documents present them: code tables, per-frame docs, examples."""

from __future__ import annotations

import re
import typing
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..codes import CloseCode, ErrorCode, should_reconnect
from ..protocol import messages as m

if TYPE_CHECKING:
    pass


JSON = dict[str, Any]

SCHEMA_ID = "urn:herald:protocol:v1"
ASYNCAPI_VERSION = "3.0.0"
DEFS_REF = "#/$defs/{model}"
COMPONENTS_REF = "#/components/schemas/{model}"
KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")

# ---------------------------------------------------------------- code tables

#: What each reply error code means (the connection stays open after an error reply).
ERROR_CODE_MEANINGS: dict[ErrorCode, str] = {
    ErrorCode.INTERNAL: "The server failed while running the command; the failure is logged.",
    ErrorCode.BAD_REQUEST: "Malformed frame: not JSON, not an object, a missing or ill-typed "
    "field, an unknown field, or an out-of-range id.",
    ErrorCode.UNKNOWN_COMMAND: "The frame's `type` is not a protocol v1 command.",
    ErrorCode.NOT_CONNECTED: "A command other than `connect` was sent before `connect`.",
    ErrorCode.ALREADY_CONNECTED: "`connect` was sent twice on one connection.",
    ErrorCode.DUPLICATE_ID: "The id belongs to a command that is still in flight.",
    ErrorCode.INVALID_CHANNEL: "The channel name is empty, too long, uses a character outside "
    "`[A-Za-z0-9_.:@=,#!~-]` or starts with the reserved `$`.",
    ErrorCode.UNKNOWN_NAMESPACE: "The channel's namespace (the part before `:`) is not configured.",
    ErrorCode.ALREADY_SUBSCRIBED: "This connection is already subscribed to the channel.",
    ErrorCode.NOT_SUBSCRIBED: "This connection is not subscribed to any of the channels.",
    ErrorCode.PERMISSION_DENIED: "The namespace, a user-limited channel (`ns:room#alice`), a "
    "token or an application hook refused the command.",
    ErrorCode.UNAUTHORIZED: "The connection token is invalid (bad signature, audience, issuer).",
    ErrorCode.TOKEN_EXPIRED: "The token has expired: get a fresh one and connect again.",
    ErrorCode.METHOD_NOT_FOUND: "No RPC method of that name is registered.",
    ErrorCode.INVALID_PARAMS: "The RPC params do not match the method's params schema.",
    ErrorCode.LIMIT_EXCEEDED: "A limit was reached (subscriptions per connection, RPC calls in flight, ...).",
    ErrorCode.RATE_LIMITED: "Too many commands per second on this connection.",
    ErrorCode.TOO_LARGE: "The frame or a value in it is larger than allowed.",
    ErrorCode.NOT_AVAILABLE: "The feature is off for this namespace (history, presence) or the "
    "broker cannot do it.",
    ErrorCode.UNRECOVERABLE_POSITION: "The requested position is no longer in history, or the "
    "stream's epoch changed: re-sync from the current state.",
    ErrorCode.TOO_DEEP: "The JSON nests arrays/objects deeper than the server allows.",
    ErrorCode.BROKER_UNAVAILABLE: "The broker (Redis, NATS) cannot be reached; retry later.",
}

#: What each close code means; ``reconnect`` comes from :func:`herald.codes.should_reconnect`.
CLOSE_CODE_MEANINGS: dict[CloseCode, str] = {
    CloseCode.NORMAL: "Normal closure.",
    CloseCode.GOING_AWAY: "The server is going away.",
    CloseCode.UNSUPPORTED_DATA: "A binary frame was sent to a text-only endpoint.",
    CloseCode.INVALID_PAYLOAD: "Malformed JSON or invalid UTF-8 (tutorial endpoints).",
    CloseCode.POLICY_VIOLATION: "Refused by policy after the handshake (e.g. Origin).",
    CloseCode.MESSAGE_TOO_BIG: "A frame larger than the maximum message size.",
    CloseCode.INTERNAL_ERROR: "The server hit an unexpected error.",
    CloseCode.SERVICE_RESTART: "Graceful shutdown: reconnect (to another node) with backoff.",
    CloseCode.SERVER_CLOSED: "The server closed the connection; reconnect with backoff.",
    CloseCode.SLOW_CONSUMER: "The client read too slowly and its send queue filled up; "
    "reconnect and resume by offset.",
    CloseCode.NO_PONG: "No pong to a server ping within the pong timeout.",
    CloseCode.IDLE_TIMEOUT: "No subscriptions and no commands for the idle timeout.",
    CloseCode.TOKEN_EXPIRED: "The connection token expired; reconnect with a fresh one.",
    CloseCode.INSUFFICIENT_STATE: "The server lost state it needs (e.g. a broker stream); "
    "reconnect and re-sync.",
    CloseCode.PROTOCOL_VIOLATION: "The client broke the protocol in a way that ends the connection.",
    CloseCode.UNAUTHORIZED: "Authentication failed; do not reconnect with the same credentials.",
    CloseCode.FORCE_DISCONNECT: "Disconnected by the server API or the application.",
    CloseCode.CONNECTION_LIMIT: "Too many connections for this user or address.",
    CloseCode.RATE_LIMIT: "The client exceeded its inbound rate limit repeatedly.",
    CloseCode.HANDSHAKE_TIMEOUT: "No `connect` command within the handshake timeout.",
    CloseCode.BAD_REQUEST: "A request the server cannot serve on this connection.",
}


def error_codes() -> list[JSON]:
    """The reply error codes as ``[{"code", "name", "message", "meaning"}]``."""
    from ..codes import ERROR_MESSAGES

    return [
        {
            "code": int(code),
            "name": code.name,
            "message": ERROR_MESSAGES.get(code, code.name.lower()),
            "meaning": ERROR_CODE_MEANINGS.get(code, ""),
        }
        for code in ErrorCode
    ]


def close_codes() -> list[JSON]:
    """The close codes as ``[{"code", "name", "reconnect", "meaning"}]``."""
    return [
        {
            "code": int(code),
            "name": code.name,
            "reconnect": should_reconnect(int(code)),
            "meaning": CLOSE_CODE_MEANINGS.get(code, ""),
        }
        for code in CloseCode
    ]


# ---------------------------------------------------------------- frames and their docs


def _members(union: Any) -> list[type[Any]]:
    """The model classes of a (possibly ``Annotated``) union type."""
    if typing.get_origin(union) is typing.Annotated:
        union = typing.get_args(union)[0]
    return list(typing.get_args(union))


COMMAND_MODELS: list[type[Any]] = _members(m.Command)
REPLY_MODELS: list[type[Any]] = _members(m.Reply)
PUSH_MODELS: list[type[Any]] = _members(m.Push)

#: Per command type: (summary, description).  The reply has the same ``type``.
COMMAND_DOCS: dict[str, tuple[str, str]] = {
    "connect": (
        "Authenticate and start the session",
        "Must be the first command, within the handshake timeout (else close 4505). "
        "`token` is an optional JWT (HS256 or RS256; its `sub` is the user id). "
        "The result names the client id, the user, and the ping interval and pong timeout.",
    ),
    "subscribe": (
        "Subscribe to one or more channels",
        "Each channel succeeds or fails on its own (`error` in its result item). "
        "With `since` (offset and epoch of the last publication seen) the result carries the "
        "missed publications, in order, and `recovered: true`; when history no longer covers the "
        "gap or the epoch changed, `recovered: false` and the client must re-sync. Live "
        "publications follow the reply with no gap and no duplicate.",
    ),
    "unsubscribe": (
        "Leave channels",
        "Returns the channels that were left; error 109 when none was subscribed.",
    ),
    "publish": (
        "Publish to a channel",
        "Allowed when the namespace lets clients publish. The result is the publication's "
        "position (offset, epoch). Subscribers, the publisher included, get a `publication` push.",
    ),
    "rpc": (
        "Call an application method",
        "`method` names a handler the application registered; `params` are validated against "
        "its params schema (error 114 when they do not match). See the `rpc.*` operations for "
        "every method with its params and result schemas.",
    ),
    "presence": (
        "Who is subscribed to a channel",
        "Clients by client id, with user id and info. Needs presence on in the namespace.",
    ),
    "presence_stats": (
        "How many clients and users are in a channel",
        "Counts only; cheaper than `presence`.",
    ),
    "history": (
        "Read a channel's history",
        "Publications after `since` (or the latest ones), at most `limit` (capped by the "
        "server), oldest first unless `reverse`. Error 119 when the epoch changed.",
    ),
    "ping": ("Round trip check", "Replies with an empty result."),
    "refresh": (
        "Replace the connection token",
        "Send a fresh token (same user) before the current one expires, or within the grace "
        "period after a `refresh` push; the result says when the new token expires.",
    ),
    "sub_refresh": (
        "Replace a subscription token",
        "Send a fresh subscription token (`typ: subscription`, same user, granting the channel) "
        "before the current one expires, or within the grace period after a `sub_refresh` push; "
        "error 109 when not subscribed to the channel.",
    ),
    "pong": (
        "Answer a server ping",
        'Send `{"type": "pong"}` after each `ping` push; no id, no reply. Without it the '
        "server closes with 4002 after the pong timeout.",
    ),
}

PUSH_DOCS: dict[str, tuple[str, str]] = {
    "publication": (
        "A publication in a subscribed channel",
        "`offset` increases by one per publication in the channel's stream `epoch`; remember "
        "the last (offset, epoch) to resume with `since` after a reconnect.",
    ),
    "join": ("A client subscribed", "Sent when the namespace has presence and join/leave on."),
    "leave": ("A client unsubscribed or left", "Sent when the namespace has join/leave on."),
    "disconnect": (
        "The server is about to close the connection",
        "Sent just before the WebSocket close with the same code. `reconnect` says whether to "
        "reconnect (close codes 4000-4499 and 1012 yes, 4500-4999 no).",
    ),
    "ping": (
        "Server heartbeat",
        "Sent every `ping_interval` seconds; answer with a `pong` command.",
    ),
    "refresh": (
        "The connection token expired",
        "Send a `refresh` command with a new token within `grace` seconds, or the server "
        "closes the connection with 4004.",
    ),
    "sub_refresh": (
        "A subscription token expired",
        "Send a `sub_refresh` command with a new subscription token for `channel` within "
        "`grace` seconds, or the server ends that subscription with an `unsubscribe` push.",
    ),
    "unsubscribe": (
        "The server ended a subscription",
        "The connection stays open; `code` is an error code (112: the subscription token "
        "expired). Subscribe again, with a new token, to continue.",
    ),
}

#: One example of each message, by component message name (checked against the schema by tests).
EXAMPLES: dict[str, Any] = {
    "connectRequest": {"id": 1, "type": "connect", "token": "eyJhbGciOi...", "name": "web"},
    "connectReply": {
        "id": 1,
        "type": "connect",
        "result": {
            "client": "9f1c2d3e4a5b6c7d",
            "user": "alice",
            "version": __version__,
            "protocol": m.PROTOCOL_VERSION,
            "ping_interval": 25.0,
            "pong_timeout": 10.0,
        },
    },
    "subscribeRequest": {
        "id": 2,
        "type": "subscribe",
        "channels": [{"channel": "chat:lobby", "since": {"offset": 5, "epoch": "ab12"}}],
    },
    "subscribeReply": {
        "id": 2,
        "type": "subscribe",
        "result": {
            "channels": [
                {
                    "channel": "chat:lobby",
                    "epoch": "ab12",
                    "offset": 6,
                    "recoverable": True,
                    "recovered": True,
                    "publications": [
                        {"offset": 6, "data": {"text": "hi"}, "info": None},
                    ],
                }
            ]
        },
    },
    "unsubscribeRequest": {"id": 3, "type": "unsubscribe", "channels": ["chat:lobby"]},
    "unsubscribeReply": {"id": 3, "type": "unsubscribe", "result": {"channels": ["chat:lobby"]}},
    "publishRequest": {"id": 4, "type": "publish", "channel": "chat:lobby", "data": {"text": "hi"}},
    "publishReply": {"id": 4, "type": "publish", "result": {"offset": 7, "epoch": "ab12"}},
    "rpcRequest": {"id": 5, "type": "rpc", "method": "echo", "params": {"text": "hi"}},
    "rpcReply": {"id": 5, "type": "rpc", "result": {"data": {"text": "hi"}}},
    "presenceRequest": {"id": 6, "type": "presence", "channel": "chat:lobby"},
    "presenceReply": {
        "id": 6,
        "type": "presence",
        "result": {"clients": {"9f1c2d3e4a5b6c7d": {"client": "9f1c2d3e4a5b6c7d", "user": "alice"}}},
    },
    "presenceStatsRequest": {"id": 7, "type": "presence_stats", "channel": "chat:lobby"},
    "presenceStatsReply": {
        "id": 7,
        "type": "presence_stats",
        "result": {"num_clients": 3, "num_users": 2},
    },
    "historyRequest": {"id": 8, "type": "history", "channel": "chat:lobby", "limit": 10},
    "historyReply": {
        "id": 8,
        "type": "history",
        "result": {"publications": [{"offset": 7, "data": {"text": "hi"}}], "offset": 7, "epoch": "ab12"},
    },
    "pingRequest": {"id": 9, "type": "ping"},
    "refreshRequest": {"id": 10, "type": "refresh", "token": "eyJhbGciOi..."},
    "refreshReply": {"id": 10, "type": "refresh", "result": {"expires_at": 1767225600.0}},
    "refreshPush": {"type": "refresh", "grace": 30.0},
    "subRefreshRequest": {"id": 11, "type": "sub_refresh", "channel": "team:red", "token": "eyJhbGciOi..."},
    "subRefreshReply": {"id": 11, "type": "sub_refresh", "result": {"expires_at": 1767225600.0}},
    "subRefreshPush": {"type": "sub_refresh", "channel": "team:red", "grace": 10.0},
    "unsubscribePush": {
        "type": "unsubscribe",
        "channel": "team:red",
        "code": 112,
        "reason": "subscription token expired",
    },
    "pingReply": {"id": 9, "type": "ping", "result": {}},
    "pongCommand": {"type": "pong"},
    "errorReply": {"id": None, "type": None, "error": {"code": 101, "message": "malformed JSON"}},
    "publicationPush": {
        "type": "publication",
        "channel": "chat:lobby",
        "offset": 8,
        "epoch": "ab12",
        "data": {"text": "hello"},
        "info": {"client": "9f1c2d3e4a5b6c7d", "user": "alice", "info": None},
    },
    "joinPush": {"type": "join", "channel": "chat:lobby", "info": {"client": "c2", "user": "bob"}},
    "leavePush": {"type": "leave", "channel": "chat:lobby", "info": {"client": "c2", "user": "bob"}},
    "disconnectPush": {
        "type": "disconnect",
        "code": 4502,
        "reason": "disconnected by server",
        "reconnect": False,
    },
    "pingPush": {"type": "ping"},
}


def type_of(model: type[Any]) -> str | None:
    field = model.model_fields.get("type")
    if field is None:
        return None
    args = typing.get_args(field.annotation)
    return str(args[0]) if args else None


def frame_message_name(model: type[Any]) -> str:
    """``ConnectRequest`` -> ``connectRequest`` (AsyncAPI component message keys)."""
    name: str = model.__name__
    return name[0].lower() + name[1:]
