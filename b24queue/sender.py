"""`b24queue send`: post an event to an ingress exactly as a Bitrix24 portal would."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from typing import Any

from b24queue.errors import BadEventError
from b24queue.events import FORM_TYPE
from b24queue.forms import encode_form, split_key
from b24queue.outbound.answers import urllib_opener
from b24queue.redaction import redact_url

DEFAULT_URL = "http://127.0.0.1:8080/b24/events"


def sample_payload(event: str, token: str, overrides: list[str]) -> dict[str, Any]:
    """A Bitrix24-shaped event body; `overrides` are `key=value` in bracket form."""
    domain = "example.bitrix24.com"
    payload: dict[str, Any] = {
        "event": event.upper(),
        "event_handler_id": "1",
        "data": {"FIELDS": {"ID": "1"}},
        "ts": str(int(time.time())),
        "auth": {
            "domain": domain,
            "client_endpoint": f"https://{domain}/rest/",
            "server_endpoint": "https://oauth.bitrix.info/rest/",
            "member_id": "0" * 32,
            "application_token": token,
        },
    }
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise BadEventError(f"--field {item!r}: expected KEY=VALUE, e.g. data[FIELDS][ID]=42")
        base, segments = split_key(key)
        path = [base, *segments]
        if any(s is None for s in path):
            raise BadEventError(f"--field {item!r}: '[]' is not supported here", field=key)
        node = payload
        for part in path[:-1]:
            assert part is not None
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        last = path[-1]
        assert last is not None
        node[last] = value
    return payload


def post(
    url: str, body: bytes, content_type: str = FORM_TYPE, timeout_s: float = 10.0
) -> tuple[int, str]:
    """POST the body; returns (status, response text): a redirect's own status (3xx), never
    followed. Connection errors raise OSError."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--url must be http:// or https://, got {redact_url(url)!r}")
    request = urllib.request.Request(  # noqa: S310 - scheme checked above
        url, data=body, method="POST", headers={"Content-Type": content_type}
    )
    try:
        with urllib_opener().open(request, timeout=timeout_s) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode("utf-8", "replace")


def form_body(payload: dict[str, Any]) -> bytes:
    return encode_form(payload)
