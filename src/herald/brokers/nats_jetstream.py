"""The NATS broker's history and shared offsets in JetStream (``jetstream=True``).

* *One stream per deployment*, ``HERALD_<prefix>`` (or ``stream=``), capturing
  ``PREFIX.h.>``; a channel's history is the subject ``PREFIX.h.<hex(channel)>``.
  The stream is created (or updated) on connection and re-created when it is
  found missing (deleted, or the server restarted without storage).
* *Gap-free offsets across nodes.*  Every stored message carries the channel's
  offset and epoch in its envelope.  To publish, a node reads the subject's last
  message (offset ``n``, epoch ``e``, stream sequence ``s``) and appends offset
  ``n + 1`` with the header ``Nats-Expected-Last-Subject-Sequence: s``: JetStream
  rejects the append if anything was appended to the subject since, and the node
  retries with the new last message (optimistic concurrency).  Offsets are thus
  1, 2, 3... in the subject's stream order, however many nodes publish.
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
  (``Herald-Keep``, ``Herald-Expires``) because stream limits are per stream:
  history reads return only the last ``Herald-Keep`` offsets that have not
  expired; namespaces without history publish with ``Nats-Rollup: sub`` (only
  the last message, which holds the offset, is kept); other subjects are trimmed
  to their history size every ``trim_every`` publications (``STREAM.PURGE`` with
  ``keep``).  ``max_age`` caps every message's age stream-wide (0: no cap);
  make it longer than the longest ``history_ttl``.
* *History reads* walk back from the last message through ``Herald-Prev`` (the
  stream sequence of the subject's previous message) with ``STREAM.MSG.GET``:
  one request per publication returned.
* *Idempotent publish* (:meth:`JetStreamHistory._js_publish_once`) uses
  JetStream's own de-duplication: the append carries ``Nats-Msg-Id:
  <hex(channel)>:<key>`` and the stream's ``duplicate_window`` is the node's
  ``idempotency_window``, so of any number of nodes appending with one key,
  JetStream stores exactly one message and acknowledges the others with
  ``duplicate: true`` and the original's stream sequence.  The original position
  is read from a record the publisher writes after its append, in a second
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
import contextlib
import hashlib
import logging
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from ..exceptions import BrokerError, BrokerUnavailableError
from . import envelope
from .base import HistoryResult, Publication, PublishOptions, StreamPosition, new_epoch

if TYPE_CHECKING:
    from .nats_config import NatsBrokerConfig

# The NATS broker's logger: operators tune one logger per broker.
logger = logging.getLogger("herald.brokers.nats")

# JetStream headers and API error codes used below.
_EXPECTED = "Nats-Expected-Last-Subject-Sequence"
_ROLLUP = "Nats-Rollup"
_KEEP = "Herald-Keep"
_EXPIRES = "Herald-Expires"
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


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True, slots=True)
class _Entry:
    """One stored message of a channel's subject (offset 0: an epoch marker)."""

    seq: int
    publication: Publication
    keep: int
    expires: int  # ms since the Unix epoch; 0: never
    prev: int  # stream sequence of the subject's previous message (0: none)

    def expired(self, now_ms: int) -> bool:
        return 0 < self.expires <= now_ms


class _Duplicate(Exception):
    """JetStream already stored a message with this ``Nats-Msg-Id``: ``seq`` is the original's."""

    def __init__(self, seq: int) -> None:
        super().__init__(seq)
        self.seq = seq


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
    #: The ``duplicate_window`` (seconds) the streams are created with: the node's
    #: ``idempotency_window``, learnt from its first idempotent publish.
    _dedupe_window: float = DEFAULT_DEDUPE_WINDOW

    if TYPE_CHECKING:  # provided by NatsBroker

        @property
        def stream_name(self) -> str: ...

        def subject(self, channel: str) -> str: ...

        def history_subject(self, channel: str) -> str: ...

        def _connection(self) -> Any: ...

        async def _publish(self, subject: str, payload: bytes) -> None: ...

    async def _request(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> Any:
        import nats.errors

        nc = self._connection()
        try:
            return await nc.request(subject, payload, timeout=self.config.request_timeout, headers=headers)
        except nats.errors.NoRespondersError:
            raise
        except Exception as exc:
            raise BrokerUnavailableError(f"NATS request failed: {exc!r}") from exc

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
        """Append to the stream; returns the ack or the error reply."""
        import nats.errors

        for attempt in range(2):
            try:
                msg = await self._request(subject, payload, headers)
            except nats.errors.NoRespondersError as exc:
                if attempt:
                    raise BrokerError(f"no JetStream stream captures {subject}") from exc
                self._stream_ready = False
                await self._ensure_stream()
                continue
            reply: dict[str, Any] = orjson.loads(msg.data)
            return reply
        raise AssertionError("unreachable")

    def _entry(self, channel: str, message: dict[str, Any]) -> _Entry:
        headers = _parse_headers(base64.b64decode(message.get("hdrs") or b""))
        data = base64.b64decode(message.get("data") or b"")
        publication = envelope.decode(channel, data)
        if not isinstance(publication, Publication):
            raise BrokerError(f"unexpected message in the history of {channel}")
        return _Entry(
            seq=int(message["seq"]),
            publication=publication,
            keep=int(headers.get(_KEEP, "0")),
            expires=int(headers.get(_EXPIRES, "0")),
            prev=int(headers.get(_PREV, "0")),
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

    async def _mark(self, channel: str, last: _Entry | None) -> _Entry | None:
        """Replace everything of the channel with an epoch marker (offset 0, a random epoch);
        None if another node appended first."""
        epoch = new_epoch()
        headers = {
            _EXPECTED: str(last.seq if last is not None else 0),
            _ROLLUP: "sub",
            _KEEP: "0",
            _EXPIRES: "0",
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
        try:
            await self._request(record, b"%d:%s" % (position.offset, position.epoch.encode()))
        except Exception as exc:  # published already: the record only helps later retries
            # The original message still answers retries until it is replaced.
            logger.warning("idempotency record of %s not written: %r", channel, exc)
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

        With ``msg_id`` (an idempotent publish) JetStream may find the append a
        duplicate: nothing is stored or fanned out and :class:`_Duplicate` is raised
        with the original's stream sequence.
        """
        subject = self.history_subject(channel)
        keep = max(options.history_size, 0)
        ttl_ms = int(options.history_ttl * 1000) if options.history_ttl > 0 else 0
        conflicts = 0
        while True:
            last = await self._last(channel)
            now = _now_ms()
            if last is None or last.expired(now):
                # First publication of a new stream, in the epoch readers were told: the old
                # messages go (rollup).
                offset, epoch, prev, rollup = 1, await self._empty_epoch(channel, last), 0, True
            else:
                offset, epoch = last.publication.offset + 1, last.publication.epoch
                prev, rollup = last.seq, keep == 0
            payload = envelope.encode_publication(offset, epoch, options.info, data)
            headers = {
                _EXPECTED: str(last.seq if last is not None else 0),
                _KEEP: str(keep),
                _EXPIRES: str(now + ttl_ms if ttl_ms else 0),
                _PREV: str(prev),
            }
            if rollup:
                headers[_ROLLUP] = "sub"
            if msg_id is not None:
                headers[_MSG_ID] = msg_id
            reply = await self._store(subject, payload, headers)
            error = reply.get("error")
            if error is None:
                if msg_id is not None and reply.get("duplicate"):
                    raise _Duplicate(int(reply["seq"]))
                break
            if error.get("err_code") != _ERR_WRONG_LAST_SEQUENCE:
                raise BrokerError(f"JetStream append failed: {error.get('description')}")
            # Another node appended first: retry on top of its publication.
            conflicts += 1
            if conflicts >= _MAX_CONFLICTS:
                raise BrokerUnavailableError(f"JetStream publish to {channel}: too much contention")
            if conflicts > 2:
                await asyncio.sleep(random.uniform(0, 0.001 * conflicts))
        if keep and offset > keep and offset % self.config.trim_every == 0:
            with contextlib.suppress(BrokerError):
                await self._api(f"STREAM.PURGE.{self.stream_name}", {"filter": subject, "keep": keep})
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
        if last is None or last.expired(_now_ms()):
            # No live stream: nothing is written for a read (module docstring).
            return HistoryResult([], StreamPosition(0, await self._empty_epoch(channel, last)))
        now = _now_ms()
        top = last.publication
        position = StreamPosition(top.offset, top.epoch)
        if limit == 0 or top.offset == 0:
            return HistoryResult([], position)
        lowest = max(top.offset - last.keep, 0)
        if since is not None and since.epoch == top.epoch:
            lowest = max(lowest, since.offset)
        enough = limit if reverse and limit is not None else None
        items: list[Publication] = []
        entry: _Entry | None = last
        while (
            entry is not None
            and entry.publication.offset > lowest
            and entry.publication.epoch == top.epoch
            and not entry.expired(now)
        ):
            items.append(entry.publication)
            if entry.prev == 0 or (enough is not None and len(items) >= enough):
                break
            entry = await self._get(channel, {"seq": entry.prev})
        if not reverse:
            items.reverse()
        if limit is not None:
            items = items[:limit]
        return HistoryResult(items, position)

    async def _js_remove_history(self, channel: str) -> None:
        for _ in range(_MAX_CONFLICTS):
            if await self._mark(channel, await self._last(channel)) is not None:
                return None
        raise BrokerUnavailableError(f"JetStream remove_history of {channel}: too much contention")


__all__ = ["JetStreamHistory"]
