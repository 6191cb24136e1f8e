"""Application hooks: callbacks the app registers for connect, subscribe, publish, disconnect.

A hook may be a plain function or a coroutine function; either way its return
value is what :meth:`AppHooks.run` collects (hooks that veto raise instead).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

Hook = Callable[..., Any]

#: The events a hook can be registered for, in the order a client meets them.
HOOK_EVENTS = ("connect", "subscribe", "publish", "disconnect")


async def maybe_await(value: Any) -> Any:
    """``value``, awaited first if it is awaitable (an app callback may be sync or async)."""
    if inspect.isawaitable(value):
        return await value
    return value


class AppHooks:
    """The hooks of each event, run in registration order."""

    __slots__ = ("_by_event",)

    def __init__(self) -> None:
        self._by_event: dict[str, list[Hook]] = {event: [] for event in HOOK_EVENTS}

    def add(self, event: str, hook: Hook) -> None:
        """Register ``hook`` for ``event``; raises ``ValueError`` for an unknown event."""
        hooks = self._by_event.get(event)
        if hooks is None:
            raise ValueError(f"unknown hook event {event!r}; one of {sorted(self._by_event)}")
        hooks.append(hook)

    async def run(self, event: str, *args: Any) -> list[Any]:
        """Call every hook of ``event`` with ``args``; their results, in order.  A hook's
        exception propagates (and the remaining hooks do not run)."""
        return [await maybe_await(hook(*args)) for hook in self._by_event[event]]
