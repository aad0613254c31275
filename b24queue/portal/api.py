"""What a handler gets to call its event's portal with, and what it raises. No HTTP client here:
the domain layer (the consumer) depends on this module only."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

from b24queue.errors import B24QueueError
from b24queue.events.event import Event
from b24queue.retry import Retry

MAX_DESCRIPTION = 200


class PortalError(B24QueueError):
    """The portal (or the OAuth server) answered with an error, or could not be asked.

    `code` is Bitrix24's error code (`ACCESS_DENIED`, `NOT_FOUND`, `expired_token`...), or ours
    for what happened before an answer (`NO_CREDENTIALS`, `UNREACHABLE`, `BAD_ANSWER`). Neither
    it nor the description ever holds a token: both come from the answer, bounded."""

    def __init__(self, code: str, description: str = "", *, status: int | None = None) -> None:
        self.code = _bounded(code, 64) or "ERROR"
        self.description = _bounded(description, MAX_DESCRIPTION)
        self.status = status
        super().__init__(f"{self.code}: {self.description}" if self.description else self.code)


class NoCredentials(PortalError):
    """Raised by our own credentials lookup, before any request: this process has no credentials
    for the event's portal (`NO_CREDENTIALS`: not installed, no webhook), or the event may not
    use them (`WRONG_PORTAL`, `NO_APP_TOKEN`). Never made from a portal's answer: a portal can
    answer any error code, this type it cannot."""


class PortalRetry(Retry, PortalError):
    """Not now: the portal limits this method's run time (`OPERATION_TIME_LIMIT`), or its bucket
    is full for longer than a handler should wait. Raised out of `handle`, it retries the event
    after `delay_s` (a `Retry`); caught, it is a `PortalError` like any other."""

    def __init__(self, code: str, description: str, delay_s: float) -> None:
        PortalError.__init__(self, code, description)
        self.delay_s = delay_s


class Portal(Protocol):
    """The REST API of one portal, with that portal's credentials only."""

    @property
    def domain(self) -> str: ...

    async def call(self, method: str, params: Mapping[str, Any] | None = None) -> Any:
        """`result` of one method (`crm.deal.get`, {"id": 42}); `PortalError` on an error."""

    async def batch(
        self, commands: Mapping[str, tuple[str, Mapping[str, Any]]], halt: bool = False
    ) -> dict[str, Any]:
        """Several methods in as few `batch` calls as can be (50 commands each): name ->
        result. A command that failed maps to its `PortalError` (or raises it, with `halt`)."""

    def list(
        self, method: str, params: Mapping[str, Any] | None = None, *, max_items: int = 100_000
    ) -> AsyncIterator[Any]:
        """Every item of a list method (`crm.deal.list`), page after page (`next`/`start`)."""


class PortalObserver(Protocol):
    """What the portal clients report (b24queue.telemetry.metrics.WorkerMetrics is one)."""

    def portal_answered(self, answer: str) -> None:
        """One request answered: `ok`, or one of `ANSWERS` (anything else is `error`)."""

    def portal_waited(self, seconds: float) -> None: ...

    def portal_refreshed(self) -> None: ...


# The answers counted by name; every other error code is `error` (codes come from the portal:
# a label per code would let it create series without bound).
ANSWERS = frozenset(
    {"QUERY_LIMIT_EXCEEDED", "OPERATION_TIME_LIMIT", "expired_token", "invalid_token"}
)


class NoObserver:
    def portal_answered(self, answer: str) -> None:
        return None

    def portal_waited(self, seconds: float) -> None:
        return None

    def portal_refreshed(self) -> None:
        return None


class PortalProvider(Protocol):
    def for_event(self, event: Event) -> Portal:
        """The client for the event's portal (chosen by its member_id); no I/O until a call."""


def _bounded(text: object, limit: int) -> str:
    value = "".join(ch if ch.isprintable() else "?" for ch in str(text)[: limit + 1])
    return value if len(value) <= limit else value[:limit] + "..."
