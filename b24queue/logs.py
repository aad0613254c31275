"""Logging setup for the entry point. Standard library only."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class _Formatter(logging.Formatter):
    """The standard formatter, with the time text made once per second rather than per line
    (the worker logs a line per event; localtime + strftime each time add up)."""

    _cache: tuple[int, str | None, str] = (-1, None, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        cached_second, cached_fmt, text = self._cache
        if second != cached_second or datefmt != cached_fmt:
            text = time.strftime(datefmt or self.default_time_format, self.converter(second))
            self._cache = (second, datefmt, text)  # one tuple: handlers in threads may share us
        if datefmt:
            return text
        return self.default_msec_format % (text, record.msecs) if self.default_msec_format else text


class _JsonFormatter(_Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update({k: v for k, v in record.__dict__.items() if k not in _RESERVED})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def configure(level: str = "INFO", fmt: str = "text") -> None:
    """Configure the root logger once, for a CLI process."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiormq/aio-pika are chatty at INFO during reconnects; our own lines say what matters.
    logging.getLogger("aiormq").setLevel(logging.WARNING)
    logging.getLogger("aio_pika").setLevel(logging.WARNING)
    logging.getLogger("aiokafka").setLevel(logging.WARNING)


MAX_CLIENT_TEXT = 80


def client_text(value: object, limit: int = MAX_CLIENT_TEXT) -> str:
    """A value that came from a caller, safe for one log line: control characters and quotes
    escaped (a newline cannot forge a line), at most `limit` characters of it kept."""
    if value is None:
        return "-"
    text = str(value)
    cut = len(text) > limit
    escaped = text[:limit].encode("unicode_escape").decode("ascii")
    return escaped + ("..." if cut else "")
