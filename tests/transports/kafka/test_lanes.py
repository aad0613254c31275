"""The Kafka runner's lanes (b24queue.transports.kafka.lanes), without a broker: a free slot
takes the head of the lane whose portal starts first; a lane in offset order; the per-portal
cap, the weights, and first in, first out (as read) with the fair share off. And what a lane
holds holds the commit point without counting as handed."""

from __future__ import annotations

from collections import Counter
from typing import Any

from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from b24queue.queues import Fairness
from b24queue.transports.kafka.lanes import READ_AHEAD, READ_AHEAD_BYTES, Lanes
from b24queue.transports.kafka.offsets import Offsets

EVENTS = [TopicPartition("b24.events", p) for p in range(3)]
RETRY = TopicPartition("q.retry.60", 0)


def records(tp: TopicPartition, portal: str, first: int, n: int) -> list[ConsumerRecord[Any, Any]]:
    return [
        ConsumerRecord(tp.topic, tp.partition, o, 0, 0, portal.encode(), b"{}", None, 0, 2, ())
        for o in range(first, first + n)
    ]


def hand_out(lanes: Lanes, n: int, *, finish: bool = True) -> list[tuple[str, int]]:
    """`n` slots one after another: (portal, offset) of each record taken."""
    out = []
    for _ in range(n):
        picked = lanes.next()
        if picked is None:
            break
        _, record = picked
        out.append((record.key.decode(), record.offset))
        if finish:
            lanes.done(record)
    return out


def test_a_quiet_partition_takes_the_next_slot_beside_a_flooded_one() -> None:
    lanes = Lanes(Fairness(on=True))
    lanes.add(EVENTS[0], records(EVENTS[0], "flood", 0, 150))
    assert [p for p, _ in hand_out(lanes, 20)] == ["flood"] * 20
    lanes.add(EVENTS[1], records(EVENTS[1], "quiet", 0, 2))
    lanes.add(EVENTS[2], records(EVENTS[2], "other", 0, 1))
    # The portals back from nothing start at the clock, the flood's pass is one turn ahead
    # (ties go to the record read first).
    got = hand_out(lanes, 6)
    assert [p for p, _ in got] == ["quiet", "other", "flood", "quiet", "flood", "flood"]
    # Each lane in offset order: the flood goes on where it stopped.
    assert [o for p, o in got if p == "flood"] == [20, 21, 22]


def test_portals_sharing_a_partition_share_its_lane_in_offset_order() -> None:
    lanes = Lanes(Fairness(on=True))
    lanes.add(EVENTS[0], records(EVENTS[0], "flood", 0, 50) + records(EVENTS[0], "door", 50, 2))
    lanes.add(EVENTS[1], records(EVENTS[1], "quiet", 0, 2))
    got = hand_out(lanes, 54)
    assert [i for i, (p, _) in enumerate(got) if p == "quiet"] == [1, 3]
    assert [i for i, (p, _) in enumerate(got) if p == "door"] == [52, 53]  # behind the flood


def test_weights_give_that_many_turns() -> None:
    lanes = Lanes(Fairness(on=True, weights={"heavy": 3}))
    lanes.add(EVENTS[0], records(EVENTS[0], "heavy", 0, 100))
    lanes.add(EVENTS[1], records(EVENTS[1], "light", 0, 100))
    assert Counter(p for p, _ in hand_out(lanes, 40)) == {"heavy": 30, "light": 10}


def test_a_portal_at_its_cap_takes_no_slot_until_one_of_its_handlers_ends() -> None:
    lanes = Lanes(Fairness(on=True, cap=2))
    lanes.add(EVENTS[0], records(EVENTS[0], "flood", 0, 10))
    lanes.add(RETRY, records(RETRY, "flood", 0, 10))  # its retries: the same portal
    lanes.add(EVENTS[1], records(EVENTS[1], "quiet", 0, 1))
    held = [lanes.next() for _ in range(3)]
    assert [r.key for _, r in (h for h in held if h)] == [b"flood", b"quiet", b"flood"]
    assert lanes.next() is None  # the flood at 2 in handlers, across both of its lanes
    lanes.done(held[0][1])  # type: ignore[index]
    picked = lanes.next()
    assert picked is not None and picked[1].key == b"flood"
    assert lanes.in_flight == {"flood": 2, "quiet": 1}


def test_off_the_lanes_go_as_read() -> None:
    lanes = Lanes(Fairness(on=False))
    lanes.add(EVENTS[0], records(EVENTS[0], "flood", 0, 5))
    lanes.add(EVENTS[1], records(EVENTS[1], "quiet", 0, 2))
    lanes.add(EVENTS[0], records(EVENTS[0], "flood", 5, 1))
    assert [p for p, _ in hand_out(lanes, 8)] == ["flood"] * 5 + ["quiet"] * 2 + ["flood"]


def test_a_full_lane_says_so_and_a_revoked_one_is_gone() -> None:
    lanes = Lanes(Fairness(on=True))
    assert not lanes.add(EVENTS[0], records(EVENTS[0], "flood", 0, READ_AHEAD - 1))
    assert lanes.add(EVENTS[0], records(EVENTS[0], "flood", READ_AHEAD - 1, 1))
    assert lanes.full(EVENTS[0])
    hand_out(lanes, 1)
    assert not lanes.full(EVENTS[0])
    lanes.drop({EVENTS[0]})
    assert lanes.waiting() == 0 and lanes.next() is None


def test_what_a_lane_holds_holds_the_commit_point_and_is_not_handed() -> None:
    offsets = Offsets()
    part = offsets.assign(EVENTS[0], committed=0, handed=0)
    for offset in range(5):
        part.hold(offset)
    part.take(0)
    part.settle(0)
    assert offsets.to_commit() == {EVENTS[0]: 1}  # 1..4 read, not handled
    assert offsets.to_mark() == {EVENTS[0]: 1}  # nor marked handed
    assert offsets.in_flight([EVENTS[0]]) == 0  # a rebalance waits for handlers only


def test_a_lane_of_large_records_is_full_by_their_bytes() -> None:
    lanes = Lanes(Fairness(on=True))
    big = records(EVENTS[0], "flood", 0, 3)
    big = [r.__class__(**{**r.__dict__, "value": b"x" * (READ_AHEAD_BYTES // 2)}) for r in big]
    assert not lanes.add(EVENTS[0], big[:1])
    assert lanes.add(EVENTS[0], big[1:2])
    hand_out(lanes, 1)
    assert not lanes.full(EVENTS[0])
