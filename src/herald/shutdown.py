"""Graceful shutdown on SIGTERM / SIGINT under uvicorn.

uvicorn handles SIGTERM by closing its listening sockets and then closing every
WebSocket itself with 1012, *before* the ASGI lifespan shutdown runs, so
``Node.close()`` (called from the lifespan) would find every client already
gone, without a disconnect push.  :func:`drain_on_signals` runs first instead:

1. it wraps the signal handlers the server installed (uvicorn installs them
   before the lifespan startup, in every worker process);
2. on the first signal it stops the server listening (uvicorn's ``Server``
   owns the handler, and its listening sockets are closed exactly as uvicorn's
   own shutdown would), and runs :meth:`Node.drain`: every client gets a
   ``disconnect`` push with ``reconnect: true`` and a close 1012 once its queue
   is flushed, waiting at most ``drain_timeout``;
3. then it hands the signal to the server's own handler, which shuts down as
   usual (the lifespan shutdown closes the broker after the drain, so every
   publication accepted before reached it).

A second signal while draining skips the wait.  Signal handlers can only be set
from the main thread; elsewhere (a server in a thread) this does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import AsyncIterator, Iterable
from types import FrameType
from typing import TYPE_CHECKING, Any

from .transports.uvicorn import stop_listening

if TYPE_CHECKING:
    from .node import Node

logger = logging.getLogger("herald.shutdown")

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _hand_over(previous: Any, sig: int, frame: FrameType | None) -> None:
    """Do what the handler we replaced would have done."""
    if callable(previous):
        previous(sig, frame)
    elif previous == signal.SIG_DFL:
        signal.signal(sig, signal.SIG_DFL)
        signal.raise_signal(sig)


@contextlib.asynccontextmanager
async def drain_on_signals(node: Node, signals: Iterable[int] = DEFAULT_SIGNALS) -> AsyncIterator[None]:
    """While the context is open, drain ``node``'s clients before the server stops on ``signals``.

    Use it in the application's lifespan (``herald serve`` does)::

        async with herald.lifespan(app), drain_on_signals(herald.node):
            yield
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {}
    draining: list[asyncio.Task[None]] = []
    signalled = False

    async def drain_then_exit(sig: int, frame: FrameType | None) -> None:
        logger.info(
            "signal %s: draining %d clients (up to %.1fs)",
            signal.Signals(sig).name,
            node.hub.connection_count,
            node.settings.drain_timeout,
        )
        try:
            stop_listening(previous[sig])
            await node.drain()
        except Exception:
            logger.exception("drain failed")
        finally:
            _hand_over(previous[sig], sig, frame)

    def start_drain(sig: int, frame: FrameType | None) -> None:
        draining.append(loop.create_task(drain_then_exit(sig, frame), name="herald-drain"))

    def handler(sig: int, frame: FrameType | None) -> None:
        nonlocal signalled
        if signalled:  # a second signal: stop waiting for the drain
            _hand_over(previous[sig], sig, frame)
            return
        signalled = True
        # Signal handlers run between bytecodes; schedule the drain on the loop.
        loop.call_soon_threadsafe(start_drain, sig, frame)

    for sig in signals:
        previous[sig] = signal.getsignal(sig)
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            if signal.getsignal(sig) is handler:
                signal.signal(sig, old)
        for task in draining:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task


__all__ = ["drain_on_signals"]
