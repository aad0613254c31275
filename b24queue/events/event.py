"""The Bitrix24 event as users see it, and how request bodies become one."""

from __future__ import annotations

import importlib
import json
import re
import sys
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from b24queue.errors import BadEventError, ModelMismatchError
from b24queue.events.forms import decode_form, decode_json

FORM_TYPE = "application/x-www-form-urlencoded"
JSON_TYPE = "application/json"

V = TypeVar("V")
M = TypeVar("M", bound="Event")

MAX_EVENT_NAME = 128
# Event names are routing keys of a topic exchange. Catalog events have dots
# (`CATALOG.PRODUCT.ON.ADD`): each dot-separated part is one routing-key word, so an exact binding
# and patterns such as `CATALOG.#` both work. `*`, `#`, empty words or any other separator would
# change what a binding matches, so they are refused.
_WORD = "[A-Za-z0-9_]+"
EVENT_NAME = re.compile(rf"[A-Za-z][A-Za-z0-9_]*(?:\.{_WORD})*")
# What a consumer may bind to: event names, and topic patterns whose words are names, `*` or `#`.
BINDING = re.compile(rf"(?:{_WORD}|\*|#)(?:\.(?:{_WORD}|\*|#))*")

# Every value copied into a message header is bounded here, at the edge: RabbitMQ closes the whole
# connection (FRAME_ERROR) for a header frame larger than its frame_max, not just one publish.
MAX_DOMAIN = 253
_LABEL = re.compile(r"[^\W_](?:[\w-]{0,61}[^\W_])?")  # letters (IDNA too), digits, inner '-'
_MEMBER_ID = re.compile(r"[A-Za-z0-9_]{1,64}")
_HANDLER_ID = re.compile(r"[0-9]{1,20}")
# Bitrix24's tokens are 32-70 characters of [0-9a-z]; printable ASCII up to 256 leaves room.
_TOKEN = re.compile(r"[\x21-\x7e]{1,256}")
MAX_AUTH_VALUE = 2048
_SCALAR_AUTH = (
    "expires",
    "expires_in",
    "scope",
    "server_endpoint",
    "client_endpoint",
    "status",
    "user_id",
)


def check_domain(value: str) -> str:
    """A host name (IDNA labels allowed) of at most 253 characters, with an optional :port (a
    self-hosted portal); `ValueError` otherwise."""
    host, colon, port = value.rpartition(":") if ":" in value else (value, "", "")
    if colon and not (port.isascii() and port.isdigit() and len(port) <= 5):
        raise ValueError("must be a host name with an optional :port")
    if not host or len(host) > MAX_DOMAIN:
        raise ValueError(f"must be a host name of 1 to {MAX_DOMAIN} characters")
    labels = host.removesuffix(".").split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError("must be a host name: labels of letters, digits and inner '-'")
    return value


def _as_text(value: Any) -> Any:
    """Integers as their decimal strings (JSON bodies send `expires_in: 3600`; forms send
    "3600"); anything else is left for the field's own check."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


class Auth(BaseModel):
    """`auth[...]` of an event. Token fields never appear in repr() or logs."""

    # JSON bodies send `expires_in: 3600`; forms send "3600": numbers become their decimal strings
    # (pydantic's own coercion, cheaper than a validator per field).
    model_config = ConfigDict(extra="allow", frozen=True, coerce_numbers_to_str=True)

    domain: str | None = None
    member_id: str | None = None
    application_token: str | None = Field(default=None, repr=False)
    access_token: str | None = Field(default=None, repr=False)
    refresh_token: str | None = Field(default=None, repr=False)
    expires: str | None = None
    expires_in: str | None = None
    scope: str | None = None
    server_endpoint: str | None = None
    client_endpoint: str | None = None
    status: str | None = None
    user_id: str | None = None

    @field_validator("domain")
    @classmethod
    def _check_domain(cls, value: str | None) -> str | None:
        return value if not value else check_domain(value)

    @field_validator("member_id")
    @classmethod
    def _check_member_id(cls, value: str | None) -> str | None:
        return _matching(_MEMBER_ID, value, "1 to 64 letters, digits or _")

    @field_validator("application_token", "access_token", "refresh_token")
    @classmethod
    def _check_token(cls, value: str | None) -> str | None:
        return _matching(_TOKEN, value, "1 to 256 printable ASCII characters")

    @field_validator(*_SCALAR_AUTH)
    @classmethod
    def _check_length(cls, value: str | None) -> str | None:
        if value is not None and len(value) > MAX_AUTH_VALUE:
            raise ValueError(f"must be at most {MAX_AUTH_VALUE} characters")
        return value

    def __repr_args__(self) -> Any:
        # Extra keys are unknown to us; they may be secrets, so show only their names.
        for name, value in super().__repr_args__():
            if name in type(self).model_fields:
                yield name, value


class Event(BaseModel):
    """One Bitrix24 event call.

    `name` is the event name upper-cased (`ONCRMDEALADD`); `payload` is the whole decoded body,
    exactly as the portal sent it (values are strings, as Bitrix24 sends them).
    """

    # Only `event` names the event: `name=` is not another spelling of it.
    model_config = ConfigDict(frozen=True, extra="ignore")

    name: str = Field(alias="event")
    event_handler_id: str | None = None
    data: Any = Field(default_factory=dict, repr=False)
    ts: int | None = Field(default=None, ge=0, le=2**53)
    auth: Auth = Field(default_factory=Auth)
    # Only on events pulled from a portal's offline queue (b24queue.offline): the record's `id`,
    # `message_id` (MESSAGE_ID), `process_id`, `timestamp` (TIMESTAMP_X) and `additional`
    # (EVENT_ADDITIONAL). None for an event the portal sent us (the ingress drops the key).
    offline: dict[str, Any] | None = Field(default=None, repr=False)

    # Not fields: the decoded body (`payload`) and what the worker knows of the delivery live in
    # pydantic's slot for private values, `__pydantic_private__`, filled by `_private` (see there).

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if len(value) > MAX_EVENT_NAME or not EVENT_NAME.fullmatch(value):
            raise ValueError(
                "must be a Bitrix24 event name: a letter, then letters, digits or _, words "
                f"separated by single dots (max {MAX_EVENT_NAME})"
            )
        return value.upper()

    @field_validator("event_handler_id", mode="before")
    @classmethod
    def _int_to_str(cls, value: Any) -> Any:
        return _as_text(value)

    @field_validator("event_handler_id")
    @classmethod
    def _check_handler_id(cls, value: str | None) -> str | None:
        return _matching(_HANDLER_ID, value, "digits (at most 20)")

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> Self:
        """Validate a decoded body; errors name the field in bracket form (`auth[domain]`)."""
        event = _validated(cls.model_validate, payload)
        _private(event)["_payload"] = payload
        return event

    @classmethod
    def from_json(cls, raw: bytes) -> Self:
        """Validate a JSON body straight from bytes (the worker's path: pydantic-core parses it;
        `payload` is decoded only if someone asks for it)."""
        event = _validated(cls.model_validate_json, raw)
        _private(event)["_raw"] = raw
        return event

    def as_model(self, model: type[M]) -> M:
        """This event validated as `model` (a typed event of `b24queue.events.typed`, e.g.
        `DealUpdated`), with the same delivery facts (`message_id`, `attempt`...);
        `ModelMismatchError` naming each field that does not fit."""
        if isinstance(self, model):
            return self
        payload = self.payload
        try:
            typed = model.from_payload(payload)
        except BadEventError as exc:
            raise mismatch(model, exc) from None
        _private(typed).update({**_private(self), "_payload": payload, "_raw": None})
        return typed

    def typed(self) -> Event:
        """This event as the typed model of its name (`DealUpdated` for ONCRMDEALUPDATE: the
        models of `b24queue.events.typed`), or itself when its name has none. Check which with
        `isinstance`; `ModelMismatchError` when it does not fit its model."""
        _load_models()
        model = _MODELS.get(self.name)
        return self if model is None else self.as_model(model)

    @property
    def payload(self) -> dict[str, Any]:
        private = _private(self)
        payload: dict[str, Any] | None = private["_payload"]
        if payload is None:
            raw = private["_raw"]
            payload = private["_payload"] = json.loads(raw) if raw is not None else {}
        return payload

    @property
    def routing_key(self) -> str:
        return self.name

    @property
    def message_id(self) -> str | None:
        """Set by the worker: the id the ingress answered with (stable across retries)."""
        message_id: str | None = _private(self)["_message_id"]
        return message_id

    @property
    def attempt(self) -> int:
        """Set by the worker: 1 on the first try, 2 on the first retry, ..."""
        attempt: int = _private(self)["_attempt"]
        return attempt

    @property
    def redelivered(self) -> bool:
        """Set by the worker: the broker delivered this message before (a worker died or
        disconnected while holding it), so the handler may have run already."""
        redelivered: bool = _private(self)["_redelivered"]
        return redelivered

    @property
    def replaces(self) -> tuple[str, ...]:
        """Set by the worker for a consumer with `coalesce`: the message_ids of the earlier events
        of this event's key that were waiting and are settled with it, oldest first (`()`: none;
        `len(event.replaces)` is how many). Handling this one handles them."""
        replaces: tuple[str, ...] = _private(self)["_replaces"]
        return replaces

    @property
    def accepted_at(self) -> datetime | None:
        """Set by the worker: when the ingress accepted the event (the message's timestamp, whole
        seconds, UTC). A spooled event keeps the time it was accepted, so with `ts` (when the
        portal sent it) a handler can order events that reached it out of order."""
        accepted_at: datetime | None = _private(self)["_accepted_at"]
        return accepted_at

    @property
    def caused_by(self) -> str | None:
        """Set by the worker for a message the app published from a handler: the message id of
        the event whose handler published it (None for Bitrix24's events and a `Producer`'s)."""
        caused_by: str | None = _private(self)["_caused_by"]
        return caused_by

    @property
    def correlation_id(self) -> str | None:
        """Set by the worker for a message the app published from a handler: the id its whole
        chain shares (the message id of the event that began it)."""
        correlation_id: str | None = _private(self)["_correlation_id"]
        return correlation_id


# Event name -> the typed model for it: each model of b24queue.events.typed registers the names it
# stands for when it is defined (the package is imported with b24queue.events).
_MODELS: dict[str, type[Event]] = {}


def register_model(model: type[Event], names: Iterable[str]) -> None:
    """Make `model` the typed model of `names` (`Event.typed`). A name keeps one model: a
    subclass of the model it has may take it over (a family's model, then the event's own),
    an unrelated one may not."""
    for name in names:
        known = _MODELS.get(name)
        if known is not None and not issubclass(model, known):
            raise TypeError(f"{name} has a model already: {known.__qualname__}")
        _MODELS[name] = model


def model_for(name: str) -> type[Event] | None:
    """The typed model registered for an event name (upper case), if any."""
    _load_models()
    return _MODELS.get(name)


def registered_models() -> dict[str, type[Event]]:
    """Every event name with a typed model, and its model."""
    _load_models()
    return dict(_MODELS)


def _load_models() -> None:
    """Import b24queue.events.typed, whose models register themselves, on first use: a process
    that never asks for one (the ingress, the CLI) does not pay their ~45 ms of import. By name,
    as that package imports this module (a static import would be a cycle)."""
    if "b24queue.events.typed" not in sys.modules:
        importlib.import_module("b24queue.events.typed")


def mismatch(model: type[Event], exc: BadEventError) -> ModelMismatchError:
    """The error of an event that is an event, but not `model`: what validating it said."""
    return ModelMismatchError(f"not {model.__name__}: {exc}", field=exc.field)


def mark_delivered(
    event: Event,
    message_id: str | None,
    attempt: int,
    redelivered: bool,
    accepted_at: datetime | None = None,
    token_digest: str | None = None,
    replaces: tuple[str, ...] = (),
    caused_by: str | None = None,
    correlation_id: str | None = None,
) -> None:
    """The delivery facts of an event the worker just decoded (private attributes, not fields:
    they are not part of the body). `token_digest`: of the token it came with (H_TOKEN_DIGEST);
    `replaces`: the message_ids of the earlier events of its key coalesced into it."""
    private = _private(event)
    private["_message_id"] = message_id
    private["_attempt"] = attempt
    private["_redelivered"] = redelivered
    private["_accepted_at"] = accepted_at
    private["_token_digest"] = token_digest
    private["_replaces"] = replaces
    private["_caused_by"] = caused_by
    private["_correlation_id"] = correlation_id


def token_digest_of(event: Event) -> str | None:
    """Set by the worker: the digest of the application token the event came with."""
    digest: str | None = _private(event)["_token_digest"]
    return digest


# What an event holds besides its fields, and the values it starts with.
_PRIVATE_DEFAULTS: dict[str, Any] = {
    "_payload": None,  # the decoded body, when known (from a form, or decoded from _raw)
    "_raw": None,  # the JSON body it was validated from (the worker's path)
    "_message_id": None,
    "_attempt": 1,
    "_redelivered": False,
    "_accepted_at": None,
    "_token_digest": None,
    "_replaces": (),
    "_caused_by": None,
    "_correlation_id": None,
}


def _private(event: Event) -> dict[str, Any]:
    """The event's values that are not fields, in pydantic's own slot for private values.

    Declared as `PrivateAttr`s they would cost ~3 us per validated event (pydantic sets each
    default through its generic machinery) and ~1 us per read or write (through
    `BaseModel.__getattr__` / `__setattr__` after a failed lookup), on both hot paths. Kept in the
    slot, they still travel with `model_copy`, pickling and `==` as private attributes do.
    """
    private = event.__pydantic_private__
    if private is None:
        private = dict(_PRIVATE_DEFAULTS)
        object.__setattr__(event, "__pydantic_private__", private)
    return private


def decode_body(content_type: str, body: bytes) -> dict[str, Any]:
    """Decode a request body by its media type (parameters such as charset ignored)."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media == FORM_TYPE:
        return decode_form(body)
    if media == JSON_TYPE:
        return decode_json(body)
    raise ValueError(media)


def parse_event(content_type: str, body: bytes) -> Event:
    return Event.from_payload(decode_body(content_type, body))


def _matching(pattern: re.Pattern[str], value: str | None, shape: str) -> str | None:
    """An optional value, if all of it matches `pattern`; else a ValueError: it must be `shape`."""
    if value and not pattern.fullmatch(value):
        raise ValueError(f"must be {shape}")
    return value


def _validated(validate: Callable[[V], M], value: V) -> M:
    """`validate(value)`; a `BadEventError` naming the fields in bracket form if it fails."""
    try:
        return validate(value)
    except ValidationError as exc:
        raise BadEventError(_describe(exc), field=_first_field(exc)) from None


def _bracket(loc: tuple[int | str, ...]) -> str:
    if not loc:
        return "body"
    head, *rest = loc
    head = "event" if head == "name" else head
    return str(head) + "".join(f"[{p}]" for p in rest)


def _first_field(exc: ValidationError) -> str | None:
    errors = exc.errors(include_url=False)
    return _bracket(errors[0]["loc"]) if errors else None


# What an error message says of a failed validation: the first few fields, each name part cut
# short (a key is the caller's, as long as the body may be); never the values sent.
MAX_ERRORS_SHOWN = 5
MAX_KEY_SHOWN = 64


def _describe(exc: ValidationError) -> str:
    parts = []
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    for err in errors[:MAX_ERRORS_SHOWN]:
        msg = err["msg"]
        if err["type"] == "missing":
            msg = "is required"
        elif msg.startswith("Value error, "):
            msg = msg.removeprefix("Value error, ")
        loc = tuple(p if isinstance(p, int) else _cut(p) for p in err["loc"])
        parts.append(f"{_bracket(loc)}: {_cut(msg, 200)}")
    if len(errors) > MAX_ERRORS_SHOWN:
        parts.append(f"and {len(errors) - MAX_ERRORS_SHOWN} more")
    return "; ".join(parts)


def _cut(text: str, limit: int = MAX_KEY_SHOWN) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
