"""Every transport b24queue knows, one descriptor each: the table a new transport joins (its
descriptor in `DESCRIPTORS`, its settings among the bases of `TransportSettings`; a test checks
that the two agree). B24QUEUE_BROKER_URL's scheme picks one; an empty URL is RabbitMQ at
B24QUEUE_AMQP_URL."""

from __future__ import annotations

from b24queue.transports.amqp.descriptor import AMQP, AmqpSettings
from b24queue.transports.descriptor import TransportDescriptor, url_scheme
from b24queue.transports.kafka.descriptor import KAFKA, KafkaSettings
from b24queue.transports.postgres.descriptor import POSTGRES, PostgresSettings
from b24queue.transports.redis_streams.descriptor import REDIS, RedisSettings
from b24queue.transports.sqlite.descriptor import SQLITE, SqliteSettings

DESCRIPTORS: tuple[TransportDescriptor, ...] = (AMQP, POSTGRES, REDIS, KAFKA, SQLITE)
DEFAULT = AMQP


class TransportSettings(
    AmqpSettings, PostgresSettings, RedisSettings, KafkaSettings, SqliteSettings
):
    """Each transport's own settings (B24QUEUE_<TRANSPORT>_*), all of them in `Settings`."""


_BY_SCHEME = {scheme: d for d in DESCRIPTORS for scheme in d.schemes}
_BY_NAME = {d.name: d for d in DESCRIPTORS}


def descriptor_of(url: str) -> TransportDescriptor:
    """The transport a broker URL names (an empty URL, or an unknown scheme: the default)."""
    return _BY_SCHEME.get(url_scheme(url), DEFAULT)


def named(name: str) -> TransportDescriptor:
    return _BY_NAME[name]


def check_broker_url(value: str) -> str:
    """The URL as its transport keeps it; ValueError saying what it should look like."""
    if not value:
        return value
    found = _BY_SCHEME.get(url_scheme(value))
    if found is None:
        shapes = [d.shape for d in DESCRIPTORS]
        listed = f"{', '.join(shapes[:-1])} or {shapes[-1]}"
        raise ValueError(f"unknown transport {url_scheme(value)!r}: use {listed}")
    return found.check_url(value)
