"""`b24queue topology`: declare what the consumers need on the transport and print what exists;
or, changing nothing, the bindings that would change (`--dry-run`) or the file a broker boots
from (`--definitions`), where the transport offers them."""

from __future__ import annotations

import argparse
import asyncio
import json

from b24queue import worker
from b24queue.cli.consumers import load_consumer
from b24queue.cli.terminal import safe
from b24queue.consumer import EventConsumer
from b24queue.errors import EXIT_OK
from b24queue.queues import spec_for
from b24queue.settings import Settings
from b24queue.transports import (
    DeclaresExchanges,
    ExportsDefinitions,
    PlansBindings,
    not_offered,
    transport_for,
)


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "topology", help="declare the queues (and any exchanges), print what exists"
    )
    p.add_argument(
        "consumers", nargs="*", metavar="MODULE:CLASS", help="also declare these consumers' queues"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--definitions",
        action="store_true",
        help="print what a RabbitMQ node boots from (rabbitmq/definitions.json); no broker",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="show the bindings that would be added or removed; change nothing",
    )
    p.set_defaults(run=run)


def run(settings: Settings, args: argparse.Namespace) -> int:
    classes = [load_consumer(spec) for spec in args.consumers]
    transport = transport_for(settings)
    if args.definitions:
        if not isinstance(transport, ExportsDefinitions):
            raise not_offered(transport, "topology --definitions")
        print(json.dumps(transport.definitions(classes), indent=2))
        return EXIT_OK
    if args.dry_run:
        if not isinstance(transport, PlansBindings):
            raise not_offered(transport, "topology --dry-run")
        return _dry_run(settings, transport, classes, as_json=args.json)
    states = asyncio.run(worker.declare_topology(settings, classes))
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "queue": s.name,
                        "messages": s.messages,
                        "consumers": s.consumers,
                        "arguments": s.arguments,
                    }
                    for s in states
                ],
                indent=2,
            )
        )
        return EXIT_OK
    if isinstance(transport, DeclaresExchanges):  # elsewhere the queues are all there is
        for x in transport.exchanges():
            alternate = f", alternate exchange {x.alternate}" if x.alternate else ""
            feeds = f" -> queue {x.queue}" if x.queue else ""
            print(safe(f"exchange {x.name} ({x.kind}{alternate}){feeds}"))
    width = max(len(safe(s.name)) for s in states)
    print(f"{'QUEUE':<{width}}  {'READY':>7}  {'CONSUMERS':>9}  ARGUMENTS")
    for s in states:
        arguments = safe(" ".join(f"{k}={v}" for k, v in s.arguments.items()))
        print(f"{safe(s.name):<{width}}  {s.messages:>7}  {s.consumers:>9}  {arguments}")
    return EXIT_OK


def _dry_run(
    settings: Settings,
    planner: PlansBindings,
    classes: list[type[EventConsumer]],
    *,
    as_json: bool,
) -> int:
    worker.check_consumers(classes)
    changes = asyncio.run(planner.plan_bindings([spec_for(cls) for cls in classes]))
    if as_json:
        rows = [
            {
                "queue": c.queue,
                "kind": c.kind,
                "exists": c.current is not None,
                "add": list(c.to_add),
                "remove": list(c.to_remove),
            }
            for c in changes
        ]
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    for c in changes:
        state = "would be created" if c.current is None else "exists"
        print(f"{c.kind} {c.queue} ({state}) on {settings.exchange}:")
        lines = [f"  + bind {safe(k)}" for k in c.to_add]
        lines += [f"  - unbind {safe(k)}" for k in c.to_remove]
        print("\n".join(lines) if lines else "  bindings up to date")
    return EXIT_OK
