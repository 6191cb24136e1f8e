"""The conformance suite against the NATS broker, on a real nats-server.

Two engines: core NATS (fan-out only: no history, no shared offsets) and NATS with
JetStream (``jetstream=True``: history, gap-free offsets across nodes, epochs), the
latter on a server started with ``-js -sd <tmpdir>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator

import nats
import pytest

from herald.brokers.nats import NatsBroker, NatsBrokerConfig, NatsPresenceManager

from ..helpers import async_wait_for
from ..servers import NatsServer, nats_server_fixture
from .conformance import BrokerConformance, Engine, NodeEngines

pytestmark = pytest.mark.nats


@pytest.fixture(scope="module")
def nats_server() -> Iterator[NatsServer]:
    yield from nats_server_fixture()


@pytest.fixture(scope="module")
def jetstream_server() -> Iterator[NatsServer]:
    yield from nats_server_fixture(jetstream=True)


@contextlib.asynccontextmanager
async def _cut_link(node: NodeEngines) -> AsyncIterator[None]:
    """Abort the node's own TCP connection to NATS (``ss -K`` on its source port); the
    other nodes stay connected.  nats-py reconnects by itself."""
    if shutil.which("ss") is None:
        pytest.skip("ss (iproute2) is not installed")
    broker = node.broker
    assert isinstance(broker, NatsBroker)
    sockname = broker._nc._transport._io_writer.get_extra_info("sockname")
    peer = broker._nc._transport._io_writer.get_extra_info("peername")
    await asyncio.to_thread(
        subprocess.run,
        ["ss", "-K", "-tn", f"( sport = :{sockname[1]} and dport = :{peer[1]} )"],
        check=True,
        capture_output=True,
    )
    await async_wait_for(lambda: not broker._connected.is_set(), 5, what="the link to drop")
    yield


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

    return Engine(make, delete_stream if lose_data else None, miss=_cut_link)


class TestNatsBroker(BrokerConformance):
    has_history = False
    shared_offsets = False
    idempotent = False

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


async def test_a_subscription_is_on_the_wire_before_the_round_trip_that_confirms_it(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``start`` and ``subscribe`` return once the server registered the SUB: it is written
    before the PING whose PONG they wait for (a connection's commands are processed in
    order).  nats-py's ``flush()`` alone writes its PING ahead of a SUB still in its
    pending buffer; then another node's publication could miss this node (a presence
    "add" lost, test_presence_across_nodes failing now and then)."""
    from nats.aio.transport import TcpTransport

    written: list[tuple[TcpTransport, bytes]] = []
    write, writelines = TcpTransport.write, TcpTransport.writelines

    def record_write(self: TcpTransport, payload: bytes) -> None:
        written.append((self, bytes(payload)))
        write(self, payload)

    def record_writelines(self: TcpTransport, payload: list[bytes]) -> None:
        written.append((self, b"".join(payload)))
        writelines(self, payload)

    monkeypatch.setattr(TcpTransport, "write", record_write)
    monkeypatch.setattr(TcpTransport, "writelines", record_writelines)

    def assert_confirmed(broker: NatsBroker, subject: str) -> None:
        wire = b"".join(data for transport, data in written if transport is broker._nc._transport)
        sub, ping = wire.find(b"SUB %s " % subject.encode()), wire.rfind(b"PING\r\n")
        assert 0 <= sub < ping, wire

    broker = NatsBroker(NatsBrokerConfig(url=nats_server.url, prefix=f"t{secrets.token_hex(4)}"))
    await broker.start(lambda message: None)
    try:
        assert await broker.ready()
        assert_confirmed(broker, broker.presence_subject)
        await broker.subscribe("room")
        assert_confirmed(broker, broker.subject("room"))
    finally:
        await broker.close()
