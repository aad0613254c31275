from __future__ import annotations

import pytest

from b24queue.retry import delay_after, snap_delay


def test_delay_after_uses_the_list_then_repeats_the_last() -> None:
    delays = (1.0, 5.0, 30.0)
    assert [delay_after(n, delays) for n in range(1, 7)] == [1, 5, 30, 30, 30, 30]
    with pytest.raises(ValueError, match="from 1"):
        delay_after(0, delays)


def test_snap_delay_rounds_up_to_a_declared_level() -> None:
    levels = (1.0, 5.0, 30.0)
    assert snap_delay(0.1, levels) == 1
    assert snap_delay(5, levels) == 5
    assert snap_delay(7, levels) == 30
    assert snap_delay(999, levels) == 30
