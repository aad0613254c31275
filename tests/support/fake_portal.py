"""A fake Bitrix24 portal for tests: answers `app.info` the way the Bitrix24 REST API documents
it, over HTTPS with a self-signed certificate for `*.portal.test`, chosen by the access token:

  good-*      200 {"result": {"CODE": <client id>, ...}}
  split-*     like good-*, the answer written in two pieces 100 ms apart
  paid-*      the same, for a paid app: STATUS "P", PAYMENT_EXPIRED "N", DAYS 365
  wrong-app   200 {"result": {"CODE": "someone.else", ...}}
  expired     401 {"error": "expired_token", "error_description": "The access token ..."}
  error       500 {"error": "INTERNAL_SERVER_ERROR", ...}
  slow        answers after 10 s
  hold-*      waits until `release` is set, then answers like good-*
  redirect    302 to another host
  crowded     like good-*, with 20,000 empty objects beside (60 KB: many values, few bytes)

Any other token the REST side issued (fake_rest.py: OAuth, CRM methods, batch, the leaky bucket,
under `rest`) is answered there, as are /rest/<method> and /oauth/token/. More methods attach to
`rest`: event bindings (fake_events.py), offline events (fake_offline.py), robots and workflow
activities (fake_bizproc.py).

The call-back only ever connects to port 443, which tests cannot listen on: the portal is
published on 443 (`port`, `endpoint()`), listens on a free port (`listen_port`), and
`StaticResolver` maps the one onto the other (aiohttp connects to the port a resolver returns).
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from tests.support.fake_rest import FakeRest

CLIENT_ID = "app.b24queue-test"
PUBLISHED_PORT = 443

# Answers that are always the same, by token.
_FIXED = {
    "wrong-app": (200, json.dumps({"result": {"ID": 5, "CODE": "someone.else"}})),
    "expired": (
        401,
        json.dumps(
            {
                "error": "expired_token",
                "error_description": "The access token provided has expired.",
            }
        ),
    ),
    "crowded": (
        200,
        json.dumps(
            {"result": {"ID": 77, "CODE": CLIENT_ID, "PAD": [{}] * 20_000}}, separators=(",", ":")
        ),
    ),
}

# published port -> the port the running fake portal really listens on
_LISTENING: dict[int, int] = {}


def make_certificate(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "portal.pem", directory / "portal.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            "/CN=portal.test",
            "-addext",
            "subjectAltName=DNS:*.portal.test,DNS:portal.test",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


class StaticResolver(AbstractResolver):
    """Every name resolves to `address` (default 127.0.0.1, where the fake portal listens), and
    port 443 to the port the running fake portal listens on (or as `ports` maps it)."""

    def __init__(self, address: str = "127.0.0.1", ports: Mapping[int, int] | None = None) -> None:
        self.address = address
        self._ports = ports
        self.asked: list[tuple[str, int]] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.asked.append((host, port))
        ports = _LISTENING if self._ports is None else self._ports
        return [
            {
                "hostname": host,
                "host": self.address,
                "port": ports.get(port, port),
                "family": socket.AF_INET6 if ":" in self.address else socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
        ]

    async def close(self) -> None:
        return None


class FakePortal:
    def __init__(self, cert: Path, key: Path) -> None:
        self.calls: list[dict[str, Any]] = []
        self._ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._ssl.load_cert_chain(cert, key)
        self._runner: web.AppRunner | None = None
        self.port = PUBLISHED_PORT
        self.listen_port = 0
        self.release = asyncio.Event()  # lets hold-* answer
        self._arrived = asyncio.Condition()
        self.rest = FakeRest(CLIENT_ID)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/rest/app.info", self.app_info)
        app.router.add_route("POST", "/rest/{user:[0-9]+}/{code}/{method}", self.rest.webhook)
        app.router.add_route("POST", "/rest/{method}", self.rest.rest)
        app.router.add_route("GET", "/oauth/token/", self.rest.oauth)
        self._runner = web.AppRunner(app, shutdown_timeout=0.2)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self._ssl)
        await site.start()
        server = site._server
        assert server is not None
        self.listen_port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        _LISTENING[self.port] = self.listen_port

    async def stop(self) -> None:
        if _LISTENING.get(self.port) == self.listen_port:
            del _LISTENING[self.port]
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    def endpoint(self, domain: str) -> str:
        return f"https://{domain}/rest/"

    async def wait_for_calls(self, count: int, timeout_s: float = 10.0) -> None:
        """Until `count` calls have arrived (held ones included)."""
        async with self._arrived:
            await asyncio.wait_for(
                self._arrived.wait_for(lambda: len(self.calls) >= count), timeout_s
            )

    async def app_info(self, request: web.Request) -> web.Response:
        if request.content_type == "application/json":
            return await self.rest.rest(request)
        form = await request.post()
        token = str(form.get("auth") or request.query.get("auth") or "")
        # host:port as the caller sent it (punycode; 443 when it named no port)
        self.calls.append({"host": f"{request.url.raw_host}:{request.url.port}", "token": token})
        async with self._arrived:
            self._arrived.notify_all()
        if token.startswith("hold"):
            await self.release.wait()
            token = "good"
        if token.startswith("split"):  # a good answer that arrives in two pieces
            answer = json.dumps({"result": {"CODE": CLIENT_ID, "PAD": "x" * 2000}}).encode()
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            await resp.prepare(request)
            await resp.write(answer[:1000])
            await asyncio.sleep(0.1)  # the second piece comes later, as over a slow network
            await resp.write(answer[1000:])
            await resp.write_eof()
            return resp
        if token.startswith("paid"):
            return web.json_response(
                {
                    "result": {
                        "ID": 77,
                        "CODE": CLIENT_ID,
                        "VERSION": 3,
                        "STATUS": "P",
                        "INSTALLED": True,
                        "PAYMENT_EXPIRED": "N",
                        "DAYS": 365,
                        "LANGUAGE_ID": "en",
                    }
                }
            )
        if token.startswith("good"):
            return web.json_response(
                {
                    "result": {
                        "ID": 77,
                        "CODE": CLIENT_ID,
                        "VERSION": 1,
                        "STATUS": "L",
                        "INSTALLED": True,
                        "PAYMENT_EXPIRED": "N",
                        "DAYS": None,
                        "LANGUAGE_ID": "en",
                    },
                    "time": {"start": 1764360000.1, "finish": 1764360000.2},
                }
            )
        if token in _FIXED:
            status, text = _FIXED[token]
            return web.Response(status=status, text=text, content_type="application/json")
        if token == "slow":
            await asyncio.sleep(10)
            return web.json_response({"result": {"CODE": CLIENT_ID}})
        if token == "redirect":
            raise web.HTTPFound("https://elsewhere.portal.test/rest/app.info")
        return web.json_response(
            {"error": "INTERNAL_SERVER_ERROR", "error_description": "Internal server error"},
            status=500,
        )
