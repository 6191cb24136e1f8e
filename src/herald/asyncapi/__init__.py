"""The typed contract: JSON Schema of protocol v1, an AsyncAPI 3.0 document, its docs page.

Everything here is generated from the pydantic models in :mod:`herald.protocol.messages`,
the node's namespaces (:class:`~herald.config.NamespaceOptions`) and the RPC methods the
application registered, so the contract cannot drift from the code:

Modules: ``frames`` (code tables, per-frame docs and examples), ``jsonschema``,
``typescript``, ``document`` (AsyncAPI) and ``page`` (HTML), one per output.

* :func:`protocol_json_schema` -- JSON Schema (draft 2020-12) of every frame, with
  ``$defs/ClientFrame`` (commands) and ``$defs/ServerFrame`` (replies | pushes).
  ``scripts/export_schema.py`` writes it to ``docs/schema/protocol.schema.json``.
* :func:`typescript_definitions` -- the same schema as TypeScript declarations
  (``src/herald/static/herald-protocol.d.ts``).
* :func:`build_asyncapi` -- the AsyncAPI 3.0 document served at ``/asyncapi.json``.
* :func:`render_html` -- a self-contained page for it (``/asyncapi``), no CDN, all text escaped.

This package is pure: it imports neither FastAPI nor anything that does I/O.
"""

from __future__ import annotations

from .document import build_asyncapi, describe_namespace
from .frames import (
    ASYNCAPI_VERSION,
    CLOSE_CODE_MEANINGS,
    COMMAND_DOCS,
    COMMAND_MODELS,
    ERROR_CODE_MEANINGS,
    EXAMPLES,
    PUSH_DOCS,
    PUSH_MODELS,
    REPLY_MODELS,
    SCHEMA_ID,
    close_codes,
    error_codes,
)
from .jsonschema import protocol_json_schema
from .page import render_html
from .typescript import typescript_definitions

__all__ = [
    "ASYNCAPI_VERSION",
    "CLOSE_CODE_MEANINGS",
    "COMMAND_DOCS",
    "COMMAND_MODELS",
    "ERROR_CODE_MEANINGS",
    "EXAMPLES",
    "PUSH_DOCS",
    "PUSH_MODELS",
    "REPLY_MODELS",
    "SCHEMA_ID",
    "build_asyncapi",
    "close_codes",
    "describe_namespace",
    "error_codes",
    "protocol_json_schema",
    "render_html",
    "typescript_definitions",
]
