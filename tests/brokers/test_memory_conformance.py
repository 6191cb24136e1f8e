"""The conformance suite against the in-memory broker (one node by definition)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest

from herald.brokers.memory import MemoryBroker
from herald.presence.memory import MemoryPresenceManager

from .conformance import BrokerConformance, Engine, NodeEngines


@contextlib.asynccontextmanager
async def _drop_deliveries(node: NodeEngines) -> AsyncIterator[None]:
    """The memory broker has no link to lose: its test-only hook drops deliveries."""
    broker = node.broker
    assert isinstance(broker, MemoryBroker)
    broker.drop_hook = lambda publication: True
    try:
        yield
    finally:
        broker.drop_hook = None


class TestMemoryBroker(BrokerConformance):
    multi_node = False

    @pytest.fixture
    async def engine(self) -> AsyncIterator[Engine]:
        engine = Engine(lambda: (MemoryBroker(), MemoryPresenceManager()), miss=_drop_deliveries)
        yield engine
        await engine.close()
