"""A small client for the RabbitMQ management HTTP API (standard library only: it serves the CLI
tools and policy setup, never a hot path)."""

from __future__ import annotations

import base64
import http.client
import json
import urllib.error
import urllib.request
from typing import Any, NoReturn
from urllib.parse import quote

from b24queue.errors import ConfigError, ManagementError
from b24queue.outbound import answers
from b24queue.secrets.redaction import redact_url
from b24queue.settings import Settings
from b24queue.transports.amqp.layout import Policy

# The operator's own broker, but its answers are still read within bounds: /api/queues of a
# vhost with 30,000 queues is about 75 MB and 3.3 million values.
BOUNDS = answers.Bounds(max_bytes=128 * 1024 * 1024, max_values=4_000_000)


class _Unreachable(Exception):
    """This node's API did not answer: ask the next one."""


class ManagementClient:
    def __init__(self, settings: Settings, timeout_s: float = 10.0) -> None:
        # Several nodes of one cluster: any answers for all; the last that did is asked first.
        self.bases = settings.management_urls
        self.base = self.bases[0]
        self.vhost = quote(settings.vhost, safe="")
        user, password = settings.broker_credentials
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self._headers = {"Authorization": f"Basic {token}", "Content-Type": "application/json"}
        self._timeout_s = timeout_s
        # Never a redirect: urllib would send the Authorization header on to any host.
        self._opener = answers.urllib_opener()

    def request(self, method: str, path: str, body: Any = None) -> Any:
        unreachable: ManagementError | None = None
        for base in [self.base] + [b for b in self.bases if b != self.base]:
            try:
                answer = self._request(base, method, path, body)
            except _Unreachable as exc:
                unreachable = ManagementError(str(exc))
                continue
            self.base = base
            return answer
        assert unreachable is not None
        raise unreachable

    def _request(self, base: str, method: str, path: str, body: Any) -> Any:
        url = base + path
        where = redact_url(base)  # for errors: a URL's password is never shown
        data = json.dumps(body).encode() if body is not None else None
        # The scheme is http(s): Settings checks management_url.
        req = urllib.request.Request(url, data=data, method=method, headers=self._headers)  # noqa: S310
        try:
            with self._opener.open(req, timeout=self._timeout_s) as resp:
                raw = resp.read(BOUNDS.max_bytes + 1)
        except urllib.error.HTTPError as exc:
            with exc:  # its connection closed, whatever is raised
                self._refused(exc, where, method, path)
        except (OSError, ValueError, http.client.HTTPException) as exc:
            raise _Unreachable(
                f"cannot reach the RabbitMQ management API at {where} ({exc}); is the "
                "rabbitmq_management plugin enabled? (rabbitmq-plugins enable rabbitmq_management)"
            ) from None
        if not raw:
            return None
        try:
            return answers.decode_json(raw, BOUNDS)
        except answers.AnswerTooLarge as exc:
            raise ManagementError(
                f"the management API at {where} answered {method} {path}: {exc}"
            ) from None
        except answers.NotJSON:  # e.g. a proxy's login page answering in its place
            raise ManagementError(
                f"the management API at {where} answered {method} {path} with something "
                "that is not JSON"
            ) from None

    def _refused(self, exc: urllib.error.HTTPError, where: str, method: str, path: str) -> NoReturn:
        try:
            answers.check_redirect(exc.code, exc.headers.get("Location"))
        except answers.Redirected as redirected:
            raise ManagementError(
                f"the management API at {where} {redirected} (set B24QUEUE_MANAGEMENT_URL "
                "to where it is)"
            ) from None
        if exc.code == 401:
            raise ConfigError(
                f"the management API at {where} refused the credentials of "
                "B24QUEUE_AMQP_URL (the user needs the 'monitoring' or 'management' tag)"
            ) from None
        if exc.code == 404:
            raise LookupError(path) from None
        if exc.code >= 500:  # a node starting or cut off from the others: ask the next
            raise _Unreachable(f"the management API at {where} answered HTTP {exc.code}") from None
        detail = exc.read(300).decode("utf-8", "replace")
        raise ManagementError(f"management API {method} {path}: HTTP {exc.code} {detail}") from None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def queues(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.get(f"/api/queues/{self.vhost}")
        return result

    def connections(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.get("/api/connections")
        return result

    def bound_queues(self, exchange: str) -> set[str]:
        """Queues bound to an exchange, and exchanges (a fair queue's) (empty if the exchange
        does not exist)."""
        path = f"/api/exchanges/{self.vhost}/{quote(exchange, safe='')}/bindings/source"
        try:
            bindings: list[dict[str, Any]] = self.get(path)
        except LookupError:
            return set()
        return {str(b["destination"]) for b in bindings}

    def queue_bindings(self, queue: str, exchange: str) -> set[str] | None:
        """Routing keys binding `queue` to `exchange`; None when the queue does not exist."""
        q, x = quote(queue, safe=""), quote(exchange, safe="")
        try:
            self.get(f"/api/queues/{self.vhost}/{q}?columns=name")
        except LookupError:
            return None
        try:
            bindings: list[dict[str, Any]] = self.get(f"/api/bindings/{self.vhost}/e/{x}/q/{q}")
        except LookupError:  # no such exchange yet
            return set()
        return {str(b.get("routing_key", "")) for b in bindings}

    def exchange_bindings(self, destination: str, exchange: str) -> set[str] | None:
        """Routing keys binding exchange `destination` to `exchange`; None when it does not
        exist."""
        d, x = quote(destination, safe=""), quote(exchange, safe="")
        try:
            self.get(f"/api/exchanges/{self.vhost}/{d}?columns=name")
        except LookupError:
            return None
        try:
            bindings: list[dict[str, Any]] = self.get(f"/api/bindings/{self.vhost}/e/{x}/e/{d}")
        except LookupError:
            return set()
        return {str(b.get("routing_key", "")) for b in bindings}

    def policy(self, name: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = self.get(f"/api/policies/{self.vhost}/{quote(name, safe='')}")
        except LookupError:
            return None
        return result

    def ensure_policy(self, policy: Policy) -> bool:
        """Create the policy if it does not exist; never overwrite what an operator changed.

        Returns True when it was created.
        """
        if self.policy(policy.name) is not None:
            return False
        path = f"/api/policies/{self.vhost}/{quote(policy.name, safe='')}"
        self.request("PUT", path, policy.as_api_body())
        return True
