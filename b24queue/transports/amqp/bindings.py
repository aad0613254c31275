"""A consumer queue's bindings follow its class: what `events` no longer names is unbound.

Declaring only ever adds bindings, so a consumer whose `events` shrink would keep receiving what
it dropped, forever. At worker start and in `b24queue topology`, after its own bindings are
declared (so there is never a moment with neither), each declared queue's bindings to the events
exchange are read from the management API and the extra ones are removed, one log line each.
Queues no running code declares are never touched. `topology --dry-run` shows the same plan
without changing anything.

During a rolling deploy an old worker still running re-adds its bindings when it reconnects; the
next start of a new one removes them again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from aio_pika.abc import AbstractQueue

from b24queue.errors import ConfigError, ManagementError
from b24queue.queues import BindingChange, QueueSpec
from b24queue.settings import Settings
from b24queue.transports.amqp.layout import fair_exchange
from b24queue.transports.amqp.management import ManagementClient
from b24queue.transports.amqp.topology import unbind

log = logging.getLogger(__name__)


async def plan(settings: Settings, specs: Sequence[QueueSpec]) -> list[BindingChange]:
    """How each queue's bindings differ from its spec (management API; raises if unreachable).
    A fair queue is not bound itself: its exchange is, in front of its shards; the exchange a
    fair queue left is to be unbound once it is fair no more."""
    client = ManagementClient(settings)
    changes = []
    for spec in specs:
        fair = spec.fairness.on
        current = await asyncio.to_thread(client.queue_bindings, spec.name, settings.exchange)
        wanted = () if fair else spec.bindings
        changes.append(
            BindingChange(spec.name, None if current is None else frozenset(current), wanted)
        )
        name = fair_exchange(spec)
        x_current = await asyncio.to_thread(client.exchange_bindings, name, settings.exchange)
        if fair or x_current:
            changes.append(
                BindingChange(
                    name,
                    None if x_current is None else frozenset(x_current),
                    spec.bindings if fair else (),
                    kind="exchange",
                )
            )
    return changes


async def prune(
    settings: Settings, declared: Sequence[tuple[QueueSpec, AbstractQueue]], *, required: bool
) -> list[BindingChange]:
    """Remove the bindings of these declared queues (and fair exchanges) that their specs no
    longer name.

    Best effort for a worker (a warning when the management API cannot be asked); `required`
    for `b24queue topology`. Returns what was changed."""
    try:
        changes = await plan(settings, [spec for spec, _ in declared])
    except Exception as exc:
        if required or not isinstance(exc, ManagementError | ConfigError | OSError | ValueError):
            raise
        log.warning(
            "could not check for stale bindings (%s): a consumer whose events shrank may still "
            "receive the dropped ones; run `b24queue topology` with management access",
            exc,
        )
        return []
    queues = {spec.name: queue for spec, queue in declared}
    queues |= {fair_exchange(spec): queue for spec, queue in declared}
    done = []
    for change in changes:
        if not change.to_remove:
            continue
        queue = queues[change.queue]
        if change.kind == "exchange":
            channel = await queue.channel.get_underlay_channel()
            for key in change.to_remove:
                await channel.exchange_unbind(
                    destination=change.queue, source=settings.exchange, routing_key=key
                )
        else:
            await unbind(queue, settings.exchange, change.to_remove)
        for key in change.to_remove:
            log.info(
                "%s %s: removed binding %s from %s (no longer in its consumer's events)",
                change.kind,
                change.queue,
                key,
                settings.exchange,
            )
        done.append(change)
    return done
