"""One portal's offline queue into the exchange: nothing is cleared before it is durable.

A pull: `event.offline.get(clear=0)` reserves a batch under a `process_id`; every record is
published through the same confirmed path as the ingress (`EventSink.publish` returns only once
the event is durable); only then `event.offline.clear(process_id, id=[...])`. Records that cannot
be published (malformed, refused by the broker for good) go to `event.offline.error`.

What a crash leaves behind is a reserved batch nobody clears. The portal keeps it (for 30 days)
and answers it again to a get with the same process_id, so `recover` finds reserved batches with
`event.offline.list` and redoes them: the consumers may see a record twice (with the same
message_id, for the duplicate guard), never not at all. While a puller works on a batch it holds
a lease on it in the portal store's shared state, so other pullers' recovery leaves it alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from b24queue.errors import BrokerUnavailableError, PublishError
from b24queue.events.envelope import Envelope, EventSink
from b24queue.offline.records import (
    BadBatch,
    Batch,
    OfflineRecord,
    envelope_for_record,
    parse_batch,
    valid_process_id,
)
from b24queue.portal.api import PortalError
from b24queue.portal.state import SharedState

log = logging.getLogger(__name__)

PUBLISH_AT_ONCE = 100
MAX_RECOVER_ITEMS = 1000  # event.offline.list records read per recovery pass


class Caller(Protocol):
    """What a puller needs of its portal's client (b24queue.portal.api.Portal)."""

    async def call(self, method: str, params: Mapping[str, Any] | None = None) -> Any: ...

    def list(
        self, method: str, params: Mapping[str, Any] | None = None, *, max_items: int = 100_000
    ) -> AsyncIterator[Any]: ...


class Counter(Protocol):
    def count(self, outcome: str, n: int = 1) -> None: ...


@dataclass(frozen=True, slots=True)
class Target:
    member_id: str
    domain: str
    auth_connector: str
    limit: int
    max_body_bytes: int
    lease_s: float  # renewed each lease_s / 3 while a batch is worked on; a crashed one's waits
    token_digest: str = field(repr=False)  # of the portal's application token


class Puller:
    def __init__(
        self, portal: Caller, sink: EventSink, state: SharedState, target: Target, counter: Counter
    ) -> None:
        self._portal = portal
        self._sink = sink
        self._state = state
        self._t = target
        self._counter = counter
        self._owner = f"offline-{os.getpid()}-{id(self):x}"
        self._pending: str | None = None  # a batch of ours left reserved (broker away)
        self._limit = target.limit  # smaller while answers are too large to read
        self._asked = target.limit
        self.published = 0  # records published so far (the broker took some: it is back)

    @property
    def asked(self) -> int:
        """The `limit` the last get that went through asked for: the batch size, or less after
        answers too large to read (ANSWER_TOO_LARGE); a full batch of it means more waits."""
        return self._asked

    async def pull_once(self) -> int:
        """One get (our own unfinished batch first) and its records finished; returns how many
        records the portal answered (a full batch means there may be more)."""
        process_id = self._pending
        params: dict[str, Any] = {"clear": 0, "auth_connector": self._t.auth_connector}
        if process_id:
            params["process_id"] = process_id
        try:
            answer = await self._get(params)
        except _Unreadable:
            # Even one record is too large to read: whatever the gets reserved is left to
            # recovery (never cleared, so never lost), and later pulls go on with new records.
            self._pending = None
            raise
        # Forgotten only once the get went through: a failed get asks for it again next time
        # (else it would wait for recovery, out of order).
        self._pending = None
        batch = parse_batch(answer, self._t.max_body_bytes)
        size = len(batch.records) + len(batch.bad) + batch.unnamed
        if batch.process_id:
            # Ours until it is finished: whatever fails from here on (taking the lease,
            # publishing, the clear) leaves it to the next pull, not to recovery.
            self._pending = batch.process_id
            await self._finish_leased(batch)
            self._pending = None
        return size

    async def recover(self) -> int:
        """Redo batches reserved and never cleared (a crashed puller's); returns how many are
        left for later (leased: a live puller's, or a dead one's until its lease runs out).
        A batch that is unreadable of itself (too large even one record at a time, or an answer
        that is no batch) is logged and left reserved for the next pass: the others are still
        redone. Any other failure (the portal, the broker away) ends the pass."""
        found = await self._reserved()
        left = 0
        for process_id in found:
            try:
                if not await self._recover_one(process_id):
                    left += 1
            except (_Unreadable, BadBatch) as exc:
                log.warning(
                    "portal %s: reserved batch %s not redone: %s", self._t.domain, process_id, exc
                )
        return left

    async def _recover_one(self, process_id: str) -> bool:
        """Redo one reserved batch; False if another puller holds its lease."""
        async with self._leased(process_id) as leased:
            if not leased:
                return False
            params = {
                "clear": 0,
                "process_id": process_id,
                "auth_connector": self._t.auth_connector,
            }
            answer = await self._get(params)
            batch = parse_batch(answer, self._t.max_body_bytes)
            if batch.process_id:
                log.info(
                    "portal %s: redoing reserved batch %s (%d records)",
                    self._t.domain,
                    batch.process_id,
                    len(batch.records),
                )
                await self._finish(batch)
                self._counter.count("recovered_batches")
        return True

    async def _get(self, params: Mapping[str, Any]) -> Any:
        """event.offline.get with `limit` halved while the answer is too large to read (down
        to 1); a limit that worked grows back, doubling, one get at a time."""
        limit = self._limit
        while True:
            try:
                answer = await self._portal.call("event.offline.get", {**params, "limit": limit})
            except PortalError as exc:
                if exc.code != "ANSWER_TOO_LARGE":
                    raise
                if limit == 1:
                    self._limit = 1
                    self._counter.count("unreadable")
                    log.error(
                        "portal %s: one offline record%s is too large to read (%s): left "
                        "reserved, not lost (raise B24QUEUE_PORTAL_MAX_ANSWER_BYTES or _VALUES "
                        "to read it)",
                        self._t.domain,
                        f" of batch {params['process_id']}" if "process_id" in params else "",
                        exc.description,
                    )
                    raise _Unreadable(exc.code, str(exc)) from None
                limit = max(1, limit // 2)
                self._limit = limit
                continue
            self._asked, self._limit = limit, min(self._t.limit, 2 * limit)
            return answer

    async def _reserved(self) -> list[str]:
        """Process ids with records reserved and not marked as errors (bounded)."""
        found: dict[str, None] = {}
        params = {
            "filter": {"!PROCESS_ID": "", "ERROR": 0},
            "auth_connector": self._t.auth_connector,
        }
        listed = self._portal.list("event.offline.list", params, max_items=MAX_RECOVER_ITEMS)
        async for item in listed:
            process_id = (
                valid_process_id(item.get("PROCESS_ID")) if isinstance(item, dict) else None
            )
            if process_id:
                found[process_id] = None
        return list(found)

    async def _finish_leased(self, batch: Batch) -> None:
        async with self._leased(batch.process_id):
            # The broker away, or the clear not answered: the batch stays reserved; the next
            # pull reads it again first, with the same process_id (published again, cleared).
            await self._finish(batch)

    @contextlib.asynccontextmanager
    async def _leased(self, process_id: str) -> AsyncIterator[bool]:
        """The batch's lease, if nobody else holds it (yields whether we got it), renewed
        while we work on it: one call alone can take longer than `lease_s` (the bucket's wait,
        then the call's timeout), and a lease run out lets another puller redo the batch."""
        key = self._lease_key(process_id)
        leased = await self._state.lease(key, self._owner, self._t.lease_s)
        renewing = asyncio.create_task(self._renew(key)) if leased else None
        try:
            yield leased
        finally:
            if renewing is not None:
                renewing.cancel()
                await asyncio.gather(renewing, return_exceptions=True)
            if leased:
                await self._state.release(key, self._owner)

    async def _renew(self, key: str) -> None:
        while True:
            await asyncio.sleep(self._t.lease_s / 3)
            try:
                held = await self._state.renew(key, self._owner, self._t.lease_s)
            except Exception as exc:  # the shared state away: try again at the next turn
                log.warning("portal %s: renewing a batch's lease: %r", self._t.domain, exc)
                continue
            if not held:  # run out and taken: the batch may be published twice (same ids)
                log.warning("portal %s: a batch's lease was lost while working", self._t.domain)
                return

    async def _finish(self, batch: Batch) -> None:
        t = self._t
        self._counter.count("pulled", len(batch.records))
        records, envelopes, bad = self._envelopes(batch)
        # Published PUBLISH_AT_ONCE at a time (confirms pipelined, each within the publish
        # timeout even on a busy broker); any failure that is not the message's own leaves the
        # whole batch reserved: nothing is cleared.
        results: list[BaseException | None] = []
        for start in range(0, len(envelopes), PUBLISH_AT_ONCE):
            chunk = envelopes[start : start + PUBLISH_AT_ONCE]
            results += await asyncio.gather(
                *(self._sink.publish(e) for e in chunk), return_exceptions=True
            )
        published = []
        for record, result in zip(records, results, strict=True):
            if result is None:
                published.append(record.id)
            elif isinstance(result, PublishError) and result.permanent:
                bad.append(record.message_id)
            elif isinstance(result, PublishError | BrokerUnavailableError):
                raise BrokerUnavailableError(f"publishing offline records: {result}")
            elif isinstance(result, BaseException):
                raise result
        self._counter.count("published", len(published))
        self.published += len(published)
        if published:
            await self._portal.call(
                "event.offline.clear", {"process_id": batch.process_id, "id": published}
            )
            self._counter.count("cleared", len(published))
        if bad:
            await self._portal.call(
                "event.offline.error", {"process_id": batch.process_id, "message_id": bad}
            )
            self._counter.count("errored", len(bad))
            log.warning(
                "portal %s: %d offline record(s) could not be published; marked as errors "
                "(event.offline.get with error=1 reads them)",
                t.domain,
                len(bad),
            )
        if batch.unnamed or batch.over:
            self._counter.count("unnamed", batch.unnamed)
            log.warning(
                "portal %s: batch %s: %d record(s) without a usable ID/MESSAGE_ID and %d over "
                "the batch cap left reserved",
                t.domain,
                batch.process_id,
                batch.unnamed,
                batch.over,
            )

    def _envelopes(self, batch: Batch) -> tuple[list[OfflineRecord], list[Envelope], list[str]]:
        """The messages of the batch's records, and the MESSAGE_IDs of those that have none
        (one that cannot be serialised is its own fault, not the batch's)."""
        t = self._t
        records, envelopes, bad = [], [], list(batch.bad)
        for record in batch.records:
            try:
                envelope = envelope_for_record(
                    record, batch.process_id, t.member_id, t.domain, t.token_digest
                )
            except TypeError:  # orjson.JSONEncodeError (parse_batch checked it; never trusted)
                bad.append(record.message_id)
                continue
            records.append(record)
            envelopes.append(envelope)
        return records, envelopes, bad

    def _lease_key(self, process_id: str) -> str:
        return f"offline:{self._t.member_id}:{process_id}"


class _Unreadable(PortalError):
    """event.offline.get answered too large even for one record."""
