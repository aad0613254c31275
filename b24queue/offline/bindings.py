"""Online event bindings kept on every installed portal (docs/marketplace.md, "Event bindings").

The app states its public handler URL once (B24QUEUE_EVENTS_HANDLER_URL); the events it wants
are those of the consumers it runs (B24QUEUE_EVENTS_CONSUMERS: their `events`) plus
B24QUEUE_EVENTS_BIND. Reconciling one portal: read `event.get` (bounded: it is the portal's
answer), bind with `event.bind` each wanted event that has no binding to our handler, unbind
with `event.unbind` each binding to our handler whose event is no longer wanted. A binding is
ours only when its handler is exactly our handler URL: any other (another app's, an old URL of
ours) is never touched, and every unbind names the event, our handler and the binding's
auth_type (event.unbind removes every binding matching what it is *not* given).

One reconciler per portal at a time across processes: a lease in the portal store's shared
state (b24queue.portal.state), the one the offline pullers hold their batches with; a
reconciler that finds it held skips that portal. It runs in `b24queue offline`: at start and
every `RECONCILE_S` over every installed portal, and at once for a portal whose ONAPPINSTALL or
ONAPPUPDATE reaches its queue (Bitrix24 drops an app's bindings when the app is updated).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from b24queue.auth.record import PortalRecord
from b24queue.auth.store import TokenStore, open_store
from b24queue.bizproc import RobotConsumer, load_declarations, register, registered_ok
from b24queue.consumer import EventConsumer
from b24queue.errors import B24QueueError, ConfigError
from b24queue.events.envelope import token_digest
from b24queue.events.event import EVENT_NAME, MAX_EVENT_NAME, Event
from b24queue.offline.bind import already_bound, portal_event
from b24queue.offline.puller import Caller
from b24queue.offline.service import REBIND_S, REFRESH_S, BindSchedule, PortalFor
from b24queue.portal.api import PortalError
from b24queue.portal.clients import PortalClients
from b24queue.portal.state import SharedState, open_state
from b24queue.portal.tenant import came_with
from b24queue.settings import Settings

if TYPE_CHECKING:
    from aiohttp.abc import AbstractResolver

log = logging.getLogger(__name__)

RECONCILE_S = REBIND_S  # every installed portal, as often as the offline bindings are renewed
LEASE_S = 60.0  # renewed after each call: a reconciler that died frees the portal this soon
MAX_BINDINGS = 1000  # event.get entries read; the rest are ignored (never unbound)
MAX_HANDLER = 2000  # longer handlers are nobody's we know: foreign, never unbound
MAX_AUTH_TYPE = 20
LIFECYCLE = ("ONAPPINSTALL", "ONAPPUPDATE")


@dataclass(frozen=True, slots=True)
class Binding:
    event: str
    handler: str
    auth_type: str


@dataclass(slots=True)
class Plan:
    """What a portal has and what it lacks; `done` filled as the plan is applied."""

    bind: list[str]
    unbind: list[Binding]
    kept: list[str]
    foreign: int  # online bindings whose handler is not ours (left alone)
    read: int  # event.get entries read (at most MAX_BINDINGS)
    done: list[tuple[str, str, str]] = field(default_factory=list)  # (action, event, outcome)
    # The app's robots and activities on the portal (b24queue.bizproc.register): (action,
    # routing key, outcome), or what would be done in a dry run.
    bizproc: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        bound = all(o in ("bound", "already bound", "unbound") for _, _, o in self.done)
        return bound and registered_ok(self.bizproc)


def wanted_events(settings: Settings, consumers: Iterable[type[EventConsumer]]) -> tuple[str, ...]:
    """The events to bind: each consumer's `events`, then B24QUEUE_EVENTS_BIND. A pattern
    (`CATALOG.#`, `*`) cannot be bound: with B24QUEUE_EVENTS_BIND set it is skipped with a
    warning (the list is taken to cover it); without, it is a ConfigError naming the consumer."""
    explicit = [_checked(name, "B24QUEUE_EVENTS_BIND") for name in settings.events_bind]
    names: list[str] = []
    for cls in consumers:
        if issubclass(cls, RobotConsumer):  # its calls come by bizproc.robot.add, not event.bind
            continue
        for name in cls.events:
            if "*" in name or "#" in name:
                if not explicit:
                    raise ConfigError(
                        f"{cls.__name__}.events: {name[:64]!r} is a pattern, and only event "
                        "names can be bound: list them in B24QUEUE_EVENTS_BIND"
                    )
                log.warning(
                    "%s.events: %r is a pattern: not bound; B24QUEUE_EVENTS_BIND is taken to "
                    "cover it",
                    cls.__name__,
                    name[:64],
                )
                continue
            names.append(_checked(name, f"{cls.__name__}.events"))
    wanted = tuple(dict.fromkeys([*names, *explicit]))
    # Every binding of ours would be unbound: a forgotten setting, surely (unless the app
    # declares robots or activities only).
    if not wanted and not settings.bizproc:
        raise ConfigError(
            "B24QUEUE_EVENTS_HANDLER_URL is set but no event is wanted: name the app's consumers "
            "in B24QUEUE_EVENTS_CONSUMERS (MODULE:CLASS,...) or the events in B24QUEUE_EVENTS_BIND"
        )
    return wanted


def _checked(name: str, where: str) -> str:
    if len(name) > MAX_EVENT_NAME or not EVENT_NAME.fullmatch(name) or "." in name:
        raise ConfigError(f"{where}: {name[:64]!r} is not a Bitrix24 event name")
    return name.upper()


async def read_bindings(portal: Caller) -> tuple[list[Binding], int]:
    """The portal's online bindings (event.get), bounded: at most MAX_BINDINGS entries read,
    offline ones and malformed ones left out (an event name that is not one, a handler longer
    than MAX_HANDLER: counted as foreign by `plan`, never ours). Returns them and how many
    entries were read."""
    answer = await portal.call("event.get")
    if not isinstance(answer, list):
        raise PortalError("BAD_ANSWER", "event.get answered with something else than a list")
    found: list[Binding] = []
    for item in answer[:MAX_BINDINGS]:
        if not isinstance(item, dict) or str(item.get("offline") or "0") not in ("0", ""):
            continue
        event, handler = str(item.get("event") or ""), item.get("handler")
        auth_type = str(item.get("auth_type") or "0")
        if len(event) > MAX_EVENT_NAME or not EVENT_NAME.fullmatch(event):
            event = "?"  # not an event name we could want: foreign or not, never unbound
        if not isinstance(handler, str) or len(handler) > MAX_HANDLER:
            handler = "?"
        if len(auth_type) > MAX_AUTH_TYPE or not auth_type.isdigit():
            auth_type = "?"
        found.append(Binding(event.upper(), handler, auth_type))
    return found, min(len(answer), MAX_BINDINGS)


def plan(current: Sequence[Binding], wanted: Sequence[str], handler: str, read: int) -> Plan:
    ours = [b for b in current if b.handler == handler]
    have = {b.event for b in ours}
    unbind = [b for b in ours if b.event not in wanted and "?" not in (b.event, b.auth_type)]
    return Plan(
        bind=[e for e in wanted if e not in have],
        unbind=list(dict.fromkeys(unbind)),
        kept=[e for e in wanted if e in have],
        foreign=len(current) - len(ours),
        read=read,
    )


async def apply(portal: Caller, todo: Plan, handler: str, renew: Any = None) -> None:
    """Bind what is missing, unbind what is ours and unwanted; each outcome in `todo.done`.
    `renew()` (the lease's) after each call: False stops here (another reconciler has it)."""
    if not handler:  # event.unbind without a handler would remove other apps' bindings too
        raise ConfigError("B24QUEUE_EVENTS_HANDLER_URL is not set")
    for event in todo.bind:
        try:
            await portal.call("event.bind", {"event": event, "handler": handler})
            outcome = "bound"
        except PortalError as exc:
            outcome = "already bound" if already_bound(exc) else exc.code
        todo.done.append(("bind", event, outcome))
        if renew is not None and not await renew():
            return
    for b in todo.unbind:
        params = {"event": b.event, "handler": handler, "auth_type": b.auth_type}
        try:
            await portal.call("event.unbind", params)
            outcome = "unbound"
        except PortalError as exc:
            outcome = exc.code
        todo.done.append(("unbind", b.event, outcome))
        if renew is not None and not await renew():
            return


class Reconciler:
    """Reconciles one portal at a time under the portal's lease (`reconcile`)."""

    def __init__(
        self, settings: Settings, portal_for: PortalFor, state: SharedState, wanted: Sequence[str]
    ) -> None:
        self.handler = settings.events_handler_url
        self.wanted = tuple(wanted)
        self.declared = load_declarations(settings.bizproc)
        self._portal_for = portal_for
        self._state = state
        self._owner = f"bindings-{os.getpid()}-{id(self):x}"

    async def reconcile(self, record: PortalRecord, *, dry_run: bool = False) -> Plan | None:
        """The portal's plan, applied unless `dry_run`; None when another reconciler holds the
        portal's lease (it does the work)."""
        key = f"bindings:{record.member_id}"
        if not await self._state.lease(key, self._owner, LEASE_S):
            return None
        try:
            portal = self._portal_for(portal_event(record))
            current, read = await read_bindings(portal)
            todo = plan(current, self.wanted, self.handler, read)
            if not dry_run:
                await apply(portal, todo, self.handler, self._renewer(key))
            if self.declared:
                todo.bizproc = await register(portal, self.declared, self.handler, dry_run=dry_run)
            return todo
        finally:
            with contextlib.suppress(Exception):
                await self._state.release(key, self._owner)

    def _renewer(self, key: str) -> Any:
        async def renew() -> bool:
            return await self._state.renew(key, self._owner, LEASE_S)

        return renew


class BindingsService:
    """Every installed portal reconciled when found (the store read every REFRESH_S), then every
    RECONCILE_S; a failure tried again after a minute, doubling up to RECONCILE_S (the offline
    bindings' schedule, `BindSchedule`); a portal at once when its ONAPPINSTALL or ONAPPUPDATE
    comes (`soon`)."""

    def __init__(self, reconciler: Reconciler, store: TokenStore) -> None:
        self.reconciler = reconciler
        self.store = store
        self._soon: asyncio.Queue[str] = asyncio.Queue(maxsize=1000)
        self._due: dict[str, BindSchedule] = {}

    def soon(self, member_id: str) -> None:
        with contextlib.suppress(asyncio.QueueFull):  # the schedule covers it
            self._soon.put_nowait(member_id)

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            await self._round(loop.time())
            next_at = min([s.due_at for s in self._due.values()], default=math.inf)
            timeout = max(0.0, min(next_at - loop.time(), REFRESH_S))
            waiting = asyncio.ensure_future(self._soon.get())
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait(
                {waiting, stopping}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            stopping.cancel()
            if not waiting.done():
                waiting.cancel()
                continue
            with contextlib.suppress(Exception):  # the store away: the schedule covers it
                found = await self.store.get(waiting.result())
                if found is not None:
                    ok = await self.portal(found)
                    self._due.setdefault(found.member_id, BindSchedule(0.0)).settled(
                        ok, loop.time()
                    )

    async def _round(self, now: float) -> None:
        try:
            records = await self.store.all()
        except Exception as exc:  # the store away for a moment: the next round
            log.warning("cannot read the portal store: %s", type(exc).__name__)
            return
        current = {r.member_id: r for r in records}
        for gone in set(self._due) - set(current):
            del self._due[gone]
        for member_id, record in current.items():
            schedule = self._due.setdefault(member_id, BindSchedule(now))
            if now >= schedule.due_at:
                ok = await self.portal(record)
                schedule.settled(ok, asyncio.get_running_loop().time())

    async def portal(self, record: PortalRecord) -> bool:
        """One portal reconciled; False if it failed (tried again sooner)."""
        try:
            todo = await self.reconciler.reconcile(record)
        except Exception as exc:
            said = exc if isinstance(exc, B24QueueError) else repr(exc)
            log.warning("portal %s: reconciling event bindings failed: %s", record.domain, said)
            return False
        if todo is None:
            log.debug("portal %s: bindings reconciled by another process", record.domain)
            return True
        if todo.done:
            log.log(
                logging.INFO if todo.ok else logging.WARNING,
                "portal %s: event bindings: %s",
                record.domain,
                ", ".join(f"{a} {e} {o}" for a, e, o in todo.done),
            )
        if todo.bizproc:
            log.log(
                logging.INFO if registered_ok(todo.bizproc) else logging.WARNING,
                "portal %s: robots and activities: %s",
                record.domain,
                ", ".join(f"{a} {e} {o}" for a, e, o in todo.bizproc),
            )
        return todo.ok


def lifecycle_consumer(settings: Settings, service: BindingsService) -> type[EventConsumer]:
    """ONAPPINSTALL and ONAPPUPDATE: the portal's bindings reconciled now (with the portal's
    own application token only: anything else is ignored)."""
    store = service.store

    async def handle(self: EventConsumer, event: Event) -> None:
        member_id = event.auth.member_id
        record = await store.get(member_id) if member_id else None
        if record is None or came_with(event) != token_digest(record.token):
            log.debug("an %s not from an installed portal's own token: ignored", event.name)
            return
        service.soon(record.member_id)

    return type(
        "EventBindings",
        (EventConsumer,),
        {
            "queue": settings.events_bindings_queue,
            "events": LIFECYCLE,
            "prefetch": 16,
            "max_attempts": 1,
            "retry_delays_s": (1,),
            "handle": handle,
        },
    )


def describe(domain: str, todo: Plan | None, *, dry_run: bool) -> list[str]:
    """`portals bindings`: one portal's difference, as lines."""
    if todo is None:
        return [f"{domain}: another process is reconciling it now; try again"]
    lines = [
        f"{domain}: {len(todo.kept)} bound, {len(todo.bind)} missing, {len(todo.unbind)} of "
        f"ours no longer wanted, {todo.foreign} not ours (left alone)"
    ]
    if dry_run:
        lines += [f"  would bind {e}" for e in todo.bind]
        lines += [f"  would unbind {b.event} (auth_type {b.auth_type})" for b in todo.unbind]
    else:
        lines += [f"  {a} {e}: {o}" for a, e, o in todo.done]
    lines += [f"  {a} {key}" + (f": {o}" if o else "") for a, key, o in todo.bizproc]
    return lines


async def portal_bindings(
    settings: Settings,
    consumers: Iterable[type[EventConsumer]],
    member_id: str | None,
    *,
    dry_run: bool,
    resolver: AbstractResolver | None = None,
) -> tuple[list[str], bool]:
    """`b24queue portals bindings [--portal X] [--dry-run]`: each installed portal's (or X's)
    difference, applied unless `dry_run`, under the same lease as the scheduled reconciler.
    Returns the lines to print and whether every portal was reconciled without an error."""
    if not settings.events_handler_url:
        raise ConfigError("portals bindings: set B24QUEUE_EVENTS_HANDLER_URL (the app's handler)")
    wanted = wanted_events(settings, consumers)
    store, state = open_store(settings.portal_store), open_state(settings.portal_store)
    lines, ok = [f"wanted: {', '.join(wanted) or '(none)'}"], True
    try:
        if member_id is None:
            records = await store.all()
            if not records:
                lines.append("no portals installed yet")
        else:
            found = await store.get(member_id)
            if found is None:
                raise ConfigError(
                    f"portals bindings: no installed portal with member_id {member_id!r}"
                )
            records = [found]
        async with PortalClients(settings, store=store, state=state, resolver=resolver) as clients:
            reconciler = Reconciler(settings, clients.for_event, state, wanted)
            for record in records:
                try:
                    todo = await reconciler.reconcile(record, dry_run=dry_run)
                except PortalError as exc:
                    lines.append(f"{record.domain}: failed: {exc}")
                    ok = False
                    continue
                lines += describe(record.domain, todo, dry_run=dry_run)
                ok = ok and todo is not None and todo.ok
    finally:
        await state.close()
        await store.close()
    return lines, ok
