"""What `Transport.status` returns (`b24queue status`): the state of every consumer queue, its
retries and dead letters, the unrouted queue, our connections and this host's ingress spools.
Each transport fills a `Status` its own way; the spool rows are added (`with_spools`) for every
transport whose ingress spools. How it is shown: b24queue.cli.status."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from b24queue import _constants as c
from b24queue.settings import Settings


@dataclass(frozen=True, slots=True)
class QueueRow:
    queue: str
    type: str
    ready: int
    unacked: int
    consumers: int
    publish_per_s: float
    deliver_per_s: float
    ack_per_s: float
    retrying: int
    dead_letters: int
    # The portals with events waiting; None where the transport cannot tell (docs/operations.md).
    portals: PortalsWaiting | None = None


@dataclass(frozen=True, slots=True)
class PortalCount:
    portal: str  # its member_id (`queues.portal_key`), "" for events without one
    waiting: int
    more: bool = False  # more than `waiting`: it was counted up to there


@dataclass(frozen=True, slots=True)
class PortalsWaiting:
    """The portals with events waiting in a consumer queue (due or waiting for a retry, not in a
    handler), and the few with the most, most first. Counted up to bounds (the transport's), so
    that `status` reads a bounded part of a large queue: `more` says a count is "at least"."""

    count: int
    more: bool = False  # more portals than were read
    top: list[PortalCount] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ConnectionRow:
    name: str
    state: str
    channels: int


@dataclass(frozen=True, slots=True)
class SpoolRow:
    """A spool file of an ingress on this host (`B24QUEUE_SPOOL_PATH`)."""

    path: str
    waiting: int
    quarantined: int


@dataclass(frozen=True, slots=True)
class MemoryRow:
    """The queue server's memory where it sets a limit of its own (Redis: `maxmemory`)."""

    used_bytes: int
    limit_bytes: int  # 0: no limit
    policy: str  # what happens at the limit
    full: bool  # over the limit: new events are refused
    evicts: bool  # the policy may drop queued events

    def describe(self) -> str:
        limit = f"of maxmemory {_mib(self.limit_bytes)}" if self.limit_bytes else "(no maxmemory)"
        return f"{_mib(self.used_bytes)} used {limit}, maxmemory-policy {self.policy}"


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


@dataclass(frozen=True, slots=True)
class Status:
    queues: list[QueueRow]
    unrouted: int
    connections: list[ConnectionRow]
    problems: list[str] = field(default_factory=list)
    spools: list[SpoolRow] = field(default_factory=list)
    memory: MemoryRow | None = None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def problems(settings: Settings, rows: Sequence[QueueRow], unrouted: int) -> list[str]:
    """What `status --fail-on-dead-letters` fails on: dead letters, and unrouted events."""
    found = [f"{r.queue}{c.DLQ_SUFFIX} holds {r.dead_letters}" for r in rows if r.dead_letters]
    if unrouted:
        found.append(unrouted_problem(settings, unrouted))
    return found


def with_spools(status: Status, spools: Sequence[SpoolRow]) -> Status:
    """`status` with the spool files of this host's ingress (`B24QUEUE_SPOOL_PATH`): a
    quarantined event is a problem too."""
    held = [
        f"spool {s.path} holds {s.quarantined} quarantined (b24queue spool list)"
        for s in spools
        if s.quarantined
    ]
    return replace(status, problems=[*status.problems, *held], spools=[*status.spools, *spools])


def unrouted_problem(settings: Settings, held: int) -> str:
    """What `status` says of an unrouted queue holding `held` events (any transport)."""
    if held < settings.unrouted_max_events:
        return f"{settings.unrouted} holds {held}"
    return (
        f"{settings.unrouted} holds {held}, its cap (B24QUEUE_UNROUTED_MAX_EVENTS): "
        "its oldest are dropped as new ones come"
    )
