"""The fake portal's offline queue keeps Bitrix24's documented rules (what the puller's tests
rely on): reservations, parallel reads apart, re-reads by process_id, clear by id or MESSAGE_ID
within the reservation only, error marks and error=1 reads, one record per object, sources."""

from __future__ import annotations

from typing import Any

from tests.support.fake_offline import FakeOffline

HOST = "m1.portal.test"


async def call(offline: FakeOffline, method: str, **params: Any) -> Any:
    answered = await offline.answer(HOST, method, {"auth_connector": "b24queue", **params})
    assert answered is not None and answered[0] == 200, answered
    return answered[1]["result"] if "result" in answered[1] else answered[1]


async def queue_of(count: int) -> FakeOffline:
    offline = FakeOffline()
    offline.queue(HOST).bindings["b24queue"] = {"ONCRMDEALUPDATE"}
    for deal in range(1, count + 1):
        await offline.change(HOST, "ONCRMDEALUPDATE", deal)
    return offline


async def test_reservations_are_apart_and_read_again_by_process_id() -> None:
    offline = await queue_of(10)
    a = await call(offline, "event.offline.get", clear=0, limit=4)
    b = await call(offline, "event.offline.get", clear=0, limit=4)
    ids_a = {e["ID"] for e in a["events"]}
    assert len(ids_a) == 4 and not ids_a & {e["ID"] for e in b["events"]}
    again = await call(offline, "event.offline.get", clear=0, limit=4, process_id=a["process_id"])
    assert {e["ID"] for e in again["events"]} == ids_a  # nothing new: the batch was full
    assert await call(offline, "event.offline.clear", process_id=b["process_id"], id=list(ids_a))
    assert len(offline.waiting(HOST)) == 10  # another reservation's ids clear nothing
    one = a["events"][0]["MESSAGE_ID"]
    await call(offline, "event.offline.clear", process_id=a["process_id"], message_id=[one])
    assert len(offline.waiting(HOST)) == 9
    await call(offline, "event.offline.clear", process_id=a["process_id"])  # the rest of it
    assert len(offline.waiting(HOST)) == 6


async def test_errors_are_read_apart_and_a_change_leaves_its_reservation() -> None:
    offline = await queue_of(3)
    got = await call(offline, "event.offline.get", clear=0, limit=3)
    first, second = got["events"][0], got["events"][1]
    await call(
        offline, "event.offline.error", process_id=got["process_id"],
        message_id=[first["MESSAGE_ID"]],
    )  # fmt: skip
    errors = await call(offline, "event.offline.get", clear=0, error=1)
    assert [e["ID"] for e in errors["events"]] == [first["ID"]]
    # The object of the second record changes again: one record still, out of the reservation,
    # so clearing the reservation cannot drop the newer change.
    await offline.change(HOST, "ONCRMDEALUPDATE", second["EVENT_DATA"]["FIELDS"]["ID"])
    assert len(offline.waiting(HOST)) == 3
    await call(offline, "event.offline.clear", process_id=got["process_id"])
    left = {r.id: r.process_id for r in offline.waiting(HOST)}
    assert left == {int(first["ID"]): errors["process_id"], int(second["ID"]): ""}


async def test_sources_and_clear_1() -> None:
    offline = await queue_of(2)
    await offline.change(HOST, "ONCRMDEALUPDATE", 3, source="b24queue")  # the app's own write
    other = await offline.answer(HOST, "event.offline.get", {"auth_connector": "x"})
    assert other is not None and other[1]["result"]["events"] == []
    taken = await call(offline, "event.offline.get")  # clear=1, the default: taken and gone
    assert [e["EVENT_DATA"]["FIELDS"]["ID"] for e in taken["events"]] == ["1", "2"]
    assert offline.waiting(HOST) == []
    listed = await call(offline, "event.offline.list")
    assert listed == []
