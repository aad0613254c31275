"""`PortalClients`: the portal clients of one worker process, handed to every consumer
(`EventConsumer.portal(event)`). It owns two HTTP sessions: the portals' (a pool per portal host,
each of at most `CONNECTIONS_PER_HOST`) and the OAuth server's (every portal's token refresh goes
to that one host: not held to a portal's share), the portal store and the shared limits; nothing
connects until a handler calls a portal."""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable

import aiohttp
from aiohttp.abc import AbstractResolver

from b24queue.auth.store import TokenStore, open_store
from b24queue.errors import ConfigError
from b24queue.events.event import Event
from b24queue.outbound.answers import AnswerBudget
from b24queue.outbound.hosts import is_ip_literal
from b24queue.outbound.resolver import GuardedResolver
from b24queue.portal.api import NoObserver, PortalError, PortalObserver
from b24queue.portal.client import Context, PortalClient
from b24queue.portal.credentials import Webhooks, host_of
from b24queue.portal.limits import Limit
from b24queue.portal.oauth import Refresher
from b24queue.portal.state import SharedState, open_state
from b24queue.settings import Settings

CONNECTIONS = 100  # across every portal of the process; per host Bitrix24's limit is lower
CONNECTIONS_PER_HOST = 10  # one slow (or hostile) portal cannot hold every connection
OAUTH_CONNECTIONS = 100  # to the OAuth server, apart from the portals' (refreshes of every portal)


class PortalClients:
    """`async with PortalClients(settings) as clients: clients.for_event(event)`."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: TokenStore | None = None,
        state: SharedState | None = None,
        resolver: AbstractResolver | None = None,
        ssl_context: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.time,
        observer: PortalObserver | None = None,
    ) -> None:
        self._settings = settings
        self._observer = observer or NoObserver()
        self._store, self._own_store = store, store is None
        self._state, self._own_state = state, state is None
        self._resolver = resolver
        self._ssl = ssl_context
        self._clock = clock
        self._webhooks = Webhooks(settings.portal_webhooks.get_secret_value())
        if not settings.portal_allow_private:
            # aiohttp connects to an address as it is, past the guarded resolver.
            for host, setting in (
                (host_of(settings.oauth_url), "B24QUEUE_OAUTH_URL"),
                *((h, "B24QUEUE_PORTAL_WEBHOOKS") for h in sorted(self._webhooks.hostnames)),
            ):
                if is_ip_literal(host):
                    raise ConfigError(
                        f"{setting}: an IP address, not a name, needs "
                        "B24QUEUE_PORTAL_ALLOW_PRIVATE=true"
                    )
        burst, drain = settings.portal_limits
        self._limit = Limit(burst, drain, settings.portal_max_wait_s)
        self._context: Context | None = None
        self._oauth_session: aiohttp.ClientSession | None = None

    @property
    def refresher(self) -> Refresher:
        assert self._context is not None, "use `async with PortalClients(...)`"
        return self._context.refresher

    async def __aenter__(self) -> PortalClients:
        s = self._settings
        store = self._store or open_store(s.portal_store)
        state = self._state or open_state(s.portal_store)
        ssl_context = self._ssl or ssl.create_default_context(cafile=s.portal_ca_file or None)
        resolver = GuardedResolver(
            self._resolver, allow_private=s.portal_allow_private, refuse=_unreachable
        )
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                resolver=resolver,
                ssl=ssl_context,
                limit=CONNECTIONS,
                limit_per_host=CONNECTIONS_PER_HOST,
            ),
            timeout=aiohttp.ClientTimeout(total=s.portal_call_timeout_s),
        )
        # The OAuth server is one host for every portal: with hundreds of tokens expiring
        # together, a portal's share of connections would time their refreshes out.
        self._oauth_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                resolver=resolver, ssl=ssl_context, limit=OAUTH_CONNECTIONS
            ),
        )
        refresher = Refresher(self._oauth_session, store, state, s, self._clock, self._observer)
        # One for the process (a worker has one PortalClients): its portals' answers.
        budget = AnswerBudget(s.portal_answers_budget_bytes, "B24QUEUE_PORTAL_ANSWERS_BUDGET_BYTES")
        self._store, self._state = store, state
        self._context = Context(
            session, store, state, refresher, self._limit, self._webhooks, self._observer,
            s.portal_allow_private, s.portal_answer_bounds, budget,
        )  # fmt: skip
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._context is not None:
            await self._context.refresher.close()
            await self._context.session.close()
            self._context = None
        if self._oauth_session is not None:
            await self._oauth_session.close()
            self._oauth_session = None
        if self._own_state and self._state is not None:
            await self._state.close()
        if self._own_store and self._store is not None:
            await self._store.close()

    def for_event(self, event: Event) -> PortalClient:
        if self._context is None:
            raise RuntimeError("use `async with PortalClients(...)` first")
        return PortalClient(self._context, event)


def _unreachable(host: str, address: str) -> PortalError:
    """A portal's name that leads to a private address (the store's domains came from installs,
    and names can be re-pointed later)."""
    return PortalError("UNREACHABLE", f"{host[:100]} resolves to a private address")
