"""Named, robust connections to RabbitMQ, and the translation of aio-pika's errors."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aio_pika
from aio_pika.abc import AbstractRobustConnection
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_delay,
    stop_never,
    wait_exponential,
)
from yarl import URL

from b24queue.errors import BrokerUnavailableError, ConfigError
from b24queue.settings import Settings
from b24queue.transports.amqp import internals

log = logging.getLogger(__name__)

Connection = AbstractRobustConnection

# Raised by aio-pika/aiormq for a connection that is down, going down or not there yet.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    aio_pika.exceptions.AMQPConnectionError,
    aio_pika.exceptions.ChannelInvalidStateError,
    aio_pika.exceptions.ChannelClosed,
    ConnectionError,
    OSError,
)
CONNECT_ERRORS: tuple[type[BaseException], ...] = (*TRANSIENT_ERRORS, TimeoutError)
# What a confirmed publish can fail with: the above, a nack, or a return (unroutable).
PUBLISH_ERRORS: tuple[type[BaseException], ...] = (
    *TRANSIENT_ERRORS,
    aio_pika.exceptions.DeliveryError,
)


class FailoverConnection(internals.ConnectionHooks):
    """A robust connection to one of several nodes of a cluster: each (re)connection tries them
    in turn, starting after the node that was lost, so a node that goes away is left for the
    next one (channels, consumers and the connection's name restored as aio-pika does).
    Options in the query of the first URL apply to all."""

    def __init__(self, urls: list[str], **kwargs: Any) -> None:
        first = URL(urls[0])
        super().__init__(first, **kwargs)
        # aiormq reads some options (TLS files, heartbeat) from the URL it connects to: every
        # node gets the first URL's, unless it names its own.
        self._urls = [first] + [
            URL(u).with_query({**dict(first.query), **dict(URL(u).query)}) for u in urls[1:]
        ]
        self._at = 0  # the node to try first

    async def connect_attempt(self) -> None:
        failures: list[Exception] = []
        for at in [(self._at + step) % len(self._urls) for step in range(len(self._urls))]:
            self.url = self._urls[at]
            try:
                await super().connect_attempt()
            except Exception as exc:  # whatever failed on this node, the next may do
                failures.append(exc)
                continue
            self._at = at
            return
        self._at = (self._at + 1) % len(self._urls)
        # A node that refused the credentials says more than one that is down.
        refused = [
            e for e in failures if isinstance(e, aio_pika.exceptions.ProbableAuthenticationError)
        ]
        raise (refused or failures)[-1]

    def lost(self) -> None:
        self._at = (self._at + 1) % len(self._urls)  # the node we were on went away


async def connect_once(settings: Settings, name: str) -> AbstractRobustConnection:
    """One attempt (over every node, each bounded by `connect_timeout_s`); later drops
    reconnect by themselves."""
    connection = FailoverConnection(
        settings.amqp_urls,
        client_properties={"connection_name": name},
        reconnect_interval=settings.reconnect_interval_s,
    )
    try:
        await connection.connect(timeout=settings.connect_timeout_s)
        return connection
    except aio_pika.exceptions.ProbableAuthenticationError as exc:
        await close_quietly(connection)
        where = settings.redacted_broker_url()
        raise ConfigError(f"RabbitMQ at {where} refused the credentials or vhost: {exc}") from None
    except CONNECT_ERRORS as exc:
        await close_quietly(connection)
        where = settings.redacted_broker_url()
        raise BrokerUnavailableError(
            f"cannot reach RabbitMQ at {where}: {exc or type(exc).__name__}"
        ) from None


async def connect(
    settings: Settings, name: str, *, give_up_after_s: float | None = None
) -> AbstractRobustConnection:
    """Connect, retrying with backoff; forever when `give_up_after_s` is None.

    Only the first connection needs this loop: once connected, the robust connection reconnects
    (and restores channels, queues and consumers) on its own.
    """
    stop = stop_after_delay(give_up_after_s) if give_up_after_s is not None else stop_never
    failures = 0
    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type(BrokerUnavailableError),
        wait=wait_exponential(multiplier=settings.reconnect_interval_s, max=10),
        stop=stop,
        reraise=True,
    ):
        with attempt:
            try:
                connection = await connect_once(settings, name)
            except BrokerUnavailableError as exc:
                failures += 1
                if failures == 1 or failures % 10 == 0:
                    log.warning("%s (attempt %d, retrying)", exc, failures)
                raise
    if failures:
        log.info("connected to RabbitMQ after %d failed attempts", failures)
    return connection


async def close_quietly(connection: AbstractRobustConnection | None) -> None:
    if connection is None or connection.is_closed:
        return
    try:
        await asyncio.wait_for(connection.close(), timeout=5)
    except Exception as exc:  # closing a dead connection must not mask why we are closing
        log.debug("closing connection failed: %r", exc)
