"""`within`: asyncio.timeout's rules for one awaitable, at about half its cost per call.

The worker bounds every handler and the ingress every publish with a timeout, once per event:
`async with asyncio.timeout(...)` costs two coroutines of a context manager and a Timeout object
each time; a timer and a flag do the same.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(timeout_s: float, awaitable: Awaitable[T]) -> T:
    """`async with asyncio.timeout(timeout_s): return await awaitable`, with the same rules:
    TimeoutError only for the timeout's own cancellation (one from outside stays a
    CancelledError), and the task's cancel count as it was when the awaitable gives in to the
    timeout, or swallows it."""
    task = asyncio.current_task()
    assert task is not None, "within() runs in a task"
    cancelling = task.cancelling()
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    timer = asyncio.get_running_loop().call_later(timeout_s, expire)
    try:
        result = await awaitable
    except asyncio.CancelledError as exc:
        if expired and task.uncancel() <= cancelling:
            raise TimeoutError from exc
        raise
    except BaseException:
        if expired:
            task.uncancel()
        raise
    finally:
        timer.cancel()
    if expired:  # it expired, and the awaitable swallowed the cancellation
        task.uncancel()
    return result
