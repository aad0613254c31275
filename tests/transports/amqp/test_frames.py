"""The frames built directly are pamqp's, byte for byte (`frames.publish_frames`, the ack)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest
from pamqp import commands, frame
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from b24queue.events.envelope import Envelope, envelope_for
from b24queue.events.event import parse_event
from b24queue.testing import make_event
from b24queue.transports.amqp import fast_consume
from b24queue.transports.amqp.frames import publish_frames
from b24queue.transports.amqp.publisher import properties_for
from tests.support.samples import SAMPLE_NAMES, sample_form

FRAME_MAX = 131072  # RabbitMQ's default


def pamqp_frames(envelope: Envelope, channel: int, exchange: str, max_content_size: int) -> bytes:
    """What aiormq's basic_publish writes for the same publish (frames marshalled by pamqp)."""
    body = envelope.body
    frames: list[frame.FrameTypes] = [
        commands.Basic.Publish(exchange=exchange, routing_key=envelope.routing_key, mandatory=True),
        ContentHeader(properties=properties_for(envelope), body_size=len(body)),
    ]
    frames += [
        ContentBody(body[i : i + max_content_size]) for i in range(0, len(body), max_content_size)
    ]
    return b"".join(frame.marshal(f, channel) for f in frames)


def ours(envelope: Envelope, channel: int, exchange: str, max_content_size: int) -> bytes:
    return publish_frames(
        channel=channel,
        max_content_size=max_content_size,
        exchange=exchange,
        routing_key=envelope.routing_key,
        body=envelope.body,
        headers=envelope.headers,
        message_id=envelope.message_id,
        timestamp=envelope.timestamp,
        message_type=envelope.event_type,
    )


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_every_sample_gives_pamqps_bytes(name: str) -> None:
    envelope = envelope_for(parse_event("application/x-www-form-urlencoded", sample_form(name)))
    for channel, exchange in ((1, "b24.events"), (65535, "x" * 127), (7, "")):
        assert ours(envelope, channel, exchange, FRAME_MAX - 8) == pamqp_frames(
            envelope, channel, exchange, FRAME_MAX - 8
        )


@pytest.mark.parametrize("size", [1, 4087, 4088, 4089, 3 * 4088, 100_000])
def test_bodies_split_across_frames_as_aiormq_splits_them(size: int) -> None:
    envelope = replace(envelope_for(make_event("ONCRMDEALADD")), body=b"\xd0" * size)
    assert ours(envelope, 3, "b24.events", 4096 - 8) == pamqp_frames(
        envelope, 3, "b24.events", 4096 - 8
    )


def test_headers_of_every_kind_we_send() -> None:
    base = envelope_for(make_event("ONCRMDEALADD", domain="пример.рф"))
    cases = [
        {},  # an event without domain or member_id
        {"b24-domain": "пример.рф", "b24-member-id": "m" * 500, "b24-event-handler-id": "42"},
        {"z": "", "a": "1", "m": "ü" * 300},  # sorted by key, as pamqp does
    ]
    for headers in cases:
        envelope = replace(base, headers=headers)
        assert ours(envelope, 1, "b24.events", FRAME_MAX - 8) == pamqp_frames(
            envelope, 1, "b24.events", FRAME_MAX - 8
        )


def test_timestamps_naive_and_aware_and_event_types_as_pamqp() -> None:
    base = envelope_for(make_event("ONIMBOTMESSAGEADD"))
    for stamp in (
        datetime(2026, 11, 29, 12, 0, 0, 999_999),  # naive: taken as UTC
        datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC),
        datetime(1970, 1, 1, tzinfo=UTC),
    ):
        envelope = replace(base, timestamp=stamp, event_type="É" * 100, message_id="x" * 255)
        assert ours(envelope, 2, "b24.events", FRAME_MAX - 8) == pamqp_frames(
            envelope, 2, "b24.events", FRAME_MAX - 8
        )


@pytest.mark.parametrize(
    "change",
    [
        {"routing_key": "K" * 256},
        {"message_id": "é" * 128},  # 256 bytes
        {"event_type": "T" * 256},
        {"body": b""},
        {"exchange": "x" * 128},
        {"exchange": "no/é"},  # pamqp refuses the é
        {"headers": {"k" * 129: "v"}},  # pamqp would cut the key: not ours to imitate
    ],
)
def test_what_it_does_not_cover_is_a_valueerror(change: dict[str, object]) -> None:
    exchange = str(change.pop("exchange", "b24.events"))
    envelope = replace(envelope_for(make_event("ONCRMDEALADD")), **change)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ours(envelope, 1, exchange, FRAME_MAX - 8)


@pytest.mark.parametrize("channel", [1, 2, 65535])
@pytest.mark.parametrize("tag", [1, 255, 2**32 + 1, 2**63 - 1])
def test_the_worker_s_ack_frame_is_pamqp_s(channel: int, tag: int) -> None:
    assert fast_consume.ack_frame(channel, tag) == frame.marshal(
        commands.Basic.Ack(delivery_tag=tag), channel
    )
