"""RPC methods the application registers, and calling them for a client's ``rpc`` command.

A handler's parameters are recognised by annotation when it is registered (not
per call): one :class:`~herald.context.ClientContext` receives the caller's
context, the other one the command's ``params``, validated against its
annotation.  The handler may be sync or async; a pydantic model it returns is
dumped to JSON.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from .codes import ErrorCode
from .context import ClientContext
from .exceptions import CommandError
from .hooks import maybe_await


@dataclass(slots=True)
class RpcMethod:
    name: str
    handler: Callable[..., Any]
    params: TypeAdapter[Any] | None
    params_type: Any
    result_type: Any
    #: What each positional argument of the handler receives: "params" or "ctx".
    arguments: tuple[str, ...] = ()


def rpc_method(name: str, handler: Callable[..., Any]) -> RpcMethod:
    """Inspect ``handler`` once: which argument gets the params, which the context.

    Its parameters are recognised by annotation: one annotated ``ClientContext`` (or
    named ``ctx`` without annotation) receives the caller's context; the other one
    receives the command's ``params``, validated against its annotation (no annotation:
    any JSON value).  Both are optional: ``handler()``, ``handler(params)``,
    ``handler(ctx)`` and ``handler(params, ctx)`` all work.  Raises ``TypeError`` for
    a handler that takes more, or whose annotations cannot be resolved.
    """
    try:
        hints = inspect.get_annotations(handler, eval_str=True)
    except NameError as exc:
        raise TypeError(
            f"rpc handler {name!r}: cannot resolve its annotations ({exc}); "
            "define the types it uses at module level"
        ) from None
    arguments: list[str] = []
    params_type: Any = None
    for parameter in inspect.signature(handler).parameters.values():
        annotation = hints.get(parameter.name)
        if annotation is ClientContext or (annotation is None and parameter.name == "ctx"):
            arguments.append("ctx")
        elif "params" in arguments:
            raise TypeError(f"rpc handler {name!r} may take one params argument and one ctx")
        else:
            arguments.append("params")
            params_type = annotation
    adapter = TypeAdapter(params_type) if params_type is not None else None
    return RpcMethod(name, handler, adapter, params_type, hints.get("return"), tuple(arguments))


async def call_rpc(methods: Mapping[str, RpcMethod], name: str, params: Any, ctx: ClientContext) -> Any:
    """Validate ``params`` and call method ``name``; its JSON-able result.

    Raises ``CommandError`` METHOD_NOT_FOUND for an unknown method and INVALID_PARAMS
    (naming the first bad field) when the params do not validate.
    """
    method = methods.get(name)
    if method is None:
        raise CommandError(ErrorCode.METHOD_NOT_FOUND, f"method not found: {name[:64]}")
    if method.params is not None:
        try:
            params = method.params.validate_python(params)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"])
            raise CommandError(
                ErrorCode.INVALID_PARAMS, f"{where}: {first['msg']}" if where else first["msg"]
            ) from None
    args = [ctx if kind == "ctx" else params for kind in method.arguments]
    result = await maybe_await(method.handler(*args))
    if isinstance(result, BaseModel):
        return result.model_dump(mode="json")
    return result
