"""Refreshing a portal's OAuth tokens: one refresh per portal at a time, across processes.

A refresh token is single-use: two processes refreshing one portal at once would each spend it,
and the loser's answer (or the winner's, stored second) leaves a pair the OAuth server no longer
knows, and the portal is lost until it sends an event with a new one. So: take the portal's
refresh lease (b24queue.portal.limits), re-read the record (someone may have refreshed while we
waited), refresh only if it is still stale, store the new pair by compare-and-set on the spent
refresh token, give the lease back. Within a process, callers of one portal queue on one lock
first, so 64 handlers make one refresh, not 64 lease attempts. Another process's refresh is
waited for by re-reading the store (there is no notification across processes), with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
import weakref
from collections.abc import Callable

import aiohttp

from b24queue.auth.record import PortalRecord
from b24queue.auth.store import TokenStore
from b24queue.portal.api import NoObserver, PortalError, PortalObserver, PortalRetry
from b24queue.portal.limits import SharedState
from b24queue.settings import Settings

log = logging.getLogger(__name__)

# A token is "valid" while it has this long left (a call must reach the portal in time).
MARGIN_S = 60
# The longest an OAuth token is believed to live, whatever the server says (Bitrix24's: 1 hour).
MAX_LIFETIME_S = 2 * 3600
LEASE_S = 20.0  # longer than the OAuth call may take (its timeout is below)
OAUTH_TIMEOUT_S = 10.0
POLL_S = 0.1  # re-reading the store while another process refreshes
MAX_ANSWER_BYTES = 64 * 1024
_TOKEN = re.compile(r"[\x21-\x7e]{1,256}")


class Refresher:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        store: TokenStore,
        state: SharedState,
        settings: Settings,
        clock: Callable[[], float] = time.time,
        observer: PortalObserver | None = None,
    ) -> None:
        self._observer = observer or NoObserver()
        self._session = session
        self._store = store
        self._state = state
        self._settings = settings
        self._clock = clock
        self._owner = f"{os.getpid()}-{id(self):x}"
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self.refreshes = 0  # OAuth refreshes this process made (tests, metrics)

    def valid(self, expires: int) -> bool:
        return expires > self._clock() + MARGIN_S

    async def fresh(self, member_id: str, spent: str) -> PortalRecord:
        """The portal's record with an access token other than `spent` (one that failed or is
        about to expire) and valid, refreshing it if nobody else has."""
        lock = self._locks.get(member_id)
        if lock is None:
            lock = self._locks[member_id] = asyncio.Lock()
        async with lock:
            return await self._fresh(member_id, spent)

    async def _fresh(self, member_id: str, spent: str) -> PortalRecord:
        deadline = self._clock() + LEASE_S + OAUTH_TIMEOUT_S
        while True:
            record = await self._current(member_id)
            if record.access_token != spent and self.valid(record.access_expires):
                return record  # refreshed by someone else meanwhile
            if await self._state.lease(member_id, self._owner, LEASE_S):
                try:
                    return await self._refresh_leased(member_id, spent)
                finally:
                    await self._state.release(member_id, self._owner)
            if self._clock() > deadline:
                raise PortalRetry(
                    "REFRESH_BUSY", "another process is refreshing this portal's token", 5.0
                )
            await asyncio.sleep(POLL_S)

    async def _current(self, member_id: str) -> PortalRecord:
        record = await self._store.get(member_id)
        if record is None:
            raise PortalError("NO_CREDENTIALS", "the portal is not installed (or was uninstalled)")
        return record

    async def _refresh_leased(self, member_id: str, spent: str) -> PortalRecord:
        record = await self._current(member_id)  # re-read: the lease's last holder may have won
        if record.access_token != spent and self.valid(record.access_expires):
            return record
        if not record.refresh_token:
            raise PortalError("NO_CREDENTIALS", "no refresh token stored for this portal")
        access, refresh, expires = await self._ask(record)
        if await self._store.refreshed(member_id, record.refresh_token, access, refresh, expires):
            self.refreshes += 1
            self._observer.portal_refreshed()
            log.info("portal %s (member_id %s): access token refreshed", record.domain, member_id)
            return await self._current(member_id)
        now = await self._current(member_id)
        if self.valid(now.access_expires) and now.access_token != spent:
            return now
        raise PortalError("REFRESH_LOST", "the refreshed token could not be stored")

    async def _ask(self, record: PortalRecord) -> tuple[str, str, int]:
        s = self._settings
        secret = s.app_client_secret.get_secret_value()
        if not s.app_client_id or not secret:
            raise PortalError(
                "expired_token",
                "the portal's access token has expired; refreshing it needs "
                "B24QUEUE_APP_CLIENT_ID and B24QUEUE_APP_CLIENT_SECRET",
            )
        params = {
            "grant_type": "refresh_token",
            "client_id": s.app_client_id,
            "client_secret": secret,
            "refresh_token": record.refresh_token,
        }
        try:
            async with self._session.get(
                s.oauth_url,
                params=params,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=OAUTH_TIMEOUT_S),
            ) as resp:
                body = await read_bounded(resp.content, MAX_ANSWER_BYTES + 1)
                status = resp.status
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            # Never str(exc): aiohttp's errors name the URL, and this one holds the secrets.
            raise PortalError("OAUTH_UNREACHABLE", type(exc).__name__) from None
        return _tokens(record, status, body, self._clock())


async def read_bounded(stream: aiohttp.StreamReader, limit: int) -> bytes:
    """Up to `limit` bytes of an answer, however many pieces it arrives in (one `read(n)`
    returns what has arrived so far)."""
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await stream.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _tokens(record: PortalRecord, status: int, body: bytes, now: float) -> tuple[str, str, int]:
    try:
        answer = json.loads(body) if len(body) <= MAX_ANSWER_BYTES else None
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise PortalError("BAD_ANSWER", f"the OAuth server's answer (HTTP {status}) is not JSON")
    if status != 200 or "error" in answer:
        error = str(answer.get("error") or status)
        raise PortalError(error, str(answer.get("error_description") or ""), status=status)
    access, refresh = answer.get("access_token"), answer.get("refresh_token")
    if not all(isinstance(t, str) and _TOKEN.fullmatch(t) for t in (access, refresh)):
        raise PortalError("BAD_ANSWER", "the OAuth server's answer has no usable tokens")
    member = answer.get("member_id")
    if member is not None and str(member) != record.member_id:
        raise PortalError("WRONG_PORTAL", "the OAuth server answered for another portal")
    lifetime = answer.get("expires_in")
    if not isinstance(lifetime, int) or isinstance(lifetime, bool) or lifetime <= 0:
        lifetime = 3600
    assert isinstance(access, str) and isinstance(refresh, str)
    return access, refresh, int(now) + min(lifetime, MAX_LIFETIME_S)
