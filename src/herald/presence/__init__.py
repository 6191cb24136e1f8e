"""Presence managers: who is in a channel."""

from __future__ import annotations

from .base import PresenceManager, PresenceStats, presence_stats
from .memory import MemoryPresenceManager

__all__ = ["MemoryPresenceManager", "PresenceManager", "PresenceStats", "presence_stats"]
