"""The fair claim's arithmetic (b24queue.transports.kit.fair), without a database, and the same
rule over the deliveries one worker process holds (`Waiting`, RabbitMQ)."""

from __future__ import annotations

from collections import Counter

from b24queue.queues import Fairness
from b24queue.transports.kit.fair import Claim, Waiting, share

ON = Fairness(on=True)


def test_slots_go_round_the_portals_in_turn() -> None:
    turns = share(6, ["a", "b", "c"], {}, 0.0, ON, {})
    assert turns.taken == {"a": 2, "b": 2, "c": 2}
    assert turns.passes == {"a": 2.0, "b": 2.0, "c": 2.0}
    assert turns.clock == 1.0  # the start of the last slot given


def test_a_portal_back_from_nothing_starts_at_the_clock_and_goes_first() -> None:
    # The flood has been served up to pass 101; the clock is at 100: a new portal (no pass)
    # starts at 100 and takes the next slot.
    turns = share(1, ["flood", "quiet"], {"flood": 101.0}, 100.0, ON, {})
    assert turns.taken == {"quiet": 1}
    # ...and one whose old pass is behind the clock gets no credit for the time it was away.
    turns = share(3, ["flood", "old"], {"flood": 101.0, "old": 3.0}, 100.0, ON, {})
    assert turns.taken == {"old": 2, "flood": 1}


def test_weights_give_that_many_turns_for_another_ones_one() -> None:
    heavy = Fairness(on=True, weights={"paid": 3})
    turns = share(400, ["paid", "free"], {}, 0.0, heavy, {})
    assert turns.taken["paid"] == 300 and turns.taken["free"] == 100


def test_room_bounds_a_portal_and_its_slots_go_to_the_others() -> None:
    turns = share(8, ["flood", "quiet"], {}, 0.0, ON, {"flood": 2})
    assert turns.taken == {"flood": 2, "quiet": 6}
    assert share(8, ["flood"], {}, 0.0, ON, {"flood": 0}).taken == {}


def test_a_claim_reads_only_the_portals_that_win_a_slot() -> None:
    capped = Fairness(on=True, cap=2)
    due = {"flood": list(range(1000)), "a": [2000], "b": [3000, 3001], "c": []}
    plan = Claim(5, ["a", "b", "c", "flood"], {}, 0.0, capped, {"flood": 2, "b": 1})
    asked: Counter[str] = Counter()
    while wanted := plan.wanted():
        for portal, n in wanted.items():
            asked[portal] += 1
            plan.found(portal, due[portal][:n], n)
    # The flood is at its cap: never read. b may take 1 more; c has nothing due; a has one.
    assert "flood" not in asked
    assert sorted(plan.ids()) == [2000, 3000]
    assert plan.turns.taken == {"a": 1, "b": 1}


def test_waiting_deliveries_go_to_the_portals_in_turn_each_in_its_order() -> None:
    waiting = Waiting(ON)
    for i in range(100):
        waiting.put("flood", f"f{i}")
    waiting.put("quiet", "q0")
    waiting.put("quiet", "q1")
    taken = [waiting.take() for _ in range(6)]
    # The flood came first and goes first; then the quiet portal at every other turn.
    assert taken == ["f0", "q0", "f1", "q1", "f2", "f3"]
    assert len(waiting) == 96


def test_waiting_a_portal_back_later_gets_no_credit_and_weights_count() -> None:
    waiting = Waiting(Fairness(on=True, weights={"heavy": 3}))
    for _ in range(40):
        waiting.put("heavy", "h")
        waiting.put("light", "l")
    assert Counter(waiting.take() for _ in range(40)) == {"h": 30, "l": 10}
    # A portal that had nothing waiting while 50 went to another comes back at the clock: the
    # next turn, not 50 of them.
    other = Waiting(ON)
    for _ in range(60):
        other.put("flood", "f")
    assert [other.take() for _ in range(50)] == ["f"] * 50
    other.put("quiet", "q1")
    other.put("quiet", "q2")
    assert [other.take() for _ in range(4)] == ["q1", "f", "q2", "f"]


def test_waiting_drain_hands_back_everything() -> None:
    waiting = Waiting(ON)
    waiting.put("a", 1)
    waiting.put("b", 2)
    waiting.put("a", 3)
    assert sorted(waiting.drain()) == [1, 2, 3] and len(waiting) == 0
