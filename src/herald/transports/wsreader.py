"""The RFC 6455 rules for what a client sends, without I/O: bytes in, calls out.

:class:`FrameReader` turns the bytes a WebSocket client sends into complete
messages and control frames.  It owns every rule about frames and messages:

* header rules (masking, lengths; see :func:`~.wsframes.read_header`), reserved
  bits (no extension is negotiated, so all three must be clear: 1002), reserved
  opcodes (1002), control frames final and at most 125 bytes (1002);
* fragmentation: a continuation frame needs a message to continue, and a new
  text or binary frame must not start inside one (1002);
* UTF-8: a text message is decoded as its fragments arrive, so invalid UTF-8
  fails at once, and the last fragment is decoded as final, so a message that
  ends inside a character fails too (1007);
* bounds: a message larger than ``max_size`` bytes is refused before its payload
  is buffered (:meth:`FrameReader.on_too_big`, then its frames are skipped); a
  message in more than ``max_fragments`` frames fails the connection (1009) on
  the header of the first frame too many, so empty continuation frames cannot
  pile up.  Fragments are joined as they arrive (a bytearray for binary, the
  non-empty decoded parts for text), never kept as one object per frame.

It is a mixin rather than a separate object so that a connection pays no extra
object (Herald's native protocol keeps an idle connection in about 5 KiB): the
class using it implements the ``on_*`` callbacks, calls :meth:`FrameReader.reset_reader`
once, and feeds it with :meth:`FrameReader.feed`.  A rule broken raises
:class:`~.wsframes.FrameError` with the close code; the reader then reads no more.
The callbacks may call :meth:`FrameReader.discard_data` or :meth:`FrameReader.stop_reading`.
"""

from __future__ import annotations

import codecs
from typing import TYPE_CHECKING

from ..codes import TOO_MANY_FRAGMENTS
from .wsframes import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameError,
    apply_mask,
    parse_close,
    read_header,
)

__all__ = ["DEFAULT_MAX_FRAGMENTS", "FrameReader"]

#: Frames one message may arrive in, unless configured otherwise.  The bound the
#: websockets library applies in its own asyncio and legacy implementations; browsers
#: never fragment what they send, and a library that streams a message sends pieces of
#: KiBs, so 4096 lets a message at the default 64 KiB limit come in 16-byte pieces.
DEFAULT_MAX_FRAGMENTS = 4096

_UTF8 = codecs.getincrementaldecoder("utf-8")


class FrameReader:
    """Reads a client's frames into messages (see the module docstring).

    The class using it implements :meth:`on_message`, :meth:`on_ping`,
    :meth:`on_pong`, :meth:`on_close_frame` and :meth:`on_too_big`.
    """

    if not TYPE_CHECKING:  # real slots here: the concrete classes' other bases have none
        __slots__ = (
            "_buf",
            "_decoder",
            "_discard",
            "_frag_bytes",
            "_frag_count",
            "_frag_op",
            "_frag_parts",
            "_frag_size",
            "_max_fragments",
            "_max_size",
            "_skip",
            "_stopped",
        )

    _buf: bytearray | None  # the start of a frame whose header or payload is incomplete
    _skip: int  # payload bytes still to skip (a refused or discarded frame)
    _discard: bool  # data frames are skipped (message refused, or closing)
    _stopped: bool  # nothing more is read
    _frag_op: int  # OP_TEXT or OP_BINARY while a fragmented message is open, else 0
    _frag_count: int  # frames of the open message so far
    _frag_size: int  # payload bytes of the open message so far
    _frag_parts: list[str] | None  # decoded non-empty parts of an open text message
    _frag_bytes: bytearray | None  # the payload of an open binary message
    _decoder: codecs.IncrementalDecoder | None
    _max_size: int
    _max_fragments: int

    # ------------------------------------------------------------ what the user implements

    def on_message(self, data: str | bytes) -> None:
        """A complete text (str) or binary (bytes) message."""
        raise NotImplementedError

    def on_ping(self, payload: bytes) -> None:
        """A ping frame (answer it with a pong carrying ``payload``)."""
        raise NotImplementedError

    def on_pong(self, payload: bytes) -> None:
        """A pong frame."""
        raise NotImplementedError

    def on_close_frame(self, code: int, reason: str) -> None:
        """A valid close frame (1005 when it had no code)."""
        raise NotImplementedError

    def on_too_big(self, reason: str) -> None:
        """A message is over ``max_size`` bytes: close with 1009 and ``reason``.

        Called once, on the header of the frame that goes over; data frames are
        skipped from then on (:meth:`discard_data`); control frames are still read.
        """
        raise NotImplementedError

    # ------------------------------------------------------------ driving it

    def reset_reader(self, max_size: int, max_fragments: int = DEFAULT_MAX_FRAGMENTS) -> None:
        """(Re)start reading with these bounds: messages of at most ``max_size`` bytes,
        in at most ``max_fragments`` frames."""
        self._buf = None
        self._skip = 0
        self._discard = False
        self._stopped = False
        self._max_size = max_size
        self._max_fragments = max_fragments
        self._end_message()

    def discard_data(self) -> None:
        """Skip data frames from now on (closing); control frames are still read."""
        self._discard = True
        self._end_message()

    def stop_reading(self) -> None:
        """Read nothing more (the connection failed or is gone)."""
        self._stopped = True
        self._discard = True
        self._buf = None
        self._end_message()

    def _end_message(self) -> None:
        self._frag_op = 0
        self._frag_count = 0
        self._frag_size = 0
        self._frag_parts = None
        self._frag_bytes = None
        self._decoder = None

    def feed(self, data: bytes) -> None:
        """Read ``data``, the next bytes from the client, calling back for each complete
        frame.  Raises :class:`FrameError` when the client broke a rule (reading stops)."""
        if self._stopped:
            return
        buf = self._buf
        if buf is not None:
            buf += data
            view: bytes | bytearray = buf
        else:
            view = data
        size = len(view)
        pos = 0
        try:
            while pos < size:
                if self._skip:
                    step = min(self._skip, size - pos)
                    pos += step
                    self._skip -= step
                    continue
                header = read_header(view, pos)
                if header is None:
                    break
                first, length, mask_start, payload_start = header
                opcode = first & 0x0F
                if first & 0x70:
                    raise FrameError(1002, "reserved bits set (no extension was negotiated)")
                if opcode >= 8:
                    if opcode > OP_PONG:
                        raise FrameError(1002, f"reserved opcode {opcode}")
                    if not first & 0x80 or length > 125:
                        raise FrameError(1002, "control frames must be final and at most 125 bytes")
                elif opcode > OP_BINARY:
                    raise FrameError(1002, f"reserved opcode {opcode}")
                elif self._discard:
                    # Refused or closing: data frames are not read, whatever their size.
                    pos, self._skip = payload_start, length
                    continue
                elif (self._frag_op or not opcode or length > self._max_size) and self._data_header(
                    opcode, length
                ):
                    # (A whole message within the size bound, the usual case, skips the call.)
                    pos, self._skip = payload_start, length
                    continue
                end = payload_start + length
                if end > size:
                    break
                payload = apply_mask(view[payload_start:end], view[mask_start:payload_start])
                pos = end
                if opcode < 8:
                    self._data(opcode, first & 0x80, payload)
                else:
                    self._control(opcode, payload)
                if self._stopped:
                    return
        except FrameError:
            self.stop_reading()
            raise
        if pos >= size:
            self._buf = None
        elif buf is None:
            self._buf = bytearray(view[pos:])
        else:
            del buf[:pos]

    # ------------------------------------------------------------ the rules

    def _data_header(self, opcode: int, length: int) -> bool:
        """Check a data frame's header against the message it belongs to.

        Returns True when the message is refused as too big (its payload is skipped).
        """
        if opcode == OP_CONT:
            if not self._frag_op:
                raise FrameError(1002, "continuation frame without a message to continue")
            if self._frag_count >= self._max_fragments:
                raise FrameError(1009, TOO_MANY_FRAGMENTS.format(limit=self._max_fragments))
            size = self._frag_size + length
        else:
            if self._frag_op:
                raise FrameError(1002, "a new message began before the last one ended")
            size = length
        if size > self._max_size:
            self.discard_data()
            self.on_too_big(f"message larger than {self._max_size} bytes")
            return True
        return False

    def _data(self, opcode: int, fin: int, payload: bytes) -> None:
        if opcode != OP_CONT:
            if fin:
                if opcode == OP_TEXT:
                    try:
                        text = payload.decode()
                    except UnicodeDecodeError:
                        raise FrameError(1007, "invalid UTF-8 in a text message") from None
                    self.on_message(text)
                else:
                    self.on_message(payload)
                return
            self._frag_op = opcode
            self._frag_count = 1
            self._frag_size = len(payload)
            if opcode == OP_TEXT:
                # Decoded as it arrives, so that invalid UTF-8 fails at once.
                self._decoder = _UTF8()
                self._frag_parts = []
                self._add_text(payload, False)
            else:
                self._frag_bytes = bytearray(payload)
            return
        self._frag_count += 1
        self._frag_size += len(payload)
        if self._frag_op == OP_TEXT:
            # The last fragment is decoded as final: a message may not end inside a character.
            self._add_text(payload, bool(fin))
            if fin:
                parts = self._frag_parts
                assert parts is not None
                self._end_message()
                self.on_message(parts[0] if len(parts) == 1 else "".join(parts))
        else:
            whole = self._frag_bytes
            assert whole is not None
            whole += payload
            if fin:
                self._end_message()
                self.on_message(bytes(whole))

    def _add_text(self, payload: bytes, final: bool) -> None:
        decoder = self._decoder
        assert decoder is not None and self._frag_parts is not None
        try:
            part = decoder.decode(payload, final)
        except UnicodeDecodeError:
            raise FrameError(1007, "invalid UTF-8 in a text message") from None
        if part:
            self._frag_parts.append(part)

    def _control(self, opcode: int, payload: bytes) -> None:
        if opcode == OP_CLOSE:
            self.on_close_frame(*parse_close(payload))
        elif opcode == OP_PING:
            self.on_ping(payload)
        else:
            self.on_pong(payload)
