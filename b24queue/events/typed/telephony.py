"""Telephony: calls of an external telephony app (ONEXTERNALCALLSTART when a user clicks a number,
ONEXTERNALCALLBACKSTART when a callback is ordered) and of Bitrix24's own telephony
(ONVOXIMPLANTCALLINIT, ...START, ...END)."""

from __future__ import annotations

from typing import ClassVar

from b24queue.events.typed.base import Fields, TypedEvent


class ExternalCallStartFields(Fields):
    call_id: str
    phone_number: str | None = None
    phone_number_international: str | None = None
    extension: str | None = None
    user_id: str | None = None  # who clicks to call
    call_list_id: str | None = None
    line_number: str | None = None
    is_mobile: str | None = None  # "1" / "0"
    crm_entity_type: str | None = None  # "CONTACT", "COMPANY", "LEAD"
    crm_entity_id: str | None = None


class ExternalCallStart(TypedEvent):
    EVENTS = ("ONEXTERNALCALLSTART",)
    data: ExternalCallStartFields


class ExternalCallBackStartFields(Fields):
    phone_number: str
    text: str | None = None
    voice: str | None = None
    crm_entity_type: str | None = None
    crm_entity_id: str | None = None
    line_number: str | None = None


class ExternalCallBackStart(TypedEvent):
    EVENTS = ("ONEXTERNALCALLBACKSTART",)
    data: ExternalCallBackStartFields


class CallFields(Fields):
    """What every Voximplant call event has: the call's id."""

    call_id: str


class CallInitFields(CallFields):
    call_type: str | None = None  # 1 outgoing, 2 incoming, 3 incoming redirected, 4 callback
    account_search_id: str | None = None
    phone_number: str | None = None
    caller_id: str | None = None
    rest_app_id: str | None = None


class CallStartFields(CallFields):
    user_id: str | None = None  # who answered


class CallEndFields(CallFields):
    call_type: str | None = None
    phone_number: str | None = None
    portal_number: str | None = None
    portal_user_id: str | None = None
    call_duration: str | None = None  # seconds
    call_start_date: str | None = None
    cost: str | None = None
    cost_currency: str | None = None
    call_failed_code: str | None = None  # "200" when it succeeded
    call_failed_reason: str | None = None
    crm_activity_id: str | None = None


class CallEvent(TypedEvent):
    """Any Voximplant call event (`call_id` is all they share)."""

    EVENTS: ClassVar[tuple[str, ...]] = (
        "ONVOXIMPLANTCALLINIT",
        "ONVOXIMPLANTCALLSTART",
        "ONVOXIMPLANTCALLEND",
    )
    data: CallFields

    @property
    def call_id(self) -> str:
        return self.data.call_id


class CallInit(CallEvent):
    EVENTS = ("ONVOXIMPLANTCALLINIT",)
    data: CallInitFields


class CallStart(CallEvent):
    EVENTS = ("ONVOXIMPLANTCALLSTART",)
    data: CallStartFields


class CallEnd(CallEvent):
    EVENTS = ("ONVOXIMPLANTCALLEND",)
    data: CallEndFields
