"""Logging setup for the entry point. Standard library only."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import Any, TextIO

from b24queue.secrets.redaction import redact

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


class _TextFormatter(_Formatter):
    """`TEXT_FORMAT`, written out: the same line as `Formatter(TEXT_FORMAT)` gives (a test
    compares them), without its generic walk (the worker formats a line per event)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            return super().format(record)
        record.message = record.getMessage()
        record.asctime = self.formatTime(record)
        return f"{record.asctime} {record.levelname:<7} {record.name}: {record.message}"


TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class _TurnHandler(logging.StreamHandler[TextIO]):
    """A stream handler that, inside an event loop, writes the lines of one turn of the loop
    together at its end: one write (a system call) per turn rather than per line, which was a
    fifth of what the worker's line per event cost. A warning or worse, and any line outside a
    loop (another thread, before or after the loop), is written at once, after those still
    waiting, so the order holds (and a process that logs why it exits right away says so).
    What waits is written by `flush()` too, which logging calls at exit. Every line is
    redacted first (b24queue.secrets.redaction): no secret of the process's, nor a URL's password,
    reaches the log, whichever library wrote the line."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._waiting: list[str] = []
        self._scheduled_on: asyncio.AbstractEventLoop | None = None

    def emit(self, record: logging.LogRecord) -> None:  # called with self.lock held
        try:
            line = redact(self.format(record)) + self.terminator
        except Exception:
            self.handleError(record)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None and record.levelno < logging.WARNING and not loop.is_closed():
            self._waiting.append(line)
            if self._scheduled_on is not loop:
                self._scheduled_on = loop
                loop.call_soon(self._write_waiting)
            return
        self._waiting.append(line)
        self._write_waiting()

    def _write_waiting(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._scheduled_on = None
            if not self._waiting:
                return
            text = "".join(self._waiting)
            self._waiting.clear()
            try:
                self.stream.write(text)
                self.stream.flush()
            except Exception:
                self.handleError(logging.makeLogRecord({"msg": "lost log lines"}))

    def flush(self) -> None:
        self._write_waiting()


def configure(level: str = "INFO", fmt: str = "text") -> None:
    """Configure the root logger once, for a CLI process."""
    handler = _TurnHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Neither format shows a record's thread or process: not looked up for every line (as the
    # logging documentation's "Optimization" section suggests).
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
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
