"""The access policy: one point that decides what a client may do with a channel.

Every protocol command that names a channel (``subscribe``, recovery with
``since``, ``history``, ``presence``, ``presence_stats``, ``publish``) asks
:meth:`ChannelPolicy.check` before touching the broker, and the HTTP API asks the
same function with ``trusted=True``.  A rule written here holds on every path;
a rule written anywhere else would hold on one path only (issue 13: history,
presence and publish once ignored the subscribe rules).

The rules, in the order they are checked (the first refusal wins):

1. the channel name is valid and its namespace configured (106, 107);
2. the namespace lets clients do this operation: ``allow_subscribe``,
   ``allow_history`` (history and recovery), ``allow_presence``,
   ``allow_publish`` (110), and the feature is on: history kept, presence
   tracked (118);
3. ``allow_anonymous = false``: clients without a user id are refused (110);
4. a user-limited channel (``chat:dm#alice,bob``) admits only the users it
   lists (110);
5. the right to the channel itself: ``subscribe`` needs a subscription token
   (``typ: "subscription"``) or, in a ``private`` namespace, a connection token
   whose ``channels`` claim grants the channel; then the ``on_subscribe``
   hooks must accept (the proxy's subscribe call is one of them, see
   :mod:`herald.proxy`).  Every other operation is allowed *on a channel the
   client could subscribe to*: a client subscribed to the channel on this
   connection passed these checks already; otherwise a ``private`` channel
   needs the connection token's ``channels`` grant and the ``on_subscribe``
   hooks run again, with the same arguments, exactly as for a subscribe.

``publish`` then runs the ``on_publish`` hooks (:meth:`ChannelPolicy.publish_data`).

The HTTP API (``trusted=True``) skips 2's client permissions and 3-5: an
API-key holder is the application's backend and may read and publish
anything.  It shares the feature checks of 2, the history limit clamp
(:func:`clamp_history_limit`), the epoch check (:func:`check_epoch`) and the
bounded history read (:func:`read_history`).
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from .auth import TokenClaims
from .brokers.base import HistoryResult, Publication, StreamPosition
from .codes import ErrorCode
from .config import NamespaceOptions
from .exceptions import CommandError
from .hooks import earliest_expiry
from .protocol.channels import allowed_users

if TYPE_CHECKING:
    from .context import ClientContext
    from .node import Node


class Operation(enum.StrEnum):
    """What a client does with a channel."""

    SUBSCRIBE = "subscribe"
    RECOVER = "recover"  # subscribe with `since`: the missed publications come from history
    HISTORY = "history"
    PRESENCE = "presence"
    PRESENCE_STATS = "presence_stats"
    PUBLISH = "publish"


#: The namespace option that lets clients do each operation, and its refusal's wording.
_PERMISSIONS: dict[Operation, tuple[str, str]] = {
    Operation.SUBSCRIBE: ("allow_subscribe", "subscribing"),
    Operation.RECOVER: ("allow_history", "history"),
    Operation.HISTORY: ("allow_history", "history"),
    Operation.PRESENCE: ("allow_presence", "presence"),
    Operation.PRESENCE_STATS: ("allow_presence", "presence"),
    Operation.PUBLISH: ("allow_publish", "publishing"),
}


@dataclass(frozen=True, slots=True)
class Grant:
    """A check that passed: the channel's valid name, its namespace options, the
    subscription token's claims when one was given, and when the subscription must be
    refreshed (the earliest of the token's ``exp`` and the ``subscribe`` hooks'
    :class:`~herald.hooks.ExpiresAt`; None: never)."""

    channel: str
    options: NamespaceOptions
    token: TokenClaims | None = None
    expires_at: float | None = None


class ChannelPolicy:
    """The one access-policy point of a node (``node.policy``)."""

    __slots__ = ("node",)

    def __init__(self, node: Node) -> None:
        self.node = node

    async def check(
        self,
        ctx: ClientContext | None,
        operation: Operation,
        channel: object,
        *,
        subscriptions: Collection[str] = (),
        token: str | None = None,
        trusted: bool = False,
    ) -> Grant:
        """Allow ``operation`` on ``channel`` for the client ``ctx``, or raise ``CommandError``.

        ``subscriptions`` are the channels the client is subscribed to on this
        connection; ``token`` the subscription token sent with a subscribe.
        ``trusted`` (the HTTP API, ``ctx`` None) applies only the feature checks.
        """
        node = self.node
        name, options = self._admit(ctx, operation, channel, trusted)
        if trusted:
            return Grant(name, options)
        assert ctx is not None  # _admit refused an untrusted check without one
        if operation is Operation.SUBSCRIBE:
            claims = await node.authorize_subscribe(ctx, name, token, private=options.private)
            results = await node.run_hooks("subscribe", ctx, name)
            expires_at = earliest_expiry(results, claims.expires_at if claims is not None else None)
            return Grant(name, options, claims, expires_at)
        if operation is Operation.RECOVER or name in subscriptions:
            # Recovery is part of a subscribe that just passed; a subscription passed too.
            return Grant(name, options)
        self._check_private(ctx, name, options)
        if node.hooks.has("subscribe"):
            await node.run_hooks("subscribe", ctx, name)
        return Grant(name, options)

    def check_now(
        self,
        ctx: ClientContext,
        operation: Operation,
        channel: object,
        *,
        subscriptions: Collection[str] = (),
    ) -> Grant | None:
        """:meth:`check` for a client, without awaiting: the grant (or ``CommandError``),
        or None when the answer needs a hook (a subscribe, or ``subscribe`` hooks to ask
        about a channel the client is not subscribed to): then use :meth:`check`."""
        if operation is Operation.SUBSCRIBE:
            return None
        name, options = self._admit(ctx, operation, channel, False)
        if operation is Operation.RECOVER or name in subscriptions:
            return Grant(name, options)
        self._check_private(ctx, name, options)
        if self.node.hooks.has("subscribe"):
            return None
        return Grant(name, options)

    def _admit(
        self, ctx: ClientContext | None, operation: Operation, channel: object, trusted: bool
    ) -> tuple[str, NamespaceOptions]:
        """The channel's name and options, after the checks that need no hook."""
        name, options = self.node.check_channel(channel)
        if not trusted:
            flag, what = _PERMISSIONS[operation]
            if not getattr(options, flag):
                raise CommandError(ErrorCode.PERMISSION_DENIED, f"{what} is not allowed in this namespace")
        _check_feature(operation, options)
        if trusted:
            return name, options
        if ctx is None:
            raise ValueError("an untrusted check needs the client's context")
        if not options.allow_anonymous and not ctx.user:
            raise CommandError(ErrorCode.PERMISSION_DENIED, "anonymous clients may not use this namespace")
        users = allowed_users(name)
        if users is not None and ctx.user not in users:
            raise CommandError(ErrorCode.PERMISSION_DENIED, "channel is limited to other users")
        return name, options

    def _check_private(self, ctx: ClientContext, name: str, options: NamespaceOptions) -> None:
        if options.private and not (ctx.claims is not None and ctx.claims.grants(name)):
            self.node.record_rejection("private_channel")
            raise CommandError(
                ErrorCode.PERMISSION_DENIED,
                "private channel: subscribe to it (with a subscription token) first",
            )

    async def publish_data(self, ctx: ClientContext, channel: str, data: Any) -> Any:
        """The data to publish after the ``on_publish`` hooks (each may refuse or replace it)."""
        if not self.node.hooks.has("publish"):
            return data
        for replaced in await self.node.run_hooks("publish", ctx, channel, data):
            if replaced is not None:
                data = replaced
        return data


def _check_feature(operation: Operation, options: NamespaceOptions) -> None:
    if operation is Operation.HISTORY and options.history_size == 0:
        raise CommandError(ErrorCode.NOT_AVAILABLE, "history is off in this namespace")
    if operation in (Operation.PRESENCE, Operation.PRESENCE_STATS) and not options.presence:
        raise CommandError(ErrorCode.NOT_AVAILABLE, "presence is off in this namespace")


# ---------------------------------------------------------------- history reads


def clamp_history_limit(requested: int | None, max_limit: int) -> int:
    """The number of publications a history read may return: ``requested`` (None: as
    many as allowed), never more than ``max_limit`` (``max_history_limit``)."""
    return max_limit if requested is None else max(0, min(requested, max_limit))


def check_epoch(since: StreamPosition | None, position: StreamPosition) -> None:
    """Refuse (119) a history read from a position of another stream than the current one.

    An empty ``since.epoch`` means "the current stream" (the HTTP API's optional
    ``since_epoch``) and is never refused.
    """
    if since is not None and since.epoch and since.epoch != position.epoch:
        raise CommandError(ErrorCode.UNRECOVERABLE_POSITION, "epoch changed: the stream was reset")


def reply_byte_budget(max_queue_bytes: int) -> int:
    """The most bytes of publications one reply (history, or all channels of one
    subscribe) may carry: half the connection's outbound bound, so that the reply is
    queued next to live traffic instead of closing the client as a slow consumer."""
    return max(max_queue_bytes // 2, 512)


def publication_size(publication: Publication) -> int:
    """About the bytes ``publication`` takes in a reply (an upper bound of the JSON)."""
    size = len(publication.data) + 48  # {"offset":N,"data":...,"info":...} around the data
    info = publication.info
    if info is not None:
        size += len(orjson.dumps(info.as_dict()))
    return size


@dataclass(frozen=True, slots=True)
class HistoryRead:
    """Publications read for one reply, and the stream's position.

    ``cut``: the reply stopped at its byte budget (or at a gap in the stream) before
    ``limit``; the client pages on with ``since`` = the last offset it got.
    """

    publications: list[Publication]
    position: StreamPosition
    cut: bool = False
    size: int = 0


HistoryFunction = Callable[..., Awaitable[HistoryResult]]

#: Publications read by the first broker call of a paged read.
_FIRST_PAGE = 32


@dataclass(slots=True)
class _Taken:
    """The publications of one paged read so far, within ``budget`` bytes."""

    budget: int
    publications: list[Publication] = field(default_factory=list)
    used: int = 0
    biggest: int = 1  # the largest publication seen, to size the next page

    def take(self, publication: Publication) -> bool:
        """Add ``publication`` unless it overflows the budget (the first always fits)."""
        size = publication_size(publication)
        if self.publications and self.used + size > self.budget:
            return False
        self.publications.append(publication)
        self.used += size
        self.biggest = max(self.biggest, size)
        return True

    def fitting(self) -> int:
        """Publications the rest of the budget may hold, at the largest size seen."""
        return (self.budget - self.used) // self.biggest + 1

    def read(self, position: StreamPosition, cut: bool = False) -> HistoryRead:
        return HistoryRead(self.publications, position, cut=cut, size=self.used)


async def read_history(
    history: HistoryFunction,
    channel: str,
    *,
    since: StreamPosition | None,
    limit: int,
    reverse: bool = False,
    byte_budget: int | None = None,
    whole: bool = False,
) -> HistoryRead:
    """Read up to ``limit`` publications of ``channel`` (after ``since``), at most
    ``byte_budget`` bytes of them (:func:`publication_size`; at least one publication
    when there is one, so that a client paging with ``since`` always progresses).

    Forward reads with a budget are paged, so the server never holds more than the
    budget plus one page, however long the stream; publications after the first must
    be contiguous and pages of one epoch, else the read stops there (``cut``).
    Whether the first follows ``since`` is the caller's question (recovery checks it;
    history starts at the oldest publication kept).
    A ``since`` of another epoch than the stream's returns no publication (the
    caller refuses with :func:`check_epoch` or answers ``recovered: false``).

    ``whole`` (recovery: all or nothing): stop after the first page, ``cut``, when
    the stream's top shows that more than ``limit`` publications follow ``since``.
    """
    if since is not None and not since.epoch:
        # "The current stream": learn its epoch so that the offset is honoured.
        top = (await history(channel, limit=0)).position
        since = StreamPosition(since.offset, top.epoch)
    if limit <= 0:
        return HistoryRead([], (await history(channel, limit=0)).position)
    if byte_budget is None:
        result = await history(channel, since=since, limit=limit, reverse=reverse)
        if since is not None and since.epoch != result.position.epoch:
            return HistoryRead([], result.position)
        return HistoryRead(result.publications, result.position)
    if reverse:
        return await _read_newest_first(history, channel, since, limit, byte_budget)
    taken = _Taken(byte_budget)
    cursor = since
    following: int | None = None  # the offset the next page must start at
    page = min(limit, _FIRST_PAGE)
    position: StreamPosition | None = None
    while True:
        result = await history(channel, since=cursor, limit=page)
        if position is None:
            if since is not None and since.epoch != result.position.epoch:
                return HistoryRead([], result.position)
            if whole and since is not None and result.position.offset - since.offset > limit:
                return HistoryRead([], result.position, cut=True)
        elif result.position.epoch != position.epoch:
            # The stream was reset between two pages: what was read is all this reply has.
            return taken.read(position, cut=True)
        position = result.position
        for publication in result.publications:
            if (following is not None and publication.offset != following) or not taken.take(publication):
                return taken.read(position, cut=True)
            cursor = StreamPosition(publication.offset, position.epoch)
            following = publication.offset + 1
        if len(result.publications) < page or len(taken.publications) >= limit:
            return taken.read(position)
        page = max(1, min(limit - len(taken.publications), taken.fitting()))
        await asyncio.sleep(0)  # a long read must not hold the loop


async def _read_newest_first(
    history: HistoryFunction, channel: str, since: StreamPosition | None, limit: int, byte_budget: int
) -> HistoryRead:
    """:func:`read_history` with ``reverse``, paged: brokers read oldest first from a
    position only, so each page is the ``n`` publications after ``upper - n``, walked
    backwards from the stream's top down to ``since`` (exclusive)."""
    position = (await history(channel, limit=0)).position
    if since is not None and since.epoch != position.epoch:
        return HistoryRead([], position)
    floor = since.offset if since is not None else 0
    taken = _Taken(byte_budget)
    upper = position.offset  # the next publication to take, going down
    page = min(limit, _FIRST_PAGE)
    while len(taken.publications) < limit and upper > floor:
        count = min(page, limit - len(taken.publications), upper - floor)
        result = await history(channel, since=StreamPosition(upper - count, position.epoch), limit=count)
        if result.position.epoch != position.epoch:
            return taken.read(position, cut=True)
        chunk = [p for p in result.publications if p.offset <= upper]
        if not chunk:
            break  # nothing older is kept
        for publication in reversed(chunk):
            if publication.offset != upper or not taken.take(publication):
                return taken.read(position, cut=True)
            upper -= 1
        if len(chunk) < count:
            break  # the stream starts here (older publications expired or trimmed)
        page = max(1, taken.fitting())
        await asyncio.sleep(0)
    return taken.read(position)


__all__ = [
    "ChannelPolicy",
    "Grant",
    "HistoryRead",
    "Operation",
    "check_epoch",
    "clamp_history_limit",
    "publication_size",
    "read_history",
    "reply_byte_budget",
]
