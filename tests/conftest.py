from __future__ import annotations

from collections.abc import Iterator

import pytest

from . import wire_schema
from .helpers import ServerProcess


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    """One real `herald serve` process shared by tests that do not change its settings."""
    process = ServerProcess(env={"HERALD_API_KEY": "test-key"}).start()
    yield process
    process.stop()


@pytest.fixture(autouse=True)
def _frames_match_protocol_schema() -> Iterator[None]:
    """Fail a test whose ProtocolClient saw a frame docs/schema/protocol.schema.json rejects."""
    wire_schema.take_violations()
    yield
    violations = wire_schema.take_violations()
    if violations:
        pytest.fail(
            "frames disagree with docs/schema/protocol.schema.json (fix the models or the "
            "server, then run scripts/export_schema.py):\n" + "\n".join(violations[:10]),
            pytrace=False,
        )
