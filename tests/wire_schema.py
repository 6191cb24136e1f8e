"""Check real frames against the exported JSON Schema (docs/schema/protocol.schema.json).

:class:`tests.helpers.ProtocolClient` records every frame the server sends, and every
command a test sent that the server decoded, here; an autouse fixture in conftest.py
fails the test that saw a frame the schema does not describe.  So every integration test
that speaks protocol v1 also checks the contract.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "docs" / "schema" / "protocol.schema.json"

#: Reply error codes meaning "the server could not decode the command": such a command
#: is expected to be outside the schema (BAD_REQUEST, UNKNOWN_COMMAND, TOO_DEEP).
UNDECODABLE = frozenset({101, 102, 120})

violations: list[str] = []


@functools.cache
def protocol_schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return schema


@functools.cache
def validator(definition: str) -> Draft202012Validator:
    """A validator for ``$defs/<definition>`` (e.g. ``ServerFrame``, ``ClientFrame``)."""
    schema = protocol_schema()
    return Draft202012Validator({"$ref": f"#/$defs/{definition}", "$defs": schema["$defs"]})


def problem(definition: str, frame: Any) -> str | None:
    """Why ``frame`` does not match ``$defs/<definition>``, or None when it does."""
    error = best_match(validator(definition).iter_errors(frame))
    if error is None:
        return None
    return f"{error.message} at {list(error.absolute_path)}"


def record_server_frame(frame: Any) -> None:
    why = problem("ServerFrame", frame)
    if why is not None:
        violations.append(f"server frame {json.dumps(frame)[:300]} is not a ServerFrame: {why}")


def record_exchange(command: Any, reply: Any) -> None:
    """A command the server decoded (its reply is not a decoding error) must be a ClientFrame."""
    error = reply.get("error") if isinstance(reply, dict) else None
    if isinstance(error, dict) and error.get("code") in UNDECODABLE:
        return
    why = problem("ClientFrame", command)
    if why is not None:
        violations.append(
            f"command {json.dumps(command)[:300]} was accepted by the server "
            f"(reply {json.dumps(reply)[:200]}) but is not a ClientFrame: {why}"
        )


def take_violations() -> list[str]:
    taken = list(violations)
    violations.clear()
    return taken
