"""The access policy's pure functions (herald/policy.py), without a node or a broker.

The rules of :class:`~herald.policy.ChannelPolicy` are proved over real sockets in
tests/integration/test_policy_matrix.py; here are the functions the protocol and the
HTTP API share: the history limit clamp, the epoch check, the reply byte budget and
the bounded, paged history read, driven with a fake stream that records every read.
"""

from __future__ import annotations

import asyncio

import orjson
import pytest

from herald import policy
from herald.brokers.base import HistoryResult, Publication
from herald.codes import ErrorCode
from herald.config import NamespaceOptions
from herald.exceptions import CommandError
from herald.policy import (
    HistoryRead,
    Operation,
    _check_feature,
    check_epoch,
    clamp_history_limit,
    publication_size,
    read_history,
    reply_byte_budget,
)
from herald.protocol import ClientInfo, StreamPosition

CHANNEL = "chat:policy"
SIZE = 58  # publication_size of a publication of 10 bytes without info


class Stream:
    """A fake broker history function over one channel's stream (the memory broker's
    semantics: ``since`` of another epoch reads from the oldest publication kept).
    ``calls`` records each read as (since, limit, reverse)."""

    def __init__(
        self, top: int, *, oldest: int = 1, epoch: str = "e1", missing: tuple[int, ...] = ()
    ) -> None:
        self.top = top
        self.epoch = epoch
        self.offsets = [o for o in range(oldest, top + 1) if o not in missing]
        self.calls: list[tuple[tuple[int, str] | None, int | None, bool]] = []
        self.reset_after: int | None = None  # start a new epoch after this many reads

    def publication(self, offset: int) -> Publication:
        return Publication(CHANNEL, offset, self.epoch, b"0123456789")

    async def __call__(
        self,
        channel: str,
        *,
        since: StreamPosition | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> HistoryResult:
        assert channel == CHANNEL
        self.calls.append((None if since is None else (since.offset, since.epoch), limit, reverse))
        if self.reset_after is not None and len(self.calls) > self.reset_after:
            self.epoch = "e2"
        position = StreamPosition(self.top, self.epoch)
        if limit == 0:
            return HistoryResult([], position)
        offsets = self.offsets
        if since is not None and since.epoch == self.epoch:
            offsets = [o for o in offsets if o > since.offset]
        if reverse:
            offsets = offsets[::-1]
        if limit is not None:
            offsets = offsets[:limit]
        return HistoryResult([self.publication(o) for o in offsets], position)


def offsets(read: HistoryRead) -> list[int]:
    return [p.offset for p in read.publications]


# ---------------------------------------------------------------- small rules


@pytest.mark.parametrize(
    ("requested", "expected"), [(None, 10), (0, 0), (1, 1), (9, 9), (10, 10), (11, 10), (10**9, 10), (-3, 0)]
)
def test_clamp_history_limit(requested: int | None, expected: int) -> None:
    assert clamp_history_limit(requested, 10) == expected


def test_check_epoch_refuses_only_another_stream() -> None:
    position = StreamPosition(7, "e1")
    check_epoch(None, position)
    check_epoch(StreamPosition(7, "e1"), position)
    check_epoch(StreamPosition(3, ""), position)  # "the current stream"
    with pytest.raises(CommandError) as refused:
        check_epoch(StreamPosition(7, "e0"), position)
    assert refused.value.code == ErrorCode.UNRECOVERABLE_POSITION
    assert refused.value.message == "epoch changed: the stream was reset"


@pytest.mark.parametrize(
    ("queue_bytes", "budget"),
    [(10_000, 5_000), (1_026, 513), (1_025, 512), (1_024, 512), (100, 512), (0, 512)],
)
def test_reply_byte_budget_is_half_the_queue_at_least_512(queue_bytes: int, budget: int) -> None:
    assert reply_byte_budget(queue_bytes) == budget


def test_publication_size_bounds_its_json() -> None:
    plain = Publication(CHANNEL, 1, "e", b"0123456789")
    assert publication_size(plain) == 10 + 48 == SIZE
    info = ClientInfo("c1", "alice", {"role": "admin"})
    signed = Publication(CHANNEL, 1, "e", b"0123456789", info)
    assert publication_size(signed) == SIZE + len(orjson.dumps(info.as_dict()))
    whole = orjson.dumps({"offset": 1, "data": orjson.Fragment(b"0123456789"), "info": info.as_dict()})
    assert publication_size(signed) >= len(whole)


def options(**fields: object) -> NamespaceOptions:
    return NamespaceOptions.model_validate(fields)


def test_features_that_are_off_are_not_available() -> None:
    no_history, no_presence = options(history_size=0), options(presence=False)
    for operation, namespace in (
        (Operation.HISTORY, no_history),
        (Operation.PRESENCE, no_presence),
        (Operation.PRESENCE_STATS, no_presence),
    ):
        with pytest.raises(CommandError) as refused:
            _check_feature(operation, namespace)
        assert refused.value.code == ErrorCode.NOT_AVAILABLE
    with pytest.raises(CommandError) as history_off:
        _check_feature(Operation.HISTORY, no_history)
    assert history_off.value.message == "history is off in this namespace"
    with pytest.raises(CommandError) as presence_off:
        _check_feature(Operation.PRESENCE, no_presence)
    assert presence_off.value.message == "presence is off in this namespace"
    # Recovery without history is answered recovered: false, not refused; other
    # operations do not need the feature that is off.
    for operation in Operation:
        if operation is not Operation.HISTORY:
            _check_feature(operation, no_history)
        if operation not in (Operation.PRESENCE, Operation.PRESENCE_STATS):
            _check_feature(operation, no_presence)
        _check_feature(operation, options())


# ---------------------------------------------------------------- read_history, one read


async def test_a_read_without_a_budget_is_one_broker_call() -> None:
    stream = Stream(70)
    read = await read_history(stream, CHANNEL, since=StreamPosition(60, "e1"), limit=5)
    assert offsets(read) == [61, 62, 63, 64, 65]
    assert (read.position, read.cut, read.size) == (StreamPosition(70, "e1"), False, 0)
    assert stream.calls == [((60, "e1"), 5, False)]
    newest = await read_history(stream, CHANNEL, since=None, limit=3, reverse=True)
    assert offsets(newest) == [70, 69, 68]
    assert stream.calls[1:] == [(None, 3, True)]


async def test_a_read_from_another_epoch_returns_nothing() -> None:
    for budget in (None, 10_000):
        for reverse in (False, True):
            stream = Stream(70)
            since = StreamPosition(60, "e0")
            read = await read_history(
                stream, CHANNEL, since=since, limit=5, reverse=reverse, byte_budget=budget
            )
            assert read == HistoryRead([], StreamPosition(70, "e1")), (budget, reverse)


async def test_an_empty_epoch_means_the_current_stream() -> None:
    stream = Stream(70)
    read = await read_history(stream, CHANNEL, since=StreamPosition(65, ""), limit=10)
    assert offsets(read) == [66, 67, 68, 69, 70]
    assert stream.calls == [(None, 0, False), ((65, "e1"), 10, False)]


@pytest.mark.parametrize("limit", [0, -1])
@pytest.mark.parametrize("budget", [None, 1000])
async def test_a_read_of_nothing_still_answers_the_position(limit: int, budget: int | None) -> None:
    stream = Stream(70)
    since = StreamPosition(60, "e1")
    read = await read_history(stream, CHANNEL, since=since, limit=limit, reverse=True, byte_budget=budget)
    assert read == HistoryRead([], StreamPosition(70, "e1"))
    assert stream.calls == [(None, 0, False)]


async def test_a_read_of_one() -> None:
    stream = Stream(70)
    read = await read_history(stream, CHANNEL, since=None, limit=1, byte_budget=1000)
    assert offsets(read) == [1] and not read.cut
    assert stream.calls == [(None, 1, False)]


# ---------------------------------------------------------------- read_history, paged


async def test_a_paged_read_takes_what_the_budget_allows_page_by_page() -> None:
    stream = Stream(70)
    read = await read_history(stream, CHANNEL, since=None, limit=100, byte_budget=10**6)
    assert offsets(read) == list(range(1, 71))
    assert (read.cut, read.size, read.position) == (False, 70 * SIZE, StreamPosition(70, "e1"))
    # 32 first, then what is left of the limit; a short page is the end of the stream.
    assert stream.calls == [(None, 32, False), ((32, "e1"), 68, False)]


async def test_the_next_page_is_sized_by_the_budget_left() -> None:
    stream = Stream(70)
    read = await read_history(stream, CHANNEL, since=None, limit=100, byte_budget=40 * SIZE)
    assert offsets(read) == list(range(1, 41))
    assert (read.cut, read.size) == (True, 40 * SIZE)
    # After 32 publications, 8 more fit: a page of 8 + 1 (the one that shows the cut).
    assert stream.calls == [(None, 32, False), ((32, "e1"), 9, False)]


async def test_a_paged_read_stops_at_the_limit() -> None:
    stream = Stream(70)
    read = await read_history(stream, CHANNEL, since=None, limit=40, byte_budget=10**6)
    assert offsets(read) == list(range(1, 41)) and not read.cut
    assert stream.calls == [(None, 32, False), ((32, "e1"), 8, False)]
    # One more than a page: the second page is of one, never more than the limit.
    one_more = Stream(70)
    read = await read_history(one_more, CHANNEL, since=None, limit=33, byte_budget=10**6)
    assert offsets(read) == list(range(1, 34)) and not read.cut
    assert one_more.calls == [(None, 32, False), ((32, "e1"), 1, False)]
    exact = Stream(70)
    read = await read_history(exact, CHANNEL, since=StreamPosition(10, "e1"), limit=32, byte_budget=10**6)
    assert offsets(read) == list(range(11, 43)) and not read.cut
    assert exact.calls == [((10, "e1"), 32, False)]
    short = Stream(10)
    read = await read_history(short, CHANNEL, since=None, limit=5, byte_budget=10**6)
    assert offsets(read) == [1, 2, 3, 4, 5] and short.calls == [(None, 5, False)]


async def test_the_budget_cuts_a_page() -> None:
    stream = Stream(70)
    read = await read_history(stream, CHANNEL, since=None, limit=100, byte_budget=5 * SIZE + 10)
    assert offsets(read) == [1, 2, 3, 4, 5]
    assert (read.cut, read.size, read.position) == (True, 5 * SIZE, StreamPosition(70, "e1"))
    exact = await read_history(Stream(70), CHANNEL, since=None, limit=100, byte_budget=5 * SIZE)
    assert offsets(exact) == [1, 2, 3, 4, 5] and exact.cut


async def test_one_publication_is_read_whatever_the_budget() -> None:
    # A client paging with `since` always progresses.
    read = await read_history(Stream(70), CHANNEL, since=None, limit=100, byte_budget=1)
    assert offsets(read) == [1] and read.cut and read.size == SIZE


async def test_a_gap_in_the_stream_cuts_the_read() -> None:
    stream = Stream(70, missing=(20,))
    read = await read_history(stream, CHANNEL, since=None, limit=100, byte_budget=10**6)
    assert offsets(read) == list(range(1, 20))
    assert (read.cut, read.size, read.position) == (True, 19 * SIZE, StreamPosition(70, "e1"))


async def test_a_reset_between_pages_cuts_the_read() -> None:
    stream = Stream(70)
    stream.reset_after = 1
    read = await read_history(stream, CHANNEL, since=None, limit=100, byte_budget=10**6)
    assert offsets(read) == list(range(1, 33))
    assert (read.cut, read.size, read.position) == (True, 32 * SIZE, StreamPosition(70, "e1"))


async def test_a_whole_read_refuses_a_gap_longer_than_the_limit() -> None:
    # Recovery is all or nothing: 60 missed publications do not fit a limit of 59.
    stream = Stream(70)
    since = StreamPosition(10, "e1")
    read = await read_history(stream, CHANNEL, since=since, limit=59, byte_budget=10**6, whole=True)
    assert read == HistoryRead([], StreamPosition(70, "e1"), cut=True)
    assert len(stream.calls) == 1
    fits = await read_history(Stream(70), CHANNEL, since=since, limit=60, byte_budget=10**6, whole=True)
    assert offsets(fits) == list(range(11, 71)) and not fits.cut
    # Without `whole`, the same read takes what the limit allows.
    some = await read_history(Stream(70), CHANNEL, since=since, limit=59, byte_budget=10**6)
    assert offsets(some) == list(range(11, 70)) and not some.cut


# ---------------------------------------------------------------- read_history, newest first


async def test_a_newest_first_read_walks_down_from_the_top() -> None:
    stream = Stream(70)
    read = await read_history(stream, CHANNEL, since=None, limit=100, reverse=True, byte_budget=10**6)
    assert offsets(read) == list(range(70, 0, -1))
    assert (read.cut, read.size, read.position) == (False, 70 * SIZE, StreamPosition(70, "e1"))
    assert stream.calls == [(None, 0, False), ((38, "e1"), 32, False), ((0, "e1"), 38, False)]


async def test_a_newest_first_read_stops_at_since_and_at_the_limit() -> None:
    stream = Stream(70)
    read = await read_history(
        stream, CHANNEL, since=StreamPosition(60, "e1"), limit=100, reverse=True, byte_budget=10**6
    )
    assert offsets(read) == list(range(70, 60, -1))
    assert stream.calls[1:] == [((60, "e1"), 10, False)]
    limited = Stream(70)
    read = await read_history(limited, CHANNEL, since=None, limit=5, reverse=True, byte_budget=10**6)
    assert offsets(read) == [70, 69, 68, 67, 66] and not read.cut
    assert limited.calls[1:] == [((65, "e1"), 5, False)]
    paged = Stream(70)
    read = await read_history(paged, CHANNEL, since=None, limit=40, reverse=True, byte_budget=10**6)
    assert offsets(read) == list(range(70, 30, -1))
    assert paged.calls[1:] == [((38, "e1"), 32, False), ((30, "e1"), 8, False)]


async def test_a_newest_first_read_is_cut_by_the_budget() -> None:
    stream = Stream(70)
    read = await read_history(stream, CHANNEL, since=None, limit=100, reverse=True, byte_budget=3 * SIZE)
    assert offsets(read) == [70, 69, 68]
    assert (read.cut, read.size, read.position) == (True, 3 * SIZE, StreamPosition(70, "e1"))
    one = await read_history(Stream(70), CHANNEL, since=None, limit=100, reverse=True, byte_budget=1)
    assert offsets(one) == [70] and one.cut
    # The next page is sized by the budget left: 40 fit, 32 taken, a page of 8 + 1.
    sized = Stream(70)
    read = await read_history(sized, CHANNEL, since=None, limit=100, reverse=True, byte_budget=40 * SIZE)
    assert offsets(read) == list(range(70, 30, -1)) and read.cut
    assert sized.calls[1:] == [((38, "e1"), 32, False), ((29, "e1"), 9, False)]
    # Less than one publication's size left: a page of one.
    tight = Stream(70)
    read = await read_history(tight, CHANNEL, since=None, limit=100, reverse=True, byte_budget=32 * SIZE + 10)
    assert offsets(read) == list(range(70, 38, -1)) and read.cut
    assert tight.calls[1:] == [((38, "e1"), 32, False), ((37, "e1"), 1, False)]


async def test_a_newest_first_read_ends_where_the_stream_starts() -> None:
    trimmed = Stream(70, oldest=50)
    read = await read_history(trimmed, CHANNEL, since=None, limit=100, reverse=True, byte_budget=10**6)
    assert offsets(read) == list(range(70, 49, -1)) and not read.cut
    assert len(trimmed.calls) == 2
    emptied = Stream(70, oldest=71)  # every publication expired; the offset stays
    read = await read_history(emptied, CHANNEL, since=None, limit=100, reverse=True, byte_budget=10**6)
    assert read == HistoryRead([], StreamPosition(70, "e1"))
    assert len(emptied.calls) == 2


async def test_a_newest_first_read_is_cut_by_a_gap_or_a_reset() -> None:
    gap = Stream(70, missing=(65,))
    read = await read_history(gap, CHANNEL, since=None, limit=100, reverse=True, byte_budget=10**6)
    assert offsets(read) == [70, 69, 68, 67, 66]
    assert (read.cut, read.size, read.position) == (True, 5 * SIZE, StreamPosition(70, "e1"))
    reset = Stream(70)
    reset.reset_after = 2  # the position read, then one page; the next page is another stream
    read = await read_history(reset, CHANNEL, since=None, limit=100, reverse=True, byte_budget=10**6)
    assert offsets(read) == list(range(70, 38, -1))
    assert (read.cut, read.size, read.position) == (True, 32 * SIZE, StreamPosition(70, "e1"))


async def test_a_paged_read_yields_to_the_loop_between_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    # A long read must not hold the event loop: it yields (sleep(0), not a delay) per page.
    delays: list[float] = []
    real_sleep = asyncio.sleep

    async def recording_sleep(delay: float) -> None:
        delays.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(policy.asyncio, "sleep", recording_sleep)
    await read_history(Stream(70), CHANNEL, since=None, limit=100, byte_budget=10**6)
    assert delays == [0]
    delays.clear()
    await read_history(Stream(70), CHANNEL, since=None, limit=100, reverse=True, byte_budget=10**6)
    assert delays == [0, 0]
