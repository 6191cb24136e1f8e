"""Herald: real-time messaging for FastAPI."""

from __future__ import annotations

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any

from .brokers.base import Broker, ClientInfo, Publication, StreamPosition
from .brokers.memory import MemoryBroker
from .codes import CloseCode, ErrorCode
from .config import NamespaceOptions, Settings
from .exceptions import (
    BrokerError,
    BrokerUnavailableError,
    CommandError,
    ConfigError,
    DisconnectError,
    HeraldError,
    NotAvailableError,
    PermissionDeniedError,
    ProtocolError,
)
from .node import ClientContext
from .presence.base import PresenceManager
from .presence.memory import MemoryPresenceManager

if TYPE_CHECKING:
    from .app import Herald


def __getattr__(name: str) -> Any:
    # `Herald` pulls in FastAPI; importing it lazily keeps `herald.client` and the CLI's
    # client commands quick to start.
    if name == "Herald":
        from .app import Herald

        return Herald
    raise AttributeError(f"module 'herald' has no attribute {name!r}")


__all__ = [
    "Broker",
    "BrokerError",
    "BrokerUnavailableError",
    "ClientContext",
    "ClientInfo",
    "CloseCode",
    "CommandError",
    "ConfigError",
    "DisconnectError",
    "ErrorCode",
    "Herald",
    "HeraldError",
    "MemoryBroker",
    "MemoryPresenceManager",
    "NamespaceOptions",
    "NotAvailableError",
    "PermissionDeniedError",
    "PresenceManager",
    "ProtocolError",
    "Publication",
    "Settings",
    "StreamPosition",
    "__version__",
]
