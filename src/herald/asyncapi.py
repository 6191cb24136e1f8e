"""The typed contract: JSON Schema of protocol v1, an AsyncAPI 3.0 document, its docs page.

Everything here is generated from the pydantic models in :mod:`herald.protocol.messages`,
the node's namespaces (:class:`~herald.config.NamespaceOptions`) and the RPC methods the
application registered, so the contract cannot drift from the code:

* :func:`protocol_json_schema` -- JSON Schema (draft 2020-12) of every frame, with
  ``$defs/ClientFrame`` (commands) and ``$defs/ServerFrame`` (replies | pushes).
  ``scripts/export_schema.py`` writes it to ``docs/schema/protocol.schema.json``.
* :func:`typescript_definitions` -- the same schema as TypeScript declarations
  (``src/herald/static/herald-protocol.d.ts``).
* :func:`build_asyncapi` -- the AsyncAPI 3.0 document served at ``/asyncapi.json``.
* :func:`render_html` -- a self-contained page for it (``/asyncapi``), no CDN, all text escaped.

This module is pure: it imports neither FastAPI nor anything that does I/O.
"""

from __future__ import annotations

import copy
import html
import json
import re
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from pydantic import TypeAdapter
from pydantic.json_schema import JsonSchemaMode

from . import __version__
from .codes import CloseCode, ErrorCode, should_reconnect
from .config import NamespaceOptions, Settings
from .protocol import messages as m

if TYPE_CHECKING:
    from .node import RpcMethod

JSON = dict[str, Any]

SCHEMA_ID = "urn:herald:protocol:v1"
ASYNCAPI_VERSION = "3.0.0"
_DEFS_REF = "#/$defs/{model}"
_COMPONENTS_REF = "#/components/schemas/{model}"
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")

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
    from .codes import ERROR_MESSAGES

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


def _type_of(model: type[Any]) -> str | None:
    field = model.model_fields.get("type")
    if field is None:
        return None
    args = typing.get_args(field.annotation)
    return str(args[0]) if args else None


def _message_name(model: type[Any]) -> str:
    """``ConnectRequest`` -> ``connectRequest`` (AsyncAPI component message keys)."""
    name: str = model.__name__
    return name[0].lower() + name[1:]


# ---------------------------------------------------------------- JSON Schema


def _generate(
    items: Iterable[tuple[str, JsonSchemaMode, Any]], ref_template: str = _DEFS_REF
) -> tuple[dict[str, JSON], dict[str, JSON]]:
    """JSON Schemas of several types with one shared ``$defs``: (schema by key, defs)."""
    inputs = [(key, mode, TypeAdapter(tp)) for key, mode, tp in items]
    by_key, defs = TypeAdapter.json_schemas(inputs, ref_template=ref_template)
    return {key: schema for (key, _), schema in by_key.items()}, dict(defs.get("$defs", {}))


#: A reply has a non-null ``result`` or a non-null ``error``, never both.
_EXACTLY_ONE_OF_RESULT_OR_ERROR: list[JSON] = [
    {"required": ["result"], "properties": {"result": {"not": {"type": "null"}}}},
    {"required": ["error"], "properties": {"error": {"not": {"type": "null"}}}},
]


def _refine_server_frames(defs: dict[str, JSON]) -> None:
    """Say in the schema what the server guarantees but pydantic cannot express.

    Every server frame carries ``type`` (it has a default in the models, so pydantic would
    make it optional), and a reply carries exactly one of ``result`` and ``error``.
    """
    for model in [*REPLY_MODELS, *PUSH_MODELS]:
        schema = defs[model.__name__]
        required = schema.setdefault("required", [])
        if "type" not in required:
            required.insert(0, "type")
        if model in REPLY_MODELS and "result" in schema.get("properties", {}):
            schema["oneOf"] = copy.deepcopy(_EXACTLY_ONE_OF_RESULT_OR_ERROR)


def protocol_json_schema() -> JSON:
    """JSON Schema (draft 2020-12) of every protocol v1 frame.

    ``$defs`` holds every model plus four unions: ``ClientFrame`` (any command),
    ``Reply``, ``Push`` and ``ServerFrame`` (``Reply | Push``: every frame the server
    sends on ``/connect``).  The root accepts any client or server frame.
    """
    keys, defs = _generate(
        [
            ("ClientFrame", "validation", m.Command),
            ("Reply", "serialization", m.Reply),
            ("Push", "serialization", m.Push),
        ]
    )
    _refine_server_frames(defs)
    defs["ClientFrame"] = {
        "description": "A frame a client sends: a command (or `pong`).",
        **keys["ClientFrame"],
    }
    defs["Reply"] = {"description": "The reply to one command, with its id.", **keys["Reply"]}
    defs["Push"] = {"description": "A frame the server sends on its own (no id).", **keys["Push"]}
    defs["ServerFrame"] = {
        "description": "Any frame the server sends on /connect.",
        "anyOf": [{"$ref": "#/$defs/Reply"}, {"$ref": "#/$defs/Push"}],
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": f"Herald protocol v{m.PROTOCOL_VERSION}",
        "description": "Every JSON text frame on the /connect WebSocket (subprotocol "
        f"{m.SUBPROTOCOL}). Generated from herald.protocol.messages by "
        "scripts/export_schema.py; do not edit.",
        "anyOf": [{"$ref": "#/$defs/ClientFrame"}, {"$ref": "#/$defs/ServerFrame"}],
        "$defs": dict(sorted(defs.items())),
    }


# ---------------------------------------------------------------- TypeScript


def _ts_literal(value: Any) -> str:
    return json.dumps(value)


def _ts_type(schema: Any, ref_name: Callable[[str], str] = lambda ref: ref.rsplit("/", 1)[-1]) -> str:
    """A TypeScript type expression for a JSON Schema."""
    if schema is True or schema == {} or not isinstance(schema, dict):
        return "unknown"
    if "$ref" in schema:
        return ref_name(schema["$ref"])
    if "const" in schema:
        return _ts_literal(schema["const"])
    if "enum" in schema:
        return " | ".join(_ts_literal(v) for v in schema["enum"])
    for key in ("anyOf", "oneOf"):
        options = [o for o in schema.get(key, []) if not set(o) <= {"required", "description"}]
        if options:
            parts: list[str] = []
            for option in options:
                text = _ts_type(option, ref_name)
                if text not in parts:
                    parts.append(text)
            return " | ".join(parts)
    kind = schema.get("type")
    if isinstance(kind, list):
        return " | ".join(_ts_type({**schema, "type": k}, ref_name) for k in kind)
    if kind == "string":
        return "string"
    if kind in ("integer", "number"):
        return "number"
    if kind == "boolean":
        return "boolean"
    if kind == "null":
        return "null"
    if kind == "array":
        item = _ts_type(schema.get("items", {}), ref_name)
        return f"({item})[]" if "|" in item else f"{item}[]"
    if kind == "object" or "properties" in schema:
        return _ts_object(schema, ref_name, indent="")
    return "unknown"


_IDENT = re.compile(r"^[A-Za-z_$][A-Za-z0-9_$]*$")


def _ts_doc(text: str | None, indent: str) -> list[str]:
    if not text:
        return []
    text = text.replace("*/", "*\\/")
    lines = text.strip().splitlines()
    if len(lines) == 1:
        return [f"{indent}/** {lines[0]} */"]
    return [f"{indent}/**", *(f"{indent} * {line}".rstrip() for line in lines), f"{indent} */"]


def _ts_object(schema: JSON, ref_name: Callable[[str], str], indent: str) -> str:
    properties: dict[str, Any] = schema.get("properties", {})
    extra = schema.get("additionalProperties")
    if not properties:
        if isinstance(extra, dict):
            return f"Record<string, {_ts_type(extra, ref_name)}>"
        return "Record<string, never>" if extra is False else "Record<string, unknown>"
    required = set(schema.get("required", []))
    lines = ["{"]
    for name, prop in properties.items():
        key = name if _IDENT.match(name) else json.dumps(name)
        optional = "" if name in required else "?"
        lines.extend(_ts_doc(prop.get("description") if isinstance(prop, dict) else None, indent + "  "))
        lines.append(f"{indent}  {key}{optional}: {_ts_type(prop, ref_name)};")
    lines.append(f"{indent}}}")
    return "\n".join(lines)


def typescript_definitions(schema: JSON) -> str:
    """TypeScript declarations for every ``$defs`` entry of :func:`protocol_json_schema`.

    Objects become interfaces, unions become type aliases; ``ResultTypes`` maps each
    command type to its result interface.
    """
    defs: dict[str, JSON] = schema["$defs"]
    out = [
        "// Herald protocol v" + m.PROTOCOL_VERSION + " frame types.",
        "// Generated by scripts/export_schema.py from docs/schema/protocol.schema.json: do not edit.",
        "",
    ]
    result_types: list[tuple[str, str]] = []
    for name, definition in defs.items():
        out.extend(_ts_doc(definition.get("description"), ""))
        is_object = definition.get("type") == "object" and bool(definition.get("properties"))
        if is_object:
            out.append(f"export interface {name} {_ts_object(definition, _ref_tail, '')}")
        else:
            out.append(f"export type {name} = {_ts_type(definition, _ref_tail)};")
        out.append("")
        props = definition.get("properties", {})
        kind = props.get("type", {}).get("const")
        if isinstance(kind, str) and "result" in props and "id" in props:
            result_types.append((kind, _ts_type(props["result"], _ref_tail).replace(" | null", "")))
    out.append("/** The result type of each command's reply, by command type. */")
    out.append("export interface ResultTypes {")
    out.extend(f"  {kind}: {result};" for kind, result in sorted(result_types))
    out.append("}")
    out.append("")
    out.append("/** Command types that get a reply. */")
    out.append("export type CommandType = keyof ResultTypes;")
    out.append("")
    return "\n".join(out)


def _ref_tail(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


# ---------------------------------------------------------------- AsyncAPI


def _asyncapi_schema(node: Any) -> Any:
    """Turn a pydantic JSON Schema into an AsyncAPI Schema Object.

    ``$defs`` refs point into ``components/schemas`` and OpenAPI-style ``discriminator``
    objects are dropped (AsyncAPI's discriminator is a different, string-valued keyword;
    the ``const`` of each member's ``type`` already tells the members apart).
    """
    if isinstance(node, dict):
        out: JSON = {}
        for key, value in node.items():
            if key == "discriminator" and isinstance(value, dict):
                continue
            if key == "$ref" and isinstance(value, str) and value.startswith("#/$defs/"):
                out[key] = "#/components/schemas/" + value[len("#/$defs/") :]
                continue
            out[key] = _asyncapi_schema(value)
        return out
    if isinstance(node, list):
        return [_asyncapi_schema(item) for item in node]
    return node


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _duration(seconds: float) -> str:
    if seconds == 0:
        return "forever"
    if seconds % 3600 == 0:
        return f"{int(seconds // 3600)} h"
    if seconds % 60 == 0:
        return f"{int(seconds // 60)} min"
    return f"{seconds:g} s"


def describe_namespace(name: str, options: NamespaceOptions) -> str:
    """A short, human-readable account of what channels of a namespace do."""
    where = f"Channels `{name}:<name>`" if name else "Channels without a namespace prefix (`<name>`)"
    if options.history_size > 0:
        history = (
            f"History: the last {options.history_size} publications, kept "
            f"{_duration(options.history_ttl)}; a reconnecting client resumes with `since` and "
            "gets exactly what it missed (`recovered: true`) while history covers the gap."
        )
    else:
        history = "History: off, so no recovery (`recoverable: false`)."
    presence = (
        f"Presence: {'on' if options.presence else 'off'}; join/leave pushes: "
        f"{'on' if options.presence and options.join_leave else 'off'}."
    )
    rights = (
        f"Clients may subscribe: {_yes(options.allow_subscribe)}; publish: "
        f"{_yes(options.allow_publish)} (the HTTP API and the application always may); "
        f"read history: {_yes(options.allow_history)}; read presence: "
        f"{_yes(options.allow_presence)}; anonymous clients (no user id): "
        f"{'allowed' if options.allow_anonymous else 'refused'}."
    )
    return f"{where}. {history} {presence} {rights}"


def _rpc_schemas(rpc_methods: Mapping[str, RpcMethod]) -> tuple[dict[str, tuple[Any, Any]], list[str]]:
    """Pick the RPC params/result types that pydantic can describe.

    Returns ``{method: (params_type | None, result_type | None)}`` and notes for methods
    whose types could not be turned into JSON Schema (they are documented as any JSON).
    """
    from .node import ClientContext

    usable: dict[str, tuple[Any, Any]] = {}
    notes: list[str] = []
    for name, method in sorted(rpc_methods.items()):
        picked: list[Any] = []
        for tp in (method.params_type, method.result_type):
            if tp is None or tp is ClientContext or tp is type(None) or tp is Any:
                picked.append(None)
                continue
            try:
                TypeAdapter(tp).json_schema()
            except Exception as exc:  # any type pydantic cannot describe: document as any JSON
                notes.append(f"{name}: {type(exc).__name__}")
                picked.append(None)
                continue
            picked.append(tp)
        usable[name] = (picked[0], picked[1])
    return usable, notes


def _message(name: str, payload: JSON, summary: str, description: str = "", *, title: str = "") -> JSON:
    message: JSON = {
        "name": name,
        "title": title or name,
        "summary": summary,
        "contentType": "application/json",
        "payload": payload,
    }
    if description:
        message["description"] = description
    example = EXAMPLES.get(name)
    if example is not None:
        message["examples"] = [{"name": name, "payload": example}]
    return message


def _key(text: str) -> str:
    return _KEY_UNSAFE.sub("_", text) or "_"


def build_asyncapi(
    settings: Settings,
    rpc_methods: Mapping[str, RpcMethod] | None = None,
    *,
    host: str | None = None,
    secure: bool = False,
    title: str = "Herald",
    description: str | None = None,
) -> JSON:
    """The AsyncAPI 3.0 document of a Herald node.

    ``host`` is ``host:port`` as clients reach the server (default: the settings' bind
    address); ``secure`` selects ``wss``.  ``rpc_methods`` are the node's registered
    methods; each becomes an ``rpc.<name>`` operation with its params and result schemas.
    """
    rpc_methods = rpc_methods or {}
    rpc_types, rpc_notes = _rpc_schemas(rpc_methods)
    items: list[tuple[str, JsonSchemaMode, Any]] = [
        ("ClientFrame", "validation", m.Command),
        ("Reply", "serialization", m.Reply),
        ("Push", "serialization", m.Push),
    ]
    for name, (params_type, result_type) in rpc_types.items():
        if params_type is not None:
            items.append((f"params:{name}", "validation", params_type))
        if result_type is not None:
            items.append((f"result:{name}", "serialization", result_type))
    keys, defs = _generate(items)
    _refine_server_frames(defs)
    schemas: JSON = {name: _asyncapi_schema(schema) for name, schema in sorted(defs.items())}

    server_host = host or f"{settings.host}:{settings.port}"
    doc: JSON = {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": title,
            "version": __version__,
            "description": description
            or (
                "Real-time messaging over WebSocket. Protocol v"
                f"{m.PROTOCOL_VERSION} runs on `/connect` (subprotocol `{m.SUBPROTOCOL}`): JSON "
                "text frames; every command has an `id` and gets exactly one reply with the same "
                "`id` and `type`, carrying `result` or `error` (`{code, message}`; the connection "
                "stays open). Frames without an id are pushes. Channels are named "
                "`namespace:name`; each namespace below says what its channels do. Close codes "
                "4000-4499 mean reconnect (with backoff, resuming by offset), 4500-4999 mean do "
                "not. The JSON Schema of every frame is in `components/schemas`; the unions "
                "`ClientFrame` and `ServerFrame` are in docs/schema/protocol.schema.json."
            ),
            "x-herald-protocol-version": m.PROTOCOL_VERSION,
        },
        "defaultContentType": "application/json",
        "servers": {
            "herald": {
                "host": server_host,
                "protocol": "wss" if secure else "ws",
                "description": "This Herald node. The Origin header must be the server's own "
                "origin or an allowed one; browsers pass tokens in the connect command.",
            }
        },
    }

    # -- messages: every frame model, plus per-method RPC messages
    messages: JSON = {}
    for models, docs, role in ((COMMAND_MODELS, COMMAND_DOCS, "command"), (PUSH_MODELS, PUSH_DOCS, "push")):
        for model in models:
            kind = _type_of(model) or ""
            summary, text = docs.get(kind, (kind, ""))
            name = _message_name(model)
            messages[name] = _message(
                name,
                {"$ref": _COMPONENTS_REF.format(model=model.__name__)},
                summary,
                text,
                title=f"{kind} {role}",
            )
    for model in REPLY_MODELS:
        reply_kind = _type_of(model)
        name = _message_name(model)
        if reply_kind is None:
            summary, title_text = "Error for a frame whose type could not be read", "error reply"
        else:
            summary, title_text = f"Reply to {reply_kind}", f"{reply_kind} reply"
        messages[name] = _message(
            name, {"$ref": _COMPONENTS_REF.format(model=model.__name__)}, summary, title=title_text
        )

    rpc_ops: dict[str, tuple[str, str]] = {}
    for method_name, (params_type, result_type) in rpc_types.items():
        key = _key(method_name)
        params_schema = _asyncapi_schema(keys[f"params:{method_name}"]) if params_type is not None else {}
        result_schema = _asyncapi_schema(keys[f"result:{method_name}"]) if result_type is not None else {}
        request_name, reply_name = f"rpc.{key}.request", f"rpc.{key}.reply"
        handler = rpc_methods[method_name].handler
        doc_text = (getattr(handler, "__doc__", None) or "").strip()
        messages[request_name] = _message(
            request_name,
            {
                "type": "object",
                "description": f"An rpc command calling `{method_name}`.",
                "properties": {
                    "type": {"const": "rpc", "type": "string"},
                    "id": _asyncapi_schema(defs["RpcRequest"]["properties"]["id"]),
                    "method": {"const": method_name, "type": "string"},
                    "params": params_schema,
                },
                "required": ["type", "id", "method"],
                "additionalProperties": False,
            },
            f"Call {method_name}",
            doc_text,
            title=f"rpc {method_name}",
        )
        messages[reply_name] = _message(
            reply_name,
            {
                "type": "object",
                "description": f"The reply to an rpc call of `{method_name}`.",
                "properties": {
                    "type": {"const": "rpc", "type": "string"},
                    "id": {"type": "integer"},
                    "result": {
                        "type": "object",
                        "properties": {"data": result_schema},
                        "additionalProperties": False,
                    },
                    "error": {"$ref": _COMPONENTS_REF.format(model="ErrorInfo")},
                },
                "required": ["type", "id"],
                "oneOf": copy.deepcopy(_EXACTLY_ONE_OF_RESULT_OR_ERROR),
                "additionalProperties": False,
            },
            f"Result of {method_name}",
            title=f"rpc {method_name} reply",
        )
        rpc_ops[method_name] = (request_name, reply_name)

    # -- channels
    connect_messages = {name: {"$ref": f"#/components/messages/{name}"} for name in messages}
    channels: JSON = {
        "connect": {
            "address": "/connect",
            "title": f"Protocol v{m.PROTOCOL_VERSION}",
            "summary": "Commands, replies and pushes over one WebSocket.",
            "description": "Open a WebSocket to `/connect` with subprotocol "
            f"`{m.SUBPROTOCOL}`, send `connect` first (within {settings.handshake_timeout:g} s), "
            "then any command. Frames are JSON text, at most "
            f"{settings.max_message_size} bytes, nested at most {settings.max_json_depth} levels. "
            f"A connection may hold {settings.max_subscriptions} subscriptions. The server pings "
            f"every {settings.ping_interval:g} s (0: never) and closes with 4002 when no pong "
            f"arrives within {settings.pong_timeout:g} s. Channel names: 1..{settings.max_channel_length} "
            "characters from `[A-Za-z0-9_.:@=,#!~-]`; `ns:room#alice,bob` is readable only by "
            "users alice and bob.",
            "servers": [{"$ref": "#/servers/herald"}],
            "messages": connect_messages,
            "bindings": {
                "ws": {
                    "method": "GET",
                    "headers": {
                        "type": "object",
                        "properties": {
                            "Sec-WebSocket-Protocol": {
                                "type": "string",
                                "const": m.SUBPROTOCOL,
                                "description": "Optional; the server selects it when offered.",
                            },
                            "Origin": {
                                "type": "string",
                                "description": "Checked before accept: same origin, or an "
                                "allowed origin; missing Origin is "
                                + ("accepted." if settings.allow_missing_origin else "refused."),
                            },
                        },
                    },
                    "bindingVersion": "0.1.0",
                }
            },
            "x-herald-subprotocol": m.SUBPROTOCOL,
        }
    }
    namespace_channels: dict[str, str] = {}
    for ns_name, options in sorted(settings.namespaces.items()):
        key = f"namespace.{_key(ns_name)}" if ns_name else "namespace.default"
        ns_messages = {"publicationPush": {"$ref": "#/components/messages/publicationPush"}}
        if options.presence and options.join_leave:
            ns_messages["joinPush"] = {"$ref": "#/components/messages/joinPush"}
            ns_messages["leavePush"] = {"$ref": "#/components/messages/leavePush"}
        channels[key] = {
            "address": f"{ns_name}:{{channel}}" if ns_name else "{channel}",
            "title": f"Namespace {ns_name}" if ns_name else "Default namespace",
            "description": describe_namespace(ns_name, options)
            + " Subscribe with the `subscribe` command on `/connect`; pushes arrive there too.",
            "parameters": {"channel": {"description": "The channel name after the namespace."}},
            "servers": [{"$ref": "#/servers/herald"}],
            "messages": ns_messages,
            "x-herald-namespace": {"name": ns_name, **options.model_dump(mode="json")},
        }
        namespace_channels[ns_name] = key

    text_payload = {"type": "string"}
    tutorial: dict[str, tuple[str, str, JSON]] = {
        "ws": (
            "/ws",
            "The tutorial's echo endpoint: each text message is answered with `Message text was: {data}`.",
            {"type": "string", "pattern": "^Message text was: "},
        ),
        "ws_json": (
            "/ws_json",
            "The tutorial's JSON endpoint: each JSON message is answered with "
            '`{"message": "Received JSON data", "data": <the JSON>}`; malformed JSON gets '
            '`{"error": {"code": 1007, "message": ...}}` and close 1007.',
            {
                "oneOf": [
                    {
                        "type": "object",
                        "properties": {
                            "message": {"const": "Received JSON data", "type": "string"},
                            "data": {},
                        },
                        "required": ["message", "data"],
                        "additionalProperties": False,
                    },
                    {
                        "type": "object",
                        "properties": {"error": {"$ref": _COMPONENTS_REF.format(model="ErrorInfo")}},
                        "required": ["error"],
                        "additionalProperties": False,
                    },
                ]
            },
        ),
        "ws_broadcast": (
            "/ws_broadcast",
            "The tutorial's broadcast endpoint: each text message reaches every other client "
            "(on every node with a shared broker) as `New message: {data}`.",
            {"type": "string", "pattern": "^New message: "},
        ),
    }
    for key, (address, text, out_payload) in tutorial.items():
        in_name, out_name = f"{key}.in", f"{key}.out"
        in_payload = {} if key == "ws_json" else text_payload
        messages[in_name] = _message(in_name, in_payload, f"What a client sends to {address}")
        messages[out_name] = _message(out_name, out_payload, f"What {address} sends back")
        if key == "ws_json":
            messages[in_name]["contentType"] = "application/json"
        else:
            messages[in_name]["contentType"] = messages[out_name]["contentType"] = "text/plain"
        channels[key] = {
            "address": address,
            "title": f"Tutorial {address}",
            "description": text,
            "servers": [{"$ref": "#/servers/herald"}],
            "messages": {
                in_name: {"$ref": f"#/components/messages/{in_name}"},
                out_name: {"$ref": f"#/components/messages/{out_name}"},
            },
            "bindings": {"ws": {"method": "GET", "bindingVersion": "0.1.0"}},
        }
    doc["channels"] = channels

    # -- operations (from the server's point of view: it receives commands, sends the rest)
    operations: JSON = {}
    replies_by_type = {_type_of(model): _message_name(model) for model in REPLY_MODELS}
    for model in COMMAND_MODELS:
        kind = _type_of(model) or ""
        name = _message_name(model)
        summary, text = COMMAND_DOCS.get(kind, (kind, ""))
        operation: JSON = {
            "action": "receive",
            "channel": {"$ref": "#/channels/connect"},
            "title": kind,
            "summary": summary,
            "description": text,
            "messages": [{"$ref": f"#/channels/connect/messages/{name}"}],
        }
        reply = replies_by_type.get(kind)
        if reply is not None:
            operation["reply"] = {
                "channel": {"$ref": "#/channels/connect"},
                "messages": [
                    {"$ref": f"#/channels/connect/messages/{reply}"},
                    {"$ref": "#/channels/connect/messages/errorReply"},
                ],
            }
        operations[f"command.{_key(kind)}"] = operation
    for model in PUSH_MODELS:
        kind = _type_of(model) or ""
        name = _message_name(model)
        summary, text = PUSH_DOCS.get(kind, (kind, ""))
        operations[f"push.{_key(kind)}"] = {
            "action": "send",
            "channel": {"$ref": "#/channels/connect"},
            "title": f"{kind} push",
            "summary": summary,
            "description": text,
            "messages": [{"$ref": f"#/channels/connect/messages/{name}"}],
        }
    for method_name, (request_name, reply_name) in rpc_ops.items():
        params_type, result_type = rpc_types[method_name]
        operations[f"rpc.{_key(method_name)}"] = {
            "action": "receive",
            "channel": {"$ref": "#/channels/connect"},
            "title": f"rpc {method_name}",
            "summary": f"RPC method `{method_name}`",
            "description": (
                f'Send `{{"type": "rpc", "method": "{method_name}", "params": ...}}`. '
                f"Params: {_type_label(params_type)}; result data: {_type_label(result_type)}."
            ),
            "messages": [{"$ref": f"#/channels/connect/messages/{request_name}"}],
            "reply": {
                "channel": {"$ref": "#/channels/connect"},
                "messages": [{"$ref": f"#/channels/connect/messages/{reply_name}"}],
            },
            "x-herald-rpc-method": method_name,
        }
    for ns_name, key in namespace_channels.items():
        options = settings.namespaces[ns_name]
        ns_ops = [("publicationPush", "publications")]
        if options.presence and options.join_leave:
            ns_ops += [("joinPush", "join"), ("leavePush", "leave")]
        for message_name, what in ns_ops:
            operations[f"{key}.{what}"] = {
                "action": "send",
                "channel": {"$ref": f"#/channels/{key}"},
                "summary": f"{what} in {channels[key]['title'].lower()}",
                "messages": [{"$ref": f"#/channels/{key}/messages/{message_name}"}],
            }
    for key in tutorial:
        operations[f"tutorial.{key}"] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{key}"},
            "summary": channels[key]["description"],
            "messages": [{"$ref": f"#/channels/{key}/messages/{key}.in"}],
            "reply": {
                "channel": {"$ref": f"#/channels/{key}"},
                "messages": [{"$ref": f"#/channels/{key}/messages/{key}.out"}],
            },
        }
    doc["operations"] = operations
    doc["components"] = {"schemas": schemas, "messages": messages}
    doc["x-herald-error-codes"] = error_codes()
    doc["x-herald-close-codes"] = close_codes()
    doc["x-herald-rpc-methods"] = sorted(rpc_methods)
    if rpc_notes:
        doc["x-herald-rpc-schema-notes"] = rpc_notes
    return doc


def _type_label(tp: Any) -> str:
    if tp is None:
        return "any JSON"
    return f"`{getattr(tp, '__name__', str(tp))}`"


# ---------------------------------------------------------------- HTML page

_CSS = """
body{font:15px/1.5 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d232a;background:#f7f8fa}
header{background:#1d2b3a;color:#fff;padding:1.2rem 2rem}header h1{margin:0 0 .3rem}
header p{max-width:70rem;margin:.3rem 0;color:#d8e1ea}main{display:flex;gap:2rem;padding:1rem 2rem}
nav{flex:0 0 15rem;position:sticky;top:1rem;align-self:flex-start;max-height:95vh;overflow:auto;font-size:13px}
nav a{display:block;color:#28557a;text-decoration:none;padding:1px 0}nav h3{margin:.8rem 0 .2rem}
section{flex:1;min-width:0}h2{border-bottom:2px solid #d5dbe1;padding-bottom:.2rem;margin-top:2rem}
.card{background:#fff;border:1px solid #dde3e9;border-radius:6px;padding:.6rem 1rem;margin:.8rem 0}
.card h3,.card h4{margin:.2rem 0}code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:13px}
code{background:#eef2f6;padding:0 3px;border-radius:3px}pre{background:#f1f4f7;padding:.6rem;overflow:auto;border-radius:4px}
table{border-collapse:collapse;width:100%;margin:.4rem 0}td,th{border:1px solid #e0e5ea;padding:3px 6px;text-align:left;vertical-align:top;font-size:13.5px}
th{background:#f0f3f6}.tag{display:inline-block;font-size:12px;font-weight:600;border-radius:3px;padding:0 6px;margin-right:6px;color:#fff}
header code{background:#34495e;color:#fff}.receive{background:#2f7d32}.send{background:#1e63a8}.muted{color:#66727e}details summary{cursor:pointer;color:#28557a}
"""


def _inline(text: str) -> str:
    """Escape text and turn `code` spans into <code>: descriptions are Markdown-ish."""
    escaped = html.escape(text)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)


def _anchor(kind: str, name: str) -> str:
    return f"{kind}-" + re.sub(r"[^A-Za-z0-9_.\-]", "_", name)


def _html_type(schema: Any) -> str:
    def link(ref: str) -> str:
        name = _ref_tail(ref)
        return f"@@{name}@@"

    text = _ts_type(schema, link)
    escaped = html.escape(text)
    return re.sub(
        r"@@([A-Za-z0-9_.\-]+)@@",
        lambda match: f'<a href="#{_anchor("schema", match.group(1))}">{match.group(1)}</a>',
        escaped,
    )


_CONSTRAINTS = (
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "pattern",
    "default",
)


def _schema_table(schema: Any) -> str:
    if not isinstance(schema, dict) or not schema.get("properties"):
        return f"<p>Type: <code>{_html_type(schema)}</code></p>"
    required = set(schema.get("required", []))
    rows = []
    for name, prop in schema["properties"].items():
        prop = prop if isinstance(prop, dict) else {}
        notes = [f"{key}: {json.dumps(prop[key])}" for key in _CONSTRAINTS if key in prop]
        for option in prop.get("anyOf", []):
            if isinstance(option, dict):
                notes += [f"{key}: {json.dumps(option[key])}" for key in _CONSTRAINTS if key in option]
        text = _inline(prop.get("description", ""))
        if notes:
            text += f' <span class="muted">({html.escape(", ".join(notes))})</span>'
        rows.append(
            f"<tr><td><code>{html.escape(name)}</code></td><td><code>{_html_type(prop)}</code></td>"
            f"<td>{'yes' if name in required else ''}</td><td>{text}</td></tr>"
        )
    one_of = [o.get("required", []) for o in schema.get("oneOf", []) if isinstance(o, dict)]
    note = ""
    if one_of and all(len(names) == 1 for names in one_of):
        fields = ", ".join(f"<code>{html.escape(names[0])}</code>" for names in one_of)
        note = f"<p>Exactly one of {fields} (not null).</p>"
    return (
        "<table><tr><th>field</th><th>type</th><th>required</th><th>description</th></tr>"
        + "".join(rows)
        + "</table>"
        + note
    )


def _pretty(value: Any) -> str:
    return html.escape(json.dumps(value, indent=2, ensure_ascii=False))


def _resolve(doc: JSON, ref: str) -> Any:
    node: Any = doc
    for part in ref.lstrip("#/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def render_html(doc: JSON) -> str:
    """A self-contained HTML page for an AsyncAPI document (no scripts, no external assets).

    Every string from the document is HTML-escaped, so application descriptions and
    schema text cannot inject markup.
    """
    doc = copy.deepcopy(doc)
    info = doc.get("info", {})
    components = doc.get("components", {})
    schemas: JSON = components.get("schemas", {})
    messages: JSON = components.get("messages", {})
    title = html.escape(f"{info.get('title', 'AsyncAPI')} {info.get('version', '')}".strip())
    parts: list[str] = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        f"<title>{title}: AsyncAPI</title><style>{_CSS}</style></head><body>",
        f"<header><h1>{title}</h1><p>{_inline(info.get('description', ''))}</p>",
        f"<p>AsyncAPI {html.escape(str(doc.get('asyncapi', '')))} &middot; "
        '<a style="color:#9cd0ff" href="asyncapi.json">asyncapi.json</a></p></header><main>',
    ]
    # navigation
    nav = ["<nav><h3>Contents</h3>", '<a href="#servers">Servers</a>']
    nav.append("<h3>Channels</h3>")
    nav += [
        f'<a href="#{_anchor("channel", key)}">{html.escape(str(ch.get("address", key)))}</a>'
        for key, ch in doc.get("channels", {}).items()
    ]
    nav.append("<h3>Operations</h3>")
    nav += [
        f'<a href="#{_anchor("operation", key)}">{html.escape(key)}</a>' for key in doc.get("operations", {})
    ]
    nav.append('<h3>Reference</h3><a href="#error-codes">Error codes</a>')
    nav.append('<a href="#close-codes">Close codes</a><a href="#messages">Messages</a>')
    nav.append('<a href="#schemas">Schemas</a></nav>')
    parts += nav
    parts.append("<section>")

    parts.append('<h2 id="servers">Servers</h2>')
    for key, server in doc.get("servers", {}).items():
        parts.append(
            f'<div class="card"><h3>{html.escape(key)}</h3><p><code>'
            f"{html.escape(str(server.get('protocol', '')))}://{html.escape(str(server.get('host', '')))}"
            f"</code></p><p>{_inline(server.get('description', ''))}</p></div>"
        )

    parts.append('<h2 id="channels">Channels</h2>')
    for key, channel in doc.get("channels", {}).items():
        refs = [ref.get("$ref", "") for ref in channel.get("messages", {}).values()]
        links = ", ".join(
            f'<a href="#{_anchor("message", _ref_tail(ref))}">{html.escape(_ref_tail(ref))}</a>'
            for ref in refs
        )
        extra = channel.get("x-herald-namespace")
        parts.append(
            f'<div class="card" id="{_anchor("channel", key)}"><h3><code>'
            f"{html.escape(str(channel.get('address', '')))}</code> "
            f"{html.escape(channel.get('title', ''))}</h3>"
            f"<p>{_inline(channel.get('description', ''))}</p><p>Messages: {links}</p>"
        )
        if extra is not None:
            parts.append(
                f"<details><summary>namespace options</summary><pre>{_pretty(extra)}</pre></details>"
            )
        if "bindings" in channel:
            parts.append(
                f"<details><summary>bindings</summary><pre>{_pretty(channel['bindings'])}</pre></details>"
            )
        parts.append("</div>")

    parts.append('<h2 id="operations">Operations</h2>')
    for key, operation in doc.get("operations", {}).items():
        action = "receive" if operation.get("action") == "receive" else "send"
        who = "client &rarr; server" if action == "receive" else "server &rarr; client"
        channel_ref = operation.get("channel", {}).get("$ref", "")
        msgs = [ref.get("$ref", "") for ref in operation.get("messages", [])]
        replies = [ref.get("$ref", "") for ref in operation.get("reply", {}).get("messages", [])]

        def message_links(refs: list[str]) -> str:
            return ", ".join(
                f'<a href="#{_anchor("message", _ref_tail(r))}">{html.escape(_ref_tail(r))}</a>' for r in refs
            )

        parts.append(
            f'<div class="card" id="{_anchor("operation", key)}"><h3>'
            f'<span class="tag {action}">{action}</span>{html.escape(key)}</h3>'
            f'<p class="muted">{who} on <a href="#{_anchor("channel", _ref_tail(channel_ref))}">'
            f"{html.escape(_ref_tail(channel_ref))}</a></p>"
            f"<p><b>{_inline(operation.get('summary', ''))}</b></p>"
            f"<p>{_inline(operation.get('description', ''))}</p>"
            f"<p>Message: {message_links(msgs)}</p>"
            + (f"<p>Reply: {message_links(replies)}</p>" if replies else "")
            + "</div>"
        )

    parts.append('<h2 id="error-codes">Error codes</h2>')
    parts.append(
        "<p>Carried in <code>error: {code, message}</code> of a reply; the connection stays open.</p>"
        "<table><tr><th>code</th><th>name</th><th>meaning</th></tr>"
    )
    for row in doc.get("x-herald-error-codes", []):
        parts.append(
            f"<tr><td>{int(row['code'])}</td><td><code>{html.escape(str(row['name']))}</code></td>"
            f"<td>{_inline(str(row['meaning']))}</td></tr>"
        )
    parts.append("</table>")
    parts.append('<h2 id="close-codes">Close codes</h2>')
    parts.append(
        "<p>WebSocket close codes. A <code>disconnect</code> push with the same code comes first "
        "on <code>/connect</code>.</p>"
        "<table><tr><th>code</th><th>name</th><th>reconnect</th><th>meaning</th></tr>"
    )
    for row in doc.get("x-herald-close-codes", []):
        parts.append(
            f"<tr><td>{int(row['code'])}</td><td><code>{html.escape(str(row['name']))}</code></td>"
            f"<td>{'yes' if row['reconnect'] else 'no'}</td><td>{_inline(str(row['meaning']))}</td></tr>"
        )
    parts.append("</table>")

    parts.append('<h2 id="messages">Messages</h2>')
    for name, message in messages.items():
        payload = message.get("payload", {})
        shown = _resolve(doc, payload["$ref"]) if isinstance(payload, dict) and "$ref" in payload else payload
        heading = html.escape(message.get("title", name))
        parts.append(
            f'<div class="card" id="{_anchor("message", name)}"><h3>{heading} '
            f'<span class="muted">{html.escape(name)}</span></h3>'
            f"<p><b>{_inline(message.get('summary', ''))}</b></p>"
            f"<p>{_inline(message.get('description', ''))}</p>"
        )
        if isinstance(payload, dict) and "$ref" in payload:
            parts.append(f"<p>Payload: <code>{_html_type(payload)}</code></p>")
        parts.append(_schema_table(shown))
        for example in message.get("examples", []):
            parts.append(
                f"<details><summary>example</summary><pre>{_pretty(example.get('payload'))}</pre></details>"
            )
        parts.append("</div>")

    parts.append('<h2 id="schemas">Schemas</h2>')
    for name, schema in schemas.items():
        parts.append(
            f'<div class="card" id="{_anchor("schema", name)}"><h4>{html.escape(name)}</h4>'
            f"<p>{_inline(schema.get('description', '') if isinstance(schema, dict) else '')}</p>"
            f"{_schema_table(schema)}"
            f"<details><summary>JSON Schema</summary><pre>{_pretty(schema)}</pre></details></div>"
        )
    parts.append("</section></main></body></html>")
    return "\n".join(parts)


__all__ = [
    "CLOSE_CODE_MEANINGS",
    "ERROR_CODE_MEANINGS",
    "EXAMPLES",
    "build_asyncapi",
    "close_codes",
    "describe_namespace",
    "error_codes",
    "protocol_json_schema",
    "render_html",
    "typescript_definitions",
]
