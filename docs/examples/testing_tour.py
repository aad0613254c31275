from b24queue.testing import event_from_form, make_event, run_handler, run_until_settled
from docs.examples.tour import DealSync

# A request as Bitrix24 posts it (form-encoded, PHP bracket keys), e.g. saved from a log.
SAVED_FORM = (
    "event=ONCRMDEALUPDATE&event_handler_id=7&data[FIELDS][ID]=13&ts=1764367200"
    "&auth[domain]=example.bitrix24.com&auth[member_id]=a223c6b3710f85df22e9377d6c4f7553"
    "&auth[application_token]=test-application-token"
)


async def test_deal_sync() -> None:
    outcome = await run_handler(DealSync(), make_event("ONCRMDEALADD", {"FIELDS": {"ID": "7"}}))
    assert outcome.acked  # or .retried (see .delay_s) or .dead_lettered
    rejected = await run_handler(DealSync(), make_event("ONCRMDEALADD", {"FIELDS": {"ID": "x"}}))
    assert rejected.dead_lettered and rejected.reason == "rejected"
    outcomes = await run_until_settled(DealSync(), event_from_form(SAVED_FORM))
    assert [o.kind for o in outcomes] == ["retry", "retry", "ack"]  # no waiting for delays
