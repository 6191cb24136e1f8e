"""Transports: adapters between a network server and Herald's connections."""

from __future__ import annotations

from .base import Transport

__all__ = ["Transport"]
