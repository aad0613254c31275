"""`b24queue dlq`: list, replay or purge the dead letters of a queue (or the unrouted queue),
through the transport's `DeadLetters` (b24queue.transports.dead_letters: what one is)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, fields, replace
from typing import Any

from b24queue.cli.terminal import confirm, safe
from b24queue.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from b24queue.settings import Settings
from b24queue.transports import transport_for
from b24queue.transports.dead_letters import DeadLetter


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "dlq", help="inspect, replay or purge dead letters (or the unrouted queue)"
    )
    dlq = p.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    d = dlq.add_parser("list", help="show dead-lettered events and why (in queue order, none lost)")
    d.add_argument("queue", help="consumer queue, its .dlq, or the unrouted queue")
    d.add_argument("--limit", type=int, default=50)
    d.add_argument("--json", action="store_true")
    d = dlq.add_parser("replay", help="send them back to the consumer's queue (or the exchange)")
    d.add_argument("queue")
    d.add_argument("--limit", type=int, help="at most this many (default: all)")
    d.add_argument(
        "--id",
        action="append",
        dest="ids",
        metavar="MESSAGE_ID",
        help="only these message ids (repeatable)",
    )
    d = dlq.add_parser(
        "purge", help="delete the messages counted for good (asks first; newer ones stay)"
    )
    d.add_argument("queue")
    d.add_argument("--yes", action="store_true", help="do not ask")
    p.set_defaults(run=run)


def run(settings: Settings, args: argparse.Namespace) -> int:
    return asyncio.run(_dlq(settings, args))


async def _dlq(settings: Settings, args: argparse.Namespace) -> int:
    async with transport_for(settings).dead_letters(args.queue) as tool:
        source = tool.source
        if args.dlq_command == "list":
            total, letters = await tool.list(args.limit)
            if args.json:
                print(
                    json.dumps(
                        {"queue": source, "total": total, "messages": [asdict(x) for x in letters]},
                        indent=2,
                    )
                )
            else:
                print(render(source, total, letters))
            return EXIT_OK
        if args.dlq_command == "replay":
            target = tool.destination
            ids = set(args.ids) if args.ids else None

            def progress(done: int, wanted: int) -> None:
                print(f"replayed {done}/{wanted}", file=sys.stderr, flush=True)

            replayed, total = await tool.replay(limit=args.limit, ids=ids, progress=progress)
            print(f"replayed {replayed} of {total} message(s) from {source} to {target}")
            if ids:
                print(f"not found: {', '.join(sorted(ids))}")
                return EXIT_FAILURE
            return EXIT_OK
        total = await tool.count()
        if total == 0:
            print(f"{source} is empty; nothing purged")
            return EXIT_OK
        question = f"Delete the {total} message(s) now in {source} for good?"
        if not args.yes and not confirm(question):
            print("nothing purged")
            return EXIT_USAGE
        # Exactly what was counted (and shown): events that arrive meanwhile are kept.
        purged = await tool.purge(total)
        print(f"purged {purged} message(s) from {source}")
        newer = await tool.count()
        if newer:
            print(f"kept {newer} message(s) that arrived after the count")
        return EXIT_OK


def render(source: str, total: int, letters: Sequence[DeadLetter]) -> str:
    source = safe(source)
    if total == 0:
        return f"{source} is empty"
    lines = [f"{source}: {total} message(s); showing {len(letters)}, in queue order", ""]
    for i, x in enumerate(map(_shown, letters), 1):
        attempts = f", {x.attempts} attempt(s)" if x.attempts is not None else ""
        lines.append(f"{i}. {x.event}  message_id={x.message_id}")
        lines.append(f"   portal: {x.domain or '?'} (member_id {x.member_id or '?'})")
        lines.append(f"   why:    {x.reason}{attempts}" + (f" - {x.error}" if x.error else ""))
        if x.first_failed_at:
            lines.append(f"   failed: first {x.first_failed_at}, last {x.last_failed_at}")
        if x.workflow_told:
            lines.append(f"   workflow: {x.workflow_told}")
        lines.append(f"   sent:   {x.published_at or '?'} ({x.size_bytes} bytes)")
    lines += ["", "replay: b24queue dlq replay <queue> [--id MESSAGE_ID] [--limit N]"]
    return "\n".join(lines)


def _shown(letter: DeadLetter) -> DeadLetter:
    """Every text of a dead letter made safe for the terminal: it comes from the message (an
    error quoting the event's data, a portal's domain)."""
    texts = {f.name: getattr(letter, f.name) for f in fields(letter)}
    shown: dict[str, Any] = {k: safe(v) for k, v in texts.items() if isinstance(v, str)}
    return replace(letter, **shown)
