from b24queue import Event, EventConsumer, Reject, Retry


class DealSync(EventConsumer):
    queue = "deal-sync"
    events = ("ONCRMDEALADD", "ONCRMDEALUPDATE")  # or ("#",) for every event, ("CATALOG.#",) …
    prefetch = 32  # at most 32 handle() calls in flight
    max_attempts = 5  # then the event goes to deal-sync.dlq
    retry_delays_s = (1, 5, 30, 120, 600)  # before attempt 2, 3, …; the last repeats

    async def handle(self, event: Event) -> None:
        deal_id = event.data["FIELDS"]["ID"]  # values are strings, as Bitrix24 sends them
        if not deal_id.isdigit():
            raise Reject("no deal id")  # to the DLQ now, no retries
        if deal_id == "13" and event.attempt < 3:
            raise Retry("the CRM is busy", delay_s=1)  # attempt + 1, in a second
        ...  # call the portal: self.portal(event) (see Calling the portal)
        # return → ack · raise Retry(delay_s=30) or any exception → retried later
