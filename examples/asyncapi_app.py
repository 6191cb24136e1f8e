"""Typed RPC methods, documented for free: run it and open http://127.0.0.1:8000/asyncapi.

    uvicorn examples.asyncapi_app:app

Each ``@herald.rpc`` handler's params and return annotations are pydantic models, so
``/asyncapi.json`` lists the methods as ``rpc.<name>`` operations with their JSON Schemas,
next to FastAPI's ``/docs`` for the HTTP side.
"""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel, Field

from herald import ClientContext, Herald, NamespaceOptions, Settings


class Move(BaseModel):
    """Where the caller wants to move its piece."""

    x: int = Field(ge=0, lt=100, description="Column, 0-99.")
    y: int = Field(ge=0, lt=100, description="Row, 0-99.")


class MoveResult(BaseModel):
    accepted: bool
    turn: int = Field(description="The game's turn number after the move.")


class Shout(BaseModel):
    text: str = Field(min_length=1, max_length=200)


# An application names the namespaces its channels use ("game:board" below).
herald = Herald(Settings(namespaces={"game": NamespaceOptions(history_size=200)}))
app = FastAPI(title="AsyncAPI example", lifespan=herald.lifespan)
app.include_router(herald.router)
app.include_router(herald.asyncapi_router)

_turn = 0


@herald.rpc("game.move")
async def move(params: Move, ctx: ClientContext) -> MoveResult:
    """Move the caller's piece; the whole game sees it in ``game:board``."""
    global _turn
    _turn += 1
    await herald.publish("game:board", {"user": ctx.user, "x": params.x, "y": params.y})
    return MoveResult(accepted=True, turn=_turn)


@herald.rpc("shout")
async def shout(params: Shout) -> str:
    """Return the text in capitals."""
    return params.text.upper()
