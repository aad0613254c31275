"""`b24queue portals`: the portals known by their install (`list`, never their tokens; `forget`),
and the operator's side of their offline event queues: `bind-offline` (b24queue.offline.bind)
and `offline-status` (b24queue.offline.inspect); and the online event bindings, `bindings`
(b24queue.offline.bindings)."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import TYPE_CHECKING

from b24queue.auth.store import open_store
from b24queue.cli.terminal import safe
from b24queue.errors import EXIT_FAILURE, EXIT_OK
from b24queue.settings import Settings

if TYPE_CHECKING:
    from b24queue.offline.inspect import QueueState


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser("portals", help="portals known by their install (never their tokens)")
    portals = p.add_subparsers(dest="portals_command", required=True, metavar="ACTION")
    d = portals.add_parser("list", help="member_id, domain, installed at")
    d.add_argument("--json", action="store_true")
    d = portals.add_parser(
        "forget", help="drop a portal: its events are refused until it reinstalls"
    )
    d.add_argument("member_id")

    d = portals.add_parser(
        "bind-offline",
        help="have the portal queue these events for `b24queue offline` (event.bind, offline)",
    )
    d.add_argument("member_id")
    d.add_argument("events", nargs="+", metavar="EVENT", help="e.g. ONCRMDEALADD ONCRMDEALUPDATE")
    d.add_argument(
        "--ping-url", help="also bind ONOFFLINEEVENT to this ingress URL (wakes the pullers)"
    )

    d = portals.add_parser(
        "offline-status", help="a portal's offline queue: waiting, reserved, errors (reads only)"
    )
    d.add_argument("member_id")
    d.add_argument("--json", action="store_true")

    d = portals.add_parser(
        "bindings",
        help="bind the events the app wants on every installed portal (event.bind), unbind "
        "ours it no longer wants, register its robots and activities (B24QUEUE_BIZPROC); shows "
        "the difference",
    )
    d.add_argument("--portal", metavar="MEMBER_ID", help="this portal only")
    d.add_argument("--dry-run", action="store_true", help="show the difference, change nothing")
    p.set_defaults(run=run)


def run(settings: Settings, args: argparse.Namespace) -> int:
    if args.portals_command == "bind-offline":
        return _bind_offline(settings, args)
    if args.portals_command == "bindings":
        return _bindings(settings, args)
    if args.portals_command == "offline-status":
        from b24queue.offline.inspect import offline_status

        state = asyncio.run(offline_status(settings, args.member_id))
        print(render(state, as_json=args.json))
        return EXIT_OK
    return asyncio.run(_installed(settings, args))


async def _installed(settings: Settings, args: argparse.Namespace) -> int:
    store = open_store(settings.portal_store)
    try:
        if args.portals_command == "list":
            records = await store.all()
            rows = [
                {
                    "member_id": r.member_id,
                    "domain": r.domain,
                    "installed_at": r.installed_at,
                    # Whether its handlers can call it back: a refresh token is kept (never shown).
                    "refreshable": bool(r.refresh_token),
                    "access_expires": r.access_expires,
                }
                for r in records
            ]
            if args.json:
                print(json.dumps(rows, indent=2))
            elif not rows:
                print("no portals installed yet")
            else:
                for row in rows:
                    calls = "refreshable" if row["refreshable"] else "no refresh token"
                    print(
                        safe(
                            f"{row['member_id']}  {row['domain']}  installed "
                            f"{row['installed_at']}  ({calls})"
                        )
                    )
            return EXIT_OK
        if await store.forget(args.member_id):
            print(f"forgot portal {args.member_id}: its events are refused until it reinstalls")
            return EXIT_OK
        print(f"no portal with member_id {args.member_id}")
        return EXIT_FAILURE
    finally:
        await store.close()


def _bind_offline(settings: Settings, args: argparse.Namespace) -> int:
    from b24queue.offline.bind import bind_offline

    done = asyncio.run(bind_offline(settings, args.member_id, args.events, args.ping_url))
    for bound in done:
        print(safe(f"{bound.event}: {bound.outcome}"))
    ok = all(b.outcome in ("bound", "already bound") for b in done)
    return EXIT_OK if ok else EXIT_FAILURE


def _bindings(settings: Settings, args: argparse.Namespace) -> int:
    from b24queue.cli.consumers import load_consumer
    from b24queue.offline.bindings import portal_bindings

    consumers = [load_consumer(spec) for spec in settings.events_consumers]
    lines, ok = asyncio.run(portal_bindings(settings, consumers, args.portal, dry_run=args.dry_run))
    for line in lines:
        print(safe(line))
    return EXIT_OK if ok else EXIT_FAILURE


def render(state: QueueState, *, as_json: bool) -> str:
    """`portals offline-status`: a portal's offline queue, as text or JSON."""
    if as_json:
        shown = {
            "waiting": state.waiting,
            "reserved": state.reserved,
            "errors": state.errors,
            "complete": state.complete,
            "by_event": dict(state.by_event.most_common()),
        }
        return json.dumps(shown, indent=2)
    more = "" if state.complete else f" (the first {state.read} read)"
    lines = [
        f"{state.waiting} waiting, {state.reserved} reserved (not cleared yet), "
        f"{state.errors} marked as errors{more}"
    ]
    lines += [f"  {safe(name)}: {count}" for name, count in state.by_event.most_common()]
    return "\n".join(lines)
