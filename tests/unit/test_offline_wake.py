"""Wake-ups per portal: only with the portal's own token, never ending a backoff, at most one
pull per quiet time, and stop ends every wait."""

from __future__ import annotations

import asyncio

from b24queue.offline.wake import Wakes

M, DIGEST = "mwake0ff", "d" * 64


async def timed(wakes: Wakes, delay_s: float, *, backoff: bool, wake_after_s: float) -> float:
    loop = asyncio.get_running_loop()
    started = loop.time()
    waiting = asyncio.create_task(wakes.wait(M, delay_s, backoff=backoff))
    await asyncio.sleep(wake_after_s)
    wakes.wake(M, DIGEST)
    await asyncio.wait_for(waiting, delay_s + 1)
    return loop.time() - started


async def test_a_wake_ends_a_poll_wait_but_never_a_backoff() -> None:
    wakes = Wakes(quiet_s=0.0)
    wakes.add(M, DIGEST)
    assert await timed(wakes, 5.0, backoff=False, wake_after_s=0.05) < 1.0
    wakes.pulling(M)
    assert await timed(wakes, 0.4, backoff=True, wake_after_s=0.05) >= 0.4


async def test_a_wake_soon_after_a_pull_waits_for_the_quiet_time() -> None:
    wakes = Wakes(quiet_s=0.4)
    wakes.add(M, DIGEST)
    wakes.pulling(M)
    took = await timed(wakes, 5.0, backoff=False, wake_after_s=0.05)
    assert 0.35 <= took < 1.0  # kept, not lost: it ends the wait once the quiet time is over


async def test_only_the_portals_own_token_wakes_it_and_stop_ends_every_wait() -> None:
    wakes = Wakes(quiet_s=0.0)
    wakes.add(M, DIGEST)
    assert not wakes.wake(M, "e" * 64) and not wakes.wake(M, None)
    assert not wakes.wake("another", DIGEST)
    wakes.add(M, "f" * 64)  # reinstalled: its new token's digest
    assert not wakes.wake(M, DIGEST) and wakes.wake(M, "f" * 64)
    waiting = asyncio.create_task(wakes.wait(M, 60, backoff=True))
    await asyncio.sleep(0.01)
    wakes.stop()
    await asyncio.wait_for(waiting, 1)
