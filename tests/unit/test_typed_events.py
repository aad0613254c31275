"""Typed events (b24queue.events.typed): every documented example of a modelled event validates,
as the portal sends it and as the queue holds it; the real-shaped samples too; unknown keys
survive a round trip; an event that does not fit a consumer's model is dead-lettered at once
with a bounded reason naming the field."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest

from b24queue import Event, EventConsumer
from b24queue import _constants as c
from b24queue.delivery import Incoming, decide
from b24queue.errors import ConfigError, ModelMismatchError
from b24queue.events.envelope import message_body
from b24queue.events.event import model_for, register_model, registered_models
from b24queue.events.typed import (
    AppInstalled,
    AppPayment,
    AppUninstalled,
    BotMessageAdded,
    CallEnd,
    CommandAdded,
    DealEvent,
    DealUpdated,
    DynamicItemUpdated,
    ProductEvent,
    ProductUpdated,
    TaskAdded,
    TypedEvent,
)
from b24queue.testing import event_from_form, make_event, run_handler
from tests.support.doc_events import doc_samples
from tests.support.samples import SAMPLE_NAMES, sample_form

DOC_SAMPLES = doc_samples()


def _ours(name: str) -> type[Event] | None:
    """The model b24queue has for an event name (not one an app or an example registered)."""
    model = model_for(name.upper())
    return model if model is not None and model.__module__.startswith(TYPED) else None


TYPED = "b24queue.events.typed."
MODELLED = [(name, f) for name, f in DOC_SAMPLES if _ours(f["payload"]["event"])]

# How many documented examples each model is checked against (the docs print two for a page
# with tabs: one-to-one and group chat, two ways a call starts...). A fixture regenerated from
# a newer b24restdocs changes this table on purpose.
EXAMPLES_PER_MODEL = {
    "ActivityAdded": 1,
    "ActivityDeleted": 1,
    "ActivityUpdated": 1,
    "AppInstalled": 1,
    "AppPayment": 1,
    "AppUninstalled": 1,
    "AppUpdated": 1,
    "BotDeleted": 1,
    "BotJoinedChat": 2,
    "BotMessageAdded": 2,
    "BotMessageDeleted": 2,
    "BotMessageUpdated": 2,
    "CalendarEntryAdded": 1,
    "CalendarEntryDeleted": 1,
    "CalendarEntryUpdated": 1,
    "CalendarSectionAdded": 1,
    "CalendarSectionDeleted": 1,
    "CalendarSectionUpdated": 1,
    "CallEnd": 1,
    "CallInit": 2,
    "CallStart": 1,
    "CommandAdded": 2,
    "CompanyAdded": 1,
    "CompanyDeleted": 1,
    "CompanyUpdated": 1,
    "ContactAdded": 1,
    "ContactDeleted": 1,
    "ContactUpdated": 1,
    "DealAdded": 3,  # its page, and the two of the overview of events
    "DealDeleted": 1,
    "DealMovedToCategory": 1,
    "DealUpdated": 1,
    "DynamicItemAdded": 1,
    "DynamicItemDeleted": 1,
    "DynamicItemUpdated": 1,
    "ExternalCallBackStart": 1,
    "ExternalCallStart": 1,
    "LeadAdded": 2,  # its page, and the leads' events overview
    "LeadDeleted": 1,
    "LeadUpdated": 1,
    "MeasureEvent": 3,
    "PriceAdded": 1,
    "PriceDeleted": 1,
    "PriceTypeEvent": 3,
    "PriceUpdated": 1,
    "ProductAdded": 1,
    "ProductDeleted": 1,
    "ProductUpdated": 1,
    "QuoteAdded": 1,
    "QuoteDeleted": 1,
    "QuoteUpdated": 1,
    "RoundingRuleEvent": 3,
    "TaskAdded": 1,
    "TaskCommentAdded": 2,
    "TaskCommentDeleted": 1,
    "TaskCommentUpdated": 1,
    "TaskDeleted": 1,
    "TaskUpdated": 1,
    "UserAdded": 1,
}
# Modelled, but no page of the documentation prints an example of it.
UNDOCUMENTED = {"ONAPPTEST"}


def _model(fixture: dict[str, Any]) -> type[Event]:
    model = _ours(fixture["payload"]["event"])
    assert model is not None
    return model


def _keys(node: Any) -> Any:
    """The shape of a value: its keys at every depth, the values left out."""
    if isinstance(node, dict):
        return {k: _keys(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_keys(v) for v in node]
    return None


def test_the_fixtures_are_every_documented_example() -> None:
    assert len(DOC_SAMPLES) >= 170, "tests/samples/docs lost examples: regenerate them"
    counts = Counter(_model(f).__name__ for _, f in MODELLED)
    assert dict(sorted(counts.items())) == EXAMPLES_PER_MODEL
    documented = {f["payload"]["event"].upper() for _, f in DOC_SAMPLES}
    ours = {
        name for name, model in registered_models().items() if model.__module__.startswith(TYPED)
    }
    assert ours - documented == UNDOCUMENTED


@pytest.mark.parametrize(("name", "fixture"), DOC_SAMPLES, ids=[n for n, _ in DOC_SAMPLES])
def test_every_documented_example_is_an_event(name: str, fixture: dict[str, Any]) -> None:
    payload = fixture["payload"]
    event = Event.from_json(message_body(payload))
    assert event.name == payload["event"].upper()


@pytest.mark.parametrize(("name", "fixture"), MODELLED, ids=[n for n, _ in MODELLED])
def test_every_documented_example_of_a_modelled_event_validates(
    name: str, fixture: dict[str, Any]
) -> None:
    payload, model = fixture["payload"], _model(fixture)
    # As the portal sends it, and as the worker reads it from the queue (tokens left out).
    sent = model.from_payload(payload)
    queued = model.from_json(message_body(payload))
    assert type(sent) is type(queued) is model
    assert type(Event.from_payload(payload).typed()) is model
    # Unknown keys kept: the data has the same keys at every depth as the documentation's.
    assert _keys(sent.model_dump(by_alias=True, exclude_unset=True)["data"]) == _keys(
        payload["data"]
    )


@pytest.mark.parametrize(("name", "fixture"), MODELLED, ids=[n for n, _ in MODELLED])
def test_a_round_trip_keeps_every_key(name: str, fixture: dict[str, Any]) -> None:
    model = _model(fixture)
    first = model.from_json(message_body(fixture["payload"]))
    as_dict = first.model_dump(by_alias=True, exclude_unset=True)
    second = model.from_payload(json.loads(json.dumps(as_dict)))
    assert second.model_dump(by_alias=True) == first.model_dump(by_alias=True)
    assert second.data == first.data


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_the_real_shaped_samples_take_their_model(name: str) -> None:
    event = event_from_form(sample_form(name))
    model = _ours(event.name)
    if model is None:  # the imbot v2 events: no model (yet)
        return
    typed = event.typed()
    assert type(typed) is model
    # The whole body, every key of it, is still there.
    assert _keys(typed.model_dump(by_alias=True, exclude_unset=True)["data"]) == _keys(event.data)


def test_typed_accessors_read_what_bitrix24_sent() -> None:
    deal = DealUpdated.from_payload(_doc("crm.deals.events.on-crm-deal-update"))
    assert (deal.id, deal.fields.id, deal.fields.get("ID")) == ("759", "759", "759")
    item = DynamicItemUpdated.from_payload(_doc("crm.universal.events.on-crm-dynamic-item-update"))
    assert (item.id, item.entity_type_id) == ("24", "1220")
    # Numbers in a JSON body become the strings a form would have had.
    product = ProductUpdated.from_payload(_doc("catalog.product.events.catalog-product-on-update"))
    assert (product.id, product.fields.type) == ("1", "1")
    task = TaskAdded.from_payload(_doc("tasks.events-tasks.on-task-add"))
    assert task.id == "123" and task.data.fields_before == "undefined"
    bot = BotMessageAdded.from_payload(
        _doc("chat-bots.outdated.messages.events.on-imbot-message-add")
    )
    assert (bot.bot.bot_id, bot.dialog_id, bot.params.message) == ("567", "27", "Hello")
    command = CommandAdded.from_payload(
        _doc("chat-bots.outdated.commands.events.on-im-command-add")
    )
    assert (command.command.command, command.command.command_params) == ("echo", "test")
    call = CallEnd.from_payload(_doc("telephony.voximplant.events.on-voximplant-call-end"))
    assert (call.call_id[:13], call.data.call_failed_code) == ("externalCall.", "304")
    assert AppUninstalled.from_payload(_doc("common.events.on-app-uninstall")).data.clean == "1"
    assert AppPayment.from_payload(_doc("common.events.on-app-payment")).data.days == "28"
    install = AppInstalled.from_payload(_doc("common.events.on-app-install"))
    assert (install.data.version, install.auth.member_id) == ("1.0.0", _AUTH_MEMBER)


_AUTH_MEMBER = "a223c6b3710f85df22e9377d6c4f7553"


def _doc(stem: str) -> dict[str, Any]:
    fixture = dict(DOC_SAMPLES)[stem]
    payload: dict[str, Any] = fixture["payload"]
    return payload


def test_unknown_keys_survive_at_every_depth() -> None:
    payload = _doc("crm.deals.events.on-crm-deal-update")
    payload = {**payload, "data": {"FIELDS": {"ID": "7", "UF_CRM_1": ["a", "b"]}, "EXTRA": "x"}}
    deal = DealUpdated.from_payload(payload)
    assert deal.fields.get("UF_CRM_1") == ["a", "b"] and deal.data.get("EXTRA") == "x"
    dumped = deal.model_dump(by_alias=True, exclude_unset=True)
    assert dumped["data"] == {"FIELDS": {"ID": "7", "UF_CRM_1": ["a", "b"]}, "EXTRA": "x"}
    assert DealUpdated.from_payload(dumped).data == deal.data


def test_typed_keeps_the_delivery_facts_and_leaves_other_events_alone() -> None:
    event = make_event("ONCRMDEALUPDATE", {"FIELDS": {"ID": "9"}})
    typed = event.typed()
    assert isinstance(typed, DealUpdated) and isinstance(typed, DealEvent)
    assert (typed.auth.domain, typed.payload) == (event.auth.domain, event.payload)
    other = make_event("ONSOMETHINGNEW", {"A": "1"})
    assert other.typed() is other
    with pytest.raises(ModelMismatchError, match=r"not DealUpdated: data\[FIELDS\]\[ID\]"):
        make_event("ONCRMDEALUPDATE", {"FIELDS": {}}).typed()


def test_a_name_keeps_one_model() -> None:
    class Mine(TypedEvent):
        pass

    with pytest.raises(TypeError, match="ONCRMDEALUPDATE has a model already: DealUpdated"):
        register_model(Mine, ["ONCRMDEALUPDATE"])
    assert model_for("ONCRMDEALUPDATE") is DealUpdated


class DealSync(EventConsumer[DealUpdated]):
    queue = "typed-deals"
    events = ("ONCRMDEALUPDATE",)

    def __init__(self) -> None:
        self.handled: list[DealUpdated] = []

    async def handle(self, event: DealUpdated) -> None:
        self.handled.append(event)


async def test_the_handler_gets_the_model() -> None:
    consumer = DealSync()
    outcome = await run_handler(consumer, make_event("ONCRMDEALUPDATE", {"FIELDS": {"ID": "5"}}))
    assert outcome.acked
    (deal,) = consumer.handled
    assert type(deal) is DealUpdated and deal.id == "5" and deal.attempt == 1
    assert deal.message_id and deal.auth.application_token is None  # not in the queue's copy


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ({"FIELDS": {}}, "not DealUpdated: data[FIELDS][ID]: is required"),
        ({"FIELDS": "5"}, "not DealUpdated: data[FIELDS]: Input should be an object"),
        ({}, "not DealUpdated: data[FIELDS]: is required"),
    ],
)
async def test_an_event_that_does_not_fit_is_dead_lettered_at_once(
    data: dict[str, Any], reason: str
) -> None:
    consumer = DealSync()
    outcome = await run_handler(consumer, make_event("ONCRMDEALUPDATE", data), attempt=1)
    assert outcome.dead_lettered and outcome.reason == "model_mismatch"
    assert outcome.headers[c.H_DEAD_LETTER_REASON] == "model_mismatch"
    assert outcome.headers[c.H_ERROR_TYPE] == "ModelMismatchError"
    assert outcome.headers[c.H_ERROR_MESSAGE] == reason
    assert not consumer.handled


async def test_another_event_name_is_a_mismatch() -> None:
    outcome = await run_handler(DealSync(), make_event("ONCRMLEADUPDATE", {"FIELDS": {"ID": "1"}}))
    assert outcome.reason == "model_mismatch"
    assert outcome.headers[c.H_ERROR_MESSAGE] == (
        "not DealUpdated: event: is ONCRMLEADUPDATE, and DealUpdated stands for ONCRMDEALUPDATE"
    )


async def test_the_reason_is_bounded_and_echoes_no_value() -> None:
    secret = "s3cr3t-value-" * 50
    long_key = "K" * 5000
    data = {"FIELDS": {"ID": {"deep": secret}, **{f"{long_key}{i}": secret for i in range(3)}}}
    bad = {f"{long_key}{i}": {"ID": [secret]} for i in range(20)}
    outcome = await run_handler(BotsEverywhere(), make_event("ONIMBOTMESSAGEADD", {"BOT": bad}))
    message = outcome.headers[c.H_ERROR_MESSAGE]
    assert outcome.reason == "model_mismatch" and secret[:12] not in message
    assert len(message) < 1000 and "more" in message and "KKK..." in message
    outcome = await run_handler(DealSync(), make_event("ONCRMDEALUPDATE", data))
    message = outcome.headers[c.H_ERROR_MESSAGE]
    assert message == "not DealUpdated: data[FIELDS][ID]: Input should be a valid string"


class BotsEverywhere(EventConsumer[BotMessageAdded]):
    queue = "typed-bots"
    events = ("ONIMBOTMESSAGEADD",)

    async def handle(self, event: BotMessageAdded) -> None:
        raise AssertionError("never called")


async def test_a_body_that_is_no_event_is_still_undecodable() -> None:
    incoming = Incoming(
        body=b'{"event": "no such name!"}', message_id="m", routing_key="X", headers={}
    )
    outcome = await decide(DealSync(), incoming, "typed-deals")
    assert outcome.reason == "undecodable" and "event:" in outcome.headers[c.H_ERROR_MESSAGE]


def test_consumers_without_a_model_get_the_plain_event() -> None:
    class Plain(EventConsumer):
        queue = "plain"
        events = ("ONCRMDEALUPDATE",)

        async def handle(self, event: Event) -> None: ...

    class Explicit(EventConsumer[Event]):
        queue = "plain"
        events = ("ONCRMDEALUPDATE",)

        async def handle(self, event: Event) -> None: ...

    assert (
        Plain.event_model is None
        and Explicit.event_model is None
        and DealSync.event_model is DealUpdated
    )
    Plain.check()
    Explicit.check()


async def test_an_attribute_of_the_consumers_own_named_model_changes_nothing() -> None:
    consumer = DealSync()
    consumer.model = object()  # type: ignore[attr-defined]  # e.g. an app's ML model
    outcome = await run_handler(consumer, make_event("ONCRMDEALUPDATE", {"FIELDS": {"ID": "5"}}))
    assert outcome.acked and type(consumer.handled[0]) is DealUpdated


def test_a_generic_base_leaves_the_model_to_its_subclasses() -> None:
    from typing import TypeVar

    E = TypeVar("E", bound=Event)

    class Audited(EventConsumer[E]):
        async def handle(self, event: E) -> None: ...

    class Deals(Audited[DealEvent]):
        queue = "audited"
        events = ("ONCRMDEALADD", "ONCRMDEALUPDATE")

    assert Audited.event_model is None and Deals.event_model is DealEvent
    Deals.check()


def test_events_a_model_cannot_take_are_a_config_error() -> None:
    class Wrong(EventConsumer[DealUpdated]):
        queue = "wrong"
        events = ("ONCRMDEALUPDATE", "ONCRMLEADADD")

        async def handle(self, event: DealUpdated) -> None: ...

    with pytest.raises(ConfigError, match=r"Wrong\.events has ONCRMLEADADD, which its model"):
        Wrong.check()

    class Patterns(EventConsumer[ProductEvent]):
        queue = "patterns"
        events = ("CATALOG.PRODUCT.ON.*",)

        async def handle(self, event: ProductEvent) -> None: ...

    Patterns.check()  # a pattern is not checked: the model checks each event it matches

    class NotAModel(EventConsumer[int]):  # type: ignore[type-var]
        queue = "not-a-model"
        events = ("ONCRMDEALUPDATE",)

        async def handle(self, event: Any) -> None: ...

    with pytest.raises(ConfigError, match=r"NotAModel\.event_model is <class .int.>"):
        NotAModel.check()
