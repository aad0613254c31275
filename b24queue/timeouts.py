"""`within`: asyncio.timeout's rules for one awaitable, at a fraction of its cost per call.

The worker bounds every handler and the ingress every publish with a timeout, once per event:
`async with asyncio.timeout(...)` costs two coroutines of a context manager, a Timeout object and
a timer of its own each time (under uvloop a libuv timer, started and stopped). Here the calls
whose deadlines fall in the same short slot share one timer: a call joins its slot's set and
leaves it when it is done, and the timer, when it fires, cancels the calls still in it. A slot is
at most a sixteenth of the timeout long (at most 1 s), so a timeout fires that much late at most.
"""

from __future__ import annotations

import asyncio
import math
import weakref
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")

# Slot lengths: powers of two from 1/1024 s to 1 s, a sixteenth of the timeout or shorter.
_MIN_SLOT_EXP, _MAX_SLOT_EXP = -10, 0
_NEVER_S = 1e12  # a timeout this long (some 30,000 years) is none


class _Call:
    """One `within` call waiting in a slot. Its task only weakly: a slot outlives a loop closed
    with the call still waiting, and must not keep that loop alive through it."""

    __slots__ = ("expired", "task")

    def __init__(self, task: asyncio.Task[object]) -> None:
        self.task = weakref.ref(task)
        self.expired = False


class _Slots:
    """The slots of one event loop: (slot length, slot number) -> the calls waiting in it. It
    keeps no reference to its loop, the key of `_LOOPS` (that would keep every loop alive)."""

    def __init__(self) -> None:
        self._slots: dict[tuple[float, int], set[_Call]] = {}

    def join(self, loop: asyncio.AbstractEventLoop, call: _Call, timeout_s: float) -> set[_Call]:
        length = _slot_length(timeout_s)
        key = (length, math.ceil((loop.time() + timeout_s) / length))
        calls = self._slots.get(key)
        if calls is None:
            calls = self._slots[key] = set()
            loop.call_at(key[1] * length, self._expire, key)
        calls.add(call)
        return calls

    def _expire(self, key: tuple[float, int]) -> None:
        for call in self._slots.pop(key, ()):
            task = call.task()
            if task is not None:
                call.expired = True
                task.cancel()


_SLOT_LENGTHS: dict[float, float] = {}


def _slot_length(timeout_s: float) -> float:
    length = _SLOT_LENGTHS.get(timeout_s)
    if length is None:
        exp = math.floor(math.log2(timeout_s / 16)) if timeout_s > 0 else _MIN_SLOT_EXP
        length = 2.0 ** min(_MAX_SLOT_EXP, max(_MIN_SLOT_EXP, exp))
        if len(_SLOT_LENGTHS) < 256:  # timeouts are settings: a handful of values
            _SLOT_LENGTHS[timeout_s] = length
    return length


_LOOPS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Slots] = weakref.WeakKeyDictionary()


async def within(timeout_s: float, awaitable: Awaitable[T]) -> T:
    """`async with asyncio.timeout(timeout_s): return await awaitable`, with the same rules:
    TimeoutError only for the timeout's own cancellation (one from outside stays a
    CancelledError), and the task's cancel count as it was when the awaitable gives in to the
    timeout, or swallows it."""
    if not timeout_s < _NEVER_S:  # math.inf (or nan): no deadline, as asyncio.timeout(inf)
        return await awaitable
    task = asyncio.current_task()
    assert task is not None, "within() runs in a task"
    loop = task.get_loop()
    slots = _LOOPS.get(loop)
    if slots is None:
        slots = _LOOPS[loop] = _Slots()
    cancelling = task.cancelling()
    call = _Call(task)
    calls = slots.join(loop, call, timeout_s)
    try:
        result = await awaitable
    except asyncio.CancelledError as exc:
        if call.expired and task.uncancel() <= cancelling:
            raise TimeoutError from exc
        raise
    except BaseException:
        if call.expired:
            task.uncancel()
        raise
    finally:
        calls.discard(call)
    if call.expired:  # it expired, and the awaitable swallowed the cancellation
        task.uncancel()
    return result
