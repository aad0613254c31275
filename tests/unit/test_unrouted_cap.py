"""The unrouted queue's cap without a queue: which of the oldest go, and how a flood of drops is
logged (a line per `LOG_EVERY_S`, saying how many) and counted (every one)."""

from __future__ import annotations

import logging

import pytest

from b24queue.settings import load_settings
from b24queue.transports.kafka.configs import capped
from b24queue.transports.unrouted import LOG_EVERY_S, UnroutedCap


def test_the_oldest_go_until_both_caps_hold() -> None:
    cap = UnroutedCap(load_settings(unrouted_max_events=3, unrouted_max_bytes=100))
    oldest = [("a", 10), ("b", 60), ("c", 10), ("d", 10)]
    assert cap.oldest_to_drop(oldest, 4, 90) == [("a", 10)]  # one too many events
    assert cap.oldest_to_drop(oldest, 3, 150) == [("a", 10), ("b", 60)]  # 50 bytes over
    assert cap.oldest_to_drop(oldest, 3, 100) == []
    assert cap.oldest_to_drop(oldest[:1], 9, 9) == [("a", 10)]  # all it was given: read on


def test_far_over_is_a_64th_past_the_cap_and_exact_for_small_caps() -> None:
    cap = UnroutedCap(load_settings(unrouted_max_events=6400, unrouted_max_bytes=64_000))
    assert not cap.far_over(6500, 0) and cap.far_over(6501, 0)
    assert not cap.far_over(0, 65_000) and cap.far_over(0, 65_001)
    small = UnroutedCap(load_settings(unrouted_max_events=3))
    assert small.far_over(4, 0)


def test_drops_are_all_counted_and_logged_a_line_at_a_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    cap = UnroutedCap(load_settings(unrouted_max_events=3), clock=lambda: now[0])
    counted: list[int] = []
    cap.on_dropped = counted.append
    with caplog.at_level(logging.WARNING, logger="b24queue.transports.unrouted"):
        cap.dropped(1, 100)
        for _ in range(50):
            cap.dropped(2, 10)
        now[0] += LOG_EVERY_S
        cap.dropped(1, None)  # Kafka's: the bytes are not known
        cap.dropped(0, 0)  # nothing went: nothing said
    assert sum(counted) == 102
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0].startswith("dropped the 1 oldest event(s) (100 bytes) of the unrouted queue")
    assert lines[1].startswith(
        "dropped the 101 oldest event(s) of the unrouted queue 'b24.unrouted'"
    )
    assert "at most 3 events" in lines[1]


def test_kafka_segments_are_small_enough_for_the_cap_to_bite() -> None:
    assert capped(load_settings()) == {
        "retention.bytes": str(256 * 1024 * 1024),
        "segment.bytes": str(32 * 1024 * 1024),
    }
    # Never under Kafka 4's least segment, never over its default.
    assert capped(load_settings(unrouted_max_bytes=4096))["segment.bytes"] == str(1024 * 1024)
    assert capped(load_settings(unrouted_max_bytes=2**40))["segment.bytes"] == str(2**30)
