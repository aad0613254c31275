"""Consumers that ask for typed events: the handler gets the model, validated."""

import logging

from b24queue import EventConsumer, Reject
from b24queue.events.typed import BotMessageAdded, DealEvent, DealUpdated

log = logging.getLogger(__name__)


class DealChanges(EventConsumer[DealUpdated]):  # the model is the type parameter
    queue = "deal-changes"
    events = ("ONCRMDEALUPDATE",)  # a name DealUpdated does not stand for: a ConfigError

    async def handle(self, event: DealUpdated) -> None:
        deal_id = event.id  # data[FIELDS][ID], a string as Bitrix24 sends it ("759")
        if deal_id == "0":
            raise Reject("deal 0 does not exist")
        extra = event.fields.get("UF_CRM_STATUS")  # a key no model knows: kept as sent
        log.info("deal %s changed on %s (%s)", deal_id, event.auth.domain, extra)


class DealAudit(EventConsumer[DealEvent]):  # a family: add, update, delete, category moves
    queue = "deal-audit"
    events = ("ONCRMDEALADD", "ONCRMDEALUPDATE", "ONCRMDEALDELETE")

    async def handle(self, event: DealEvent) -> None:
        log.info("%s: deal %s", event.name, event.id)  # name says which one


class EchoBot(EventConsumer[BotMessageAdded]):
    queue = "echo-bot"
    events = ("ONIMBOTMESSAGEADD",)

    async def handle(self, event: BotMessageAdded) -> None:
        answer = {
            "BOT_ID": event.bot.bot_id,  # which of the app's bots was written to
            "DIALOG_ID": event.dialog_id,  # where to answer
            "MESSAGE": f"You wrote: {event.params.message}",
        }
        await self.portal(event).call("imbot.message.add", answer)
