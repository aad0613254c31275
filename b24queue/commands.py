"""What each `b24queue` command does, given parsed arguments and settings (the parser, logging
and exit live in `cli`)."""

from __future__ import annotations

import argparse
import asyncio
import http.client
import importlib
import json
import logging
import os
import socket
import sys
from dataclasses import asdict

from b24queue import dlq_view, process, sender, status, worker
from b24queue.auth.store import open_store
from b24queue.consumer import EventConsumer
from b24queue.definitions import definitions
from b24queue.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, ConfigError
from b24queue.events import FORM_TYPE, JSON_TYPE
from b24queue.ingress import prefork, spool_ops
from b24queue.ingress.process import serve_ingress
from b24queue.layout import spec_for
from b24queue.redaction import redact, redact_url, url_secrets
from b24queue.settings import Settings
from b24queue.terminal import safe
from b24queue.transports import transport_for
from b24queue.transports.amqp import bindings

log = logging.getLogger("b24queue")


def cmd_ingress(settings: Settings, args: argparse.Namespace) -> int:
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


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    classes = [load_consumer(spec) for spec in args.consumers]
    return process.run(lambda stop: worker.serve_worker(settings, classes, stop))


def cmd_topology(settings: Settings, args: argparse.Namespace) -> int:
    classes = [load_consumer(spec) for spec in args.consumers]
    if (args.definitions or args.dry_run) and settings.transport != "amqp":
        raise ConfigError(
            "--definitions and --dry-run are RabbitMQ's; B24QUEUE_BROKER_URL names "
            f"{settings.transport}, where `b24queue topology` applies and prints the bindings"
        )
    if args.definitions:
        print(json.dumps(definitions(settings, classes), indent=2))
        return EXIT_OK
    if args.dry_run:
        return _topology_dry_run(settings, classes, as_json=args.json)
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
    print(f"exchange {settings.exchange} (topic, alternate exchange {settings.unrouted})")
    print(f"exchange {settings.unrouted} (fanout) -> queue {settings.unrouted}")
    width = max(len(safe(s.name)) for s in states)
    print(f"{'QUEUE':<{width}}  {'READY':>7}  {'CONSUMERS':>9}  ARGUMENTS")
    for s in states:
        arguments = safe(" ".join(f"{k}={v}" for k, v in s.arguments.items()))
        print(f"{safe(s.name):<{width}}  {s.messages:>7}  {s.consumers:>9}  {arguments}")
    return EXIT_OK


def _topology_dry_run(
    settings: Settings, classes: list[type[EventConsumer]], *, as_json: bool
) -> int:
    worker.check_consumers(classes)
    changes = asyncio.run(bindings.plan(settings, [spec_for(cls) for cls in classes]))
    if as_json:
        rows = [
            {
                "queue": c.queue,
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
        print(f"queue {c.queue} ({state}) on {settings.exchange}:")
        lines = [f"  + bind {safe(k)}" for k in c.to_add]
        lines += [f"  - unbind {safe(k)}" for k in c.to_remove]
        print("\n".join(lines) if lines else "  bindings up to date")
    return EXIT_OK


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    current = asyncio.run(transport_for(settings).status())
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
                print(dlq_view.render(source, total, letters))
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
        if not args.yes and not _confirm(question):
            print("nothing purged")
            return EXIT_USAGE
        # Exactly what was counted (and shown): events that arrive meanwhile are kept.
        purged = await tool.purge(total)
        print(f"purged {purged} message(s) from {source}")
        newer = await tool.count()
        if newer:
            print(f"kept {newer} message(s) that arrived after the count")
        return EXIT_OK


def cmd_spool(settings: Settings, args: argparse.Namespace) -> int:
    if args.spool_command == "list":
        found = spool_ops.files(settings)
        held = spool_ops.quarantined(found, args.limit)
        if args.json:
            print(
                json.dumps(
                    {
                        "files": [{**asdict(f), "path": str(f.path)} for f in found],
                        "quarantined": [asdict(q) for q in held],
                    },
                    indent=2,
                )
            )
            return EXIT_OK
        if not found:
            print(f"no spool files at {settings.spool_path} (nothing was spooled on this host)")
        for f in found:
            print(f"{safe(f.path)}: {f.waiting} waiting for RabbitMQ, {f.quarantined} quarantined")
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
        if not args.yes and not _confirm(f"Delete {len(ids)} quarantined event(s) for good?"):
            print("nothing deleted")
            return EXIT_FAILURE
        print(f"deleted {spool_ops.drop(settings, ids)} quarantined event(s)")
        return EXIT_OK
    result = asyncio.run(spool_ops.replay(settings, set(args.ids) if args.ids else None))
    print(f"replayed {result.replayed} quarantined event(s)")
    for message_id, why in result.refused:
        print(f"  still refused {safe(message_id)}: {safe(why)}")
    return EXIT_FAILURE if result.refused else EXIT_OK


def cmd_portals(settings: Settings, args: argparse.Namespace) -> int:
    if args.portals_command in ("bind-offline", "offline-status"):
        from b24queue.offline import tools

        return tools.portals_command(settings, args.portals_command, vars(args))
    return asyncio.run(_portals(settings, args))


def cmd_offline(settings: Settings, args: argparse.Namespace) -> int:
    from b24queue.offline.process import serve_offline

    async def serve(stop: asyncio.Event) -> None:
        await serve_offline(settings, stop)

    return process.run(serve)


async def _portals(settings: Settings, args: argparse.Namespace) -> int:
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


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        raise ConfigError(f"{question} Refusing without a terminal to ask: pass --yes")
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def cmd_send(settings: Settings, args: argparse.Namespace) -> int:
    token = _send_token(settings, args)
    if args.body_file is not None:
        body = args.body_file.read_bytes()
        content_type = JSON_TYPE if args.json else FORM_TYPE
    else:
        if not args.event:
            raise ConfigError("send: give an EVENT name or --body-file")
        payload = sender.sample_payload(args.event, token, args.field)
        if args.json:
            body, content_type = json.dumps(payload).encode(), JSON_TYPE
        else:
            body, content_type = sender.form_body(payload), FORM_TYPE
    try:
        status, text = sender.post(args.url, body, content_type)
    except (OSError, ValueError, http.client.HTTPException) as exc:
        # The URL's password hidden, in the URL and wherever the error quotes a part of it.
        why = redact(str(exc), url_secrets(args.url))
        log.error("cannot post to %s: %s", redact_url(args.url), why)
        return EXIT_FAILURE
    print(safe(f"{status} {redact(text, (token,))}"))
    return EXIT_OK if status == 200 else EXIT_FAILURE


def _send_token(settings: Settings, args: argparse.Namespace) -> str:
    """--token, --token-file, B24QUEUE_SEND_TOKEN, or the first of B24QUEUE_APP_TOKENS."""
    if args.token is not None:
        log.warning(
            "--token is visible to other users of this host (ps, /proc/<pid>/cmdline): "
            "prefer B24QUEUE_SEND_TOKEN or --token-file"
        )
        return str(args.token)
    if args.token_file is not None:
        where = f"send --token-file {args.token_file}"
        try:
            token: str = args.token_file.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{where}: cannot read it ({exc})") from None
        if not token:
            raise ConfigError(f"{where}: the file is empty")
        return token
    from_settings: str = settings.send_token.get_secret_value()
    return from_settings or next(iter(settings.app_tokens), "")


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
