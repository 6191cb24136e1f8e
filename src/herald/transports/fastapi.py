"""Hooks that reuse the app's FastAPI dependencies: :func:`run_dependency`.

The WebSocket routes themselves are not FastAPI endpoints (see
:mod:`herald.transports.asgi`); this module is what is left of FastAPI on the socket
side: running a dependency against a handshake's ASGI scope.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, MutableMapping
from typing import Any

from starlette.websockets import WebSocket


async def run_dependency(dependency: Callable[..., Any], scope: MutableMapping[str, Any]) -> Any:
    """Run a FastAPI dependency callable against a WebSocket handshake's ASGI ``scope``.

    For Herald hooks (``on_connect``, ``on_subscribe``, ...) that want to reuse the
    app's dependencies: ``user = await run_dependency(current_user, ctx.scope)``.
    Sub-dependencies, ``Header``/``Cookie``/``Query`` parameters and
    ``WebSocket``/``HTTPConnection`` parameters are resolved as FastAPI does;
    yield-dependencies are finished before this returns.  A parameter that cannot
    be resolved raises :class:`fastapi.exceptions.WebSocketRequestValidationError`;
    an ``HTTPException`` raised by the dependency propagates (Herald maps exceptions
    in hooks to error replies).
    """
    from fastapi.dependencies.utils import get_dependant, solve_dependencies
    from fastapi.exceptions import WebSocketRequestValidationError

    async def no_receive() -> Any:
        raise RuntimeError("a dependency cannot read from the WebSocket")

    async def no_send(message: Any) -> None:
        raise RuntimeError("a dependency cannot write to the WebSocket")

    dependant = get_dependant(path=str(scope.get("path", "/")), call=dependency)
    async with contextlib.AsyncExitStack() as stack:
        # FastAPI's routes put their exit stacks in the scope; yield-dependencies need them.
        own_scope = {
            **scope,
            "fastapi_inner_astack": stack,
            "fastapi_function_astack": stack,
        }
        websocket = WebSocket(own_scope, receive=no_receive, send=no_send)
        solved = await solve_dependencies(
            request=websocket,
            dependant=dependant,
            async_exit_stack=stack,
            embed_body_fields=False,
        )
        if solved.errors:
            raise WebSocketRequestValidationError(solved.errors)
        result = dependency(**solved.values)
        if inspect.isawaitable(result):
            result = await result
        elif inspect.isgenerator(result) or inspect.isasyncgen(result):
            raise TypeError("run_dependency: call generator dependencies from another dependency")
        return result


__all__ = ["run_dependency"]
