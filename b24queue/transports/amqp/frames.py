"""The wire bytes of one event's publish (Basic.Publish, its content header, its body frames),
built directly instead of through pamqp's generic encoder.

On the ingress's hot path pamqp spent most of the publish's CPU walking its frame classes for
bytes that are nearly constant: the same exchange, the same fixed properties, three short headers.
`publish_frames` writes exactly what `pamqp.frame.marshal` writes for the same frames (a test
compares them byte for byte) and raises `ValueError` for anything it does not cover, so the
caller can take pamqp's path instead.
"""

from __future__ import annotations

import struct
from datetime import UTC, datetime
from functools import lru_cache

from pamqp import commands

from b24queue import _constants as c

_FRAME_METHOD, _FRAME_HEADER, _FRAME_BODY = 1, 2, 3
_FRAME_END = b"\xce"
_BASIC_CLASS, _PUBLISH_METHOD = 60, 40
_PERSISTENT = 2

# Basic.Properties flags, in pamqp's order: the properties `properties_for` sets.
_CONTENT_TYPE = 1 << 15
_CONTENT_ENCODING = 1 << 14
_HEADERS = 1 << 13
_DELIVERY_MODE = 1 << 12
_MESSAGE_ID = 1 << 7
_TIMESTAMP = 1 << 6
_TYPE = 1 << 5
_APP_ID = 1 << 3
_FLAGS = (
    _CONTENT_TYPE
    | _CONTENT_ENCODING
    | _HEADERS
    | _DELIVERY_MODE
    | _MESSAGE_ID
    | _TIMESTAMP
    | _TYPE
    | _APP_ID
)

_frame_head = struct.Struct(">BHI").pack
_uint32 = struct.Struct(">I").pack
_uint64 = struct.Struct(">Q").pack


def _short(text: str) -> bytes:
    raw = text.encode()
    if len(raw) > 255:
        raise ValueError("a short string over 255 bytes")
    return bytes((len(raw),)) + raw


def _long(text: str) -> bytes:
    raw = text.encode()
    return _uint32(len(raw)) + raw


@lru_cache(maxsize=16)
def _publish_head(exchange: str) -> bytes:
    """The method frame's payload up to the routing key. pamqp checks the exchange's name (at
    most 127 characters, its character set) and raises ValueError."""
    commands.Basic.Publish(exchange=exchange)
    return struct.pack(">HHH", _BASIC_CLASS, _PUBLISH_METHOD, 0) + _short(exchange)


_MANDATORY = b"\x01"  # the bits after the routing key: mandatory=1, immediate=0


# Fixed properties before the headers table, and after the variable ones.
_PROPS_HEAD = struct.pack(">H", _FLAGS) + _short(c.CONTENT_TYPE) + _short("utf-8")
_PROPS_TAIL = _short(c.APP_ID)
_HEADER_CLASS = struct.pack(">HH", _BASIC_CLASS, 0)


def _table(headers: dict[str, str]) -> bytes:
    """An AMQP field table of string values (pamqp: keys sorted, values as long strings `S`)."""
    parts = []
    for key, value in sorted(headers.items()):
        if not isinstance(value, str) or len(key.encode()) > 128:
            raise ValueError("a header pamqp would encode differently")
        parts.append(_short(key) + b"S" + _long(value))
    table = b"".join(parts)
    return _uint32(len(table)) + table


def _seconds(timestamp: datetime) -> int:
    if timestamp.tzinfo is None or timestamp.tzinfo.utcoffset(timestamp) is None:
        timestamp = timestamp.replace(tzinfo=UTC)  # as pamqp: a naive time is UTC
    return int(timestamp.timestamp())


def publish_frames(
    *,
    channel: int,
    max_content_size: int,
    exchange: str,
    routing_key: str,
    body: bytes,
    headers: dict[str, str],
    message_id: str,
    timestamp: datetime,
    message_type: str,
) -> bytes:
    """Basic.Publish (mandatory), its content header and body frames, as one byte string.

    `max_content_size` is the channel's (frame_max - 8): a body longer than it is split."""
    if not body:
        raise ValueError("an empty body")  # aiormq sends no body frame then; we never publish one
    method = _publish_head(exchange) + _short(routing_key) + _MANDATORY
    props = b"".join(
        (
            _PROPS_HEAD,
            _table(headers),
            bytes((_PERSISTENT,)),
            _short(message_id),
            _uint64(_seconds(timestamp)),
            _short(message_type),
            _PROPS_TAIL,
        )
    )
    header = _HEADER_CLASS + _uint64(len(body)) + props
    parts = [
        _frame_head(_FRAME_METHOD, channel, len(method)),
        method,
        _FRAME_END,
        _frame_head(_FRAME_HEADER, channel, len(header)),
        header,
        _FRAME_END,
    ]
    for start in range(0, len(body), max_content_size):
        chunk = body[start : start + max_content_size]
        parts += (_frame_head(_FRAME_BODY, channel, len(chunk)), chunk, _FRAME_END)
    return b"".join(parts)
