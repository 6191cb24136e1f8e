"""The NATS broker's history and shared offsets in JetStream (``jetstream=True``).

* *One stream per deployment*, ``HERALD_<prefix>`` (or ``stream=``), capturing
  ``PREFIX.h.>``; a channel's history is the subject ``PREFIX.h.<hex(channel)>``.
  The stream is created (or updated) on connection and re-created when it is
  found missing (deleted, or the server restarted without storage).
* *Gap-free offsets across nodes.*  Every stored message carries the channel's
  offset and epoch in its envelope.  To publish, a node takes the subject's last
  message (offset ``n``, epoch ``e``, stream sequence ``s``) and appends offset
  ``n + 1`` with the header ``Nats-Expected-Last-Subject-Sequence: s``: JetStream
  rejects the append if anything was appended to the subject since, and the node
  retries with the new last message (optimistic concurrency).  Offsets are thus
  1, 2, 3... in the subject's stream order, however many nodes publish.
* *One round trip per publish* in the common case: the node remembers, per
  channel, the last message it appended or read (its *tip*: ``s``, ``n``,
  ``e``) and appends on top of it without reading first; the expected-sequence
  header makes a stale tip harmless (refused, then read and retried).  After a
  refusal, or when the node sees another node's publication of the channel go by
  (a fan-out, if it is subscribed), the channel is published read-first (two
  round trips, as when several nodes take turns) until a read finds the tip was
  still right.  A node's own publishes to one channel are serialised (they would
  only refuse each other).
  Tips are forgotten on a disconnection, when the node (re-)creates the stream
  and on JetStream's stream created/deleted advisories: a re-created stream
  restarts its sequences, so an old tip could otherwise match a new message.
* *Epochs.*  Reads never write.  A channel with no live stream (the subject is
  empty: never used, stream deleted, server restarted without storage; or its
  last message expired, ``history_ttl``) reads as offset 0 in its *empty epoch*,
  computed by every node alike: a hash of the JetStream stream's creation time
  and the channel name (empty subject), or of the expired last message's epoch
  and sequence.  The next publish starts the stream at offset 1 in that epoch
  and atomically removes the old messages (``Nats-Rollup: sub``), so a
  subscriber told ``(0, epoch)`` continues, and a later stream of the channel
  never gets an earlier epoch (a re-created stream has another creation time; an
  expired last message another sequence).  :meth:`~herald.brokers.nats.NatsBroker.remove_history` replaces the
  channel's messages with an *epoch marker* (offset 0, a random epoch).  Purge a
  single channel only that way: a subject emptied by hand would read as its
  first epoch again.
* *Per-namespace history size and TTL* travel in headers of each message
  (``Herald-Keep``, ``Herald-TTL`` in ms) because stream limits are per stream:
  history reads return only the last ``Herald-Keep`` offsets that have not
  expired; namespaces without history publish with ``Nats-Rollup: sub`` (only
  the last message, which holds the offset, is kept); other subjects are trimmed
  to their history size every ``trim_every`` publications (``STREAM.PURGE`` with
  ``keep``, sent without waiting for the answer).  ``max_age`` caps every
  message's age stream-wide (0: no cap); make it longer than the longest
  ``history_ttl``.
* *Expiry follows the server's clock*: a message expires ``Herald-TTL`` after
  the time JetStream stored it (its stream timestamp), judged against the
  server's clock as each node tracks it (:class:`ServerClock`: the node's clock
  plus an offset learnt from JetStream replies that carry the server's time,
  accurate to half a round trip).  A node's own clock being off changes
  nothing.  (Messages of older Herald versions carry ``Herald-Expires``, an
  absolute time by their publisher's clock, which is still honoured.)
* *History reads*: up to :data:`WALK_MAX` publications are read walking back
  from the last message through ``Herald-Prev`` (the stream sequence of the
  subject's previous message), one ``STREAM.MSG.GET`` each; longer reads create
  an ephemeral pull consumer on the subject and fetch it in batches of
  :data:`BATCH` (the last message, the consumer, then ceil(stored / BATCH)
  fetches; the consumer is deleted without waiting, and expires by itself anyway).
* *Idempotent publish* (:meth:`JetStreamHistory._js_publish_once`) uses
  JetStream's own de-duplication: the append carries ``Nats-Msg-Id:
  <hex(channel)>:<key>`` and the stream's ``duplicate_window`` is the node's
  ``idempotency_window``, so of any number of nodes appending with one key,
  JetStream stores exactly one message and acknowledges the others with
  ``duplicate: true`` and the original's stream sequence.  The original position
  is read from a record the publisher writes after its append (without waiting
  for the answer: a keyed publish is one round trip too), in a second
  stream ``<stream>_IDEM`` (subjects ``PREFIX.i.<hex(channel)>.<hex(key)>``, one
  message each, ``max_age`` = the window), or, while that record is not written
  yet, from the original message itself.

:class:`JetStreamHistory` is a mixin of :class:`~herald.brokers.nats.NatsBroker`
rather than a separate object: it works on the broker's connection and stream
state, and the broker's in-order delivery reads through it directly.
"""

from __future__ import annotations

import asyncio
import base64
import calendar
import contextlib
import hashlib
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from ..exceptions import BrokerError, BrokerUnavailableError
from . import envelope
from .base import HistoryResult, Publication, PublishOptions, StreamPosition, new_epoch

if TYPE_CHECKING:
    from .base import BackgroundTasks
    from .nats_config import NatsBrokerConfig

# The NATS broker's logger: operators tune one logger per broker.
logger = logging.getLogger("herald.brokers.nats")

# JetStream headers and API error codes used below.
_EXPECTED = "Nats-Expected-Last-Subject-Sequence"
_ROLLUP = "Nats-Rollup"
_KEEP = "Herald-Keep"
_TTL = "Herald-TTL"
_EXPIRES = "Herald-Expires"  # written by earlier Herald versions (publisher's clock); read only
_PREV = "Herald-Prev"
_MSG_ID = "Nats-Msg-Id"
_ERR_WRONG_LAST_SEQUENCE = 10071
_ERR_STREAM_NOT_FOUND = 10059
_ERR_NO_MESSAGE = 10037
_ERR_STREAM_NAME_IN_USE = 10058
#: Give up a publish after this many lost optimistic-concurrency races in a row.
_MAX_CONFLICTS = 200
#: The stream's de-duplication window until a node asks for another (its setting).
DEFAULT_DEDUPE_WINDOW = 300.0
#: History reads of at most this many publications walk back message by message;
#: longer ones fetch the subject in batches through an ephemeral consumer.
WALK_MAX = 4
#: Messages (and bytes) per fetch of a batched history read.
BATCH = 256
BATCH_BYTES = 4 << 20
#: Seconds an abandoned history reader (ephemeral consumer) outlives its last use.
_READER_IDLE = 10.0
#: Seconds after which a node re-learns the server clock's offset (in the background).
CLOCK_RESAMPLE = 60.0
#: Channels whose tip a node remembers (least recently published forgotten first).
_TIPS_MAX = 10_000


def _rfc3339_ms(value: str) -> int:
    """JetStream's UTC timestamps (``2026-12-01T10:56:41.058510245Z``) -> ms since the epoch."""
    base, _, fraction = value.rstrip("Z").partition(".")
    seconds = calendar.timegm(time.strptime(base, "%Y-%m-%dT%H:%M:%S"))
    return seconds * 1000 + int((fraction + "000")[:3])


class ServerClock:
    """The JetStream server's wall clock as one node sees it.

    ``clock`` is the node's own clock (any origin: ``time.monotonic`` by default);
    :meth:`learn` takes a server timestamp from a reply and the node's clock when
    the request left and the reply came, and keeps ``server - midpoint`` as the
    offset.  :meth:`now_ms` is then the server's time to within half that round
    trip, however wrong or stepped the node's wall clock is.  A sample whose round
    trip was much slower than the kept one's does not replace it (unless that one
    is stale).
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.offset_ms: float | None = None
        self.learnt_at = 0.0
        self.round_trip = 0.0

    def learn(self, server_ms: int, sent: float, received: float) -> None:
        round_trip = received - sent
        if self.offset_ms is not None and not self.stale() and round_trip > 2 * self.round_trip + 0.001:
            return
        self.offset_ms = server_ms - (sent + received) * 500.0
        self.learnt_at, self.round_trip = received, round_trip

    def known(self) -> bool:
        return self.offset_ms is not None

    def stale(self) -> bool:
        return self.clock() - self.learnt_at > CLOCK_RESAMPLE

    def forget(self) -> None:
        self.offset_ms = None

    def now_ms(self) -> int:
        if self.offset_ms is None:
            raise BrokerError("the NATS server's clock is not known yet")
        return int(self.clock() * 1000.0 + self.offset_ms)


@dataclass(frozen=True, slots=True)
class _Entry:
    """One stored message of a channel's subject (offset 0: an epoch marker)."""

    seq: int
    publication: Publication
    keep: int
    expires: int  # ms since the Unix epoch by the server's clock; 0: never
    prev: int  # stream sequence of the subject's previous message (0: none)

    def expired(self, now_ms: int) -> bool:
        return 0 < self.expires <= now_ms


@dataclass(slots=True)
class _Tip:
    """What one node knows of a channel's last message, to append without reading first."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    entry: _Entry | None = None  # the last message this node appended or read
    generation: int = -1  # JetStreamHistory._tips_generation when ``entry`` was learnt
    trusted: bool = True  # False after a refused append: read first until a read agrees

    def known(self, generation: int) -> _Entry | None:
        """The entry to append on without reading, if any."""
        return self.entry if self.trusted and self.generation == generation else None

    def confirm(self, generation: int, last: _Entry | None) -> None:
        """A read found ``last``: if it is the entry we had, nobody else is appending."""
        if self.generation == generation and self.entry is not None and last is not None:
            self.trusted = self.trusted or last.seq == self.entry.seq

    def learn(self, generation: int, entry: _Entry) -> None:
        self.entry, self.generation = entry, generation


class _Duplicate(Exception):
    """JetStream already stored a message with this ``Nats-Msg-Id``: ``seq`` is the original's."""

    def __init__(self, seq: int) -> None:
        super().__init__(seq)
        self.seq = seq


def _ack_metadata(reply: str) -> tuple[int, int, int]:
    """A consumed message's stream sequence, stored time (ms) and the number of messages
    after it, from its reply subject: ``$JS.ACK.<stream>.<consumer>.<delivered>.<stream
    seq>.<consumer seq>.<ns>.<pending>`` (nats-server 2.9), or with ``<domain>.<account
    hash>.`` after ``$JS.ACK.`` and a random token at the end (later servers)."""
    tokens = reply.split(".")
    first = 5 if len(tokens) == 9 else 7
    try:
        return int(tokens[first]), int(tokens[first + 2]) // 1_000_000, int(tokens[first + 3])
    except (IndexError, ValueError) as exc:
        raise BrokerError(f"unexpected JetStream message metadata {reply!r}") from exc


def _parse_headers(raw: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in raw.decode("latin-1").split("\r\n")[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip()] = value.strip()
    return headers


class JetStreamHistory:
    """Appends, reads and marks a channel's messages in the deployment's JetStream
    stream (see the module docstring)."""

    config: NatsBrokerConfig
    _stream_ready: bool
    _tasks: BackgroundTasks
    #: The ``duplicate_window`` (seconds) the streams are created with: the node's
    #: ``idempotency_window``, learnt from its first idempotent publish.
    _dedupe_window: float = DEFAULT_DEDUPE_WINDOW
    _server_clock: ServerClock
    _clock_sampling: asyncio.Task[None] | None
    _tips: dict[str, _Tip]
    _tips_generation: int

    if TYPE_CHECKING:  # provided by NatsBroker

        @property
        def stream_name(self) -> str: ...

        def subject(self, channel: str) -> str: ...

        def history_subject(self, channel: str) -> str: ...

        def _connection(self) -> Any: ...

        async def _publish(self, subject: str, payload: bytes) -> None: ...

    def _init_jetstream(self, clock: Callable[[], float]) -> None:
        """Called by the broker's constructor (``clock``: the node's clock, see ServerClock)."""
        self._server_clock = ServerClock(clock)
        self._clock_sampling = None
        self._tips = {}
        self._tips_generation = 0

    def _forget_server_state(self, *, clock: bool = False) -> None:
        """Forget every channel's tip (the stream may have been re-created: its
        sequences restart) and, with ``clock``, the server clock (another server)."""
        self._tips_generation += 1
        if clock:
            self._server_clock.forget()

    async def _request(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> Any:
        import nats.errors

        nc = self._connection()
        try:
            return await nc.request(subject, payload, timeout=self.config.request_timeout, headers=headers)
        except nats.errors.NoRespondersError:
            raise
        except Exception as exc:
            raise BrokerUnavailableError(f"NATS request failed: {exc!r}") from exc

    async def _send(self, subject: str, payload: bytes) -> None:
        """A JetStream API call whose answer nobody waits for (trims, consumer deletes)."""
        with contextlib.suppress(Exception):
            nc = self._connection()
            await nc.publish(subject, payload, reply=nc.new_inbox())

    async def _api(self, operation: str, body: dict[str, Any]) -> dict[str, Any]:
        """Call ``$JS.API.<operation>``; re-creates the stream once when it is missing."""
        import nats.errors

        for attempt in range(2):
            try:
                msg = await self._request(f"$JS.API.{operation}", orjson.dumps(body))
            except nats.errors.NoRespondersError as exc:
                raise BrokerError("JetStream is not enabled on the NATS server (start it with -js)") from exc
            reply: dict[str, Any] = orjson.loads(msg.data)
            error = reply.get("error")
            if error and error.get("err_code") == _ERR_STREAM_NOT_FOUND and attempt == 0:
                self._stream_ready = False
                await self._ensure_stream()
                continue
            return reply
        raise BrokerError(f"JetStream stream {self.stream_name} could not be created")

    @property
    def idempotency_stream_name(self) -> str:
        """The stream of idempotency records (the original positions of keyed publishes)."""
        return f"{self.stream_name}_IDEM"

    def idempotency_subject(self, channel: str, key: str) -> str:
        return f"{self.config.prefix}.i.{channel.encode().hex()}.{key.encode().hex()}"

    async def _ensure_stream(self) -> None:
        cfg = self.config
        window = self._dedupe_window
        if cfg.max_age > 0:
            window = min(window, cfg.max_age)  # JetStream refuses a window longer than max_age
        body = {
            "name": self.stream_name,
            "subjects": [f"{cfg.prefix}.h.>"],
            "retention": "limits",
            "storage": cfg.storage,
            "num_replicas": cfg.replicas,
            "max_age": int(cfg.max_age * 1e9),
            "max_msgs_per_subject": -1,
            "discard": "old",
            "allow_rollup_hdrs": True,
            "deny_delete": False,
            "deny_purge": False,
            "duplicate_window": int(window * 1e9),
        }
        # Whether the stream was missing (re-created: sequences restart) or not, tips
        # learnt before are not worth the risk.
        self._forget_server_state()
        await self._create_or_update(self.stream_name, body)
        records = {
            "name": self.idempotency_stream_name,
            "subjects": [f"{cfg.prefix}.i.>"],
            "retention": "limits",
            "storage": cfg.storage,
            "num_replicas": cfg.replicas,
            "max_age": int(self._dedupe_window * 1e9),
            "max_msgs_per_subject": 1,
            "discard": "old",
            "duplicate_window": int(min(self._dedupe_window, 120.0) * 1e9),
        }
        self._stream_ready = True
        try:
            await self._create_or_update(self.idempotency_stream_name, records)
        except BrokerError as exc:
            # Only keyed publishes need it, and they still work without it (their retries
            # read the original message): publishing must not stop for it.
            logger.warning("JetStream stream %s: %s", self.idempotency_stream_name, exc)

    async def _create_or_update(self, name: str, body: dict[str, Any]) -> None:
        import nats.errors

        for operation in ("CREATE", "UPDATE"):
            try:
                msg = await self._request(f"$JS.API.STREAM.{operation}.{name}", orjson.dumps(body))
            except nats.errors.NoRespondersError as exc:
                raise BrokerError("JetStream is not enabled on the NATS server (start it with -js)") from exc
            error = orjson.loads(msg.data).get("error")
            if error is None:
                return
            if error.get("err_code") != _ERR_STREAM_NAME_IN_USE:
                raise BrokerError(f"JetStream stream {name}: {error.get('description')}")
        raise BrokerError(f"JetStream stream {name} could not be updated")

    async def _store(self, subject: str, payload: bytes, headers: dict[str, str]) -> dict[str, Any]:
        """Append to the stream; returns the ack or the error reply.

        When no stream captures the subject (deleted, server restarted without
        storage) the stream is re-created and a *wrong last sequence* error is
        returned without storing: the caller's view of the subject is stale.
        """
        import nats.errors

        try:
            msg = await self._request(subject, payload, headers)
        except nats.errors.NoRespondersError:
            self._stream_ready = False
            await self._ensure_stream()
            return {"error": {"err_code": _ERR_WRONG_LAST_SEQUENCE, "description": "stream re-created"}}
        reply: dict[str, Any] = orjson.loads(msg.data)
        return reply

    # ------------------------------------------------------------ the server's clock

    async def _server_now_ms(self) -> int:
        """The server's time now (ms); learns it first if this node does not know it yet."""
        clock = self._server_clock
        if not clock.known():
            await self._sample_server_clock()
        elif clock.stale() and (self._clock_sampling is None or self._clock_sampling.done()):
            self._clock_sampling = self._tasks.spawn(self._resample_server_clock())
        return clock.now_ms()

    async def _resample_server_clock(self) -> None:
        try:
            await self._sample_server_clock()
        except BrokerError as exc:
            logger.debug("NATS server clock not re-learnt: %s", exc)

    async def _sample_server_clock(self) -> None:
        """One round trip: an ephemeral consumer's creation reply carries the server's time
        (nats-server 2.9 has no cheaper API answer that does)."""
        reply = await self._create_reader(f"{self.config.prefix}.h.clock", "new")
        await self._send(f"$JS.API.CONSUMER.DELETE.{self.stream_name}.{reply['name']}", b"")

    async def _create_reader(self, subject: str, deliver_policy: str) -> dict[str, Any]:
        """Create an ephemeral pull consumer on ``subject`` (no acks, in memory, removed
        by the server after ``_READER_IDLE`` unused); learns the server clock from it."""
        config = {
            "deliver_policy": deliver_policy,
            "ack_policy": "none",
            "filter_subject": subject,
            "inactive_threshold": int(_READER_IDLE * 1e9),
            "mem_storage": True,
            "num_replicas": 1,
        }
        clock = self._server_clock
        sent = clock.clock()
        reply = await self._api(
            f"CONSUMER.CREATE.{self.stream_name}", {"stream_name": self.stream_name, "config": config}
        )
        received = clock.clock()
        error = reply.get("error")
        if error is not None:
            raise BrokerError(f"JetStream reader could not be created: {error.get('description')}")
        clock.learn(_rfc3339_ms(reply["created"]), sent, received)
        return reply

    # ------------------------------------------------------------ reading messages

    def _entry_of(
        self, channel: str, seq: int, stored_ms: int, headers: Mapping[str, str], data: bytes
    ) -> _Entry:
        publication = envelope.decode(channel, data)
        if not isinstance(publication, Publication):
            raise BrokerError(f"unexpected message in the history of {channel}")
        ttl = int(headers.get(_TTL, "0"))
        return _Entry(
            seq=seq,
            publication=publication,
            keep=int(headers.get(_KEEP, "0")),
            expires=stored_ms + ttl if ttl > 0 else int(headers.get(_EXPIRES, "0")),
            prev=int(headers.get(_PREV, "0")),
        )

    def _entry(self, channel: str, message: dict[str, Any]) -> _Entry:
        """An entry from a ``STREAM.MSG.GET`` reply's message."""
        return self._entry_of(
            channel,
            int(message["seq"]),
            _rfc3339_ms(message["time"]),
            _parse_headers(base64.b64decode(message.get("hdrs") or b"")),
            base64.b64decode(message.get("data") or b""),
        )

    async def _get(self, channel: str, request: dict[str, Any]) -> _Entry | None:
        reply = await self._api(f"STREAM.MSG.GET.{self.stream_name}", request)
        error = reply.get("error")
        if error is not None:
            if error.get("err_code") == _ERR_NO_MESSAGE:
                return None
            raise BrokerError(f"JetStream read failed: {error.get('description')}")
        return self._entry(channel, reply["message"])

    async def _last(self, channel: str) -> _Entry | None:
        return await self._get(channel, {"last_by_subj": self.history_subject(channel)})

    async def _walk_back(self, channel: str, last: _Entry, count: int) -> list[_Entry]:
        """Up to ``count`` messages ending with ``last``, newest first (one request each)."""
        entries = [last]
        while len(entries) < count and entries[-1].prev:
            entry = await self._get(channel, {"seq": entries[-1].prev})
            if entry is None:
                break
            entries.append(entry)
        return entries

    async def _read_subject(self, channel: str, last: _Entry) -> list[_Entry]:
        """The channel's messages up to ``last``, newest first, fetched in batches."""
        nc = self._connection()
        inbox = nc.new_inbox()
        arrived: list[Any] = []
        answered = asyncio.Event()
        fetch = ""  # the current fetch's reply subject
        expected = 0  # messages ``arrived`` holds once the current fetch is answered

        async def collect(msg: Any) -> None:
            if msg.reply:  # a message (on its own subject; the reply is its $JS.ACK metadata)
                arrived.append(msg)
                if len(arrived) >= expected:
                    answered.set()
            elif msg.subject == fetch:  # a status ending the current fetch (not a late one)
                answered.set()

        try:
            subscription = await nc.subscribe(f"{inbox}.*", cb=collect)
        except Exception as exc:
            raise BrokerUnavailableError(f"NATS subscribe failed: {exc!r}") from exc
        entries: list[_Entry] = []
        try:
            reader = await self._create_reader(self.history_subject(channel), "all")
            pull = f"$JS.API.CONSUMER.MSG.NEXT.{self.stream_name}.{reader['name']}"
            pending = int(reader.get("num_pending", 0))
            try:
                while pending > 0:
                    batch = min(pending, BATCH)
                    start, expected = len(arrived), len(arrived) + batch
                    fetch = f"{inbox}.{start}"
                    answered.clear()
                    request = {"batch": batch, "no_wait": True, "max_bytes": BATCH_BYTES}
                    await nc.publish(pull, orjson.dumps(request), reply=fetch)
                    try:
                        await asyncio.wait_for(answered.wait(), self.config.request_timeout)
                    except TimeoutError as exc:
                        raise BrokerUnavailableError("JetStream history read timed out") from exc
                    if len(arrived) == start:
                        break
                    for msg in arrived[start:expected]:
                        seq, stored_ms, pending = _ack_metadata(msg.reply)
                        if seq >= last.seq:  # appended after the read started
                            pending = 0
                            break
                        entries.append(self._entry_of(channel, seq, stored_ms, msg.headers or {}, msg.data))
            finally:
                await self._send(f"$JS.API.CONSUMER.DELETE.{self.stream_name}.{reader['name']}", b"")
        finally:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
        entries.append(last)
        entries.reverse()
        return entries

    # ------------------------------------------------------------ epochs

    async def _mark(self, channel: str, last: _Entry | None) -> _Entry | None:
        """Replace everything of the channel with an epoch marker (offset 0, a random epoch);
        None if another node appended first."""
        epoch = new_epoch()
        headers = {
            _EXPECTED: str(last.seq if last is not None else 0),
            _ROLLUP: "sub",
            _KEEP: "0",
            _PREV: "0",
        }
        reply = await self._store(
            self.history_subject(channel), envelope.encode_publication(0, epoch, None, b""), headers
        )
        error = reply.get("error")
        if error is None:
            return _Entry(int(reply["seq"]), Publication(channel, 0, epoch, b""), 0, 0, 0)
        if error.get("err_code") == _ERR_WRONG_LAST_SEQUENCE:
            return None
        raise BrokerError(f"JetStream append failed: {error.get('description')}")

    async def _empty_epoch(self, channel: str, last: _Entry | None) -> str:
        """The epoch ``channel`` reads as while it has no live stream (``last`` is None or
        expired), and its next stream starts in: computed, never stored (module docstring)."""
        if last is not None:
            seed = f"expired:{last.publication.epoch}:{last.seq}"
        else:
            reply = await self._api(f"STREAM.INFO.{self.stream_name}", {})
            error = reply.get("error")
            if error is not None:
                raise BrokerError(f"JetStream stream info failed: {error.get('description')}")
            seed = f"new:{reply.get('created', '')}:{channel}"
        return hashlib.sha1(seed.encode(), usedforsecurity=False).hexdigest()[:8]

    # ------------------------------------------------------------ publishing

    def _js_seen(self, publication: Publication) -> None:
        """Another node's publication went by (a fan-out): a tip below it is stale, so
        the next publish reads first instead of being refused."""
        tip = self._tips.get(publication.channel)
        if tip is not None and tip.entry is not None:
            known = tip.entry.publication
            if publication.epoch == known.epoch and publication.offset > known.offset:
                tip.trusted = False

    def _tip(self, channel: str) -> _Tip:
        tips = self._tips
        tip = tips.pop(channel, None)
        if tip is None:
            tip = _Tip()
            if len(tips) >= _TIPS_MAX:
                # Forget the least recently published channel (a tip in use only loses
                # its serialisation: appends stay safe).
                del tips[next(iter(tips))]
        tips[channel] = tip  # most recently used last
        return tip

    async def _js_publish_once(
        self, channel: str, data: bytes, options: PublishOptions, key: str, window: float
    ) -> tuple[StreamPosition, bool]:
        """Publish once per key within ``window`` across nodes (module docstring)."""
        if window != self._dedupe_window:
            # The streams' windows follow the node's setting (every node should share it).
            self._dedupe_window = window
            self._stream_ready = False
            await self._ensure_stream()
        record = self.idempotency_subject(channel, key)
        try:
            position = await self._js_publish(channel, data, options, f"{channel.encode().hex()}:{key}")
        except _Duplicate as duplicate:
            return await self._original_position(channel, record, duplicate.seq), True
        # Not waited for: the record only helps later retries, and until it is written
        # (or if it is lost) the original message answers them while it is stored.
        await self._send(record, b"%d:%s" % (position.offset, position.epoch.encode()))
        return position, False

    async def _original_position(self, channel: str, record: str, seq: int) -> StreamPosition:
        """The position of the publication JetStream found ``seq`` to be the original of."""
        try:
            msg = await self._request(
                f"$JS.API.STREAM.MSG.GET.{self.idempotency_stream_name}",
                orjson.dumps({"last_by_subj": record}),
            )
            reply = orjson.loads(msg.data)
        except BrokerError:
            raise
        except Exception as exc:  # no records stream (it could not be created)
            reply = {"error": repr(exc)}
        if reply.get("error") is None:
            offset, _, epoch = base64.b64decode(reply["message"]["data"]).partition(b":")
            return StreamPosition(int(offset), epoch.decode())
        # The publisher has not written its record yet: the message itself is still there.
        original = await self._get(channel, {"seq": seq})
        if original is not None and original.publication.offset > 0:
            return StreamPosition(original.publication.offset, original.publication.epoch)
        raise BrokerError(
            f"publish to {channel}: the idempotency key's original publication (stream sequence "
            f"{seq}) is stored but its position was lost (its publisher failed before recording it)"
        )

    async def _js_publish(
        self, channel: str, data: bytes, options: PublishOptions, msg_id: str | None = None
    ) -> StreamPosition:
        """Store and fan out the channel's next publication; returns its position.

        One round trip when the channel's tip is trusted (module docstring), two
        when the last message must be read first.  With ``msg_id`` (an idempotent
        publish) JetStream may find the append a duplicate: nothing is stored or
        fanned out and :class:`_Duplicate` is raised with the original's stream
        sequence.
        """
        subject = self.history_subject(channel)
        keep = max(options.history_size, 0)
        ttl_ms = int(options.history_ttl * 1000) if options.history_ttl > 0 else 0
        tip = self._tip(channel)
        async with tip.lock:
            conflicts = 0
            while True:
                generation = self._tips_generation
                last = tip.known(generation)
                if last is None:
                    last = await self._last(channel)
                    tip.confirm(generation, last)
                # The server's clock is needed only to judge or set an expiry.
                now = await self._server_now_ms() if ttl_ms or (last is not None and last.expires) else 0
                if last is None or last.expired(now):
                    # First publication of a new stream, in the epoch readers were told: the
                    # old messages go (rollup).
                    offset, epoch, prev, rollup = 1, await self._empty_epoch(channel, last), 0, True
                else:
                    offset, epoch = last.publication.offset + 1, last.publication.epoch
                    prev, rollup = last.seq, keep == 0
                payload = envelope.encode_publication(offset, epoch, options.info, data)
                headers = {
                    _EXPECTED: str(last.seq if last is not None else 0),
                    _KEEP: str(keep),
                    _PREV: str(prev),
                }
                if ttl_ms:
                    headers[_TTL] = str(ttl_ms)
                if rollup:
                    headers[_ROLLUP] = "sub"
                if msg_id is not None:
                    headers[_MSG_ID] = msg_id
                reply = await self._store(subject, payload, headers)
                error = reply.get("error")
                if error is None:
                    if msg_id is not None and reply.get("duplicate"):
                        raise _Duplicate(int(reply["seq"]))
                    # Stored between ``now`` and this moment, by the server's clock.
                    clock = self._server_clock
                    expires = (clock.now_ms() if clock.known() else now) + ttl_ms if ttl_ms else 0
                    tip.learn(
                        generation,
                        _Entry(
                            int(reply["seq"]), Publication(channel, offset, epoch, b""), keep, expires, prev
                        ),
                    )
                    break
                if error.get("err_code") != _ERR_WRONG_LAST_SEQUENCE:
                    raise BrokerError(f"JetStream append failed: {error.get('description')}")
                # Another node appended first (or the stream was re-created): read, retry
                # on top of what is there now, and read first until that looks quiet.
                tip.trusted = False
                conflicts += 1
                if conflicts >= _MAX_CONFLICTS:
                    raise BrokerUnavailableError(f"JetStream publish to {channel}: too much contention")
                if conflicts > 2:
                    await asyncio.sleep(random.uniform(0, 0.001 * conflicts))
        if keep and offset > keep and offset % self.config.trim_every == 0:
            purge = {"filter": subject, "keep": keep}
            await self._send(f"$JS.API.STREAM.PURGE.{self.stream_name}", orjson.dumps(purge))
        try:
            await self._publish(self.subject(channel), payload)
        except BrokerError as exc:
            # Stored but not fanned out: nodes fill the gap from the stream.
            logger.warning("fan-out of %s offset %d failed: %s", channel, offset, exc)
        return StreamPosition(offset, epoch)

    async def _js_history(
        self,
        channel: str,
        *,
        since: StreamPosition | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> HistoryResult:
        last = await self._last(channel)
        now = await self._server_now_ms()
        if last is None or last.expired(now):
            # No live stream: nothing is written for a read (module docstring).
            return HistoryResult([], StreamPosition(0, await self._empty_epoch(channel, last)))
        top = last.publication
        position = StreamPosition(top.offset, top.epoch)
        lowest = max(top.offset - last.keep, 0)
        if since is not None and since.epoch == top.epoch:
            lowest = max(lowest, since.offset)
        wanted = top.offset - lowest
        if reverse and limit is not None:
            wanted = min(wanted, limit)
        if limit == 0 or wanted <= 0:
            return HistoryResult([], position)
        if wanted <= WALK_MAX:
            entries = await self._walk_back(channel, last, wanted)
        else:
            entries = await self._read_subject(channel, last)
        # Newest first: the unexpired run of consecutive offsets ending at the top.
        items: list[Publication] = []
        expected = top.offset
        for entry in entries:
            publication = entry.publication
            if (
                publication.offset != expected
                or publication.offset <= lowest
                or publication.epoch != top.epoch
                or entry.expired(now)
                or len(items) >= wanted
            ):
                break
            items.append(publication)
            expected -= 1
        if not reverse:
            items.reverse()
        if limit is not None:
            items = items[:limit]
        return HistoryResult(items, position)

    async def _js_remove_history(self, channel: str) -> None:
        tip = self._tip(channel)
        async with tip.lock:
            for _ in range(_MAX_CONFLICTS):
                generation = self._tips_generation
                marker = await self._mark(channel, await self._last(channel))
                if marker is not None:
                    tip.learn(generation, marker)
                    return None
        raise BrokerUnavailableError(f"JetStream remove_history of {channel}: too much contention")


__all__ = ["BATCH", "CLOCK_RESAMPLE", "WALK_MAX", "JetStreamHistory", "ServerClock"]
