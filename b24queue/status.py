"""`b24queue status`: the state of every consumer queue, its retries and dead letters, the
unrouted queue and our connections, from the management API, as a table or JSON."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from b24queue import _constants as c
from b24queue.settings import Settings
from b24queue.terminal import safe


class SpoolFileLike(Protocol):
    @property
    def path(self) -> Path: ...

    @property
    def waiting(self) -> int: ...

    @property
    def quarantined(self) -> int: ...


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


def _rate(queue: dict[str, Any], key: str) -> float:
    stats = queue.get("message_stats") or {}
    return round(float((stats.get(f"{key}_details") or {}).get("rate", 0.0)), 2)


def _depth(queue: dict[str, Any] | None) -> int:
    if queue is None:
        return 0
    return int(queue.get("messages_ready", 0) or 0) + int(
        queue.get("messages_unacknowledged", 0) or 0
    )


def summarize(
    settings: Settings,
    queues: list[dict[str, Any]],
    connections: list[dict[str, Any]],
    bound: set[str],
    spools: Sequence[SpoolFileLike] = (),
) -> Status:
    """Consumer queues are the queues bound to our exchange (`bound`) that have a `.dlq`
    sibling: found on the broker, no consumer code needed."""
    by_name = {q["name"]: q for q in queues}
    rows = []
    for name in sorted(by_name):
        if name not in bound or name + c.DLQ_SUFFIX not in by_name:
            continue
        q = by_name[name]
        retry_prefix = name + c.RETRY_SUFFIX
        rows.append(
            QueueRow(
                queue=name,
                type=str(q.get("type", "")),
                ready=int(q.get("messages_ready", 0) or 0),
                unacked=int(q.get("messages_unacknowledged", 0) or 0),
                consumers=int(q.get("consumers", 0) or 0),
                publish_per_s=_rate(q, "publish"),
                deliver_per_s=_rate(q, "deliver_get"),
                ack_per_s=_rate(q, "ack"),
                retrying=sum(_depth(v) for k, v in by_name.items() if k.startswith(retry_prefix)),
                dead_letters=_depth(by_name[name + c.DLQ_SUFFIX]),
            )
        )
    ours = [
        ConnectionRow(
            name=str((conn.get("client_properties") or {}).get("connection_name", "")),
            state=str(conn.get("state", "")),
            channels=int(conn.get("channels", 0) or 0),
        )
        for conn in connections
        if conn.get("vhost", settings.vhost) == settings.vhost
        and str((conn.get("client_properties") or {}).get("connection_name", "")).startswith(
            c.CONNECTION_PREFIX
        )
    ]
    unrouted = _depth(by_name.get(settings.unrouted))
    problems = [f"{r.queue}{c.DLQ_SUFFIX} holds {r.dead_letters}" for r in rows if r.dead_letters]
    if unrouted:
        problems.append(unrouted_problem(settings, unrouted))
    spool_rows = [SpoolRow(str(s.path), s.waiting, s.quarantined) for s in spools]
    problems += [
        f"spool {s.path} holds {s.quarantined} quarantined (b24queue spool list)"
        for s in spool_rows
        if s.quarantined
    ]
    return Status(rows, unrouted, sorted(ours, key=lambda r: r.name), problems, spool_rows)


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
            f"spool {safe(spool.path)}: {spool.waiting} waiting for RabbitMQ, "
            f"{spool.quarantined} quarantined"
        )
    if status.problems:
        lines.append("")
        lines.append("DEAD LETTERS / QUARANTINE: " + "; ".join(map(safe, status.problems)))
    return "\n".join(lines)
