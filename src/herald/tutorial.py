"""The FastAPI tutorial's three endpoints, exactly: their reply formats.

``/ws``           each text message -> ``Message text was: {data}``
``/ws_json``      each JSON message -> ``{"message": "Received JSON data", "data": <value>}``
``/ws_broadcast`` each text message -> ``New message: {data}`` to every *other* client

The endpoints themselves are sessions in :mod:`herald.sessions`; the broadcast goes through
the node's hub and broker on the reserved channel :data:`BROADCAST_CHANNEL`, so
it reaches clients on every worker once a shared broker is configured.
"""

from __future__ import annotations

from typing import Any

import orjson

from .brokers.base import Publication

BROADCAST_CHANNEL = "$tutorial:broadcast"


def echo_reply(text: str) -> str:
    return f"Message text was: {text}"


def json_reply(value: Any) -> str:
    return orjson.dumps({"message": "Received JSON data", "data": value}).decode()


def render_broadcast(publication: Publication) -> str:
    """Renderer for ``/ws_broadcast`` clients: the publication's data is the sent text."""
    text = orjson.loads(publication.data)
    return f"New message: {text}"
