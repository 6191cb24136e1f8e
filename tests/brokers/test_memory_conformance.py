"""The conformance suite against the in-memory broker (one node by definition)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from herald.brokers.memory import MemoryBroker
from herald.presence.memory import MemoryPresenceManager

from .conformance import BrokerConformance, Engine


class TestMemoryBroker(BrokerConformance):
    multi_node = False

    @pytest.fixture
    async def engine(self) -> AsyncIterator[Engine]:
        engine = Engine(lambda: (MemoryBroker(), MemoryPresenceManager()))
        yield engine
        await engine.close()
