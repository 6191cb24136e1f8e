"""A channel subscription: an async iterator of publications that survives reconnects."""

from __future__ import annotations

import asyncio
import enum
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeAlias

from ..exceptions import ClientError, ClientTimeoutError
from ..protocol.values import ClientPublication, JoinEvent, LeaveEvent, StreamPosition
from .link import Link, Token

if TYPE_CHECKING:
    from .client import Client

logger = logging.getLogger("herald.client")


Since: TypeAlias = "StreamPosition | tuple[int, str] | Mapping[str, Any] | None"


def position_of(value: Since) -> StreamPosition | None:
    if value is None or isinstance(value, StreamPosition):
        return value
    if isinstance(value, tuple):
        offset, epoch = value
        return StreamPosition(int(offset), str(epoch))
    if isinstance(value, Mapping):
        return StreamPosition(int(value["offset"]), str(value["epoch"]))
    raise TypeError(f"since must be a StreamPosition, (offset, epoch) or a mapping, not {value!r}")


async def maybe_await(value: Any) -> None:
    if inspect.isawaitable(value):
        await value


class End:
    """Queue sentinel: the subscription ended (``error`` set when it ended abnormally)."""

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


# ---------------------------------------------------------------- subscription


class SubscriptionState(enum.Enum):
    SUBSCRIBING = "subscribing"
    SUBSCRIBED = "subscribed"
    UNSUBSCRIBED = "unsubscribed"


class Subscription:
    """One channel the client is subscribed to; an async iterator of its publications.

    Publications are buffered (unbounded) until read, unless ``on_publication``
    was given to :meth:`Client.subscribe`, in which case a task feeds them to it.
    """

    def __init__(
        self,
        client: Client,
        channel: str,
        since: StreamPosition | None,
        on_publication: Callable[[ClientPublication], Any] | None,
        on_join: Callable[[JoinEvent], Any] | None = None,
        on_leave: Callable[[LeaveEvent], Any] | None = None,
    ) -> None:
        self.client = client
        self.channel = channel
        #: Position (offset, epoch) of the last publication received, or of the
        #: stream's top when subscribed; ``None`` until the first subscribe reply.
        self.position: StreamPosition | None = since
        #: ``None`` until a subscribe with ``since``; then whether nothing was missed.
        self.recovered: bool | None = None
        #: Whether the channel keeps history (the server's ``recoverable``).
        self.recoverable = False
        self.state = SubscriptionState.SUBSCRIBING
        #: Called (sync or async) with each :class:`JoinEvent` / :class:`LeaveEvent` of
        #: this channel, before the client's ``join``/``leave`` handlers, by the same task.
        self.on_join = on_join
        self.on_leave = on_leave
        self._confirmed = False  # the server confirmed it at least once
        self._queue: asyncio.Queue[ClientPublication | End] = asyncio.Queue()
        self._ended: End | None = None
        self._link: Link | None = None
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._callback = on_publication
        self._task: asyncio.Task[None] | None = None
        #: The subscription token (a string, or a callable giving a fresh one) and the
        #: value last sent (resubscribes after a reconnect send it again, refreshed).
        self._token: Token = None
        self._token_value: str | None = None
        if on_publication is not None:
            self._task = asyncio.get_running_loop().create_task(
                self._feed(on_publication), name=f"herald-client-sub-{channel}"
            )

    def __repr__(self) -> str:
        return f"<Subscription {self.channel} {self.state.value} at {self.position}>"

    # -- reading

    async def next(self, timeout: float | None = None) -> ClientPublication:
        """The next publication; raises :class:`ClientTimeoutError` after ``timeout`` seconds.

        Raises :class:`StopAsyncIteration` once the subscription ended normally
        (unsubscribed, client closed) and :class:`ClientClosedError` or
        :class:`ReplyError` when it ended because of the server.
        """
        if self._callback is not None:
            raise ClientError("this subscription delivers to its on_publication callback")
        if self._ended is not None and self._queue.empty():
            return self._raise_end(self._ended)
        wait = self.client.timeout if timeout is None else timeout
        try:
            item = await asyncio.wait_for(self._queue.get(), wait)
        except TimeoutError:
            raise ClientTimeoutError(f"no publication on {self.channel} within {wait:g}s") from None
        if isinstance(item, End):
            self._queue.put_nowait(item)  # every later call ends too
            return self._raise_end(item)
        return item

    @staticmethod
    def _raise_end(end: End) -> ClientPublication:
        if end.error is not None:
            raise end.error
        raise StopAsyncIteration

    def __aiter__(self) -> AsyncIterator[ClientPublication]:
        return self

    async def __anext__(self) -> ClientPublication:
        """Waits without a time limit; use :meth:`next` with a timeout in tests."""
        if self._callback is not None:
            raise ClientError("this subscription delivers to its on_publication callback")
        if self._ended is not None and self._queue.empty():
            return self._raise_end(self._ended)
        item = await self._queue.get()
        if isinstance(item, End):
            self._queue.put_nowait(item)
            return self._raise_end(item)
        return item

    def pending(self) -> int:
        """Publications received but not read yet."""
        return max(self._queue.qsize() - (1 if self._ended is not None else 0), 0)

    async def unsubscribe(self, timeout: float | None = None) -> None:
        await self.client.unsubscribe(self.channel, timeout=timeout)

    async def wait_subscribed(self, timeout: float | None = None) -> None:
        """Wait until the server confirmed this subscription (again, after a reconnect)."""
        wait = self.client.timeout if timeout is None else timeout
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), wait)
        except TimeoutError:
            raise ClientTimeoutError(f"not subscribed to {self.channel} within {wait:g}s") from None

    # -- fed by the client (synchronously, from its reader)

    def _deliver(self, publication: ClientPublication) -> bool:
        """Queue ``publication`` unless it was already delivered; returns whether it was queued."""
        if self._ended is not None:
            return False
        last = self.position
        if last is not None and publication.epoch == last.epoch and publication.offset <= last.offset:
            return False  # a duplicate: at or below what we already have in this stream
        self.position = publication.position
        self._queue.put_nowait(publication)
        return True

    def _end(self, error: BaseException | None) -> None:
        if self._ended is not None:
            return
        self.state = SubscriptionState.UNSUBSCRIBED
        self._ended = End(error)
        self._queue.put_nowait(self._ended)
        if not self._ready.done():
            self._ready.set_exception(error or ClientError(f"unsubscribed from {self.channel}"))
            self._ready.exception()  # retrieved: nobody may be waiting

    async def _feed(self, callback: Callable[[ClientPublication], Any]) -> None:
        while True:
            item = await self._queue.get()
            if isinstance(item, End):
                return
            try:
                await maybe_await(callback(item))
            except Exception:
                logger.exception("on_publication callback for %s failed", self.channel)
