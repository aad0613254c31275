import logging

from b24queue import Event, EventConsumer, Producer, Settings

log = logging.getLogger(__name__)


class DealSync(EventConsumer):
    queue = "deal-sync"
    events = ("ONCRMDEALUPDATE",)

    async def handle(self, event: Event) -> None:
        deal_id = event.data["FIELDS"]["ID"]
        # Held until this handler returns, then made durable before this event is acked: if
        # anything below raises, nothing is published (the retry publishes it again).
        await self.publish("APP.DEAL.SYNC_CONTACTS", {"deal_id": deal_id}, key=f"deal-{deal_id}")


class ContactSync(EventConsumer):
    queue = "contact-sync"
    events = ("APP.DEAL.SYNC_CONTACTS",)  # bound like an event

    async def handle(self, event: Event) -> None:
        # The portal of the event that caused it: call it as that handler could.
        deal = await self.portal(event).call("crm.deal.get", {"id": event.data["deal_id"]})
        log.info(
            "contacts of deal %s synced (caused by %s, chain %s)",
            deal["ID"],
            event.caused_by,  # the message id of the deal event whose handler published this
            event.correlation_id,  # the id every message of the chain shares
        )


async def recheck_from_a_view(settings: Settings, event: Event, deal_id: str) -> str:
    """Application code (a web view, a script): published once the queue confirmed it."""
    async with Producer(settings) as producer:
        # The same key twice is the same message id (the consumer's idempotency drops a copy).
        return await producer.publish(
            "APP.DEAL.SYNC_CONTACTS", {"deal_id": deal_id}, portal=event, key=f"view-{deal_id}"
        )
