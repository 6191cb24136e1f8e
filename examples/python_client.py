"""Examples for the Python client (``herald.client``), shown verbatim in docs/clients.md.

Each function is self-contained and takes the server's ``/connect`` URL; the tests
(``tests/test_client.py``) run every one of them against a real server and check
that docs/clients.md shows exactly this code.

    python -m examples.python_client ws://127.0.0.1:8000/connect
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from herald.client import (
    Client,
    ClientPublication,
    DisconnectedEvent,
    JoinEvent,
    RecoveryFailedEvent,
)


async def hello(url: str) -> Any:
    async with Client(url, name="example") as client:
        sub = await client.subscribe("chat:lobby")
        position = await client.publish("chat:lobby", {"text": "hello"})
        print("published at", position.offset, "in epoch", position.epoch)
        async for pub in sub:  # our own publication comes back too
            print(pub.offset, pub.data)
            return pub.data


async def callbacks(url: str) -> list[str]:
    seen: list[str] = []
    done = asyncio.Event()

    async with Client(url) as client:

        @client.on("join")
        def joined(event: JoinEvent) -> None:
            print(event.info.client, "joined", event.channel)

        async def on_message(pub: ClientPublication) -> None:
            seen.append(pub.data["text"])  # called in offset order, one at a time
            if len(seen) == 2:
                done.set()

        await client.subscribe("chat:room-1", on_publication=on_message)
        await client.publish("chat:room-1", {"text": "one"})
        await client.publish("chat:room-1", {"text": "two"})
        await asyncio.wait_for(done.wait(), timeout=5)
    return seen


async def presence_and_history(url: str) -> tuple[int, list[Any]]:
    async with Client(url) as client:
        await client.subscribe("chat:room-2")
        await client.publish("chat:room-2", "first")
        await client.publish("chat:room-2", "second")

        who = await client.presence("chat:room-2")  # client id -> ClientInfo
        for client_id, info in who.items():
            print(client_id, info.user, info.info)
        stats = await client.presence_stats("chat:room-2")

        page = await client.history("chat:room-2", limit=10)
        newest = await client.history("chat:room-2", limit=1, reverse=True)
        after_first = await client.history("chat:room-2", since=page.publications[0].position)
        print("stream top:", page.position, "newest:", newest.publications[0].data)
        return stats.num_clients, [p.data for p in after_first.publications]


async def call_rpc(url: str) -> Any:
    # The server registered: @herald.rpc("add") async def add(params: Add, ctx) -> ...
    async with Client(url) as client:
        return await client.rpc("add", {"a": 2, "b": 3}, timeout=5)


async def stay_in_sync(url: str) -> None:
    client = Client(url, backoff_min=0.5, backoff_max=20)

    @client.on("disconnected")
    def offline(event: DisconnectedEvent) -> None:
        print("offline:", event.code, event.reason, "retrying" if event.reconnect else "giving up")

    @client.on("recovery_failed")
    async def resync(event: RecoveryFailedEvent) -> None:
        # Publications after event.previous may be lost (history too short, or the
        # stream was reset): reload the state from the application, then carry on.
        print("re-sync", event.channel, "epoch changed" if event.epoch_changed else "")

    await client.connect(timeout=10)
    sub = await client.subscribe("chat:lobby")
    print("live from offset", sub.position)
    await client.close()


async def resume_later(url: str) -> list[Any]:
    async with Client(url) as client:
        sub = await client.subscribe("chat:journal")
        await client.publish("chat:journal", "seen")
        await sub.next(timeout=5)
        saved = sub.position  # store (offset, epoch) somewhere

    async with Client(url) as client:
        await client.publish("chat:journal", "missed")

    async with Client(url) as client:
        sub = await client.subscribe("chat:journal", since=saved)
        if sub.recovered:  # everything after `saved` is queued, in order
            return [(await sub.next(timeout=5)).data]
        return []  # the gap could not be filled: re-sync from your own data


async def in_a_test(url: str) -> None:
    async with Client(url, timeout=5) as client:
        sub = await client.subscribe("chat:test")
        await client.publish("chat:test", {"n": 1})
        pub = await sub.next(timeout=2)  # raises ClientTimeoutError instead of hanging
        assert pub.data == {"n": 1}


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else "ws://127.0.0.1:8000/connect"
    print(asyncio.run(hello(target)))
