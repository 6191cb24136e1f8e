"""Herald mounted in an existing FastAPI application.

Run it:  uvicorn examples.chat_app:app --port 8000

It shows the library API: mounting the router, publishing from an ordinary
route, a typed RPC handler, and hooks for connect, subscribe, publish and
disconnect.  tests/integration/test_example_app.py runs this file.
"""

from __future__ import annotations

import random
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, Field

from herald import ClientContext, Herald, NamespaceOptions, PermissionDeniedError, Settings

# Where a real app would look sessions up in its database.
SESSIONS = {"s3cret-alice": "alice", "s3cret-admin": "admin"}

herald = Herald(
    Settings(
        namespaces={
            "chat": NamespaceOptions(history_size=50, history_ttl=300),
            "orders": NamespaceOptions(allow_publish=False, presence=False),
        }
    )
)
app = FastAPI(title="Shop with live updates", lifespan=herald.lifespan)
app.include_router(herald.router)  # /connect, /ws, /ws_json, /ws_broadcast
app.include_router(herald.api_router)  # /api/publish, /api/presence, ...

disconnects: list[tuple[str, int]] = []


@herald.on_connect
async def authenticate(ctx: ClientContext) -> None:
    """Use the app's own session cookie instead of a token."""
    cookie = ctx.header("cookie") or ""
    for part in cookie.split(";"):
        name, _, value = part.strip().partition("=")
        if name == "session" and value in SESSIONS:
            ctx.user = SESSIONS[value]


@herald.on_subscribe
async def only_admins_in_admin_rooms(ctx: ClientContext, channel: str) -> None:
    if channel.startswith("chat:admin") and ctx.user != "admin":
        raise PermissionDeniedError("admins only")


@herald.on_publish
async def sign_messages(ctx: ClientContext, channel: str, data: Any) -> Any:
    """Refuse empty messages; stamp the author on the rest."""
    if not isinstance(data, dict) or not str(data.get("text", "")).strip():
        raise PermissionDeniedError("a message needs non-empty text")
    return {"text": str(data["text"]).strip(), "by": ctx.user or "anonymous"}


@herald.on_disconnect
async def remember(ctx: ClientContext, code: int, reason: str) -> None:
    disconnects.append((ctx.client, code))


class RollParams(BaseModel):
    sides: int = Field(default=6, ge=2, le=100)


class RollResult(BaseModel):
    value: int
    sides: int


@herald.rpc("roll")
async def roll(params: RollParams, ctx: ClientContext) -> RollResult:
    return RollResult(value=random.randint(1, params.sides), sides=params.sides)


class Order(BaseModel):
    item: str
    quantity: int = 1


@app.post("/orders")
async def create_order(order: Order) -> dict[str, Any]:
    """An ordinary route that notifies every subscriber of `orders:new`."""
    position = await herald.publish("orders:new", order.model_dump())
    return {"accepted": True, "offset": position.offset}
