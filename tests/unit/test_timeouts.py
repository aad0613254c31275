"""`timeouts.within` keeps asyncio.timeout's rules."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import weakref
from typing import Any

import pytest

from b24queue.timeouts import within


async def forever() -> None:
    await asyncio.Event().wait()


async def test_a_result_in_time_is_returned() -> None:
    async def quick() -> int:
        await asyncio.sleep(0)
        return 7

    assert await within(1.0, quick()) == 7


async def test_too_late_is_a_timeout_error_and_leaves_the_task_uncancelled() -> None:
    with pytest.raises(TimeoutError):
        await within(0.02, forever())
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0.05)  # and nothing cancels it later


async def test_an_outer_timeout_stays_the_outer_one() -> None:
    """The outer deadline cancels: that is not the inner timeout's, so the inner one does not
    turn it into its own TimeoutError; the outer context manager does."""
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.02) as outer:
            await within(10.0, forever())
    assert outer.expired()


async def test_a_cancellation_from_outside_stays_one() -> None:
    task = asyncio.create_task(within(10.0, forever()))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_an_error_in_time_is_raised_as_it_is() -> None:
    async def fails() -> None:
        raise ValueError("no")

    with pytest.raises(ValueError, match="no"):
        await within(1.0, fails())


async def test_a_swallowed_timeout_returns_and_leaves_the_task_uncancelled() -> None:
    async def swallows() -> str:
        with contextlib.suppress(asyncio.CancelledError):
            await forever()
        return "went on"

    assert await within(0.02, swallows()) == "went on"
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


async def test_a_timeout_fires_never_early_and_at_most_a_sixteenth_late(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop = asyncio.get_running_loop()
    now = 1000.0
    monkeypatch.setattr(loop, "time", lambda: now)
    timers: list[float] = []
    call_at = loop.call_at

    def recorded(when: float, callback: Any, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        timers.append(when)
        return call_at(when, callback, *args, **kwargs)

    monkeypatch.setattr(loop, "call_at", recorded)
    for n, timeout_s in enumerate((0.013, 0.05, 0.11, 0.75, 3.0, 60.0, 1500.0)):
        now = 1000.0 + n * 7919.123457  # a new slot each time, not on any slot's border
        task = asyncio.create_task(within(timeout_s, forever()))
        await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert now + timeout_s <= timers[-1] <= now + timeout_s + min(timeout_s / 16, 1.0)
    assert len(timers) == 7


async def test_calls_with_deadlines_close_together_share_one_timer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What makes a call cheap: one timer for a slot of deadlines, not one per call. Only the
    calls still waiting when it fires time out."""
    loop = asyncio.get_running_loop()
    timers = 0
    call_at = loop.call_at

    def counted(when: float, callback: Any, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        nonlocal timers
        timers += 1
        return call_at(when, callback, *args, **kwargs)

    monkeypatch.setattr(loop, "call_at", counted)
    # 0.4 s: slots of 1/64 s; the calls all start within a millisecond or so.
    quick = [asyncio.create_task(within(0.4, asyncio.sleep(0))) for _ in range(50)]
    slow = [asyncio.create_task(within(0.4, forever())) for _ in range(50)]
    results = await asyncio.gather(*quick, *slow, return_exceptions=True)
    assert timers <= 2  # their deadlines may straddle the border of two slots
    assert results[:50] == [None] * 50
    assert all(isinstance(r, TimeoutError) for r in results[50:])


def test_a_closed_loop_is_not_kept_alive() -> None:
    async def once() -> None:
        await within(1.0, asyncio.sleep(0))

    loop = asyncio.new_event_loop()
    loop.run_until_complete(once())
    loop.close()
    gone = weakref.ref(loop)
    del loop
    gc.collect()
    assert gone() is None


async def test_an_infinite_timeout_is_none() -> None:
    assert await within(math.inf, asyncio.sleep(0, "done")) == "done"


def test_a_loop_closed_with_a_call_still_waiting_is_not_kept_alive() -> None:
    loop = asyncio.new_event_loop()
    task = loop.create_task(within(60.0, forever()))
    loop.run_until_complete(asyncio.sleep(0.01))  # the call waits in its slot
    assert not task.done()
    loop.close()
    gone = weakref.ref(loop)
    del loop, task
    gc.collect()
    assert gone() is None
