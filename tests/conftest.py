from __future__ import annotations

from collections.abc import Iterator

import pytest

from .helpers import ServerProcess


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    """One real `herald serve` process shared by tests that do not change its settings."""
    process = ServerProcess(env={"HERALD_API_KEY": "test-key"}).start()
    yield process
    process.stop()
