"""Brokers: the in-memory default and the engines that scale out."""

from __future__ import annotations

from .base import (
    Broker,
    BrokerHandler,
    BrokerMessage,
    ClientInfo,
    HistoryResult,
    PresenceEvent,
    Publication,
    PublishOptions,
    StreamGap,
    StreamPosition,
)
from .memory import MemoryBroker

__all__ = [
    "Broker",
    "BrokerHandler",
    "BrokerMessage",
    "ClientInfo",
    "HistoryResult",
    "MemoryBroker",
    "PresenceEvent",
    "Publication",
    "PublishOptions",
    "StreamGap",
    "StreamPosition",
]
