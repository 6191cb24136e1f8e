"""Run a callback every few seconds for as long as a ``with`` block (an app's lifespan) lasts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from .hooks import maybe_await

logger = logging.getLogger("herald")


@contextlib.asynccontextmanager
async def every(
    interval: float, tick: Callable[[], Awaitable[object] | object], *, name: str
) -> AsyncIterator[None]:
    """Call ``tick`` (sync or async) every ``interval`` seconds inside the block.

    A failing tick is logged (debug: the next tick retries, e.g. after a broker outage)
    and never ends the loop; leaving the block cancels the task and waits for it.
    """

    async def loop() -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await maybe_await(tick())
            except Exception as exc:
                logger.debug("%s failed: %r", name, exc)

    task = asyncio.get_running_loop().create_task(loop(), name=name)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
