"""Herald: real-time messaging for FastAPI."""

from __future__ import annotations

__version__ = "0.1.0"

import importlib
from typing import TYPE_CHECKING, Any

from .codes import CloseCode, ErrorCode
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
from .protocol.values import ClientInfo, StreamPosition

if TYPE_CHECKING:
    from .app import Herald
    from .brokers.base import Broker, Publication
    from .brokers.memory import MemoryBroker
    from .config import NamespaceOptions, Settings
    from .context import ClientContext
    from .presence.base import PresenceManager
    from .presence.memory import MemoryPresenceManager

# The server's names are imported on first use: `import herald.client` (which runs this
# module) must load no server module, neither FastAPI, PyJWT nor pydantic-settings
# (tests/test_layers.py), and the CLI's client commands start quickly.
_LAZY = {
    "Herald": ".app",
    "Broker": ".brokers.base",
    "Publication": ".brokers.base",
    "MemoryBroker": ".brokers.memory",
    "NamespaceOptions": ".config",
    "Settings": ".config",
    "ClientContext": ".context",
    "PresenceManager": ".presence.base",
    "MemoryPresenceManager": ".presence.memory",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'herald' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


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
