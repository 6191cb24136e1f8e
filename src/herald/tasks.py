"""Stopping background tasks reliably.

A close cancels the tasks a component started and waits for them.  A client
library may swallow one cancellation (``asyncio.wait_for`` on Python 3.11 returns
a result that raced its cancel; nats-py turns it into its own error), and the
task then waits on I/O that never comes: a plain ``await task`` after one
``cancel()`` hangs the close.  :func:`stop_tasks` asks again until the tasks end.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

logger = logging.getLogger("herald")


async def stop_tasks(tasks: Iterable[asyncio.Task[Any]], *, rounds: int = 10, every: float = 1.0) -> None:
    """Cancel ``tasks`` and wait for them to end, cancelling again every ``every``
    seconds; after ``rounds`` attempts the stragglers are logged and left running.
    Their results and errors are dropped (a task that failed was logged where it ran)."""
    pending = {task for task in tasks if not task.done()}
    for _ in range(rounds):
        if not pending:
            return
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=every)
    for task in pending:
        logger.warning("task %s did not stop when cancelled", task.get_name())


__all__ = ["stop_tasks"]
