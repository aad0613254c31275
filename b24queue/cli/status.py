"""`b24queue status`: what the transport reports (b24queue.transports.status) and this host's
ingress spools, as a table or JSON; with --fail-on-dead-letters, exit 1 on a problem."""

from __future__ import annotations

import argparse
import asyncio
import json

from b24queue.cli.terminal import safe
from b24queue.errors import EXIT_FAILURE, EXIT_OK
from b24queue.ingress import spool_ops
from b24queue.queues import MAX_PORTAL_CHARS
from b24queue.settings import Settings
from b24queue.transports import transport_for
from b24queue.transports.status import PortalCount, PortalsWaiting, Status, with_spools


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser("status", help="queues, rates, consumers, retries, DLQs, connections")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--fail-on-dead-letters",
        action="store_true",
        help="exit 1 when a DLQ or the unrouted queue is not empty (for cron/CI)",
    )
    p.set_defaults(run=run)


def run(settings: Settings, args: argparse.Namespace) -> int:
    transport = transport_for(settings)
    current = asyncio.run(transport.status())
    if transport.needs_spool:  # this host's ingress spools, whatever the transport
        current = with_spools(current, spool_ops.files(settings))
    if args.json:
        print(json.dumps(current.as_json(), indent=2))
    else:
        print(render(current, settings))
    if args.fail_on_dead_letters and current.problems:
        return EXIT_FAILURE
    return EXIT_OK


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
        "PORTALS",
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
            _portals(r.portals),
        )
        for r in status.queues
    ]
    lines = []
    if table:
        widths = [max(len(str(x)) for x in col) for col in zip(headers, *table, strict=True)]
        fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
        lines.append(fmt.format(*headers))
        lines += [fmt.format(*row) for row in table]
        most = [(r.queue, r.portals.top) for r in status.queues if r.portals and r.portals.top]
        if most:
            lines.append("")
            lines.append("PORTALS WITH THE MOST WAITING")
            lines += [f"  {safe(q)}: " + ", ".join(map(_portal, top)) for q, top in most]
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


def _portals(portals: PortalsWaiting | None) -> str:
    """The PORTALS cell: how many portals have events waiting ("-": the transport cannot tell)."""
    if portals is None:
        return "-"
    return f"{portals.count}+" if portals.more else str(portals.count)


def _portal(p: PortalCount) -> str:
    """A portal and its events waiting. The portal is a member_id from an event, anyone's text:
    made safe for the terminal, and cut to the length the queue keeps of it."""
    name = safe(p.portal[:MAX_PORTAL_CHARS]) if p.portal else "(no member_id)"
    return f"{name} {p.waiting}{'+' if p.more else ''}"
