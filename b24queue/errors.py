"""One exception family for the framework, and the exit codes of the `b24queue` command.

`Retry` and `Reject` (in `retry`) are control flow for handlers and deliberately not here.
"""

from __future__ import annotations

# What a `b24queue` command exits with: ok, a runtime failure, a usage or configuration error,
# the broker unreachable.
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_BROKER = 0, 1, 2, 3


class B24QueueError(Exception):
    """Base of every error b24queue raises on purpose. `exit_code`: what the CLI exits with."""

    exit_code = EXIT_FAILURE


class ConfigError(B24QueueError):
    """Settings or a consumer class are wrong; the message names the field."""

    exit_code = EXIT_USAGE


class BadEventError(B24QueueError):
    """A request body is not a Bitrix24 event we can accept.

    `field` names the offending key (PHP bracket form, e.g. ``data[FIELDS][ID]``) when one is known.
    """

    exit_code = EXIT_USAGE

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        # The name as the caller sent it, cut short: a key can be as long as the body.
        self.field = field[:200] if field else field


class ModelMismatchError(BadEventError):
    """An event is a Bitrix24 event but not the typed model its consumer asked for
    (`EventConsumer[DealUpdated]`): another event name, or a known field missing or of another
    shape. The message names each field and what was wrong, never the values sent."""


class UnauthorizedError(B24QueueError):
    """The event's application token is not one we accept."""


class BrokerUnavailableError(B24QueueError):
    """The queue's server cannot be reached, or did not take a publish in time."""

    exit_code = EXIT_BROKER


class PublishError(B24QueueError):
    """The broker refused a message (nack) or returned it as unroutable (`returned`).

    `permanent`: refused for the message itself (e.g. larger than the broker takes), so trying
    again would fail the same way; never spooled, never retried as if the broker were down.
    """

    def __init__(self, message: str, *, returned: bool = False, permanent: bool = False) -> None:
        super().__init__(message)
        self.returned = returned
        self.permanent = permanent


class StoreUnavailableError(B24QueueError):
    """The portal token store cannot be read or written now (e.g. Redis down): the event cannot
    be verified, so it is not stored (503), whoever sent it."""


class SpoolFullError(B24QueueError):
    """The ingress's spool holds its maximum: the event cannot be made durable."""


class TopologyMismatchError(B24QueueError):
    """An exchange or queue exists with other arguments than the ones we declare."""

    exit_code = EXIT_USAGE


class ManagementError(B24QueueError):
    """The RabbitMQ management API is unreachable or refused our credentials."""

    exit_code = EXIT_BROKER
