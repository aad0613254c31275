"""Refreshing a portal's OAuth tokens: one refresh per portal at a time, across processes.

A refresh token is single-use: two processes refreshing one portal at once would each spend it,
and the loser's answer (or the winner's, stored second) leaves a pair the OAuth server no longer
knows, and the portal is lost until it sends an event with a new one. So: take the portal's
refresh lease (b24queue.portal.state), re-read the record (someone may have refreshed while we
waited), refresh only if it is still stale, store the new pair by compare-and-set on the spent
refresh token, give the lease back. Another process's refresh is waited for by re-reading the
store (there is no notification across processes), with a deadline.

Within a process there is one refresh per portal in flight, a task of the Refresher's own: every
caller of that portal waits for it (at most `WAIT_S`, then `PortalRetry`) and gets its result or
its error, so 64 handlers make one attempt, not one each in turn. The task is not the caller's:
a handler cancelled (its timeout, a shutdown) while the OAuth server answers does not lose the
new pair, whose refresh token was spent by then. A store write that fails is tried again; if it
still fails the pair is kept in this process's memory (said in an error log), which beats losing
the portal. After `invalid_grant` (the stored refresh token is dead) the stored one is cleared,
so later calls give NO_CREDENTIALS at once until an event brings a new pair.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import os
import time
from collections.abc import Callable
from functools import partial

import aiohttp

from b24queue.auth.record import Grant, PortalRecord
from b24queue.auth.store import TokenStore
from b24queue.outbound.hosts import same_host
from b24queue.portal.api import (
    NoCredentials,
    NoObserver,
    PortalError,
    PortalObserver,
    PortalRetry,
)
from b24queue.portal.oauth_server import OAUTH_TIMEOUT_S, ask_oauth
from b24queue.portal.state import SharedState
from b24queue.settings import Settings

log = logging.getLogger(__name__)

# A token is "valid" while it has this long left (a call must reach the portal in time).
MARGIN_S = 60
STORE_BUSY_S = 5.0  # sqlite3's busy timeout on the store's connection (its default)
WRITE_PAUSES_S = (0.2, 1.0)  # between the tries of storing a refreshed pair
# The lease outlives the slowest refresh: the re-read, the OAuth call, every try of the write
# (each may wait out the busy timeout), and a margin.
LEASE_S = OAUTH_TIMEOUT_S + (2 + len(WRITE_PAUSES_S)) * STORE_BUSY_S + sum(WRITE_PAUSES_S) + 5
WAIT_S = OAUTH_TIMEOUT_S + 5.0  # the longest a caller waits for a refresh, then PortalRetry
CLOSE_WAIT_S = 5.0  # at close, refreshes in flight get this long to store what they got
MAX_REFUSED = 10_000
POLL_S = 0.1  # re-reading the store while another process refreshes


@dataclasses.dataclass(frozen=True, slots=True)
class _Unsaved:
    """A refreshed pair the store would not take: `stored_refresh` is what the store still
    holds (spent), `record` the portal with the live pair."""

    stored_refresh: str
    record: PortalRecord


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
        self._inflight: dict[str, asyncio.Task[PortalRecord]] = {}
        self._unsaved: dict[str, _Unsaved] = {}
        # Refresh tokens the OAuth server refused, should clearing them in the store fail.
        self._refused: set[str] = set()
        self.refreshes = 0  # OAuth refreshes this process made (tests, metrics)

    def valid(self, expires: int) -> bool:
        return expires > self._clock() + MARGIN_S

    async def fresh(self, member_id: str, spent: str, install: PortalRecord) -> PortalRecord:
        """The portal's record with an access token other than `spent` (one that failed or is
        about to expire) and valid, refreshing it if nobody else has. `install` is the record
        the caller's target was made from: a record of another install (the portal forgotten
        and installed again meanwhile) is refused, never handed to the old target."""
        for _ in range(2):
            task = self._inflight.get(member_id) or self._start(member_id, spent)
            # Shielded: a caller that is cancelled or gives up leaves the refresh running.
            done, _ = await asyncio.wait({task}, timeout=WAIT_S)
            if not done:
                raise PortalRetry("REFRESH_SLOW", "the portal's token refresh takes too long", 5.0)
            record = task.result()
            _same_install(record, install)
            if record.access_token != spent and self.valid(record.access_expires):
                return record
            # That refresh was for an older token (ours came after it): one of our own.
        raise PortalError("REFRESH_LOST", "no valid token after refreshing")

    def _start(self, member_id: str, spent: str) -> asyncio.Task[PortalRecord]:
        task = asyncio.get_running_loop().create_task(
            self._fresh(member_id, spent), name=f"b24queue-refresh-{member_id[:40]}"
        )
        self._inflight[member_id] = task
        task.add_done_callback(partial(self._finished, member_id))
        return task

    def _finished(self, member_id: str, task: asyncio.Task[PortalRecord]) -> None:
        if self._inflight.get(member_id) is task:
            del self._inflight[member_id]
        if not task.cancelled():
            task.exception()  # retrieved: its callers may all have given up

    async def close(self) -> None:
        """Let refreshes in flight store what they got (briefly), then cancel the rest."""
        tasks = set(self._inflight.values())
        if tasks:
            await asyncio.wait(tasks, timeout=CLOSE_WAIT_S)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _fresh(self, member_id: str, spent: str) -> PortalRecord:
        deadline = self._clock() + LEASE_S + OAUTH_TIMEOUT_S
        while True:
            record, _ = await self._current(member_id)
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

    async def _current(self, member_id: str) -> tuple[PortalRecord, str]:
        """The portal's record, and the refresh token the store holds for it (which a new pair
        replaces by compare-and-set). A pair the store would not take, kept here, wins while
        the store still holds the refresh token it replaced."""
        record = await self._store.get(member_id)
        if record is None:
            self._unsaved.pop(member_id, None)
            raise NoCredentials(
                "NO_CREDENTIALS", "the portal is not installed (or was uninstalled)"
            )
        kept = self._unsaved.get(member_id)
        if kept is not None:
            if record.refresh_token == kept.stored_refresh and record.token == kept.record.token:
                return kept.record, kept.stored_refresh
            del self._unsaved[member_id]  # the store moved on (an event's pair, a reinstall)
        return record, record.refresh_token

    async def _refresh_leased(self, member_id: str, spent: str) -> PortalRecord:
        # Re-read: the lease's last holder may have won.
        record, stored_refresh = await self._current(member_id)
        if record.access_token != spent and self.valid(record.access_expires):
            return record
        if not record.refresh_token or record.refresh_token in self._refused:
            raise NoCredentials("NO_CREDENTIALS", "no usable refresh token stored for this portal")
        try:
            grant = await self._ask(record)
        except PortalError as exc:
            if exc.code == "invalid_grant":
                await self._forget_refresh(record, stored_refresh)
            raise
        self.refreshes += 1
        self._observer.portal_refreshed()
        return await self._keep(record, grant, stored_refresh)

    async def _keep(self, record: PortalRecord, grant: Grant, stored_refresh: str) -> PortalRecord:
        """Store the new pair in place of `stored_refresh`, trying again if the store fails;
        if it still fails, keep the pair in memory (its refresh token is the live one now).
        The portal's record with the new pair."""
        member_id, domain = record.member_id, record.domain
        new = dataclasses.replace(
            record,
            access_token=grant.access_token,
            refresh_token=grant.refresh_token,
            access_expires=grant.access_expires,
        )
        for pause in (*WRITE_PAUSES_S, None):
            try:
                ok = await self._store.refreshed(member_id, stored_refresh, grant)
            except Exception as exc:  # the store's own errors (sqlite3, redis): try again
                log.warning(
                    "portal %s (member_id %s): storing its refreshed token failed (%s)",
                    domain, member_id, type(exc).__name__,
                )  # fmt: skip
                if pause is not None:
                    await asyncio.sleep(pause)
                continue
            self._unsaved.pop(member_id, None)
            if ok:
                log.info("portal %s (member_id %s): access token refreshed", domain, member_id)
                return new
            now = await self._store.get(member_id)  # lost the compare-and-set: who won?
            if now is not None and self.valid(now.access_expires):
                return now
            raise PortalError("REFRESH_LOST", "the refreshed token could not be stored")
        log.error(
            "portal %s (member_id %s): the refreshed token pair could not be stored; this "
            "process keeps it in memory (other processes will find the portal's stored refresh "
            "token spent until its next event brings a new pair)",
            domain, member_id,
        )  # fmt: skip
        self._unsaved[member_id] = _Unsaved(stored_refresh, new)
        return new

    async def _forget_refresh(self, record: PortalRecord, stored_refresh: str) -> None:
        """The OAuth server refused the refresh token: clear it in the store (compare-and-set),
        so no process asks with it again; the portal's next event brings a new one."""
        self._unsaved.pop(record.member_id, None)
        if len(self._refused) >= MAX_REFUSED:
            self._refused.clear()  # bounded; the store's cleared refresh token is what lasts
        self._refused.add(record.refresh_token)
        try:
            cleared = Grant(record.access_token, record.access_expires)  # refresh token ''
            await self._store.refreshed(record.member_id, stored_refresh, cleared)
        except Exception as exc:  # the next caller asks again and is refused again: no harm
            log.warning(
                "portal %s (member_id %s): clearing its refused refresh token failed (%s)",
                record.domain, record.member_id, type(exc).__name__,
            )  # fmt: skip

    async def _ask(self, record: PortalRecord) -> Grant:
        return await ask_oauth(self._session, self._settings, record, self._clock())


def _same_install(record: PortalRecord, install: PortalRecord) -> None:
    same = hmac.compare_digest(record.token.encode(), install.token.encode())
    if not same or not same_host(record.domain, install.domain):
        raise NoCredentials("WRONG_PORTAL", "the portal was installed again (by another install)")
