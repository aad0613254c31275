"""The operator's side of offline events, as `b24queue portals` subcommands: `bind-offline`
(b24queue.offline.bind) and `offline-status` (b24queue.offline.inspect). Prints; returns the
exit code (the CLI exits with it)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from b24queue.errors import EXIT_FAILURE, EXIT_OK
from b24queue.offline.bind import bind_offline
from b24queue.offline.inspect import QueueState, offline_status
from b24queue.settings import Settings
from b24queue.terminal import safe


def portals_command(settings: Settings, action: str, args: dict[str, Any]) -> int:
    if action == "bind-offline":
        done = asyncio.run(
            bind_offline(settings, args["member_id"], args["events"], args["ping_url"])
        )
        for bound in done:
            print(safe(f"{bound.event}: {bound.outcome}"))
        ok = all(b.outcome in ("bound", "already bound") for b in done)
        return EXIT_OK if ok else EXIT_FAILURE
    state = asyncio.run(offline_status(settings, args["member_id"]))
    print(render(state, as_json=bool(args["json"])))
    return EXIT_OK


def render(state: QueueState, *, as_json: bool) -> str:
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
