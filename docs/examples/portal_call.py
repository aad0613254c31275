import logging

from b24queue import Event, EventConsumer, PortalError, Reject

log = logging.getLogger(__name__)


class DealContacts(EventConsumer):
    queue = "deal-contacts"
    events = ("ONCRMDEALUPDATE",)
    retry_delays_s = (5, 60)  # a PortalRetry of 60 s (a method out of time) waits 60 s

    async def handle(self, event: Event) -> None:
        portal = self.portal(event)  # this event's portal, with its credentials only
        try:
            deal = await portal.call("crm.deal.get", {"id": event.data["FIELDS"]["ID"]})
        except PortalError as exc:
            if exc.code == "NOT_FOUND":
                raise Reject("the deal is gone") from exc  # retrying cannot help
            raise  # anything else is retried (a PortalRetry after its own delay)
        found = await portal.batch({"c": ("crm.contact.get", {"id": deal.get("CONTACT_ID", 0)})})
        contact = found["c"]  # its result, or its PortalError (halt=True raises the first)
        won = [d["ID"] async for d in portal.list("crm.deal.list", {"filter": {"STAGE_ID": "WON"}})]
        log.info(
            "deal %s (%s): contact %s, %d deals won",
            deal["ID"],
            deal["TITLE"],
            "unreadable" if isinstance(contact, PortalError) else contact.get("NAME"),
            len(won),
        )
