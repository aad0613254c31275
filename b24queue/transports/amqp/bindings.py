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
from b24queue.transports.amqp.management import ManagementClient
from b24queue.transports.amqp.topology import unbind

log = logging.getLogger(__name__)


async def plan(settings: Settings, specs: Sequence[QueueSpec]) -> list[BindingChange]:
    """How each queue's bindings differ from its spec (management API; raises if unreachable)."""
    client = ManagementClient(settings)
    changes = []
    for spec in specs:
        current = await asyncio.to_thread(client.queue_bindings, spec.name, settings.exchange)
        changes.append(
            BindingChange(spec.name, None if current is None else frozenset(current), spec.bindings)
        )
    return changes


async def prune(
    settings: Settings, declared: Sequence[tuple[QueueSpec, AbstractQueue]], *, required: bool
) -> list[BindingChange]:
    """Remove the bindings of these declared queues that their specs no longer name.

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
    done = []
    for change in changes:
        if not change.to_remove:
            continue
        await unbind(queues[change.queue], settings.exchange, change.to_remove)
        for key in change.to_remove:
            log.info(
                "queue %s: removed binding %s from %s (no longer in its consumer's events)",
                change.queue,
                key,
                settings.exchange,
            )
        done.append(change)
    return done
