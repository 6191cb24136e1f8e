"""The AsyncAPI 3.0 document served at ``/asyncapi.json``: protocol, namespaces, RPC methods."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pydantic import TypeAdapter
from pydantic.json_schema import JsonSchemaMode

from .. import __version__
from ..config import NamespaceOptions, Settings
from ..protocol import messages as m

if TYPE_CHECKING:
    from ..rpc import RpcMethod

from .frames import (
    ASYNCAPI_VERSION,
    COMMAND_DOCS,
    COMMAND_MODELS,
    COMPONENTS_REF,
    EXAMPLES,
    JSON,
    KEY_UNSAFE,
    PUSH_DOCS,
    PUSH_MODELS,
    REPLY_MODELS,
    close_codes,
    error_codes,
    frame_message_name,
    type_of,
)
from .jsonschema import EXACTLY_ONE_OF_RESULT_OR_ERROR, generate_schema, refine_server_frames


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
    presence = f"Presence: {'on' if options.presence else 'off'}; join/leave pushes: {_join_leave(options)}."
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
    from ..context import ClientContext

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
    return KEY_UNSAFE.sub("_", text) or "_"


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
    keys, defs = generate_schema(items)
    refine_server_frames(defs)
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
            },
            # One-way streams over plain HTTP (herald.sse, docs/transports.md).
            "herald_sse": {
                "host": server_host,
                "protocol": "https" if secure else "http",
                "pathname": "/sse",
                "description": "Server-Sent Events, one way: `GET /sse?channel=a&channel=b` "
                "(`GET /stream` for newline-delimited JSON). Publications are `PublicationPush` "
                "frames as `data:` of default events, with an `id:` that resumes every channel "
                "(`Last-Event-ID`); `subscribed`, `recovery` and `disconnect` are named events. "
                "Token: `Authorization: Bearer`, `?token=` or the `herald_token` cookie. "
                "See docs/transports.md.",
            },
        },
    }

    # -- messages: every frame model, plus per-method RPC messages
    messages: JSON = {}
    for models, docs, role in ((COMMAND_MODELS, COMMAND_DOCS, "command"), (PUSH_MODELS, PUSH_DOCS, "push")):
        for model in models:
            kind = type_of(model) or ""
            summary, text = docs.get(kind, (kind, ""))
            name = frame_message_name(model)
            messages[name] = _message(
                name,
                {"$ref": COMPONENTS_REF.format(model=model.__name__)},
                summary,
                text,
                title=f"{kind} {role}",
            )
    for model in REPLY_MODELS:
        reply_kind = type_of(model)
        name = frame_message_name(model)
        if reply_kind is None:
            summary, title_text = "Error for a frame whose type could not be read", "error reply"
        else:
            summary, title_text = f"Reply to {reply_kind}", f"{reply_kind} reply"
        messages[name] = _message(
            name, {"$ref": COMPONENTS_REF.format(model=model.__name__)}, summary, title=title_text
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
                    "error": {"$ref": COMPONENTS_REF.format(model="ErrorInfo")},
                },
                "required": ["type", "id"],
                "oneOf": copy.deepcopy(EXACTLY_ONE_OF_RESULT_OR_ERROR),
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
                        "properties": {"error": {"$ref": COMPONENTS_REF.format(model="ErrorInfo")}},
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
    replies_by_type = {type_of(model): frame_message_name(model) for model in REPLY_MODELS}
    for model in COMMAND_MODELS:
        kind = type_of(model) or ""
        name = frame_message_name(model)
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
        kind = type_of(model) or ""
        name = frame_message_name(model)
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


def _join_leave(options: NamespaceOptions) -> str:
    if not (options.presence and options.join_leave):
        return "off"
    bound = options.join_leave_max_subscribers
    return f"on (none while a channel has more than {bound} subscribers on a node)" if bound else "on"
