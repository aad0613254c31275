"""The Redis Streams transport's keys, connections, routing and queue operations (the scripts in
`scripts.py`, the fair queues' in `fair*.py`), for the ingress, the workers and the CLI."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as rx

from b24queue.errors import BrokerUnavailableError, ConfigError
from b24queue.events.envelope import Envelope
from b24queue.queues import Fairness, QueueSpec, topic_matches
from b24queue.settings import Settings
from b24queue.transports.kit.leased import Row
from b24queue.transports.kit.tables import CONSUMER, DLQ, UNROUTED, Depth, Overview
from b24queue.transports.kit.unrouted import UnroutedCap
from b24queue.transports.redis_streams import fair, fair_mend, fair_status, scripts
from b24queue.transports.redis_streams.connection import connect, evicts, full, translate
from b24queue.transports.status import MemoryRow, PortalsWaiting

log = logging.getLogger(__name__)


async def check_for_workers(store: Store) -> None:
    """A worker needs Redis >= 7 (its scripts' flags). It runs whatever the memory policy: the
    ingress refuses a policy that can evict events, and draining is what puts the ones already
    there out of reach of eviction; so it says so, as it does when Redis is full at start."""
    version = str((await store.client.info("server")).get("redis_version", "unknown"))
    major = version.split(".")[0]
    where = store.settings.redacted_broker_url()
    if not major.isdigit() or int(major) < 7:
        raise ConfigError(f"b24queue needs Redis >= 7; {where} runs {version}")
    memory = await store.memory()
    if memory.evicts:
        log.error(
            "Redis at %s runs with maxmemory-policy %s: when full it can evict queued events "
            "(set maxmemory-policy noeviction)",
            where,
            memory.policy,
        )
    if memory.full:
        log.warning("%s (the ingress spools them or answers 503); draining", full(where, memory))


class Store:
    """One namespace (`B24QUEUE_REDIS_PREFIX`) of queues on one client."""

    def __init__(self, client: aioredis.Redis, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        p = settings.redis_prefix
        self.bindings_key, self.version_key = f"{p}:bindings", f"{p}:bindings:version"
        self.queues_key, self.workers_key = f"{p}:queues", f"{p}:workers"
        self._prefix = p
        names = ("PUBLISH", "DECLARE", "CLAIM", "ACK", "MOVE", "BEAT", "LEAVE", "PRUNE")
        self._scripts = {
            name: client.register_script(getattr(module, name))
            for module, names_of in (
                (scripts, (*names, "REPLAY", "PURGE", "SIZE")),
                (fair, ("FAIR_CLAIM",)),
                (fair_mend, ("RECONCILE", "UNLISTED")),
                (fair_status, ("PORTALS",)),
            )
            for name in names_of
        }
        self._routes: tuple[str, list[tuple[str, str]]] | None = None

    def stream(self, queue: str) -> str:
        return f"{self._prefix}:q:{queue}"

    def later(self, queue: str) -> str:
        return f"{self._prefix}:later:{queue}"

    def sizes(self, queue: str) -> str:
        """The ledger of a stream that has one (the unrouted stream's: its entries' bytes)."""
        return self.stream(queue) + ":bytes"

    async def _run(self, name: str, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self._scripts[name](keys=keys, args=args)
        except rx.OutOfMemoryError as exc:  # a script that adds data (PUBLISH, REPLAY)
            raise translate(exc, self.settings) from None

    # Routing -------------------------------------------------------------------------------

    async def _load_routes(self) -> tuple[str, list[tuple[str, str]]]:
        """The bindings and their version, read in this order in one round trip: bindings
        changed after the version was read make PUBLISH refuse it, so a MULTI is not needed
        (and Redis refuses one, even of reads, while over maxmemory)."""
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.get(self.version_key)
            pipe.hkeys(self.bindings_key)
            version, fields = await pipe.execute()
        pairs = [text(f).split("\n", 1) for f in fields]
        self._routes = (text(version or b"0"), [(q, p) for q, p in pairs])
        return self._routes

    def _targets(self, bindings: list[tuple[str, str]], key: str) -> list[str]:
        return sorted({q for q, p in bindings if topic_matches(p, key)})

    async def publish(
        self, envelopes: Sequence[Envelope], cap: UnroutedCap | None = None
    ) -> tuple[int, int]:
        """Every copy of every event in one script (atomic; one fsync), routed by the bindings
        the script confirms are still current; past the `cap`, the unrouted stream's oldest
        entries go in the same script. Returns what went: (entries, bytes)."""
        unrouted = self.stream(self.settings.unrouted)
        limits = (cap.max_events, cap.max_bytes) if cap is not None else (2**53, 2**53)
        for _ in range(5):
            version, bindings = self._routes or await self._load_routes()
            streams: dict[str, int] = {}
            args: list[Any] = [version, 0, 0, *limits]
            count = 0
            for e in envelopes:
                queues = self._targets(bindings, e.routing_key) or [self.settings.unrouted]
                fields = e.stored()
                for queue in queues:
                    index = streams.setdefault(self.stream(queue), len(streams) + 2)
                    args += [index, *fields]
                    count += 1
            args[1] = count
            keys = [self.version_key, *streams]
            if unrouted in streams:
                args[2] = streams[unrouted]
                keys.append(self.sizes(self.settings.unrouted))
            done = await self._run("PUBLISH", keys, args)
            if done != -1:
                return int(done[1]), int(done[2])
            self._routes = None  # the bindings changed meanwhile: route again
        raise BrokerUnavailableError("the bindings kept changing while publishing")

    # Topology ------------------------------------------------------------------------------

    async def declare(self, spec: QueueSpec) -> list[str]:
        """The queue, its group and DLQ, and exactly its bindings; the bindings removed."""
        keys = [self.queues_key, self.stream(spec.name), self.bindings_key, self.version_key]
        args = [scripts.GROUP, spec.name, spec.dlq, CONSUMER, DLQ, *spec.bindings]
        return sorted(text(p) for p in await self._run("DECLARE", keys, args))

    async def declare_unrouted(self) -> None:
        """Written only when missing: an ingress starting while Redis is full gets ready, and
        then refuses each event with the reason. So is the unrouted stream's ledger (counted
        once: read here in pieces, and what came since by the script that sets it); while
        Redis is full it waits for the next start, and only the cap in events holds."""
        unrouted = self.settings.unrouted
        if await self.client.hget(self.queues_key, unrouted) != UNROUTED.encode():
            await self.client.hset(self.queues_key, unrouted, UNROUTED)
        if await self.client.exists(self.sizes(unrouted)):
            return
        total, after = 0, "0-0"
        while True:
            rows: Any = await self.client.xrange(self.stream(unrouted), min=f"({after}", count=1000)
            if not rows:
                break
            total += sum(len(fields.get(b"b", b"")) for _, fields in rows)
            after = text(rows[-1][0])
        try:
            await self._run("SIZE", [self.stream(unrouted), self.sizes(unrouted)], [after, total])
        except BrokerUnavailableError as exc:  # over maxmemory: SET refused
            log.warning("%s: the unrouted stream's bytes are counted at the next start", exc)

    # Worker side ---------------------------------------------------------------------------

    async def claim(
        self, queue: str, owner: str, count: int, lease_s: float, fairness: Fairness | None = None
    ) -> list[Row]:
        """Up to `count` entries: first in, first out, or in turns among the portals when
        `fairness` is on (`fair.FAIR_CLAIM`)."""
        if fairness is not None and fairness.on:
            weights = json.dumps(dict(fairness.weights)) if fairness.weights else ""
            args = fair.claim_args(owner, count, lease_s, fairness.cap or 0, weights)
            found = await self._run("FAIR_CLAIM", [self.stream(queue), self.later(queue)], args)
        else:
            found = await self._run(
                "CLAIM",
                [self.stream(queue), self.later(queue), self.stream(queue) + ":cursor"],
                [scripts.GROUP, owner, count, int(lease_s * 1000)],
            )
        return [_row(entry_id, fields, int(n)) for entry_id, fields, n in found]

    async def reconcile(
        self, queue: str, at_most: int = fair_mend.MEND_AT_MOST
    ) -> tuple[int, bool]:
        """One step of `fair_mend.RECONCILE` on a fair queue: the next `at_most` entries parked,
        those in no portal's list added again. Returns (how many it added again, whether it
        reached the end of what is parked)."""
        done = await self._run("RECONCILE", [self.stream(queue)], fair_mend.reconcile_args(at_most))
        return int(done[1]), bool(done[3])

    async def parked_unlisted(self, queue: str) -> bool:
        """Whether some entries of a fair queue may be parked in no portal's list."""
        keys = [self.stream(queue)]
        return bool(await self._run("UNLISTED", keys, fair_mend.unlisted_args()))

    async def ack(self, queue: str, rows: Sequence[tuple[Row, str]]) -> list[bool]:
        args: list[Any] = [scripts.GROUP]
        for row, owner in rows:
            args += [row.id, owner, row.fence]
        done = await self._run("ACK", [self.stream(queue)], args)
        return [bool(x) for x in done]

    async def move(
        self, row: Row, owner: str, *, queue: str, headers: dict[str, Any], delay_s: float
    ) -> bool:
        """Retry (`queue` is the row's own: the delayed set) or dead-letter (`queue` its DLQ)."""
        dead = queue.endswith(".dlq")
        source = queue.removesuffix(".dlq")
        target = self.stream(queue) if dead else self.later(queue)
        args = [
            scripts.GROUP,
            row.id,
            owner,
            row.fence,
            "dlq" if dead else "retry",
            json.dumps(headers, default=str),
            int(delay_s * 1000),
        ]
        return bool(await self._run("MOVE", [self.stream(source), target], args))

    async def beat(self, owner: str, queue: str, name: str, ids: list[Any], lease_s: float) -> None:
        alive = json.dumps({"queue": queue, "name": name, "seen": time.time()})
        await self._run(
            "BEAT",
            [self.stream(queue), self.workers_key],
            [scripts.GROUP, owner, int(lease_s * 1000), alive, *ids],
        )

    async def release(self, queue: str, owner: str) -> None:
        """Everything `owner` holds becomes claimable at once (idle far past any lease)."""
        await self._run(
            "BEAT", [self.stream(queue), self.workers_key], [scripts.GROUP, owner, 10**11, ""]
        )

    async def prune(self, queue: str, max_age_s: float) -> int:
        """Forget the workers of `queue` not heard of for `max_age_s` (crashed ones)."""
        return int(
            await self._run(
                "PRUNE",
                [self.stream(queue), self.workers_key],
                [scripts.GROUP, queue, time.time(), max_age_s],
            )
        )

    async def leave(self, queue: str, owner: str) -> None:
        await self._run("LEAVE", [self.stream(queue), self.workers_key], [scripts.GROUP, owner])

    # Operator side -------------------------------------------------------------------------

    async def exists(self, queue: str) -> bool:
        return bool(await self.client.hexists(self.queues_key, queue))

    async def count(self, queue: str) -> int:
        return int(await self.client.xlen(self.stream(queue)))

    async def first(self, queue: str, limit: int, after: Any) -> list[Row]:
        start = "-" if after is None else f"({after}"
        entries: Any = await self.client.xrange(self.stream(queue), min=start, count=limit)
        return [_row(entry_id, fields, 0) for entry_id, fields in entries or []]

    async def replay(
        self, row: Row, headers: dict[str, Any], back_to: str | None, source: str
    ) -> bool:
        for _ in range(5):
            version, bindings = await self._load_routes()
            targets = [back_to] if back_to is not None else self._targets(bindings, row.routing_key)
            if not targets:
                return False  # still bound by no queue: it stays
            keys = [
                self.stream(source),
                self.version_key,
                self.sizes(source),
                *(self.stream(t) for t in targets),
            ]
            moved = await self._run(
                "REPLAY", keys, [row.id, json.dumps(headers, default=str), version]
            )
            if moved != -1:
                return bool(moved)
        return False

    async def purge(self, queue: str, count: int) -> int:
        return int(await self._run("PURGE", [self.stream(queue), self.sizes(queue)], [count]))

    async def memory(self) -> MemoryRow:
        """Redis's memory as its maxmemory check sees it (`INFO`: no `CONFIG` right needed)."""
        info = await self.client.info("memory")
        used, limit = int(info["used_memory"]), int(info.get("maxmemory", 0))
        counted = used - int(info.get("mem_not_counted_for_evict", 0))
        policy = text(info.get("maxmemory_policy", "unknown"))
        return MemoryRow(used, limit, policy, limit > 0 and counted > limit, evicts(policy))

    async def overview(self, alive_s: float) -> Overview:
        kinds = {text(k): text(v) for k, v in (await self.client.hgetall(self.queues_key)).items()}
        queues: dict[str, Depth] = {}
        portals: dict[str, PortalsWaiting] = {}
        for name, kind in kinds.items():
            total = int(await self.client.xlen(self.stream(name)))
            leased = later = 0
            if kind == CONSUMER:
                try:
                    pending = await self.client.xpending(self.stream(name), scripts.GROUP)
                    leased = int(pending["pending"]) - sum(
                        int(x["pending"])
                        for x in pending["consumers"]
                        if text(x["name"]) == fair.PARK
                    )
                except rx.ResponseError:  # no group yet
                    leased = 0
                later = int(await self.client.zcard(self.later(name)))
                keys = [self.stream(name), self.later(name)]
                found = await self._run("PORTALS", keys, fair_status.portals_args())
                portals[name] = fair_status.portals_waiting(found)
            queues[name] = Depth(total - leased, leased, later)
        now = time.time()
        workers: dict[str, int] = {}
        names = set()
        for raw in (await self.client.hgetall(self.workers_key)).values():
            seen = json.loads(raw)
            if now - seen["seen"] <= alive_s:
                workers[seen["queue"]] = workers.get(seen["queue"], 0) + 1
                names.add(seen["name"])
        consumers = [n for n, k in kinds.items() if k == CONSUMER]
        return Overview(consumers, queues, workers, sorted(names), portals)


async def opened(settings: Settings, name: str) -> Store:
    """A store on a connection that answered a ping (else the error, translated)."""
    client = connect(settings, name)
    try:
        await client.ping()
    except Exception as exc:
        await client.aclose()
        raise translate(exc, settings) from None
    return Store(client, settings)


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _row(entry_id: Any, fields: Any, deliveries: int) -> Row:
    if isinstance(fields, list):  # from a script: a flat list
        fields = dict(zip(fields[::2], fields[1::2], strict=True))
    f = {(k.decode() if isinstance(k, bytes) else k): v for k, v in fields.items()}
    return Row(
        id=text(entry_id),
        message_id=f["m"].decode(),
        routing_key=f["k"].decode(),
        body=bytes(f["b"]),
        headers=json.loads(f["h"]),
        timestamp=datetime.fromisoformat(f["t"].decode()),
        event_type=f["e"].decode(),
        deliveries=deliveries,
        fence=deliveries,
    )
