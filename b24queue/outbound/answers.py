"""Answers from HTTP servers we do not run: portals (the REST client, offline events, the install
call-back's app.info), Bitrix24's OAuth server, the RabbitMQ management API. Every one of them
is read here, the same way:

- A redirect is never followed: it is an error (`Redirected`) naming the status and the origin
  the Location points to, never its path or query (where a credential could be), so nothing we
  send (a token, a password, the app's secret) is sent on to another host.
- An answer is read up to `Bounds.max_bytes`, then its JSON values are counted before it is
  decoded, up to `Bounds.max_values`. Bytes alone do not bound memory: JSON's size in memory
  depends on its shape (14 MB of `{},` decode into about 320 MiB, 23 bytes per byte; a page of
  50 deals takes 2.6 bytes per byte). A count bounds it. It is a pass over the bytes at C
  speed, counting each `{`, `[` and `,` (a value adds one or two), first in the whole answer
  and, only if that is over the bound, again outside texts (a comma in a text is no value).
  What one counts decodes into at most `VALUE_BYTES` (a one-key object, the costliest: 184
  bytes), plus the characters of texts.
- `AnswerBudget`: the memory of the answers a process reads and decodes at once, charged as
  their bytes arrive and, while one is decoded, with what it decodes into. An answer that would
  take the process past it fails at once (`AnswersBusy`), it does not wait: it already holds
  what it has read, and answers waiting for each other's bytes could wait forever.

Errors say which bound, its setting and by how much; never a byte of the answer itself.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from b24queue.errors import B24QueueError
from b24queue.telemetry.logs import client_text

# The memory a decoded value may take, at most (CPython 3.11, 64-bit: a one-key object 184
# bytes, an empty one 64 plus its 8 in the array holding it; a number 32; a short text 60).
VALUE_BYTES = 200
MIB = 1024 * 1024

_STRUCTURAL = b"{[,"
_NOT_STRUCTURAL = bytes(b for b in range(256) if b not in _STRUCTURAL)
# A JSON string, escapes and all; one left open runs to the end (where a decoder stops too).
# Possessive, so linear whatever the bytes.
_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+(?:"|\\?\Z)', re.DOTALL)


class AnswerError(B24QueueError):
    """An answer we did not take (the callers turn it into their own error)."""


class Redirected(AnswerError):
    def __init__(self, status: int, location: str | None) -> None:
        self.status = status
        self.origin = origin(location) if location else None
        to = f" to {self.origin}" if self.origin else " without a Location"
        super().__init__(f"answered HTTP {status}, a redirect{to}: not followed")


class AnswerTooLarge(AnswerError):
    def __init__(self, what: str, limit: int, found: int | None, setting: str) -> None:
        self.what, self.limit, self.found = what, limit, found
        counted = f"{found:,} {what}" if found is not None else f"more than {limit:,} {what}"
        named = f" ({setting})" if setting else ""
        over = f", {found - limit:,} over the limit of {limit:,}" if found is not None else ""
        super().__init__(f"the answer is too large: {counted}{over}{named}")


class AnswersBusy(AnswerError):
    def __init__(self, budget: AnswerBudget, needed: int) -> None:
        self.needed = needed
        super().__init__(
            f"answers being read at once would take {_mib(budget.in_use + needed)} MiB, over "
            f"the {_mib(budget.limit)} MiB of {budget.setting} ({_mib(budget.in_use)} MiB in "
            "use): tried again later"
        )


class NotJSON(AnswerError):
    def __init__(self) -> None:
        super().__init__("the answer is not JSON (in UTF-8)")


@dataclass(frozen=True, slots=True)
class Bounds:
    """How large one answer may be; the settings named in the errors (empty: a constant)."""

    max_bytes: int
    max_values: int
    bytes_setting: str = ""
    values_setting: str = ""

    def decoded_bytes(self) -> int:
        """The most memory an answer within these bounds is charged: its bytes and values."""
        return self.max_bytes + self.max_values * VALUE_BYTES


class AnswerBudget:
    """Memory for the answers one process reads and decodes at once (see the module)."""

    def __init__(self, limit: int, setting: str = "") -> None:
        self.limit = limit
        self.setting = setting or "the process's budget for answers"
        self.in_use = 0

    @contextmanager
    def held(self) -> Iterator[_Held]:
        """What one answer takes, given back when it is decoded (or fails)."""
        held = _Held(self)
        try:
            yield held
        finally:
            self.in_use -= held.amount


class _Held:
    def __init__(self, budget: AnswerBudget) -> None:
        self._budget = budget
        self.amount = 0

    def take(self, n: int) -> None:
        budget = self._budget
        if budget.in_use + n > budget.limit:
            raise AnswersBusy(budget, n)
        budget.in_use += n
        self.amount += n


class Readable(Protocol):
    """A body arriving in pieces (aiohttp's `StreamReader`): `read(n)` gives what has arrived,
    up to n bytes, and b"" at its end."""

    async def read(self, n: int = -1) -> bytes: ...


def check_redirect(status: int, location: str | None) -> None:
    """`Redirected` for a 3xx answer (its Location header given, or None)."""
    if 300 <= status < 400:
        raise Redirected(status, location)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """urllib follows redirects, with every header (Authorization too), to any host: this
    handler follows none, so a 3xx reaches the caller as an `HTTPError` (for
    `check_redirect`)."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def urllib_opener() -> urllib.request.OpenerDirector:
    """An opener like `urllib.request.urlopen`'s that follows no redirect."""
    return urllib.request.build_opener(_NoRedirects)


async def read_json(stream: Readable, bounds: Bounds, budget: AnswerBudget | None = None) -> Any:
    """The decoded answer: `AnswerTooLarge`, `AnswersBusy` or `NotJSON` if not taken."""
    if budget is None:
        return decode_json(await read_bounded(stream, bounds), bounds)
    with budget.held() as held:
        raw = await read_bounded(stream, bounds, held)
        values = _checked_count(raw, bounds)
        held.take(values * VALUE_BYTES)  # what it is about to decode into
        return _decode(raw)


async def read_bounded(stream: Readable, bounds: Bounds, held: _Held | None = None) -> bytes:
    """The answer's bytes, however many pieces they arrive in; `AnswerTooLarge` past the bound
    (at most one byte past it is read)."""
    limit = bounds.max_bytes + 1
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await stream.read(limit - size)
        if not chunk:
            break
        if held is not None:
            held.take(len(chunk))
        chunks.append(chunk)
        size += len(chunk)
    if size > bounds.max_bytes:
        raise AnswerTooLarge("bytes", bounds.max_bytes, None, bounds.bytes_setting)
    return b"".join(chunks)


def decode_json(raw: bytes, bounds: Bounds) -> Any:
    """`raw` decoded, if it is within `bounds`."""
    if len(raw) > bounds.max_bytes:  # read up to one byte past the bound: the total is unknown
        raise AnswerTooLarge("bytes", bounds.max_bytes, None, bounds.bytes_setting)
    _checked_count(raw, bounds)
    return _decode(raw)


def _checked_count(raw: bytes, bounds: Bounds) -> int:
    """How many values `raw` holds (at least), `AnswerTooLarge` if more than the bound."""
    if json.detect_encoding(raw) not in ("utf-8", "utf-8-sig"):
        # JSON over HTTP is UTF-8; in UTF-16 or -32 a byte of a character can look like a `"`
        # and hide values from the count.
        raise NotJSON()
    found = count_values(raw)
    if found > bounds.max_values:  # counting the commas in texts too: recount without them
        found = count_values(raw, exact=True)
        if found > bounds.max_values:
            raise AnswerTooLarge("JSON values", bounds.max_values, found, bounds.values_setting)
    return found


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested past the decoder's depth
        raise NotJSON() from None


def count_values(raw: bytes, *, exact: bool = False) -> int:
    """The `{`, `[` and `,` of the JSON text `raw`, plus one: at least its number of values (each
    value but the first adds a `,`, or a `{` or `[`, or both) and at most twice that. Those in
    its texts too, unless `exact` (a slower pass, that skips them)."""
    if exact:
        raw = _STRING.sub(b"", raw)
    return len(raw.translate(None, _NOT_STRUCTURAL)) + 1


def origin(url: str) -> str:
    """scheme://host[:port] of a URL, escaped for a log line: never its user, path or query."""
    try:
        parts = urlsplit(url.strip())
        host, port = parts.hostname, parts.port
    except ValueError:
        return "an unreadable URL"
    if not host:
        return "the same host"  # a relative Location
    netloc = f"[{host}]" if ":" in host else host
    return client_text(f"{parts.scheme}://{netloc}" + (f":{port}" if port else ""), 200)


def _mib(n: int) -> str:
    return f"{n / MIB:.1f}"
