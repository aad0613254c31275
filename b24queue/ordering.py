"""Order within an entity (`EventConsumer.ordering_key`, `ordering`; docs/fairness.md): which
events of a consumer's queue share an order, as the queue stores it. No I/O here.

An event's key is read by the worker from the event (a dotted path into it, or a function of it)
the first time a claim of its queue meets its row, and kept in that row (`order_key`): the key of
a consumer is a property of that consumer's code, which the ingress does not load. What a row
keeps is its group: the portal and the key together (a deal 42 of one portal is not another's),
or "" for an event with no key (no key, no order: it runs as any other event).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from b24queue.events.event import Event

log = logging.getLogger(__name__)

# Longer keys are cut: events whose keys are alike up to here share one order (more order, never
# less). Bitrix24's ids are a few digits.
MAX_ORDER_KEY_CHARS = 128
STRICT, LENIENT = "strict", "lenient"
RULES = (STRICT, LENIENT)
# Coalescing: at most this many earlier events of a key are settled with the latest in one
# delivery (more wait for the next).
MAX_COALESCED = 100
NO_KEY = ""
KeyOf = Callable[[Event], object]


def path_reader(path: str) -> KeyOf:
    """`data.FIELDS.ID` as a function of the event: the value at that path of its payload, or
    None where a step is missing or not a mapping."""
    steps = path.split(".")

    def read(event: Event) -> object:
        value: Any = event.payload
        for step in steps:
            if not isinstance(value, dict):
                return None
            value = value.get(step)
        return value

    return read


def check_path(path: str) -> str | None:
    """Why `path` is not a dotted path into the event (None: it is)."""
    if not path or len(path) > 200:
        return "must be a dotted path such as 'data.FIELDS.ID' (at most 200 characters)"
    if any(not step or step != step.strip() for step in path.split(".")):
        return f"{path!r} has an empty step: a dotted path such as 'data.FIELDS.ID'"
    return None


def as_key(value: object) -> str:
    """A key read from an event, as the row keeps it: text (an int as its digits), cut to
    `MAX_ORDER_KEY_CHARS`; anything else (None, "", a list, a mapping) is no key. Text a database
    cannot store (a NUL, which PostgreSQL's text refuses; a lone surrogate, which is not UTF-8)
    is kept as a digest of all of it (`storable`): the same key, the same digest."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        return NO_KEY
    text = str(value)
    return storable(text) if text and not _stores(text) else text[:MAX_ORDER_KEY_CHARS]


def storable(text: str) -> str:
    """`text` as text every database stores: itself when it can, else 'sha256:' and the hex
    digest of its UTF-8 with surrogates passed through (one text, always the same digest)."""
    if _stores(text):
        return text
    return "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _stores(text: str) -> bool:
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class Ordering:
    """A consumer's order within an entity. `key` None: none (rows are not keyed at all)."""

    key: KeyOf | None = None
    strict: bool = True
    name: str = ""  # the consumer's class, for the log
    coalesce: bool = False  # the key's waiting events handed over as the latest

    @property
    def on(self) -> bool:
        return self.key is not None

    def group(self, portal: str, body: bytes) -> str:
        """What the row of an event with this `body` in `portal` keeps: "" for no key; always
        text the database stores (`storable`), so no row's key fails the claim that keys it. A
        key function that raises, or a body that is not an event, gives no key (logged, without
        the event: it may hold personal data)."""
        assert self.key is not None
        try:
            key = as_key(self.key(Event.from_json(body)))
            return storable(f"{len(portal)}:{portal}:{key}") if key else NO_KEY
        except Exception as exc:
            log.warning("%s.ordering_key failed (%s): the event has no key", self.name, type(exc))
            return NO_KEY
