from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import Generator, Iterator
from typing import Any

import pytest

from . import wire_schema
from .helpers import ServerProcess

# The benchmark smoke runs (tests/test_bench_*) would pin their server and load generator
# to cores 0 and 1 for a minute or more, starving the other test worker's servers; their
# figures mean nothing at that size, so they are left to the scheduler.
os.environ.setdefault("HERALD_BENCH_PIN", "0")


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


def _await_chain(task: asyncio.Task[Any]) -> str:
    """Where ``task`` waits: each coroutine of its await chain with its file and line."""
    steps, coro = [], task.get_coro()
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            steps.append(f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return "\n    ".join(steps) or repr(task)


def _dump_tasks(test: str) -> None:
    # Read from the watchdog thread while the loop is stuck: racy, so retry a copy.
    for _ in range(5):
        try:
            tasks = list(asyncio.tasks._all_tasks)  # type: ignore[attr-defined]
            break
        except RuntimeError:  # the set changed while copied
            continue
    else:
        return
    lines = [f"\n==== {test}: still running near its timeout; asyncio tasks:"]
    lines += [
        f"  {task.get_name()} ({'done' if task.done() else 'pending'}):\n    {_await_chain(task)}"
        for task in tasks
    ]
    print("\n".join(lines), file=sys.__stderr__, flush=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    """Before pytest-timeout kills a hung test, print where each asyncio task waits
    (pytest-timeout shows threads only, and a hung loop sits in select())."""
    marker = item.get_closest_marker("timeout")
    limit = float(marker.args[0]) if marker and marker.args else float(item.config.getini("timeout") or 0)
    watchdog = threading.Timer(max(limit - 5, 1), _dump_tasks, (item.nodeid,)) if limit > 0 else None
    if watchdog is not None:
        watchdog.daemon = True
        watchdog.start()
    try:
        yield
    finally:
        if watchdog is not None:
            watchdog.cancel()
