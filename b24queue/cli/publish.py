"""`b24queue publish`: a message of the app's own (`APP.…`) from the command line, through a
`Producer` (a management command, a cron job, a re-check by hand): confirmed before it prints
the message id."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from b24queue.errors import EXIT_OK
from b24queue.producer import Producer
from b24queue.publishing import PublishInputError
from b24queue.settings import Settings


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "publish",
        help="publish a message of the app's own (APP.*), confirmed",
        description="Publish a message of the app's own, routed like an event (consumers bind "
        "its name), confirmed by the queue before its message id is printed.",
    )
    p.add_argument("name", help="e.g. APP.DEAL.RECHECK")
    p.add_argument("--data", default="{}", help="its data, as JSON (default {})")
    p.add_argument(
        "--portal",
        metavar="MEMBER_ID",
        help="the installed portal it is of (read from B24QUEUE_PORTAL_STORE)",
    )
    p.add_argument(
        "--key", help="idempotency key: the same name, portal and key give the same message id"
    )
    p.set_defaults(run=run)


def run(settings: Settings, args: argparse.Namespace) -> int:
    try:
        data = json.loads(args.data)
    except ValueError as exc:  # says where, never what
        raise PublishInputError(f"--data: not JSON ({exc})", "data") from None
    print(asyncio.run(_publish(settings, args.name, data, args.portal, args.key)))
    return EXIT_OK


async def _publish(
    settings: Settings, name: str, data: Any, portal: str | None, key: str | None
) -> str:
    async with Producer(settings) as producer:
        return await producer.publish(name, data, portal=portal, key=key)
