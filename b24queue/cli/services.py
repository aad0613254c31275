"""The services: `b24queue ingress`, `worker` and `offline`, each run until SIGINT/SIGTERM
(b24queue.process)."""

from __future__ import annotations

import argparse
import asyncio
import socket

from b24queue import process, worker
from b24queue.cli.consumers import load_consumer
from b24queue.ingress import prefork
from b24queue.ingress.process import serve_ingress
from b24queue.settings import Settings


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser("ingress", help="run the HTTP ingress")
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
    p.set_defaults(
        run=run_ingress,
        settings_flags={"host": "http_host", "port": "http_port", "processes": "ingress_processes"},
    )

    p = commands.add_parser("worker", help="run consumers: b24queue worker module:Class [...]")
    p.add_argument("consumers", nargs="+", metavar="MODULE:CLASS")
    p.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus /metrics here (B24QUEUE_WORKER_METRICS_PORT; 0 = off)",
    )
    p.set_defaults(run=run_worker, settings_flags={"metrics_port": "worker_metrics_port"})

    p = commands.add_parser(
        "offline", help="pull portals' offline event queues into the exchange (issue 18)"
    )
    p.add_argument(
        "--metrics-port", type=int, help="serve /metrics here (B24QUEUE_OFFLINE_METRICS_PORT)"
    )
    p.set_defaults(run=run_offline, settings_flags={"metrics_port": "offline_metrics_port"})


def run_ingress(settings: Settings, args: argparse.Namespace) -> int:
    if args.listen_fd is not None:  # one of several, started by `prefork`
        sock = socket.socket(fileno=args.listen_fd)
        return process.run(
            lambda stop: serve_ingress(
                settings, stop, host="", port=0, sock=sock, slot=args.child_slot or 0
            )
        )
    if settings.ingress_processes > 1:
        return prefork.run(settings)
    return process.run(
        lambda stop: serve_ingress(settings, stop, host=settings.http_host, port=settings.http_port)
    )


def run_worker(settings: Settings, args: argparse.Namespace) -> int:
    classes = [load_consumer(spec) for spec in args.consumers]
    return process.run(lambda stop: worker.serve_worker(settings, classes, stop))


def run_offline(settings: Settings, args: argparse.Namespace) -> int:
    from b24queue.offline.bindings import wanted_events
    from b24queue.offline.process import serve_offline

    consumers = [load_consumer(spec) for spec in settings.events_consumers]
    wanted = wanted_events(settings, consumers) if settings.events_handler_url else ()

    async def serve(stop: asyncio.Event) -> None:
        await serve_offline(settings, stop, wanted=wanted)

    return process.run(serve)
