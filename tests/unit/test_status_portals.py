"""`status`'s portals of a queue, from what a transport counted (b24queue.transports.kit.tables),
and how the table shows them: counts at their bounds say "+", a transport that cannot tell "-"."""

from __future__ import annotations

from b24queue.cli.status import render
from b24queue.settings import load_settings
from b24queue.transports.kit.tables import PORTAL_EVENTS_READ, portals_waiting
from b24queue.transports.status import PortalCount, PortalsWaiting, QueueRow, Status
from tests.support.samples import SAMPLE_TOKEN


def test_in_handlers_are_not_waiting_and_the_most_come_first() -> None:
    counted = [("a", 2), ("b", 7), ("c", 3), ("d", 3), ("e", 1)]
    found = portals_waiting(counted, {"b": 1, "e": 1}, read_all=True)
    # e's only row is in a handler: it has nothing waiting; at a tie, by portal.
    assert found == PortalsWaiting(
        4, False, [PortalCount("b", 6), PortalCount("c", 3), PortalCount("d", 3)]
    )


def test_counts_at_their_bounds_say_at_least() -> None:
    found = portals_waiting([("flood", PORTAL_EVENTS_READ + 3)], {"flood": 2}, read_all=False)
    assert found == PortalsWaiting(1, True, [PortalCount("flood", PORTAL_EVENTS_READ, True)])


def row(queue: str, portals: PortalsWaiting | None) -> QueueRow:
    return QueueRow(queue, "t", 0, 0, 0, 0.0, 0.0, 0.0, 0, 0, portals)


def test_the_table() -> None:
    settings = load_settings(broker_url="sqlite:/tmp/unused", app_tokens=SAMPLE_TOKEN)
    many = PortalsWaiting(1000, True, [PortalCount("", 10_000, True), PortalCount("x", 4)])
    text = render(Status([row("q1", many), row("q2", None)], 0, []), settings)
    lines = text.splitlines()
    assert lines[0].split()[-1] == "PORTALS"
    assert lines[1].split()[-1] == "1000+" and lines[2].split()[-1] == "-", text
    assert "  q1: (no member_id) 10000+, x 4" in lines, text
    assert not any(ln.startswith("  q2:") for ln in lines), text
