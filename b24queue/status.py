"""`b24queue status`: the state of every consumer queue, its retries and dead letters, the
unrouted queue, our connections and this host's ingress spools, as a table or JSON. Each transport
fills a `Status` its own way (`Transport.status`); the spool rows are added here, for every
transport whose ingress spools."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from b24queue import _constants as c
from b24queue.settings import Settings
from b24queue.terminal import safe


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


def render(status: Status, settings: Settings) -> str:
    headers = (
        "QUEUE",
        "TYPE",
        "READY",
        "UNACKED",
        "CONSUMERS",
        "PUB/s",
        "DELIVER/s",
        "ACK/s",
        "RETRYING",
        "DLQ",
    )
    # Names and states come from the broker, where any client may have named a queue or a
    # connection: every cell is made safe for the terminal.
    table = [
        (
            safe(r.queue),
            safe(r.type),
            r.ready,
            r.unacked,
            r.consumers,
            r.publish_per_s,
            r.deliver_per_s,
            r.ack_per_s,
            r.retrying,
            r.dead_letters,
        )
        for r in status.queues
    ]
    lines = []
    if table:
        widths = [max(len(str(x)) for x in col) for col in zip(headers, *table, strict=True)]
        fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
        lines.append(fmt.format(*headers))
        lines += [fmt.format(*row) for row in table]
    else:
        lines.append("no consumer queues yet (a worker declares them when it starts)")
    lines.append("")
    lines.append(f"{settings.unrouted}: {status.unrouted} message(s) no consumer is bound to")
    if status.memory is not None:
        lines.append(f"memory: {safe(status.memory.describe())}")
        if status.memory.full:
            lines.append(
                "  FULL: new events are refused (the ingress spools them or answers 503) "
                "until the workers drain the queues"
            )
        if status.memory.evicts:
            lines.append("  this policy can evict queued events: set maxmemory-policy noeviction")
    lines.append("")
    if status.connections:
        lines.append("CONNECTIONS")
        lines += [
            f"  {safe(c.name)}  ({safe(c.state)}, {c.channels} channels)"
            for c in status.connections
        ]
    else:
        lines.append("no b24queue connections (no ingress or worker is running)")
    for spool in status.spools:
        lines.append(
            f"spool {safe(spool.path)}: {spool.waiting} waiting to be forwarded, "
            f"{spool.quarantined} quarantined"
        )
    if status.problems:
        lines.append("")
        lines.append("DEAD LETTERS / QUARANTINE: " + "; ".join(map(safe, status.problems)))
    return "\n".join(lines)
