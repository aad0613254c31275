"""The app's own lifecycle on a portal: installed, updated, paid for, uninstalled, and the test
event `event.test` sends (ONAPPTEST)."""

from __future__ import annotations

from typing import Any

from b24queue.events.typed.base import Fields, TypedEvent


class AppInstallFields(Fields):
    version: str | None = None
    active: str | None = None  # "Y" / "N"
    installed: str | None = None  # "Y" / "N"
    language_id: str | None = None


class AppInstalled(TypedEvent):
    """ONAPPINSTALL: `auth` holds the portal's first tokens and its application token."""

    EVENTS = ("ONAPPINSTALL",)
    data: AppInstallFields


class AppUpdateFields(Fields):
    version: str | None = None
    previous_version: str | None = None
    language_id: str | None = None


class AppUpdated(TypedEvent):
    """ONAPPUPDATE: Bitrix24 drops the app's event bindings on an update."""

    EVENTS = ("ONAPPUPDATE",)
    data: AppUpdateFields


class AppUninstallFields(Fields):
    language_id: str | None = None
    clean: str | None = None  # "1": the user asked to delete the app's data


class AppUninstalled(TypedEvent):
    EVENTS = ("ONAPPUNINSTALL",)
    data: AppUninstallFields


class AppPaymentFields(Fields):
    code: str | None = None  # the app's code on the Market
    version: str | None = None
    status: str | None = None  # "F" free, "D" demo, "T" trial, "P" paid
    payment_expired: str | None = None  # "Y" / "N"
    days: str | None = None
    language_id: str | None = None


class AppPayment(TypedEvent):
    """ONAPPPAYMENT: its `auth` carries no tokens (the portal is asked to confirm it)."""

    EVENTS = ("ONAPPPAYMENT",)
    data: AppPaymentFields


class AppTestFields(Fields):
    query: dict[str, Any] | list[Any] | str | None = None  # what event.test was called with


class AppTest(TypedEvent):
    EVENTS = ("ONAPPTEST",)
    data: AppTestFields
