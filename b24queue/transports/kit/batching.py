"""Group commit: whatever arrived while the last batch ran goes in the next, one statement, script
or transaction (PostgreSQL, Redis, the embedded SQLite queue)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

MAX_BATCH = 256  # items in one statement (bodies are bounded: at most 8 MiB each)


class Batcher(Generic[T, R]):
    """Group commit: items that arrive while a batch runs go together in the next one (one
    statement, one commit). `run(items)` returns one result per item, or raises for all; a batch
    that fails is tried item by item, so one bad item fails alone."""

    def __init__(
        self,
        run: Callable[[list[T]], Awaitable[list[R]]],
        name: str,
        lost: tuple[type[BaseException], ...] = (ConnectionError,),
        max_batch: int | None = MAX_BATCH,
    ) -> None:
        self._run = run
        self._lost = lost  # errors not worth trying item by item (the connection is gone)
        self._name = name
        self._max = max_batch  # items in one batch; None: all that are waiting
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=self._name)

    async def stop(self, why: str = "closed") -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for _, future in self._pending:
            if not future.done():
                future.set_exception(ConnectionError(why))
        self._pending = []

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        self._wake.set()
        return await future

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            # A caller that gave up (a publish past its timeout, answered 503) is not written for.
            waiting = [(item, f) for item, f in self._pending if not f.done()]
            cut = len(waiting) if self._max is None else self._max
            batch, self._pending = waiting[:cut], waiting[cut:]
            if self._pending:
                self._wake.set()  # the rest in the next statement
            if batch:
                await self._batch(batch)

    async def _batch(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            results = await self._run([item for item, _ in batch])
        except Exception as exc:
            if len(batch) == 1 or isinstance(exc, self._lost):
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                return
            for one in batch:
                await self._batch([one])
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)
