"""Structured logs: JSON lines, or readable text on a terminal.

``settings.log_format`` picks ``json``, ``text``, or ``auto`` (text when stderr
is a terminal, JSON otherwise).  ``herald serve`` hands :func:`log_config` to
uvicorn so that uvicorn's own lines (startup, access log) share the format.

Herald attaches context as ``extra`` fields; :data:`CONTEXT_FIELDS` are the ones
a formatter prints: ``conn`` (connection id), ``user``, ``channel``, ``code``
(close code), ``reason``, ``remote`` (peer address), ``node``.  Message payloads
and tokens are never logged; as a second line of defence every formatted line
has ``token=...``/``api_key=...`` query parameters masked (uvicorn logs the
handshake path with its query string).
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import sys
from typing import IO, Any
from urllib.parse import unquote_plus

#: ``extra`` fields that formatters print, in this order.
CONTEXT_FIELDS = ("conn", "user", "channel", "code", "reason", "remote", "node")

LEVELS = {"critical": 50, "error": 40, "warning": 30, "info": 20, "debug": 10, "trace": 5}

# A query-style parameter: a key (word characters, ``.~+-`` and %XX escapes) that starts
# after a separator, "=", and a value up to the next separator.
_PARAM = re.compile(r"(?<![\w%.~+\-])((?:[\w.~+\-]|%[0-9A-Fa-f]{2})+)=([^&\s\"']+)")
# Keys whose values are secrets, once decoded: "token", "x-api-key", "access_token", ...
_SECRET_KEY = re.compile(r"(?:^|[^a-z0-9])(?:token|api_key|apikey|key|secret|password)$")


def _mask(match: re.Match[str]) -> str:
    key = match.group(1)
    # The server decodes the key before it looks it up (``?%74oken=`` is ``?token=``), so
    # the key is judged decoded; it is shown as sent.
    decoded = unquote_plus(key) if "%" in key or "+" in key else key
    if _SECRET_KEY.search(decoded.lower()) is None:
        return match.group(0)
    return f"{key}=***"


def redact(text: str) -> str:
    """Mask the values of secret-looking query parameters (``token=abc`` -> ``token=***``),
    whether their key is written plainly or percent-encoded (``%74oken=abc``)."""
    if "=" not in text:
        return text
    return _PARAM.sub(_mask, text)


# Characters that would end or forge a line, or move the cursor, in a text log; shown
# escaped as Python would (``\n``, ``\x1b``, ``\u2028``).
_CONTROL = {c: repr(chr(c))[1:-1] for c in (*range(0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029)}


def escape_controls(text: str) -> str:
    """``text`` with every control character (newlines included) escaped: one log field
    can never start a new log line."""
    return text.translate(_CONTROL)


def _field(value: Any) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\\'):
        # Quoted, so that a value cannot pose as another field (``user=a code=1000``).
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return escape_controls(text)


def _context(record: logging.LogRecord) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in CONTEXT_FIELDS:
        value = record.__dict__.get(name)
        if value is not None and value != "":
            values[name] = value
    return values


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time``, ``level``, ``logger``, ``message``, context fields,
    and ``error`` (the exception, with its traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        entry.update(_context(record))
        if record.exc_info:
            entry["error"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``HH:MM:SS LEVEL logger: message key=value ...`` for people at a terminal.

    The message and every field have their control characters escaped (a JWT ``sub``
    holding a newline cannot forge a log line); values with spaces, quotes or ``=`` are
    quoted.  Only a traceback, below the line, spans several lines.
    """

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = _context(record)
        if context:
            head, sep, tail = line.partition("\n")  # keep a traceback below the fields
            fields = " ".join(f"{k}={_field(v)}" for k, v in context.items())
            line = f"{head} {fields}{sep}{tail}"
        return redact(line)


def resolve_format(log_format: str, stream: IO[str] | None = None) -> str:
    """``json`` or ``text``; ``auto`` is text on a terminal, JSON otherwise."""
    if log_format in ("json", "text"):
        return log_format
    stream = stream if stream is not None else sys.stderr
    try:
        return "text" if stream.isatty() else "json"
    except (AttributeError, ValueError):
        return "json"


def formatter_for(log_format: str) -> logging.Formatter:
    return TextFormatter() if resolve_format(log_format) == "text" else JsonFormatter()


def log_config(log_format: str, log_level: str = "info") -> dict[str, Any]:
    """A :func:`logging.config.dictConfig` for uvicorn's ``log_config``: uvicorn's and
    Herald's loggers, in one format, on stderr."""
    kind = resolve_format(log_format)
    factory = "herald.logs.TextFormatter" if kind == "text" else "herald.logs.JsonFormatter"
    level = LEVELS.get(log_level, logging.INFO)
    logger: dict[str, Any] = {"handlers": ["default"], "level": level, "propagate": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"herald": {"()": factory}},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "herald",
                "stream": "ext://sys.stderr",
            }
        },
        "loggers": {
            "uvicorn": dict(logger),
            "uvicorn.error": {"level": level},
            "uvicorn.access": dict(logger),
            "herald": dict(logger),
        },
    }


def configure_logging(log_format: str, log_level: str = "info") -> None:
    """Give the ``herald`` logger a handler in ``log_format`` unless it already has one
    (``herald serve`` configured it through uvicorn, or the application did)."""
    logger = logging.getLogger("herald")
    if logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(formatter_for(log_format))
    logger.addHandler(handler)
    logger.setLevel(LEVELS.get(log_level, logging.INFO))
    logger.propagate = False


__all__ = [
    "CONTEXT_FIELDS",
    "JsonFormatter",
    "TextFormatter",
    "configure_logging",
    "escape_controls",
    "formatter_for",
    "log_config",
    "redact",
    "resolve_format",
]
