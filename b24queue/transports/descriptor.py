"""What b24queue knows of a transport before loading it: the one record a transport registers
(`b24queue.transports.registry`). Pure data and pure functions of text: reading it imports no
client library, so the settings can check a broker URL for any transport."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import BaseModel

if TYPE_CHECKING:
    from b24queue.settings import Settings


def _kept(url: str) -> str:
    return url


def _broker_url(settings: Settings) -> str:
    return settings.broker_url


@dataclass(frozen=True, slots=True)
class TransportDescriptor:
    name: str  # what `Settings.transport` says: "postgres"
    schemes: tuple[str, ...]  # the B24QUEUE_BROKER_URL schemes that name it
    shape: str  # what its URL looks like, for an error
    settings: type[BaseModel]  # its own settings (B24QUEUE_<NAME>_*), a base of `Settings`
    # Its client library's top-level module, if it needs one b24queue does not depend on: the
    # pip extra named after the transport installs it (`b24queue[postgres]`).
    client: str = ""
    # The URL as kept; a ValueError saying what it should look like.
    check_url: Callable[[str], str] = _kept
    # The URL naming its server (for a log line or an error, once redacted).
    server_url: Callable[[Settings], str] = _broker_url
    # The settings holding URLs whose passwords are secrets (B24QUEUE_BROKER_URL always is).
    secret_urls: tuple[str, ...] = ()

    @property
    def module(self) -> str:
        """Whose `transport(settings)` makes it: the `transport` module beside its descriptor
        (where its settings are declared), in its package; imported only when it is used."""
        return f"{self.settings.__module__.rpartition('.')[0]}.transport"


def url_scheme(url: str) -> str:
    return url.split(":", 1)[0].lower()


def needs_authority(shape: str) -> Callable[[str], str]:
    """A URL check: `scheme://...`, else a ValueError showing `shape`."""

    def check(url: str) -> str:
        if not url.split(":", 1)[1].startswith("//"):
            raise ValueError(f"must look like {shape}")
        return url

    return check
