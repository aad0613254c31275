"""`timeouts.within` keeps asyncio.timeout's rules."""

from __future__ import annotations

import asyncio
import contextlib

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
