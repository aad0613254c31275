"""`b24queue` command line. The only module that reads argv, configures logging and exits.

Exit codes: 0 ok, 1 runtime failure, 2 usage or configuration error, 3 broker unreachable.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from b24queue import commands, process, redaction, sender
from b24queue.errors import (
    EXIT_BROKER,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    B24QueueError,
    ConfigError,
)
from b24queue.settings import Settings, load_settings

log = logging.getLogger("b24queue")

__all__ = ["EXIT_BROKER", "EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "main", "run"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="b24queue",
        description="Bitrix24 events into a queue, answered at once, processed reliably later.",
    )
    parser.add_argument("--log-format", choices=("text", "json"), help="default: text")
    parser.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("ingress", help="run the HTTP ingress")
    p.add_argument("--host", help="listen address (B24QUEUE_HTTP_HOST, default 0.0.0.0)")
    p.add_argument("--port", type=int, help="listen port (B24QUEUE_HTTP_PORT, default 8080)")
    p.add_argument(
        "--processes",
        type=int,
        help="ingress processes sharing the port (B24QUEUE_INGRESS_PROCESSES, default 1; "
        "about one per core)",
    )
    # Set by the parent of several ingress processes for each child; not for users.
    p.add_argument("--child-slot", type=int, help=argparse.SUPPRESS)
    p.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)

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
        help="print what a RabbitMQ node boots from (rabbitmq/definitions.json); no broker",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="show the bindings that would be added or removed; change nothing",
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

    p = sub.add_parser(
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

    p = sub.add_parser("portals", help="portals known by their install (never their tokens)")
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

    p = sub.add_parser(
        "offline", help="pull portals' offline event queues into the exchange (issue 18)"
    )
    p.add_argument(
        "--metrics-port", type=int, help="serve /metrics here (B24QUEUE_OFFLINE_METRICS_PORT)"
    )

    p = sub.add_parser(
        "send",
        help="post an event to an ingress as Bitrix24 would",
        description="Post an event to an ingress as Bitrix24 would. The application token it "
        "sends: --token-file, else B24QUEUE_SEND_TOKEN, else the first of B24QUEUE_APP_TOKENS "
        "(--token works too, but other users of the host see it in the process list).",
    )
    p.add_argument("event", nargs="?", help="event name, e.g. ONCRMDEALADD")
    p.add_argument("--url", default=sender.DEFAULT_URL, help=f"default {sender.DEFAULT_URL}")
    token = p.add_mutually_exclusive_group()
    token.add_argument(
        "--token-file",
        type=Path,
        metavar="PATH",
        help="read the application token from this file (default: B24QUEUE_SEND_TOKEN, else "
        "the first of B24QUEUE_APP_TOKENS)",
    )
    token.add_argument(
        "--token",
        help="the application token itself: visible to other users in the process list, "
        "prefer B24QUEUE_SEND_TOKEN or --token-file",
    )
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
        "processes": "ingress_processes",
        "metrics_port": "worker_metrics_port",
    }
    if args.command == "offline":
        flags["metrics_port"] = "offline_metrics_port"
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
        print(f"b24queue: {redaction.redact(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    process.start_logging(settings)
    handlers: dict[str, Callable[[Settings, argparse.Namespace], int]] = {
        "ingress": commands.cmd_ingress,
        "worker": commands.cmd_worker,
        "topology": commands.cmd_topology,
        "status": commands.cmd_status,
        "dlq": commands.cmd_dlq,
        "portals": commands.cmd_portals,
        "spool": commands.cmd_spool,
        "send": commands.cmd_send,
        "offline": commands.cmd_offline,
    }
    try:
        return handlers[args.command](settings, args)
    except B24QueueError as exc:  # each error class says what to exit with
        log.error("%s", exc)
        return exc.exit_code
