"""The REST side of the fake portal (fake_portal.py serves it): Bitrix24's OAuth token
endpoint, a few methods, `batch`, and the per-portal leaky bucket, with the documented answers:

  over the bucket     503 {"error": "QUERY_LIMIT_EXCEEDED", "error_description": "Too many
                          requests"}
  method out of time  429 {"error": "OPERATION_TIME_LIMIT", ..., "time": {...,
                          "operating_reset_at": ...}} (methods in `time_limited`: 10 minutes
                          on; in `operating_until`: on that host until that unix time)
  token expired       401 {"error": "expired_token", "error_description": "The access token
                          provided has expired."}
  refresh token spent 400 {"error": "invalid_grant", ...} (refresh tokens are single-use)

Tokens are issued here (`issue`) and by the OAuth endpoint; an access token lives
`token_lifetime_s` (3600) unless `expire` ends it. The bucket has Bitrix24's numbers by default
(burst 50, drain 2/s); tests may drain faster, and they count at the fake (`max_level`,
`over_limit`, `served`). Calls are counted per host (the portal), whatever the token.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

from b24queue.events.forms import decode_form

CLIENT_SECRET = "fake-client-secret"
DEALS = 120
PAGE = 50

_ids = itertools.count(1)

Extension = Callable[[str, str, dict[str, Any]], Awaitable[tuple[int, dict[str, Any]] | None]]


def _error(status: int, code: str, description: str) -> web.Response:
    return web.json_response({"error": code, "error_description": description}, status=status)


class FakeRest:
    def __init__(self, client_id: str, *, burst: int = 50, drain_per_s: float = 2.0) -> None:
        self.client_id = client_id
        self.burst, self.drain_per_s = burst, drain_per_s
        self.token_lifetime_s = 3600
        self.tokens: dict[str, tuple[str, float]] = {}  # access token -> (member_id, expires)
        self.refresh_tokens: dict[str, str] = {}  # live refresh token -> member_id
        self.spent: set[str] = set()
        self.refreshes = 0  # successful refreshes
        self.refused_refreshes = 0
        self.buckets: dict[str, tuple[float, float]] = {}  # host -> (level, stamp)
        self.max_level: dict[str, float] = {}
        self.over_limit = 0  # 503s answered
        self.served: list[tuple[str, str, float]] = []  # (host, method, when) of every 200
        self.deal_gets: list[str] = []  # the ids crm.deal.get answered for
        self.used_tokens: list[str] = []  # the access token of every REST call, in order
        self.time_limited: set[str] = set()
        # (host, method) -> the unix time it is free again on that portal
        self.operating_until: dict[tuple[str, str], float] = {}
        self.time_refused: list[tuple[str, str, float]] = []  # (host, method, when) of each 429
        self.webhooks: dict[str, str] = {}  # code -> member_id (its host: <member_id>.portal.test)
        self.deals = {i: {"ID": str(i), "TITLE": f"Deal {i}"} for i in range(1, DEALS + 1)}
        self.oauth_requests = 0  # every request to the token endpoint, answered or not
        self.oauth_arrived = asyncio.Event()  # set at each one
        # When set: the refresh is done (the old refresh token spent, the new pair issued), and
        # the answer waits for this gate, as when it is lost on the way or a server hangs.
        self.oauth_gate: asyncio.Event | None = None
        # More methods, registered by other fakes (fake_offline.py): (host, method,
        # params) -> (status, answer), or None when not theirs.
        self.extensions: list[Extension] = []
        # Answers written as they are (a hostile portal's), by method: the body, or a function
        # of the call's params making it. With `raw_gate` for a method: (n, gate) writes n
        # bytes, waits for the gate, then the rest.
        self.raw: dict[str, bytes | Callable[[dict[str, Any]], bytes]] = {}
        self.raw_gate: dict[str, tuple[int, asyncio.Event]] = {}
        # Methods answered with a redirect: method -> (status, Location).
        self.moved: dict[str, tuple[int, str]] = {}
        # Added to every OAuth answer (a hostile OAuth server's), and a redirect in its place.
        self.oauth_extra: dict[str, Any] = {}
        self.oauth_moved: tuple[int, str] | None = None

    def issue(self, member_id: str, lifetime_s: float | None = None) -> tuple[str, str, int]:
        """A new (access, refresh, expires) for the portal."""
        n = next(_ids)
        access, refresh = f"acc{n:06d}x{member_id}"[:60], f"ref{n:06d}x{member_id}"[:60]
        expires = time.time() + (self.token_lifetime_s if lifetime_s is None else lifetime_s)
        self.tokens[access] = (member_id, expires)
        self.refresh_tokens[refresh] = member_id
        return access, refresh, int(expires)

    def expire(self, access: str) -> None:
        member, _ = self.tokens[access]
        self.tokens[access] = (member, 0.0)

    def valid_refresh_tokens(self, member_id: str) -> list[str]:
        return [r for r, m in self.refresh_tokens.items() if m == member_id]

    # -- the bucket ------------------------------------------------------------------------
    def _admit(self, host: str) -> bool:
        now = time.monotonic()
        level, stamp = self.buckets.get(host, (0.0, now))
        level = max(0.0, level - (now - stamp) * self.drain_per_s)
        if level + 1 > self.burst:
            self.buckets[host] = (level, now)
            self.over_limit += 1
            return False
        self.buckets[host] = (level + 1, now)
        self.max_level[host] = max(self.max_level.get(host, 0.0), level + 1)
        return True

    # -- HTTP ------------------------------------------------------------------------------
    async def rest(self, request: web.Request) -> web.Response:
        method = request.match_info["method"].removesuffix(".json")
        params = await _params(request)
        host = str(request.url.raw_host)
        if not self._admit(host):
            return _error(503, "QUERY_LIMIT_EXCEEDED", "Too many requests")
        token = str(params.pop("auth", ""))
        self.used_tokens.append(token)
        known = self.tokens.get(token)
        if known is None:
            return _error(401, "invalid_token", "The access token provided is invalid.")
        if known[1] < time.time():
            return _error(401, "expired_token", "The access token provided has expired.")
        if method in self.moved or method in self.raw:
            return await self._raw(request, method, params)
        for extension in self.extensions:
            answered = await extension(host, method, params)
            if answered is not None:
                if answered[0] == 200:
                    self.served.append((host, method, time.monotonic()))
                return web.json_response(answered[1], status=answered[0])
        if method == "crm.deal.pieces":  # a large answer, written in two pieces
            return await _in_pieces(request, {"result": {"PAD": "x" * 200_000}})
        if method == "crm.deal.deep":  # nested deeper than a recursive decoder goes
            deep = '{"result":' + "[" * 30_000 + "]" * 30_000 + "}"
            return web.Response(text=deep, content_type="application/json")
        return self._run(host, method, params, token)

    async def _raw(
        self, request: web.Request, method: str, params: dict[str, Any]
    ) -> web.StreamResponse:
        if method in self.moved:
            status, location = self.moved[method]
            return web.Response(status=status, headers={"Location": location})
        made = self.raw[method]
        body = made(params) if callable(made) else made
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        first, gate = self.raw_gate.get(method, (len(body), None))
        await resp.write(body[:first])
        if gate is not None:
            await gate.wait()
        await resp.write(body[first:])
        await resp.write_eof()
        return resp

    async def webhook(self, request: web.Request) -> web.Response:
        method = request.match_info["method"].removesuffix(".json")
        params = await _params(request)
        host = str(request.url.raw_host)
        if not self._admit(host):
            return _error(503, "QUERY_LIMIT_EXCEEDED", "Too many requests")
        member = self.webhooks.get(request.match_info["code"])
        if member is None or host != f"{member}.portal.test":  # a code is its own portal's only
            return _error(401, "INVALID_CREDENTIALS", "Invalid request credentials")
        return self._run(host, method, params)

    def _run(self, host: str, method: str, params: dict[str, Any], token: str = "") -> web.Response:
        now = time.time()
        until = self.operating_until.get((host, method), 0.0)
        if method in self.time_limited or until > now:
            self.time_refused.append((host, method, time.monotonic()))
            reset_at = until if until > now else now + 600
            answer = {
                "error": "OPERATION_TIME_LIMIT",
                "error_description": "Method is blocked due to operation time limit.",
                "time": _time_block(now, reset_at, operating=480.5),
            }
            return web.json_response(answer, status=429)
        status, answer = self.answer(method, params, token)
        if status == 200:
            self.served.append((host, method, time.monotonic()))
        return web.json_response(answer, status=status)

    def answer(
        self, method: str, params: dict[str, Any], token: str = ""
    ) -> tuple[int, dict[str, Any]]:
        if method == "crm.deal.echo":  # an error quoting the request, its token and all
            return 400, {"error": "INVALID_REQUEST", "error_description": f"bad: auth={token}"}
        if method == "crm.deal.get":
            deal = self.deals.get(_int(params.get("id") or params.get("ID")))
            if deal is None:
                return 400, {"error": "NOT_FOUND", "error_description": "Not found"}
            self.deal_gets.append(deal["ID"])
            return 200, {"result": deal}
        if method == "crm.deal.stuck":  # `next` that does not move past the page given
            start = _int(params.get("start"))
            page = [{"ID": str(start + i)} for i in range(PAGE)]
            return 200, {"result": page, "next": start + 1, "total": 10**9}
        if method == "crm.deal.list":
            start = _int(params.get("start"))
            ids = sorted(self.deals)
            page = [self.deals[i] for i in ids[start : start + PAGE]]
            answer: dict[str, Any] = {"result": page, "total": len(ids)}
            if start + PAGE < len(ids):
                answer["next"] = start + PAGE
            return 200, answer
        if method == "app.info":
            return 200, {"result": {"ID": 77, "CODE": self.client_id, "STATUS": "L"}}
        if method == "batch":
            return 200, {"result": self._batch(params.get("cmd") or {}, token)}
        return 404, {"error": "ERROR_METHOD_NOT_FOUND", "error_description": "Method not found!"}

    def _batch(self, commands: dict[str, str], token: str) -> dict[str, Any]:
        if len(commands) > 50:
            return {"result": {}, "result_error": {"batch": "more than 50 commands"}}
        results: dict[str, Any] = {}
        errors: dict[str, Any] = {}
        for name, command in commands.items():
            method, _, query = command.partition("?")
            status, answer = self.answer(method, dict(parse_qsl(query)), token)
            if status == 200:
                results[name] = answer["result"]
            else:
                errors[name] = answer
        return {"result": _php_array(results), "result_error": _php_array(errors)}

    async def oauth(self, request: web.Request) -> web.Response:
        self.oauth_requests += 1
        self.oauth_arrived.set()
        if self.oauth_moved is not None:
            status, location = self.oauth_moved
            return web.Response(status=status, headers={"Location": location})
        answer = self._refresh(request.query)
        if self.oauth_gate is not None:
            await self.oauth_gate.wait()
        return answer

    def _refresh(self, q: Any) -> web.Response:
        if q.get("client_id") != self.client_id or q.get("client_secret") != CLIENT_SECRET:
            return _error(401, "invalid_client", "Invalid client credentials")
        if q.get("grant_type") != "refresh_token":
            return _error(400, "unsupported_grant_type", "Unsupported grant type")
        refresh = q.get("refresh_token", "")
        member = self.refresh_tokens.pop(refresh, None)
        if member is None:
            self.refused_refreshes += 1
            return _error(400, "invalid_grant", "Invalid refresh token")
        self.spent.add(refresh)
        self.refreshes += 1
        access, new_refresh, expires = self.issue(member)
        return web.json_response(
            {
                "access_token": access,
                "expires": expires,
                "expires_in": self.token_lifetime_s,
                "scope": "crm",
                "domain": "oauth.bitrix.info",
                "server_endpoint": "https://oauth.bitrix.info/rest/",
                "status": "L",
                "client_endpoint": f"https://{member}.portal.test/rest/",
                "member_id": member,
                "user_id": 1,
                "refresh_token": new_refresh,
                **self.oauth_extra,
            }
        )


def _time_block(now: float, reset_at: float, operating: float) -> dict[str, Any]:
    """The `time` block of a Bitrix24 answer, shaped as its documentation prints it."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(now))
    return {
        "start": now,
        "finish": now + 0.01,
        "duration": 0.01,
        "processing": 0.0,
        "date_start": stamp,
        "date_finish": stamp,
        "operating_reset_at": int(reset_at),
        "operating": operating,
    }


def _php_array(values: dict[str, Any]) -> Any:
    """What PHP's json_encode writes for an array: a JSON array when its keys are 0..n-1 in
    order (`[]` when empty; command names "0", "1"... become integer keys), else an object."""
    if list(values) == [str(i) for i in range(len(values))]:
        return list(values.values())
    return values


async def _in_pieces(request: web.Request, answer: dict[str, Any]) -> web.StreamResponse:
    body = json.dumps(answer).encode()
    resp = web.StreamResponse(headers={"Content-Type": "application/json"})
    await resp.prepare(request)
    await resp.write(body[:1000])
    await asyncio.sleep(0.05)  # the rest comes later, as over a slow network
    await resp.write(body[1000:])
    await resp.write_eof()
    return resp


async def _params(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if request.content_type == "application/json":
        loaded = json.loads(raw or b"{}")
        return loaded if isinstance(loaded, dict) else {}
    return decode_form(raw) if raw else {}


def _int(value: Any) -> int:
    try:
        return int(str(value))
    except ValueError:
        return -1
