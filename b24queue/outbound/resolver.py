"""The resolver of every aiohttp session that calls a portal (the install call-back's, the
portal clients'): a portal's name must not lead to a private address. The names come from
requests or from installs, and a name can be re-pointed at any time, so the address is judged
when connecting (DNS rebinding cannot slip past a check made earlier)."""

from __future__ import annotations

import socket
from collections.abc import Callable

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from b24queue.outbound.hosts import is_public_address

# (host, the private address it resolved to) -> the caller's own error, raised as it is through
# aiohttp to the caller. Never an OSError: aiohttp would make a connection error of that.
Refusal = Callable[[str, str], Exception]


class GuardedResolver(AbstractResolver):
    """Refuses to connect to private addresses (unless `allow_private`), whatever the name
    resolves to at that moment. `inner`: the resolver asked (aiohttp's default if None)."""

    def __init__(
        self, inner: AbstractResolver | None, *, allow_private: bool, refuse: Refusal
    ) -> None:
        self._inner = inner or aiohttp.DefaultResolver()
        self._allow_private = allow_private
        self._refuse = refuse

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if not self._allow_private:
            for r in results:
                if not is_public_address(r["host"]):
                    raise self._refuse(host, r["host"])
        return results

    async def close(self) -> None:
        await self._inner.close()
