"""`b24queue spool`: the ingress's local spool files on this host and the events set aside in
them, listed, replayed or dropped (b24queue.ingress.spool_ops does the work)."""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import asdict

from b24queue.cli.terminal import confirm, safe
from b24queue.errors import EXIT_FAILURE, EXIT_OK
from b24queue.ingress import spool_ops
from b24queue.settings import Settings


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "spool", help="the ingress's local spool on this host, and the events it set aside"
    )
    spool = p.add_subparsers(dest="spool_command", required=True, metavar="ACTION")
    d = spool.add_parser("list", help="spool files, events waiting, quarantined events and why")
    d.add_argument("--limit", type=int, default=50)
    d.add_argument("--json", action="store_true")
    d = spool.add_parser(
        "replay", help="publish quarantined events again (confirmed, then removed)"
    )
    d.add_argument(
        "--id", action="append", dest="ids", metavar="MESSAGE_ID", help="only these (repeatable)"
    )
    d = spool.add_parser("drop", help="delete quarantined events for good (asks first)")
    d.add_argument("ids", nargs="+", metavar="MESSAGE_ID")
    d.add_argument("--yes", action="store_true", help="do not ask")
    p.set_defaults(run=run)


def run(settings: Settings, args: argparse.Namespace) -> int:
    if args.spool_command == "list":
        found = spool_ops.files(settings)
        held = spool_ops.quarantined(found, args.limit)
        if args.json:
            print(
                json.dumps(
                    {
                        "files": [asdict(f) for f in found],
                        "quarantined": [asdict(q) for q in held],
                    },
                    indent=2,
                )
            )
            return EXIT_OK
        if not found:
            print(f"no spool files at {settings.spool_path} (nothing was spooled on this host)")
        for f in found:
            print(
                f"{safe(f.path)}: {f.waiting} waiting to be forwarded, {f.quarantined} quarantined"
            )
        for q in held:
            print(
                safe(
                    f"  {q.message_id}  {q.event}  {q.size_bytes} bytes  spooled {q.spooled_at}  "
                    f"set aside {q.quarantined_at}: {q.reason}"
                )
            )
        return EXIT_OK
    if args.spool_command == "drop":
        ids = set(args.ids)
        if not args.yes and not confirm(f"Delete {len(ids)} quarantined event(s) for good?"):
            print("nothing deleted")
            return EXIT_FAILURE
        print(f"deleted {spool_ops.drop(settings, ids)} quarantined event(s)")
        return EXIT_OK
    result = asyncio.run(spool_ops.replay(settings, set(args.ids) if args.ids else None))
    print(f"replayed {result.replayed} quarantined event(s)")
    for message_id, why in result.refused:
        print(f"  still refused {safe(message_id)}: {safe(why)}")
    return EXIT_FAILURE if result.refused else EXIT_OK
