"""The conformance suite against the NATS broker, on a real nats-server."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator

import pytest

from herald.brokers.nats import NatsBroker, NatsBrokerConfig, NatsPresenceManager

from ..servers import NatsServer, nats_server_fixture
from .conformance import BrokerConformance, Engine

pytestmark = pytest.mark.nats


@pytest.fixture(scope="module")
def nats_server() -> Iterator[NatsServer]:
    yield from nats_server_fixture()


class TestNatsBroker(BrokerConformance):
    has_history = False
    shared_offsets = False
    subscriptions_settle = True

    @pytest.fixture
    async def engine(self, nats_server: NatsServer) -> AsyncIterator[Engine]:
        config = NatsBrokerConfig(url=nats_server.url, prefix=f"t{secrets.token_hex(4)}")

        def make() -> tuple[NatsBroker, NatsPresenceManager]:
            broker = NatsBroker(config)
            return broker, broker.presence_manager()

        engine = Engine(make)
        yield engine
        await engine.close()
