"""The REST client of one event's portal: `call`, `batch`, `list` (b24queue.portal.api.Portal).

Every request first takes its place in the portal's shared bucket (b24queue.portal.limits). The
portal's answers are handled as Bitrix24 documents them:
- 503 QUERY_LIMIT_EXCEEDED: the call never ran; it waits its turn again and is re-sent, up to
  `BUSY_TRIES` times, then the event is retried later (`PortalRetry`).
- 429 OPERATION_TIME_LIMIT: the method used up its run time for the portal's 10-minute window
  until the answer's `time.operating_reset_at` (b24queue.portal.limits.operating_hold_s): the
  method is held on that portal in the shared state, so every call of it from any handler or
  process waits until then (other methods do not), and this one is re-sent after the wait. A
  hold longer than the bucket's `max_wait_s` is not waited in a handler: the event is retried
  later (`PortalRetry` with the time left).
- 401 expired_token: refreshed once (b24queue.portal.oauth), then re-sent once.
- any other error: `PortalError` with Bitrix24's code.
Tokens go in the request body, never in a URL, a log line or an error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from b24queue.auth.record import PortalRecord
from b24queue.auth.store import TokenStore
from b24queue.events.event import Event
from b24queue.events.forms import encode_form
from b24queue.outbound.answers import (
    AnswerBudget,
    AnswersBusy,
    AnswerTooLarge,
    Bounds,
    NotJSON,
    Redirected,
    check_redirect,
    read_json,
)
from b24queue.portal.api import ANSWERS, PortalError, PortalObserver, PortalRetry
from b24queue.portal.credentials import METHOD, Endpoint, Webhooks
from b24queue.portal.limits import Limit, operating_hold_s
from b24queue.portal.oauth import Refresher
from b24queue.portal.state import SharedState
from b24queue.portal.tenant import credentials
from b24queue.secrets.redaction import redact

log = logging.getLogger(__name__)

BATCH_SIZE = 50  # Bitrix24 runs at most 50 commands per batch
BUSY_TRIES = 5
MAX_PAGES = 10_000  # a list's pages, whatever `max_items` (Bitrix24 pages by 50)
BUSY_RETRY_S = 5.0  # the process's answer budget is full: answers in flight end in seconds
EXPIRED = frozenset({"expired_token", "invalid_token"})


@dataclass(frozen=True, slots=True)
class Context:
    """What every client of one worker process shares."""

    session: aiohttp.ClientSession
    store: TokenStore
    state: SharedState
    refresher: Refresher
    limit: Limit
    webhooks: Webhooks
    observer: PortalObserver
    allow_private: bool
    bounds: Bounds  # Settings.portal_answer_bounds
    budget: AnswerBudget | None  # the process's, for the answers it reads at once


class PortalClient:
    """Made per event (no I/O here); finds its credentials at the first call."""

    def __init__(self, context: Context, event: Event) -> None:
        self._ctx = context
        self._event = event
        self._target: Endpoint | None = None
        self._token = ""  # OAuth only; empty for a webhook
        self._record: PortalRecord | None = None  # the install the target was made from

    def __repr__(self) -> str:
        return f"PortalClient(domain={self.domain!r})"

    @property
    def domain(self) -> str:
        return self._target.domain if self._target else str(self._event.auth.domain or "")

    async def call(self, method: str, params: Mapping[str, Any] | None = None) -> Any:
        return (await self._request(method, params or {}))["result"]

    async def batch(
        self, commands: Mapping[str, tuple[str, Mapping[str, Any]]], halt: bool = False
    ) -> dict[str, Any]:
        items = list(commands.items())
        out: dict[str, Any] = {}
        for start in range(0, len(items), BATCH_SIZE):
            chunk = items[start : start + BATCH_SIZE]
            cmd = {name: _command(method, params) for name, (method, params) in chunk}
            result = (await self._request("batch", {"halt": int(halt), "cmd": cmd}))["result"]
            if not isinstance(result, dict):
                raise PortalError("BAD_ANSWER", "batch answered with something else than results")
            results, errors = _by_name(result.get("result")), _by_name(result.get("result_error"))
            for name, _ in chunk:
                error = errors.get(name)
                if error:
                    failed = self._error_of(error)
                    if halt:
                        raise failed
                    out[name] = failed
                else:
                    out[name] = results.get(name)
        return out

    async def list(
        self, method: str, params: Mapping[str, Any] | None = None, *, max_items: int = 100_000
    ) -> AsyncIterator[Any]:
        start, given = 0, 0
        for _ in range(MAX_PAGES):
            if given >= max_items:
                return
            answer = await self._request(method, {**(params or {}), "start": start})
            items = _items(answer["result"])
            if not items:
                return  # an empty page ends it, whatever `next` says (no endless paging)
            for item in items:
                if given >= max_items:
                    return
                given += 1
                yield item
            following = answer.get("next")
            if not isinstance(following, int) or isinstance(following, bool):
                return
            if following < start + len(items):  # it would page over what it gave again
                raise PortalError("BAD_ANSWER", "a list's `next` does not move past its page")
            start = following
        raise PortalError("BAD_ANSWER", f"a list of more than {MAX_PAGES} pages")

    async def _request(self, method: str, params: Mapping[str, Any]) -> dict[str, Any]:
        if not METHOD.fullmatch(method):
            raise PortalError("BAD_METHOD", f"not a REST method name: {method[:64]!r}")
        target = await self._resolve()
        replaced, limited = 0, None
        for tries in range(BUSY_TRIES):
            await self._unheld(target, method)
            await self._turn(target)
            status, answer = await self._post(target, method, params)
            code = answer.get("error")
            if code is None and status == 200 and "result" in answer:
                self._ctx.observer.portal_answered("ok")
                return answer
            code = str(code or f"HTTP_{status}")
            self._ctx.observer.portal_answered(code if code in ANSWERS else "error")
            if code == "QUERY_LIMIT_EXCEEDED":
                # It never ran. The portal's bucket is fuller than ours says (other apps, other
                # addresses): give it time to drain a request or more, then re-send.
                await asyncio.sleep((tries + 1) / self._ctx.limit.drain_per_s)
                continue
            if code == "OPERATION_TIME_LIMIT":
                # It never ran: held for everyone until the portal says, then re-sent (or the
                # event retried then, when that is past the wait; see _unheld).
                hold_s = operating_hold_s(answer, time.time())
                await self._ctx.state.hold(target.key, method, hold_s)
                limited = PortalRetry(code, self._said(answer), hold_s)
                continue
            if code in EXPIRED and self._record is not None and replaced < 2:
                # The token failed: the refresher gives a newer one it knows of (another
                # process's refresh, a pair it keeps in memory) or, if none, refreshes; that
                # one may have ended early too (revoked), so twice at most. It re-reads before
                # it spends anything.
                replaced += 1
                record = await self._ctx.refresher.fresh(target.key, self._token, self._record)
                self._token = record.access_token
                continue
            raise PortalError(code, self._said(answer), status=status)
        raise limited or PortalRetry(
            "QUERY_LIMIT_EXCEEDED", "the portal stayed over its limit", 5.0
        )

    def _said(self, answer: Mapping[str, Any]) -> str:
        """The portal's error description, less the token this call sent (it may quote the
        request) and any webhook code."""
        return redact(str(answer.get("error_description") or ""), (self._token,))

    def _error_of(self, error: Any) -> PortalError:
        if isinstance(error, dict):
            return PortalError(str(error.get("error") or "ERROR"), self._said(error))
        return PortalError("ERROR", self._said({"error_description": error}))

    async def _unheld(self, target: Endpoint, method: str) -> None:
        """Wait while the portal's run-time limit holds `method` (an OPERATION_TIME_LIMIT seen
        by any process on this store); past the bucket's wait, retry the event then instead."""
        wait_s = await self._ctx.state.held(target.key, method)
        if wait_s > self._ctx.limit.max_wait_s:
            raise PortalRetry(
                "OPERATION_TIME_LIMIT",
                f"{method} is held on this portal for {wait_s:.0f}s more (its run-time limit)",
                wait_s,
            )
        if wait_s > 0:
            await asyncio.sleep(wait_s)

    async def _turn(self, target: Endpoint) -> None:
        wait_s = await self._ctx.state.reserve(target.key, self._ctx.limit)
        if wait_s is None:
            raise PortalRetry(
                "QUERY_LIMIT_EXCEEDED",
                f"the portal's bucket is full for more than {self._ctx.limit.max_wait_s:g}s",
                self._ctx.limit.max_wait_s,
            )
        self._ctx.observer.portal_waited(wait_s)
        if wait_s > 0:
            await asyncio.sleep(wait_s)  # our reserved place in the portal's leaky bucket

    async def _post(
        self, target: Endpoint, method: str, params: Mapping[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        body, status = dict(params), 0
        if target.kind == "oauth":
            body["auth"] = self._token
        try:
            async with self._ctx.session.post(
                target.url(method), json=body, allow_redirects=False
            ) as resp:
                status = resp.status
                check_redirect(status, resp.headers.get("Location"))
                answer = await read_json(resp.content, self._ctx.bounds, self._ctx.budget)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            # Not str(exc): it names the URL, and a webhook's holds its code.
            raise PortalError("UNREACHABLE", f"{target.domain}: {type(exc).__name__}") from None
        except Redirected as exc:
            raise PortalError("REDIRECT", f"{method}: {exc}", status=status) from None
        except AnswerTooLarge as exc:
            raise PortalError("ANSWER_TOO_LARGE", f"{method}: {exc}", status=status) from None
        except AnswersBusy as exc:
            raise PortalRetry("ANSWERS_BUSY", f"{method}: {exc}", BUSY_RETRY_S) from None
        except NotJSON:
            answer = None
        if not isinstance(answer, dict):
            raise PortalError("BAD_ANSWER", f"not a JSON object (HTTP {status})", status=status)
        return status, answer

    async def _resolve(self) -> Endpoint:
        if self._target is None:
            self._target, self._token, self._record = await credentials(
                self._ctx.store,
                self._ctx.refresher,
                self._ctx.webhooks,
                self._event,
                allow_private=self._ctx.allow_private,
            )
        return self._target


def _command(method: str, params: Mapping[str, Any]) -> str:
    if not METHOD.fullmatch(method):
        raise PortalError("BAD_METHOD", f"not a REST method name: {method[:64]!r}")
    query = encode_form(dict(params)).decode("ascii")
    return f"{method}?{query}" if query else method


def _by_name(answer: Any) -> dict[str, Any]:
    """A batch's `result` or `result_error` by command name. PHP writes an array whose keys are
    0..n-1 in order as a JSON array (commands named "0", "1"...; an empty one as `[]`): its
    n-th item is the command named str(n). The names are the caller's own, not ours, so that
    `$result[name]` references between commands keep working."""
    if isinstance(answer, dict):
        return {str(k): v for k, v in answer.items()}
    if isinstance(answer, list):
        return {str(i): v for i, v in enumerate(answer)}
    return {}


def _items(result: Any) -> list[Any]:
    if isinstance(result, list):
        return result
    if isinstance(result, dict) and len(result) == 1:  # e.g. tasks.task.list: {"tasks": [...]}
        (inner,) = result.values()
        if isinstance(inner, list):
            return inner
    raise PortalError("BAD_ANSWER", "a list method answered with something else than a list")
