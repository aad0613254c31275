"""`b24queue offline`: every enabled portal's offline queue pulled into the exchange.

One task per portal (from the portal store, re-read every `REFRESH_S`): bind
B24QUEUE_OFFLINE_EVENTS when due (at the start, every `REBIND_S`, a failure again sooner), redo
what a crash left reserved, then pull while batches come full, then wait for a wake-up or the
poll interval. A wake-up is an ONOFFLINEEVENT the portal sent to the ingress: the ingress
publishes it like any event, and this process consumes it from a small queue of its own
(B24QUEUE_OFFLINE_WAKE_QUEUE) on whichever transport, so several pullers share the pings. Every
call goes through the portal client, within the portal's shared rate limit.

Stop (SIGTERM): no new pull starts; a batch being published is finished and cleared, up to
`shutdown_timeout_s`; what is cancelled after that stays reserved and is redone at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from b24queue.auth.record import PortalRecord
from b24queue.auth.store import TokenStore
from b24queue.consumer import EventConsumer
from b24queue.errors import B24QueueError, BadEventError, BrokerUnavailableError
from b24queue.events.envelope import EventSink, token_digest
from b24queue.events.event import Event
from b24queue.offline.bind import bind_events, portal_event
from b24queue.offline.puller import Caller, Puller, Target
from b24queue.offline.records import BadBatch
from b24queue.offline.wake import QUIET_S, Wakes
from b24queue.portal.api import NoCredentials, PortalRetry
from b24queue.portal.state import SharedState
from b24queue.portal.tenant import came_with
from b24queue.settings import Settings
from b24queue.telemetry.metrics import OfflineMetrics

log = logging.getLogger(__name__)

REFRESH_S = 30.0  # how often the list of installed portals is read again
RECOVER_S = 300.0  # how often a portal's reserved-and-forgotten batches are looked for
BROKER_WAIT_S = 1.0  # the broker away: try the batch again after this long, then twice that...
BROKER_MAX_WAIT_S = 30.0  # ...up to this (each retry gets and publishes the whole batch again)
FAIL_WAIT_S = 5.0  # any other failed pull or recovery: try again after this long, then twice...
FAIL_MAX_WAIT_S = 300.0  # ...up to this, or the poll interval if shorter
MAX_PULLS_IN_A_ROW = 100  # full batches before the loop waits (a portal answering full forever)
# B24QUEUE_OFFLINE_EVENTS: bound when a portal's loop starts, and again this often (Bitrix24 drops
# an app's bindings when the app is updated or reinstalled; binding again is harmless)...
REBIND_S = 3600.0
BIND_RETRY_S = 60.0  # ...and a binding that failed tried again after this, then twice that...

PortalFor = Callable[[Event], Caller]


class BindSchedule:
    """When a portal's B24QUEUE_OFFLINE_EVENTS are to be bound next (never: math.inf)."""

    def __init__(self, due_at: float) -> None:
        self.due_at = due_at
        self._retry_s = BIND_RETRY_S

    def settled(self, ok: bool, now: float) -> None:
        if ok:
            self.due_at, self._retry_s = now + REBIND_S, BIND_RETRY_S
        else:  # ...up to REBIND_S
            self.due_at, self._retry_s = now + self._retry_s, min(2 * self._retry_s, REBIND_S)


@dataclass(frozen=True, slots=True)
class Done:
    """A pull or recovery went through: records the get answered (recovery: batches left)."""

    count: int


@dataclass(frozen=True, slots=True)
class Backoff:
    """It failed: wait this long before the next try (a wake-up does not shorten it, so a failing
    portal is not pulled at every ping; the wait is short at first and grows while it fails)."""

    delay_s: float


Step = Done | Backoff


class OfflineService:
    def __init__(
        self,
        settings: Settings,
        portal_for: PortalFor,
        sink: EventSink,
        store: TokenStore,
        state: SharedState,
        metrics: OfflineMetrics,
        *,
        quiet_s: float = QUIET_S,
    ) -> None:
        self._s = settings
        self._portal_for = portal_for
        self._sink = sink
        self._store = store
        self._state = state
        self.metrics = metrics
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._retired: set[asyncio.Task[None]] = set()
        self._wakes = Wakes(quiet_s)
        self._broker_wait_s: dict[str, float] = {}  # per portal, while the broker fails
        self._fail_wait_s: dict[str, float] = {}  # per portal, while its pulls fail otherwise
        self._stop = asyncio.Event()

    def enabled(self, member_id: str | None) -> bool:
        wanted = self._s.offline_portals
        return bool(member_id) and ("*" in wanted or member_id in wanted)

    def wake(self, member_id: str | None, digest: str | None) -> bool:
        """An ONOFFLINEEVENT came with the token of `digest`: pull that portal soon, if the
        token is the portal's own (b24queue.offline.wake); True if it counted."""
        return self._wakes.wake(member_id, digest)

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                await self._refresh()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), REFRESH_S)
        finally:
            await self._stop_all()

    async def _refresh(self) -> None:
        try:
            records = [r for r in await self._store.all() if self.enabled(r.member_id)]
        except Exception as exc:  # the store away for a moment: keep the portals we have
            log.warning("cannot read the portal store: %s", type(exc).__name__)
            return
        current = {r.member_id: r for r in records}
        for member_id in list(self._tasks):
            if member_id not in current:  # uninstalled (or no longer enabled)
                retired = self._tasks.pop(member_id)
                retired.cancel()
                self._retired.add(retired)  # awaited at stop, dropped once done
                retired.add_done_callback(self._retired.discard)
                self._wakes.remove(member_id)
                self._broker_wait_s.pop(member_id, None)
                self._fail_wait_s.pop(member_id, None)
        for member_id, record in current.items():
            self._wakes.add(member_id, token_digest(record.token))
            task = self._tasks.get(member_id)
            if task is None or task.done():
                self._tasks[member_id] = asyncio.create_task(
                    self._portal_loop(record), name=f"b24queue-offline-{member_id}"
                )
        self.metrics.portals.set(len(self._tasks))

    async def _stop_all(self) -> None:
        self._stop.set()
        self._wakes.stop()
        tasks = [*self._tasks.values(), *self._retired]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=self._s.shutdown_timeout_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()

    async def _portal_loop(self, record: PortalRecord) -> None:
        with contextlib.suppress(_PortalGone):
            await self._pull_portal(record)

    async def _pull_portal(self, record: PortalRecord) -> None:
        try:
            portal = self._portal_for(portal_event(record))
        except BadEventError:
            log.error("portal %s: its stored domain is not usable; not pulled", record.member_id)
            return
        target = Target(
            record.member_id,
            record.domain,
            self._s.offline_auth_connector,
            self._s.offline_batch,
            self._s.max_body_bytes,
            self._s.offline_lease_s,
            token_digest(record.token),
        )
        puller = Puller(portal, self._sink, self._state, target, self.metrics)
        loop = asyncio.get_running_loop()
        recover_at = loop.time()
        bindings = BindSchedule(recover_at if self._s.offline_events else math.inf)
        while not self._stop.is_set():
            if loop.time() >= bindings.due_at:
                bindings.settled(await self._bind(record, portal), loop.time())
            self._wakes.pulling(record.member_id)
            if loop.time() >= recover_at:
                left = await self._step(record, puller, puller.recover)
                # Batches still leased are looked at again once the lease can have run out.
                if isinstance(left, Done):
                    again_s = self._s.offline_lease_s + 1 if left.count else RECOVER_S
                else:
                    again_s = left.delay_s
                recover_at = loop.time() + again_s
            wait_s, backoff = self._s.offline_poll_s, False
            for _ in range(MAX_PULLS_IN_A_ROW):
                outcome = await self._step(record, puller, puller.pull_once)
                if isinstance(outcome, Backoff):
                    wait_s, backoff = outcome.delay_s, True
                    break
                if outcome.count < puller.asked or self._stop.is_set():
                    break  # a full batch means there is more waiting
            else:
                wait_s = 0.0  # a long queue: the other portals' turn in the loop first
            if backoff:  # waited whole: a recovery due meanwhile waits for its end too
                recover_at = max(recover_at, loop.time() + wait_s)
            else:
                due_at = min(recover_at, bindings.due_at)
                wait_s = max(0.0, min(wait_s, due_at - loop.time()))
            await self._wakes.wait(record.member_id, wait_s, backoff=backoff)

    async def _bind(self, record: PortalRecord, portal: Caller) -> bool:
        """B24QUEUE_OFFLINE_EVENTS (and the ping) bound on this portal; True if every one is.
        Said at INFO when one was missing (bound now) or failed; DEBUG when all were there."""
        try:
            done = await bind_events(
                portal,
                list(self._s.offline_events),
                self._s.offline_auth_connector,
                self._s.offline_ping_url or None,
                self._s.offline_ping_min_timeout_s,
            )
        except Exception as exc:  # tried again later; the pulls go on meanwhile
            reason = exc if isinstance(exc, B24QueueError) else repr(exc)
            log.warning("portal %s: binding offline events failed: %s", record.domain, reason)
            return False
        ok = all(b.outcome in ("bound", "already bound") for b in done)
        quiet = ok and all(b.outcome == "already bound" for b in done)
        log.log(
            logging.DEBUG if quiet else logging.INFO if ok else logging.WARNING,
            "portal %s: offline bindings: %s",
            record.domain,
            ", ".join(f"{b.event} {b.outcome}" for b in done),
        )
        return ok

    async def _step(
        self, record: PortalRecord, puller: Puller, action: Callable[[], Awaitable[int]]
    ) -> Step:
        """Run one pull or recovery: `Done` with its count, or `Backoff` with how long to wait."""
        member_id = record.member_id
        published = puller.published
        try:
            count = await action()
        except BrokerUnavailableError as exc:
            log.warning("portal %s: offline records wait for the broker: %s", record.domain, exc)
            self.metrics.count("failed_pulls")
            # Each try gets and publishes the batch again: wait longer each time, per portal.
            return Backoff(_grown(self._broker_wait_s, member_id, BROKER_WAIT_S, BROKER_MAX_WAIT_S))
        except PortalRetry as exc:
            return Backoff(float(exc.delay_s or BROKER_WAIT_S))
        except NoCredentials:
            # Our own lookup found no credentials of this portal (uninstalled, reinstalled with
            # another token): never an error code the portal answered, which it could choose.
            raise _PortalGone from None
        except Exception as exc:  # the portal (a 502, a bad batch), the shared state's store...
            self.metrics.count("failed_pulls")
            said = str(exc) if isinstance(exc, BadBatch | B24QueueError) else repr(exc)
            log.warning("portal %s: offline pull failed: %s", record.domain, said)
            # A blip must not hold the portal's events for a whole poll interval: a short wait,
            # growing while it fails (bounded by the poll interval).
            cap = min(float(self._s.offline_poll_s), FAIL_MAX_WAIT_S)
            return Backoff(_grown(self._fail_wait_s, member_id, min(FAIL_WAIT_S, cap), cap))
        self._fail_wait_s.pop(member_id, None)
        if puller.published > published:  # only a publish shows the broker is back
            self._broker_wait_s.pop(member_id, None)
        return Done(count)


def _grown(waits: dict[str, float], member_id: str, first_s: float, max_s: float) -> float:
    """This portal's wait now (`first_s` the first time); the next one is twice as long, up to
    `max_s`."""
    wait_s = waits.get(member_id, first_s)
    waits[member_id] = min(2 * wait_s, max_s)
    return wait_s


class _PortalGone(Exception):
    """Uninstalled meanwhile: its loop ends; the next refresh starts it again if it is back."""


def wake_consumer(settings: Settings, service: OfflineService) -> type[EventConsumer]:
    """The consumer of ONOFFLINEEVENT pings: wakes the portal's puller, nothing else (a lost
    ping only delays the pull to the next poll), and only with the portal's own token."""

    async def handle(self: EventConsumer, event: Event) -> None:
        if not service.wake(event.auth.member_id, came_with(event)):
            log.debug("an ONOFFLINEEVENT not from a pulled portal's own token: ignored")

    return type(
        "OfflineWake",
        (EventConsumer,),
        {
            "queue": settings.offline_wake_queue,
            "events": ("ONOFFLINEEVENT",),
            "prefetch": 16,
            "max_attempts": 1,
            "retry_delays_s": (1,),
            "handle": handle,
        },
    )
