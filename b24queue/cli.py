"""`b24queue` command line. The only module that reads argv, configures logging and exits.

Exit codes: 0 ok, 1 runtime failure, 2 usage or configuration error, 3 broker unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from b24queue import dlq_view, logs, runtime, sender, status
from b24queue.amqp.dlq import DeadLetterTool
from b24queue.consumer import EventConsumer
from b24queue.definitions import definitions
from b24queue.errors import (
    B24QueueError,
    BadEventError,
    BrokerUnavailableError,
    ConfigError,
    ManagementError,
    TopologyMismatchError,
)
from b24queue.events import FORM_TYPE, JSON_TYPE
from b24queue.management import ManagementClient
from b24queue.portals import open_store
from b24queue.settings import Settings, load_settings

log = logging.getLogger("b24queue")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_BROKER = 0, 1, 2, 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="b24queue",
        description="Bitrix24 events into RabbitMQ, answered at once, processed reliably later.",
    )
    parser.add_argument("--log-format", choices=("text", "json"), help="default: text")
    parser.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("ingress", help="run the HTTP ingress")
    p.add_argument("--host", help="listen address (B24QUEUE_HTTP_HOST, default 0.0.0.0)")
    p.add_argument("--port", type=int, help="listen port (B24QUEUE_HTTP_PORT, default 8080)")

    p = sub.add_parser("worker", help="run consumers: b24queue worker module:Class [...]")
    p.add_argument("consumers", nargs="+", metavar="MODULE:CLASS")
    p.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus /metrics here (B24QUEUE_WORKER_METRICS_PORT; 0 = off)",
    )

    p = sub.add_parser("topology", help="declare exchanges and queues, print what exists")
    p.add_argument(
        "consumers", nargs="*", metavar="MODULE:CLASS", help="also declare these consumers' queues"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--definitions",
        action="store_true",
        help="print broker definitions (rabbitmq/definitions.json) instead; no broker",
    )

    p = sub.add_parser("status", help="queues, rates, consumers, retries, DLQs, connections")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--fail-on-dead-letters",
        action="store_true",
        help="exit 1 when a DLQ or the unrouted queue is not empty (for cron/CI)",
    )

    p = sub.add_parser("dlq", help="inspect, replay or purge dead letters (or the unrouted queue)")
    dlq = p.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    d = dlq.add_parser("list", help="show dead-lettered events and why (order kept, none lost)")
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
    d = dlq.add_parser("purge", help="delete them for good (asks first)")
    d.add_argument("queue")
    d.add_argument("--yes", action="store_true", help="do not ask")

    p = sub.add_parser("portals", help="portals known by their install (never their tokens)")
    portals = p.add_subparsers(dest="portals_command", required=True, metavar="ACTION")
    d = portals.add_parser("list", help="member_id, domain, installed at")
    d.add_argument("--json", action="store_true")
    d = portals.add_parser(
        "forget", help="drop a portal: its events are refused until it reinstalls"
    )
    d.add_argument("member_id")

    p = sub.add_parser("send", help="post an event to an ingress as Bitrix24 would")
    p.add_argument("event", nargs="?", help="event name, e.g. ONCRMDEALADD")
    p.add_argument("--url", default=sender.DEFAULT_URL, help=f"default {sender.DEFAULT_URL}")
    p.add_argument("--token", help="application token (default: first of B24QUEUE_APP_TOKENS)")
    p.add_argument(
        "--field",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field, e.g. 'data[FIELDS][ID]=42' (repeatable)",
    )
    p.add_argument("--body-file", type=Path, help="send this body as is (a saved request)")
    p.add_argument("--json", action="store_true", help="send JSON instead of a form")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run(argv))


def _flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """CLI flags beat the environment: only the ones given become overrides."""
    flags = {
        "log_format": "log_format",
        "log_level": "log_level",
        "host": "http_host",
        "port": "http_port",
        "metrics_port": "worker_metrics_port",
    }
    return {
        setting: getattr(args, flag)
        for flag, setting in flags.items()
        if getattr(args, flag, None) is not None
    }


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(**_flag_overrides(args))
    except ConfigError as exc:
        print(f"b24queue: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logs.configure(settings.log_level, settings.log_format)
    commands: dict[str, Callable[[Settings, argparse.Namespace], int]] = {
        "ingress": cmd_ingress,
        "worker": cmd_worker,
        "topology": cmd_topology,
        "status": cmd_status,
        "dlq": cmd_dlq,
        "portals": cmd_portals,
        "send": cmd_send,
    }
    try:
        return commands[args.command](settings, args)
    except (ConfigError, TopologyMismatchError, BadEventError) as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    except (BrokerUnavailableError, ManagementError) as exc:
        log.error("%s", exc)
        return EXIT_BROKER
    except B24QueueError as exc:
        log.error("%s", exc)
        return EXIT_FAILURE


def _run_service(make: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> int:
    async def main() -> None:
        stop = asyncio.Event()
        runtime.install_signal_handlers(stop)
        await make(stop)

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(main())
    return EXIT_OK


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it is installed (it is a dependency on Linux and macOS): a faster event loop
    for the ingress and workers; the standard loop elsewhere."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def cmd_ingress(settings: Settings, args: argparse.Namespace) -> int:
    return _run_service(
        lambda stop: runtime.serve_ingress(
            settings, stop, host=settings.http_host, port=settings.http_port
        )
    )


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    classes = [load_consumer(spec) for spec in args.consumers]
    return _run_service(lambda stop: runtime.serve_worker(settings, classes, stop))


def cmd_topology(settings: Settings, args: argparse.Namespace) -> int:
    classes = [load_consumer(spec) for spec in args.consumers]
    if args.definitions:
        print(json.dumps(definitions(settings, classes), indent=2))
        return EXIT_OK
    states = asyncio.run(runtime.declare_topology(settings, classes))
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
    print(f"exchange {settings.exchange} (topic, alternate exchange {settings.unrouted})")
    print(f"exchange {settings.unrouted} (fanout) -> queue {settings.unrouted}")
    width = max(len(s.name) for s in states)
    print(f"{'QUEUE':<{width}}  {'READY':>7}  {'CONSUMERS':>9}  ARGUMENTS")
    for s in states:
        arguments = " ".join(f"{k}={v}" for k, v in s.arguments.items())
        print(f"{s.name:<{width}}  {s.messages:>7}  {s.consumers:>9}  {arguments}")
    return EXIT_OK


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    client = ManagementClient(settings)
    current = status.summarize(
        settings, client.queues(), client.connections(), client.bound_queues(settings.exchange)
    )
    if args.json:
        print(json.dumps(current.as_json(), indent=2))
    else:
        print(status.render(current, settings))
    if args.fail_on_dead_letters and current.problems:
        return EXIT_FAILURE
    return EXIT_OK


def cmd_dlq(settings: Settings, args: argparse.Namespace) -> int:
    return asyncio.run(_dlq(settings, args))


async def _dlq(settings: Settings, args: argparse.Namespace) -> int:
    async with DeadLetterTool(settings, args.queue) as tool:
        source = tool.target.source
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
                print(dlq_view.render(source, total, letters))
            return EXIT_OK
        if args.dlq_command == "replay":
            target = tool.target.queue or f"exchange {settings.exchange}"
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
        if not args.yes and not _confirm(f"Delete all {total} message(s) in {source} for good?"):
            print("nothing purged")
            return EXIT_USAGE
        print(f"purged {await tool.purge()} message(s) from {source}")
        return EXIT_OK


def cmd_portals(settings: Settings, args: argparse.Namespace) -> int:
    return asyncio.run(_portals(settings, args))


async def _portals(settings: Settings, args: argparse.Namespace) -> int:
    store = open_store(settings.portal_store)
    try:
        if args.portals_command == "list":
            records = await store.all()
            rows = [
                {"member_id": r.member_id, "domain": r.domain, "installed_at": r.installed_at}
                for r in records
            ]
            if args.json:
                print(json.dumps(rows, indent=2))
            elif not rows:
                print("no portals installed yet")
            else:
                for row in rows:
                    print(f"{row['member_id']}  {row['domain']}  installed {row['installed_at']}")
            return EXIT_OK
        if await store.forget(args.member_id):
            print(f"forgot portal {args.member_id}: its events are refused until it reinstalls")
            return EXIT_OK
        print(f"no portal with member_id {args.member_id}")
        return EXIT_FAILURE
    finally:
        await store.close()


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        raise ConfigError(f"{question} Refusing without a terminal to ask: pass --yes")
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def cmd_send(settings: Settings, args: argparse.Namespace) -> int:
    if args.body_file is not None:
        body = args.body_file.read_bytes()
        content_type = JSON_TYPE if args.json else FORM_TYPE
    else:
        if not args.event:
            raise ConfigError("send: give an EVENT name or --body-file")
        token = args.token or (settings.app_tokens[0] if settings.app_tokens else "")
        payload = sender.sample_payload(args.event, token, args.field)
        if args.json:
            body, content_type = json.dumps(payload).encode(), JSON_TYPE
        else:
            body, content_type = sender.form_body(payload), FORM_TYPE
    try:
        status, text = sender.post(args.url, body, content_type)
    except (OSError, ValueError) as exc:
        log.error("cannot post to %s: %s", args.url, exc)
        return EXIT_FAILURE
    print(f"{status} {text}")
    return EXIT_OK if status == 200 else EXIT_FAILURE


def load_consumer(spec: str) -> type[EventConsumer]:
    """`package.module:ClassName` -> the class, checked."""
    module_name, sep, class_name = spec.partition(":")
    if not sep or not module_name or not class_name:
        raise ConfigError(f"consumer {spec!r}: expected MODULE:CLASS, e.g. examples.deals:DealSync")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # `b24queue worker app.consumers:X` from the app's folder
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"consumer {spec!r}: cannot import {module_name!r}: {exc}") from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, EventConsumer)):
        raise ConfigError(f"consumer {spec!r}: {class_name!r} is not an EventConsumer subclass")
    cls.check()
    return cls
