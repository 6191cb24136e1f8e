"""The conformance suite against the NATS broker, on a real nats-server.

Two engines: core NATS (fan-out only: no history, no shared offsets) and NATS with
JetStream (``jetstream=True``: history, gap-free offsets across nodes, epochs), the
latter on a server started with ``-js -sd <tmpdir>``.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator

import nats
import pytest

from herald.brokers.nats import NatsBroker, NatsBrokerConfig, NatsPresenceManager

from ..servers import NatsServer, nats_server_fixture
from .conformance import BrokerConformance, Engine

pytestmark = pytest.mark.nats


@pytest.fixture(scope="module")
def nats_server() -> Iterator[NatsServer]:
    yield from nats_server_fixture()


@pytest.fixture(scope="module")
def jetstream_server() -> Iterator[NatsServer]:
    yield from nats_server_fixture(jetstream=True)


def _engine(config: NatsBrokerConfig, lose_data: bool = False) -> Engine:
    def make() -> tuple[NatsBroker, NatsPresenceManager]:
        broker = NatsBroker(config)
        return broker, broker.presence_manager()

    async def delete_stream() -> None:
        # What a server restarted without storage (or an operator) does to the stream.
        nc = await nats.connect(config.url)
        try:
            await nc.jetstream().delete_stream(config.stream_name)
        finally:
            await nc.close()

    return Engine(make, delete_stream if lose_data else None)


class TestNatsBroker(BrokerConformance):
    has_history = False
    shared_offsets = False
    subscriptions_settle = True

    @pytest.fixture
    async def engine(self, nats_server: NatsServer) -> AsyncIterator[Engine]:
        engine = _engine(NatsBrokerConfig(url=nats_server.url, prefix=f"t{secrets.token_hex(4)}"))
        yield engine
        await engine.close()


class TestNatsJetStreamBroker(BrokerConformance):
    """Everything the Redis broker does: history, shared offsets, epochs, in-order delivery."""

    @pytest.fixture
    async def engine(self, jetstream_server: NatsServer) -> AsyncIterator[Engine]:
        # A prefix (hence a stream) per test: tests never see each other's messages.
        config = NatsBrokerConfig(url=jetstream_server.url, prefix=f"t{secrets.token_hex(4)}", jetstream=True)
        engine = _engine(config, lose_data=True)
        yield engine
        await engine.close()
