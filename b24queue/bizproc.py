"""Bitrix24 robots and workflow activities, answered later (docs/robots.md).

An app declares its robots (`Robot`) and activities (`Activity`) in code. They are registered on
every installed portal (`bizproc.robot.add` / `bizproc.activity.add`, kept up to date with
`.update`: `register`, run with the event bindings, b24queue.offline.bindings). When a workflow
reaches one, Bitrix24 POSTs the call to the app's handler (the ingress): `event_token`,
`workflow_id`, `code`, `document_id`, `document_type`, `properties`, `ts`, `auth`. The ingress
verifies it as an event and queues it under `ROBOT.<CODE>` or `ACTIVITY.<CODE>` (`as_event`);
a `RobotConsumer` handles it and returns the return values, which the worker sends back with
`bizproc.event.send` (b24queue.delivery). The answer is kept with the message
(`H_BIZPROC_RESULT`), so a failed send is retried without running the handler again. When the
call is dead-lettered, the workflow is told as the declaration says (`give_up`).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from b24queue.consumer import EventConsumer
from b24queue.errors import BadEventError, ConfigError
from b24queue.events.event import Event
from b24queue.portal.api import PortalError
from b24queue.retry import Reject


class Portal(Protocol):
    """What these functions call a portal with (b24queue.portal.api.Portal has it)."""

    async def call(self, method: str, params: Mapping[str, Any] | None = None) -> Any: ...


# Bitrix24 allows `a-z A-Z 0-9 . - _` in a code (bizproc.robot.add, CODE). A code becomes words
# of a routing key (`ROBOT.<CODE>`), where `-` cannot be: letters, digits, `_` and inner dots.
CODE = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")
MAX_CODE = 64
# A property's system name (bizproc.robot.add, PROPERTIES / RETURN_PROPERTIES).
PROPERTY_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
# What the ingress takes from a call before it is queued (each is copied into the body as sent).
# Bitrix24's event tokens look like `55c1dc1c3f0d75.78875596|A51601_82584_96831_81132|<64+ chars>`
# (b24restdocs, bizproc.event.send): printable ASCII, well under 512.
EVENT_TOKEN = re.compile(r"[\x21-\x7e]{1,512}")
WORKFLOW_ID = re.compile(r"[A-Za-z0-9_.]{1,64}")
# bizproc.event.send's answer for an event token that is invalid or expired.
TOKEN_GONE = "ACCESS_DENIED"  # noqa: S105 - an error code
# The return values kept with a message while their send is retried (a header), as JSON.
MAX_RESULT_CHARS = 16_000
MAX_LOG_MESSAGE = 1000

Text = str | dict[str, str]  # a string, or localized strings: {"en": "...", "de": "..."}


class Property(BaseModel):
    """One parameter of a robot or activity (bizproc.robot.add, the PROPERTY object)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Text
    type: Literal[
        "bool", "date", "datetime", "double", "file", "int", "select", "string", "text", "user"
    ] = "string"
    description: Text | None = None
    required: bool = False
    multiple: bool = False
    default: Any = None
    options: dict[str, str] | None = None  # for type "select": value -> title

    def rest(self) -> dict[str, Any]:
        """As Bitrix24 takes it."""
        out: dict[str, Any] = {
            "Name": self.name,
            "Type": self.type,
            "Required": "Y" if self.required else "N",
            "Multiple": "Y" if self.multiple else "N",
        }
        if self.description is not None:
            out["Description"] = self.description
        if self.default is not None:
            out["Default"] = self.default
        if self.options is not None:
            out["Options"] = self.options
        return out


class Bizproc(BaseModel):
    """What robots and activities share. `give_up_values`: the RETURN_VALUES sent with
    `bizproc.event.send` when a call is dead-lettered (None: no result is sent, the workflow keeps
    waiting); `give_up_log`: the LOG_MESSAGE sent with it, or alone through
    `bizproc.activity.log` when no result is sent (None: none). `{reason}` in it is replaced by
    why the call was given up (rejected, max_attempts...)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: ClassVar[str] = ""

    code: str
    name: Text
    description: Text | None = None
    properties: dict[str, Property] = Field(default_factory=dict)
    return_properties: dict[str, Property] = Field(default_factory=dict)
    use_subscription: bool = True
    document_type: tuple[str, str, str] | None = None
    filter: dict[str, Any] | None = None
    auth_user_id: int | None = Field(default=None, ge=1)
    give_up_values: dict[str, Any] | None = Field(default_factory=dict)
    give_up_log: str | None = Field(
        default="The app could not handle this step ({reason}).", max_length=MAX_LOG_MESSAGE
    )

    @field_validator("code")
    @classmethod
    def _check_code(cls, value: str) -> str:
        if "-" in value:
            raise ValueError(
                "a '-' cannot be part of a routing key: use letters, digits, '_' and inner '.'"
            )
        if len(value) > MAX_CODE or not CODE.fullmatch(value):
            raise ValueError(f"must be 1 to {MAX_CODE} letters, digits, '_' and inner '.'")
        return value

    @field_validator("properties", "return_properties")
    @classmethod
    def _check_keys(cls, value: dict[str, Property]) -> dict[str, Property]:
        for key in value:
            if not PROPERTY_KEY.fullmatch(key):
                raise ValueError(
                    f"{key[:64]!r}: a property's name is a letter, then letters, digits, _"
                )
        return value

    @model_validator(mode="after")
    def _check_give_up(self) -> Bizproc:
        unknown = [k for k in self.give_up_values or {} if k not in self.return_properties]
        if unknown:
            raise ValueError(
                f"give_up_values has {', '.join(unknown)[:200]}, not among return_properties"
            )
        return self

    @property
    def routing_key(self) -> str:
        return f"{self.kind}.{self.code.upper()}"

    @property
    def method(self) -> str:
        """`bizproc.robot` or `bizproc.activity`: add, update and list are its methods."""
        return f"bizproc.{self.kind.lower()}"

    def fields(self, handler: str) -> dict[str, Any]:
        """What `.add` takes (less CODE), and `.update` as FIELDS."""
        out: dict[str, Any] = {
            "HANDLER": handler,
            "NAME": self.name,
            "USE_SUBSCRIPTION": "Y" if self.use_subscription else "N",
            "PROPERTIES": {k: p.rest() for k, p in self.properties.items()},
            "RETURN_PROPERTIES": {k: p.rest() for k, p in self.return_properties.items()},
        }
        if self.description is not None:
            out["DESCRIPTION"] = self.description
        if self.document_type is not None:
            out["DOCUMENT_TYPE"] = list(self.document_type)
        if self.filter is not None:
            out["FILTER"] = self.filter
        if self.auth_user_id is not None:
            out["AUTH_USER_ID"] = self.auth_user_id
        return out


class Robot(Bizproc):
    """A robot (automation rule): bizproc.robot.add."""

    kind: ClassVar[str] = "ROBOT"


class Activity(Bizproc):
    """A workflow activity: bizproc.activity.add."""

    kind: ClassVar[str] = "ACTIVITY"


class RobotConsumer(EventConsumer):
    """The consumer of one robot's (or activity's) calls: set `bizproc`, implement `handle`,
    return the return values (a dict of the declared `return_properties`; None: no values).
    The worker sends them with `bizproc.event.send`. `events` is the declaration's routing key."""

    bizproc: ClassVar[Bizproc | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        declared = cls.__dict__.get("bizproc")
        if isinstance(declared, Bizproc) and "events" not in cls.__dict__:
            cls.events = (declared.routing_key,)

    async def handle(self, event: Event) -> Mapping[str, Any] | None:
        raise NotImplementedError(f"{type(self).__name__}.handle is not implemented")

    @classmethod
    def binding_keys(cls) -> tuple[str, ...]:
        return (cls._declared().routing_key,)

    @classmethod
    def check(cls) -> None:
        declared = cls._declared()
        if tuple(cls.events) != (declared.routing_key,):
            raise cls._bad("events", f"must be ({declared.routing_key!r},) or left unset")
        super().check()

    @classmethod
    def _declared(cls) -> Bizproc:
        if not isinstance(cls.bizproc, Bizproc):
            raise cls._bad("bizproc", "must be a Robot(...) or Activity(...) declaration")
        return cls.bizproc

    async def log_to_workflow(self, event: Event, text: str) -> None:
        """A line in the workflow's log (`bizproc.activity.log`; the workflow's template must
        log events, and the declaration must wait for an answer: use_subscription)."""
        await self.portal(event).call(
            "bizproc.activity.log",
            {"EVENT_TOKEN": call_of(event).event_token, "LOG_MESSAGE": text[:MAX_LOG_MESSAGE]},
        )


@dataclass(frozen=True, slots=True)
class Call:
    """What a robot or activity call says, as Bitrix24 sent it (strings)."""

    code: str
    workflow_id: str
    event_token: str
    document_id: Any
    document_type: Any
    properties: dict[str, Any]


def call_of(event: Event) -> Call:
    p = event.payload
    props = p.get("properties")
    return Call(
        code=str(p.get("code") or ""),
        workflow_id=str(p.get("workflow_id") or ""),
        event_token=str(p.get("event_token") or ""),
        document_id=p.get("document_id"),
        document_type=p.get("document_type"),
        properties=props if isinstance(props, dict) else {},
    )


# -- the declarations an app runs with ----------------------------------------------------------


class Declarations:
    """The app's robots and activities, by code (B24QUEUE_BIZPROC)."""

    def __init__(self, declared: Iterable[Bizproc]) -> None:
        self.by_code: dict[str, Bizproc] = {}
        folded: dict[str, str] = {}
        for d in declared:
            other = folded.get(d.code.upper())
            if other is not None and self.by_code[other] != d:
                raise ConfigError(
                    f"bizproc code {d.code!r} is declared twice (as {other!r}); codes must differ "
                    "in more than case: the routing key upper-cases them"
                )
            folded[d.code.upper()] = d.code
            self.by_code[d.code] = d

    def __bool__(self) -> bool:
        return bool(self.by_code)

    def __iter__(self) -> Iterator[Bizproc]:
        return iter(self.by_code.values())


def load_declarations(specs: Sequence[str]) -> Declarations:
    """`MODULE:NAME` each: a `Robot` or `Activity`, a `RobotConsumer` class, or a list of them."""
    found: list[Bizproc] = []
    for spec in specs:
        module_name, sep, name = spec.partition(":")
        if not sep or not module_name or not name:
            raise ConfigError(f"B24QUEUE_BIZPROC: {spec!r}: expected MODULE:NAME")
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(f"B24QUEUE_BIZPROC: cannot import {module_name!r}: {exc}") from None
        value = getattr(module, name, None)
        items = value if isinstance(value, list | tuple) else [value]
        for item in items:
            if isinstance(item, type) and issubclass(item, RobotConsumer):
                item = item._declared()
            if not isinstance(item, Bizproc):
                raise ConfigError(
                    f"B24QUEUE_BIZPROC: {spec!r} is not a Robot, an Activity, a RobotConsumer "
                    "or a list of them"
                )
            found.append(item)
    return Declarations(found)


# -- the ingress side ---------------------------------------------------------------------------


def is_call(payload: Mapping[str, Any]) -> bool:
    """A robot or activity call: `event_token`, `workflow_id` and `code`, and no `event`."""
    return "event" not in payload and all(
        k in payload for k in ("event_token", "workflow_id", "code")
    )


def as_event(payload: dict[str, Any], declared: Declarations) -> dict[str, Any]:
    """The call as an event the rest of the path takes: its body plus `event`, the declaration's
    routing key. A call whose code the app does not declare is refused (`BadEventError`): no
    consumer would take it, and the workflow would wait for an answer that never comes."""
    for key, pattern in (("event_token", EVENT_TOKEN), ("workflow_id", WORKFLOW_ID)):
        value = payload.get(key)
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise BadEventError(f"{key}: not a Bitrix24 {key}", field=key)
    code = payload.get("code")
    if not isinstance(code, str) or len(code) > MAX_CODE or not CODE.fullmatch(code):
        raise BadEventError(
            "code: not a robot or activity code this app could declare", field="code"
        )
    found = declared.by_code.get(code)
    if found is None:
        raise BadEventError(
            f"code: {code!r} is not a robot or activity this app declares (B24QUEUE_BIZPROC)",
            field="code",
        )
    return {**payload, "event": found.routing_key}


# -- the worker side ----------------------------------------------------------------------------


def answer_of(declared: Bizproc, result: Any) -> str:
    """The handler's return values as the JSON kept with the message; `Reject` (dead-letter now)
    for what cannot be sent: not a dict, undeclared keys, a value not of its property's type
    (`_typed`), too large."""
    values = {} if result is None else result
    if not isinstance(values, Mapping):
        raise Reject(f"{declared.routing_key}: handle returned {type(result).__name__}, not a dict")
    unknown = [str(k)[:64] for k in values if k not in declared.return_properties]
    if unknown:
        raise Reject(
            f"{declared.routing_key}: handle returned {', '.join(unknown)}, not among its "
            f"return_properties ({', '.join(declared.return_properties) or 'none'})"
        )
    values = {
        k: _typed(declared, k, p, values[k])
        for k, p in declared.return_properties.items()
        if k in values
    }
    try:
        text = json.dumps(values, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise Reject(f"{declared.routing_key}: return values are not JSON: {exc}") from None
    if len(text) > MAX_RESULT_CHARS:
        raise Reject(f"{declared.routing_key}: return values over {MAX_RESULT_CHARS} characters")
    return text


_SCALARS = (str, int, float, bool)


def _typed(declared: Bizproc, key: str, prop: Property, value: Any) -> Any:
    """A return value as Bitrix24 takes it for its property: `bool` as "Y"/"N"; `int` an integer
    (or its digits), `double` a number; a list only for a `multiple` property; None passes."""
    if value is None:
        return None
    if isinstance(value, list | tuple):
        if not prop.multiple:
            raise Reject(f"{declared.routing_key}: {key} is a list, and its property not multiple")
        return [_one(declared, key, prop, v) for v in value]
    return _one(declared, key, prop, value)


def _one(declared: Bizproc, key: str, prop: Property, value: Any) -> Any:
    kind = prop.type
    if kind == "bool" and isinstance(value, bool):
        return "Y" if value else "N"
    ok = isinstance(value, _SCALARS)
    if kind == "int":
        ok = (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, str) and value.lstrip("-").isdigit()
        )
    elif kind == "double":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        ok = ok or (isinstance(value, str) and _is_number(value))
    if not ok:
        raise Reject(
            f"{declared.routing_key}: {key} is a {type(value).__name__}, not a value of type {kind}"
        )
    return value


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


class TokenGone(Reject):
    """bizproc.event.send answered ACCESS_DENIED: the event token is invalid or expired
    (b24restdocs, bizproc.event.send), so the workflow no longer waits for this call."""


async def send_answer(portal: Portal, event: Event, kept: str) -> None:
    """`bizproc.event.send` with the kept return values; `TokenGone` for ACCESS_DENIED."""
    params = {"EVENT_TOKEN": call_of(event).event_token, "RETURN_VALUES": json.loads(kept)}
    try:
        await portal.call("bizproc.event.send", params)
    except PortalError as exc:
        if exc.code != TOKEN_GONE:
            raise
        raise TokenGone(
            "bizproc.event.send: ACCESS_DENIED: the workflow no longer waits for this call "
            "(its event token is spent or expired)"
        ) from None


async def give_up(portal: Portal, declared: Bizproc, event: Event, reason: str) -> str:
    """Tell the workflow its call was dead-lettered, as the declaration says; what was done
    (the `H_WORKFLOW_TOLD` header)."""
    if not declared.use_subscription:
        return "not told: the call does not wait for an answer (use_subscription=False)"
    token = call_of(event).event_token
    message = (declared.give_up_log or "").replace("{reason}", reason)[:MAX_LOG_MESSAGE]
    try:
        if declared.give_up_values is not None:
            values = declared.give_up_values
            params: dict[str, Any] = {"EVENT_TOKEN": token, "RETURN_VALUES": values}
            if message:
                params["LOG_MESSAGE"] = message
            await portal.call("bizproc.event.send", params)
            return "error result sent (bizproc.event.send)"
        if message:
            params = {"EVENT_TOKEN": token, "LOG_MESSAGE": message}
            await portal.call("bizproc.activity.log", params)
            return "log line written (bizproc.activity.log); the workflow still waits"
    except Exception as exc:  # the dead letter stands; say why the workflow was not told
        code = getattr(exc, "code", type(exc).__name__)
        return f"not told: {str(code)[:64]}"
    return "not told: the declaration sends nothing (give_up_values and give_up_log are None)"


def declared_of(consumer: EventConsumer) -> Bizproc | None:
    return consumer.bizproc if isinstance(consumer, RobotConsumer) else None


# -- registration on a portal -------------------------------------------------------------------

MAX_LISTED = 1000  # codes read from a portal's .list answer
ADDED, UPDATED = "added", "updated"


async def register(
    portal: Portal, declared: Declarations, handler: str, *, dry_run: bool = False
) -> list[tuple[str, str, str]]:
    """Each declaration on the portal: added when `.list` does not name it, else updated (the
    list gives codes only, so the fields are sent again: a changed name or property reaches
    every portal). Codes the app registered and no longer declares are left alone (deleting a
    robot breaks the workflows that use it): reported as `not declared`. Returns (action, routing
    key or code, outcome) per step; with `dry_run`, what would be done, nothing changed."""
    done: list[tuple[str, str, str]] = []
    for kind in ("robot", "activity"):
        mine = [d for d in declared if d.method == f"bizproc.{kind}"]
        if not mine:
            continue
        method = f"bizproc.{kind}"
        try:
            answer = await portal.call(f"{method}.list")
        except PortalError as exc:  # e.g. ACCESS_DENIED: not an administrator's token
            done.append(("list", f"{method}.list", exc.code))
            continue
        listed = answer[:MAX_LISTED] if isinstance(answer, list) else []
        present = {str(code)[:MAX_CODE] for code in listed}
        for d in mine:
            action = "update" if d.code in present else "add"
            if dry_run:
                done.append((f"would {action}", d.routing_key, ""))
                continue
            done.append((action, d.routing_key, await _register_one(portal, d, handler, action)))
        for code in sorted(present - {d.code for d in mine}):
            done.append(("leave", f"{kind.upper()}.{code.upper()}", "not declared"))
    return done


async def _register_one(portal: Portal, d: Bizproc, handler: str, action: str) -> str:
    try:
        if action == "add":
            await portal.call(f"{d.method}.add", {"CODE": d.code, **d.fields(handler)})
            return ADDED
        await portal.call(f"{d.method}.update", {"CODE": d.code, "FIELDS": d.fields(handler)})
        return UPDATED
    except PortalError as exc:
        return exc.code


def registered_ok(done: Iterable[tuple[str, str, str]]) -> bool:
    return all(o in (ADDED, UPDATED, "", "not declared") for _, _, o in done)
