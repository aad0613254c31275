"""The HTTP ingress: Bitrix24 calls `POST /b24/events`; we answer 200 only once RabbitMQ confirmed.

Order per request: method, content type, size, decode, validate, verify, the portal's rate limit,
publish. Every refusal is a JSON `{"error": ...}` with its status, and nothing is published for it.
"""

from __future__ import annotations

import logging
import math
import socket
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from b24queue.auth.tokens import TokenVerifier
from b24queue.bizproc import as_event, is_call, load_declarations
from b24queue.errors import (
    BadEventError,
    BrokerUnavailableError,
    PublishError,
    StoreUnavailableError,
    UnauthorizedError,
)
from b24queue.events.envelope import EventSink, envelope_for
from b24queue.events.event import FORM_TYPE, JSON_TYPE, Event, decode_body
from b24queue.limits import KeyedLimiter, LogBudget
from b24queue.publishing import from_outside
from b24queue.settings import Settings
from b24queue.telemetry.logs import client_text
from b24queue.telemetry.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from b24queue.telemetry.metrics import EventLabels, IngressMetrics

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SINK_KEY = web.AppKey("sink", EventSink)
METRICS_KEY = web.AppKey("metrics", IngressMetrics)
_REASONS = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}
ACCEPTED_TYPES = (FORM_TYPE, JSON_TYPE)
# Portals whose rate-limit buckets one process keeps (about 270 bytes each, with the key: 27 MB
# at most). Only portals seen within a bucket's refill time are kept; past this many, the least
# recently seen is forgotten (its bucket refills early: nobody is refused for it).
MAX_LIMITED_PORTALS = 100_000


def error(status: int, message: str, **extra: str) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own refusals (404, 405, 413) as JSON too; never a traceback to the caller."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        request.app[METRICS_KEY].refused.labels(_REASONS.get(exc.status, str(exc.status))).inc()
        message = exc.reason
        if exc.status == 405:
            message = f"method {request.method} not allowed; use {exc.headers.get('Allow', '')}"
        return web.json_response(
            {"error": message},
            status=exc.status,
            headers={k: v for k, v in exc.headers.items() if k in ("Allow",)},
        )
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return error(500, "internal error")


class EventsView:
    def __init__(
        self,
        settings: Settings,
        sink: EventSink,
        verifier: TokenVerifier,
        metrics: IngressMetrics,
    ) -> None:
        self._settings = settings
        self._sink = sink
        self._verifier = verifier
        self._metrics = metrics
        self._retry_after = {"Retry-After": str(settings.retry_after_s)}
        self._labels = EventLabels()
        # A flood of forged requests must not flood the log: 20 lines at once, then one a second.
        self._refusal_log = LogBudget(20, 1.0, time.monotonic)
        # Each 503 is an event Bitrix24 will not resend: log them, but not without bound.
        self._not_stored_log = LogBudget(50, 5.0, time.monotonic)
        self._portals = _portal_limiter(settings)
        self._rate_limited_log = LogBudget(5, 0.1, time.monotonic)
        self._bizproc = load_declarations(settings.bizproc)

    async def post(self, request: web.Request) -> web.Response:
        media = request.content_type.lower()
        body = await self._read(request, media)
        if isinstance(body, web.Response):
            return body
        try:
            event = from_outside(self._parse(media, body))
            envelope = envelope_for(event)
        except BadEventError as exc:
            self._metrics.refused.labels("bad_request").inc()
            extra = {"field": exc.field} if exc.field else {}
            return error(400, str(exc), **extra)
        try:
            tenant = await self._verifier.verify(event)
        except UnauthorizedError as exc:
            return self._unauthorized(event, exc)
        except StoreUnavailableError as exc:
            return self._not_stored(event.name, envelope.message_id, exc)
        if self._portals is not None and not self._portals.take(tenant):
            return self._rate_limited(event, tenant, self._portals)
        started = time.perf_counter()
        try:
            await self._sink.publish(envelope)
        except PublishError as exc:
            if not exc.permanent:
                return self._not_stored(event.name, envelope.message_id, exc)
            # The broker refuses this message itself (too large for it): trying again later
            # would fail the same way, so the caller is told now, and nothing is kept.
            self._metrics.refused.labels("too_large").inc()
            log.error("refused %s message_id=%s: %s", event.name, envelope.message_id, exc)
            return error(413, str(exc))
        except BrokerUnavailableError as exc:
            return self._not_stored(event.name, envelope.message_id, exc)
        try:
            await self._verifier.accepted(event)
        except Exception:  # the event is stored: its 200 stands; say what went wrong
            log.exception("after accepting %s message_id=%s", event.name, envelope.message_id)
        self._metrics.publish_seconds.observe(time.perf_counter() - started)
        self._metrics.count_accepted(self._labels.of(event.name))
        log.debug("accepted %s message_id=%s", event.name, envelope.message_id)
        # message_id is hex: no escaping needed, and this is the hot path.
        return web.Response(
            body=b'{"status": "accepted", "message_id": "%s"}' % envelope.message_id.encode(),
            content_type="application/json",
        )

    def _parse(self, media: str, body: bytes) -> Event:
        """The event, or a robot's or activity's call as one (b24queue.bizproc)."""
        payload = decode_body(media, body)
        if is_call(payload):
            payload = as_event(payload, self._bizproc)
        return Event.from_payload(payload)

    async def _read(self, request: web.Request, media: str) -> bytes | web.Response:
        """The body, or the refusal: an unsupported type (415) or too large (413)."""
        if media not in ACCEPTED_TYPES:
            self._metrics.refused.labels("unsupported_type").inc()
            return error(
                415,
                f"unsupported content type {media or '(none)'!r}; "
                f"send {FORM_TYPE} (as Bitrix24 does) or {JSON_TYPE}",
            )
        limit = self._settings.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            self._metrics.refused.labels("too_large").inc()
            return error(413, f"body of {request.content_length} bytes exceeds {limit} bytes")
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            self._metrics.refused.labels("too_large").inc()
            return error(413, f"body exceeds {limit} bytes")

    def _unauthorized(self, event: Event, exc: UnauthorizedError) -> web.Response:
        self._metrics.refused.labels("unauthorized").inc()
        dropped = self._refusal_log.spend()
        if dropped is not None:
            log.warning(
                "refused %s from domain=%s member_id=%s: %s%s",
                event.name,
                client_text(event.auth.domain),
                client_text(event.auth.member_id),
                client_text(exc, 300),
                f" ({dropped} refusals before this one not logged)" if dropped else "",
            )
        return error(401, str(exc))

    def _rate_limited(self, event: Event, tenant: str, portals: KeyedLimiter) -> web.Response:
        self._metrics.refused.labels("rate_limited").inc()
        wait_s = max(1, math.ceil(portals.wait_s(tenant)))
        s = self._settings
        dropped = self._rate_limited_log.spend()
        if dropped is not None:
            log.warning(
                "refused %s from %s (domain=%s): over %g events/s after a burst of %d "
                "(B24QUEUE_INGRESS_RATE_PER_S, _BURST)%s",
                event.name,
                client_text(tenant),
                client_text(event.auth.domain),
                s.ingress_rate_per_s,
                s.ingress_rate_burst,
                f" ({dropped} more refused before this one, not logged)" if dropped else "",
            )
        return web.json_response(
            {"error": f"too many events from this portal: not stored, try again in {wait_s} s"},
            status=429,
            headers={"Retry-After": str(wait_s)},
        )

    def _not_stored(self, name: str, message_id: str, exc: Exception) -> web.Response:
        self._metrics.not_stored.labels(self._labels.of(name)).inc()
        dropped = self._not_stored_log.spend()
        if dropped is not None:
            log.error(
                "not accepted %s message_id=%s: %s%s",
                name,
                message_id,
                exc,
                f" ({dropped} more not logged; see the metrics)" if dropped else "",
            )
        return web.json_response(
            {"error": f"event not stored, try again later: {exc}"},
            status=503,
            headers=self._retry_after,
        )


def _portal_limiter(settings: Settings) -> KeyedLimiter | None:
    """One bucket per tenant (the verifier's answer), so a request not verified spends nobody's
    budget. Each of several ingress processes refills at its share of the rate (a flood spreads
    over them, as connections do) but holds a whole burst: one portal's burst may reach a single
    process (a proxy's kept-alive connection), and a refused event is never sent again."""
    if not settings.ingress_rate_limited:
        return None
    per_s = settings.ingress_rate_per_s / settings.ingress_processes
    return KeyedLimiter(settings.ingress_rate_burst, per_s, MAX_LIMITED_PORTALS, time.monotonic)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    if request.app[SINK_KEY].is_ready():
        return web.json_response({"status": "ready"})
    return web.json_response(
        {"error": "broker not connected"}, status=503, headers={"Retry-After": "5"}
    )


async def metrics(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[METRICS_KEY].render(), headers={"Content-Type": METRICS_CONTENT_TYPE}
    )


def create_app(
    settings: Settings,
    sink: EventSink,
    verifier: TokenVerifier,
    metrics_: IngressMetrics | None = None,
) -> web.Application:
    # client_max_size also bounds chunked bodies that carry no Content-Length.
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[json_errors])
    app[SINK_KEY] = sink
    app[METRICS_KEY] = metrics_ or IngressMetrics()
    view = EventsView(settings, sink, verifier, app[METRICS_KEY])
    app.router.add_post(settings.http_path, view.post)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


HTTP_SHUTDOWN_TIMEOUT_S = 10.0


async def serve(
    app: web.Application, *, host: str, port: int, sock: socket.socket | None
) -> web.AppRunner:
    """Listen on host:port, or on a socket handed over (one of several ingress processes).
    `cleanup()` the runner to stop: in-flight requests finish first."""
    runner = web.AppRunner(
        app, access_log=None, shutdown_timeout=HTTP_SHUTDOWN_TIMEOUT_S, handle_signals=False
    )
    await runner.setup()
    site: web.BaseSite
    if sock is None:
        site = web.TCPSite(runner, host, port, backlog=1024)
    else:
        site = web.SockSite(runner, sock)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
