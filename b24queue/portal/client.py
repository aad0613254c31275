"""The REST client of one event's portal: `call`, `batch`, `list` (b24queue.portal.api.Portal).

Every request first takes its place in the portal's shared bucket (b24queue.portal.limits). The
portal's answers are handled as Bitrix24 documents them:
- 503 QUERY_LIMIT_EXCEEDED: the call never ran; it waits its turn again and is re-sent, up to
  `BUSY_TRIES` times, then the event is retried later (`PortalRetry`).
- 429 OPERATION_TIME_LIMIT: the method used up its run time for the portal's 10-minute window;
  waiting in a handler would hold it for minutes, so the event is retried later instead.
- 401 expired_token: refreshed once (b24queue.portal.oauth), then re-sent once.
- any other error: `PortalError` with Bitrix24's code.
Tokens go in the request body, never in a URL, a log line or an error.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from b24queue.auth.portal import access_of
from b24queue.auth.record import PortalRecord
from b24queue.auth.store import TokenStore
from b24queue.envelope import token_digest
from b24queue.events import Event, token_digest_of
from b24queue.forms import encode_form
from b24queue.hosts import same_host
from b24queue.portal.api import ANSWERS, PortalError, PortalObserver, PortalRetry
from b24queue.portal.credentials import METHOD, Target, Webhooks, oauth_target
from b24queue.portal.limits import Limit, SharedState
from b24queue.portal.oauth import Refresher, read_bounded

log = logging.getLogger(__name__)

MAX_ANSWER_BYTES = 32 * 1024 * 1024
BATCH_SIZE = 50  # Bitrix24 runs at most 50 commands per batch
BUSY_TRIES = 5
OPERATION_LIMIT_RETRY_S = 60.0
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


class PortalClient:
    """Made per event (no I/O here); finds its credentials at the first call."""

    def __init__(self, context: Context, event: Event) -> None:
        self._ctx = context
        self._event = event
        self._target: Target | None = None
        self._token = ""  # OAuth only; empty for a webhook

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
            results, errors = result.get("result"), result.get("result_error")
            for name, _ in chunk:
                error = errors.get(name) if isinstance(errors, dict) else None
                if error:
                    failed = _error_of(error)
                    if halt:
                        raise failed
                    out[name] = failed
                elif isinstance(results, dict):
                    out[name] = results.get(name)
        return out

    async def list(
        self, method: str, params: Mapping[str, Any] | None = None, *, max_items: int = 100_000
    ) -> AsyncIterator[Any]:
        start, given = 0, 0
        while given < max_items:
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
            if not isinstance(following, int) or isinstance(following, bool) or following <= start:
                return
            start = following

    async def _request(self, method: str, params: Mapping[str, Any]) -> dict[str, Any]:
        if not METHOD.fullmatch(method):
            raise PortalError("BAD_METHOD", f"not a REST method name: {method[:64]!r}")
        target = await self._resolve()
        replaced = 0
        for tries in range(BUSY_TRIES):
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
                raise PortalRetry(code, _description(answer), OPERATION_LIMIT_RETRY_S)
            if code in EXPIRED and target.kind == "oauth" and replaced < 2:
                # The event's own token first gives way to the stored one; a stored one that
                # failed is refreshed (once: the refresher re-reads before it spends anything).
                replaced += 1
                record = await self._ctx.refresher.fresh(target.key, self._token)
                self._token = record.access_token
                continue
            raise PortalError(code, _description(answer), status=status)
        raise PortalRetry("QUERY_LIMIT_EXCEEDED", "the portal stayed over its limit", 5.0)

    async def _turn(self, target: Target) -> None:
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
        self, target: Target, method: str, params: Mapping[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        body = dict(params)
        if target.kind == "oauth":
            body["auth"] = self._token
        try:
            async with self._ctx.session.post(
                target.url(method), json=body, allow_redirects=False
            ) as resp:
                raw = await read_bounded(resp.content, MAX_ANSWER_BYTES + 1)
                status = resp.status
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            # Not str(exc): it names the URL, and a webhook's holds its code.
            raise PortalError("UNREACHABLE", f"{target.domain}: {type(exc).__name__}") from None
        if len(raw) > MAX_ANSWER_BYTES:
            raise PortalError("BAD_ANSWER", "the portal's answer is too large", status=status)
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise PortalError("BAD_ANSWER", f"not a JSON object (HTTP {status})", status=status)
        return status, answer

    async def _resolve(self) -> Target:
        if self._target is None:
            self._target, self._token = await _credentials(self._ctx, self._event)
        return self._target


async def _credentials(ctx: Context, event: Event) -> tuple[Target, str]:
    """The event's portal only: its member_id selects the record; its domain must agree."""
    member_id = event.auth.member_id
    record = await ctx.store.get(member_id) if member_id else None
    if record is None:
        webhook = ctx.webhooks.for_domain(event.auth.domain)
        if webhook is not None:
            return webhook, ""
        raise PortalError("NO_CREDENTIALS", "no installed portal or webhook for this event")
    if event.auth.domain and not same_host(event.auth.domain, record.domain):
        raise PortalError("WRONG_PORTAL", "the event's domain is not its portal's")
    # The ingress also lets in events carrying a static token (B24QUEUE_APP_TOKENS: an outgoing
    # webhook's), whatever member_id they name: only an event that came with the portal's own
    # application token may act with that portal's credentials.
    given = came_with(event)
    if given is None or not hmac.compare_digest(given, token_digest(record.token)):
        raise PortalError("WRONG_PORTAL", "the event does not carry its portal's application token")
    return oauth_target(record), await _token(ctx.refresher, event, record)


async def _token(refresher: Refresher, event: Event, record: PortalRecord) -> str:
    own = access_of(event)
    if own is not None and refresher.valid(own[1]):
        return own[0]  # the event's own, still valid
    if refresher.valid(record.access_expires):
        return record.access_token
    return (await refresher.fresh(record.member_id, record.access_token)).access_token


def came_with(event: Event) -> str | None:
    """The digest of the application token the event came with: from its message's header in a
    worker (the body leaves the token out), or of the token itself in an event built directly."""
    if event.auth.application_token:
        return token_digest(event.auth.application_token)
    return token_digest_of(event)


def _command(method: str, params: Mapping[str, Any]) -> str:
    if not METHOD.fullmatch(method):
        raise PortalError("BAD_METHOD", f"not a REST method name: {method[:64]!r}")
    query = encode_form(dict(params)).decode("ascii")
    return f"{method}?{query}" if query else method


def _items(result: Any) -> list[Any]:
    if isinstance(result, list):
        return result
    if isinstance(result, dict) and len(result) == 1:  # e.g. tasks.task.list: {"tasks": [...]}
        (inner,) = result.values()
        if isinstance(inner, list):
            return inner
    raise PortalError("BAD_ANSWER", "a list method answered with something else than a list")


def _error_of(error: Any) -> PortalError:
    if isinstance(error, dict):
        return PortalError(str(error.get("error") or "ERROR"), _description(error))
    return PortalError("ERROR", str(error))


def _description(answer: Mapping[str, Any]) -> str:
    return str(answer.get("error_description") or "")
