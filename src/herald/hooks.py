"""Application hooks: callbacks that decide what a client may do, in process or over HTTP.

A hook may be a plain function or a coroutine function; either way its return
value is what :meth:`AppHooks.run` collects.  A hook refuses by raising
:class:`~herald.exceptions.CommandError` (an error reply with its code) or
:class:`~herald.exceptions.DisconnectError` (the connection closes with its code).

The proxy hooks of ``herald serve`` (:mod:`herald.proxy`) are hooks like any other:
registered here, first, from the settings, so an HTTP backend and an app's
in-process hooks follow the same order and the same rules.

The events, their arguments and what a hook may return:

============  ==========================  ===============================================
event         arguments                   return value
============  ==========================  ===============================================
connect       ``(ctx)``                   may set ``ctx.user``/``ctx.info``; may return
                                          :class:`ExpiresAt` (the connection must be
                                          refreshed then)
refresh       ``(ctx)``                   at the connection's expiry: :class:`ExpiresAt`
                                          extends it; None asks the client for a token
subscribe     ``(ctx, channel)``          may return :class:`ExpiresAt` (the
                                          subscription must be refreshed then)
sub_refresh   ``(ctx, channel)``          at the subscription's expiry: as ``refresh``
publish       ``(ctx, channel, data)``    a value replaces ``data`` (None keeps it)
rpc           ``(ctx, method, params)``   methods without a registered handler: the first
                                          value that is not None is the result
disconnect    ``(ctx, code, reason)``     ignored (the client already left)
============  ==========================  ===============================================
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

Hook = Callable[..., Any]

#: The events a hook can be registered for, in the order a client meets them.
HOOK_EVENTS = ("connect", "refresh", "subscribe", "sub_refresh", "publish", "rpc", "disconnect")


@dataclass(frozen=True, slots=True)
class ExpiresAt:
    """What a ``connect``, ``subscribe``, ``refresh`` or ``sub_refresh`` hook returns to
    say until when the connection (or the subscription) holds: ``at`` is a Unix time.

    Then the ``refresh`` (``sub_refresh``) hooks are asked again; without one that
    extends it, the client is asked for a new token as for an expiring JWT.
    """

    at: float


async def maybe_await(value: Any) -> Any:
    """``value``, awaited first if it is awaitable (an app callback may be sync or async)."""
    if inspect.isawaitable(value):
        return await value
    return value


def earliest_expiry(results: Iterable[Any], *others: float | None) -> float | None:
    """The earliest of the :class:`ExpiresAt` among hook ``results`` and ``others``
    (token ``exp`` claims; None: no expiry); None when nothing expires."""
    times = [result.at for result in results if isinstance(result, ExpiresAt)]
    times.extend(other for other in others if other is not None)
    return min(times) if times else None


def first_answer(results: Iterable[Any]) -> Any:
    """The first result that is not None (``publish`` data, an ``rpc`` result), or None."""
    for result in results:
        if result is not None:
            return result
    return None


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

    def has(self, event: str) -> bool:
        """Whether any hook is registered for ``event``."""
        return bool(self._by_event.get(event))

    async def run(self, event: str, *args: Any) -> list[Any]:
        """Call every hook of ``event`` with ``args``; their results, in order.  A hook's
        exception propagates (and the remaining hooks do not run)."""
        return [await maybe_await(hook(*args)) for hook in self._by_event[event]]
