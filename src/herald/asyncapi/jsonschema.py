"""JSON Schema (draft 2020-12) of every frame of protocol v1, generated from the models."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from pydantic import TypeAdapter
from pydantic.json_schema import JsonSchemaMode

from ..protocol import messages as m

if TYPE_CHECKING:
    pass

from .frames import DEFS_REF, JSON, PUSH_MODELS, REPLY_MODELS, SCHEMA_ID


def generate_schema(
    items: Iterable[tuple[str, JsonSchemaMode, Any]], ref_template: str = DEFS_REF
) -> tuple[dict[str, JSON], dict[str, JSON]]:
    """JSON Schemas of several types with one shared ``$defs``: (schema by key, defs)."""
    inputs = [(key, mode, TypeAdapter(tp)) for key, mode, tp in items]
    by_key, defs = TypeAdapter.json_schemas(inputs, ref_template=ref_template)
    return {key: schema for (key, _), schema in by_key.items()}, dict(defs.get("$defs", {}))


#: A reply has a non-null ``result`` or a non-null ``error``, never both.
EXACTLY_ONE_OF_RESULT_OR_ERROR: list[JSON] = [
    {"required": ["result"], "properties": {"result": {"not": {"type": "null"}}}},
    {"required": ["error"], "properties": {"error": {"not": {"type": "null"}}}},
]


def refine_server_frames(defs: dict[str, JSON]) -> None:
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
            schema["oneOf"] = copy.deepcopy(EXACTLY_ONE_OF_RESULT_OR_ERROR)


def protocol_json_schema() -> JSON:
    """JSON Schema (draft 2020-12) of every protocol v1 frame.

    ``$defs`` holds every model plus four unions: ``ClientFrame`` (any command),
    ``Reply``, ``Push`` and ``ServerFrame`` (``Reply | Push``: every frame the server
    sends on ``/connect``).  The root accepts any client or server frame.
    """
    keys, defs = generate_schema(
        [
            ("ClientFrame", "validation", m.Command),
            ("Reply", "serialization", m.Reply),
            ("Push", "serialization", m.Push),
        ]
    )
    refine_server_frames(defs)
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
