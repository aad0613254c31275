"""`b24queue send`: post an event to an ingress exactly as a Bitrix24 portal would."""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from b24queue.cli.terminal import safe
from b24queue.errors import EXIT_FAILURE, EXIT_OK, BadEventError, ConfigError
from b24queue.events.event import FORM_TYPE, JSON_TYPE
from b24queue.events.forms import encode_form, split_key
from b24queue.outbound.answers import urllib_opener
from b24queue.secrets.redaction import redact, redact_url, url_secrets
from b24queue.settings import Settings

log = logging.getLogger("b24queue")

DEFAULT_URL = "http://127.0.0.1:8080/b24/events"


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "send",
        help="post an event to an ingress as Bitrix24 would",
        description="Post an event to an ingress as Bitrix24 would. The application token it "
        "sends: --token-file, else B24QUEUE_SEND_TOKEN, else the first of B24QUEUE_APP_TOKENS "
        "(--token works too, but other users of the host see it in the process list).",
    )
    p.add_argument("event", nargs="?", help="event name, e.g. ONCRMDEALADD")
    p.add_argument("--url", default=DEFAULT_URL, help=f"default {DEFAULT_URL}")
    token = p.add_mutually_exclusive_group()
    token.add_argument(
        "--token-file",
        type=Path,
        metavar="PATH",
        help="read the application token from this file (default: B24QUEUE_SEND_TOKEN, else "
        "the first of B24QUEUE_APP_TOKENS)",
    )
    token.add_argument(
        "--token",
        help="the application token itself: visible to other users in the process list, "
        "prefer B24QUEUE_SEND_TOKEN or --token-file",
    )
    p.add_argument(
        "--field",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field, e.g. 'data[FIELDS][ID]=42' (repeatable)",
    )
    p.add_argument(
        "--robot",
        metavar="CODE",
        help="post a robot's or activity's call with this code (as a workflow would) instead "
        "of an event: override its properties with --field 'properties[NAME]=VALUE'",
    )
    p.add_argument("--body-file", type=Path, help="send this body as is (a saved request)")
    p.add_argument("--json", action="store_true", help="send JSON instead of a form")
    p.set_defaults(run=run)


def run(settings: Settings, args: argparse.Namespace) -> int:
    token = _token(settings, args)
    if args.body_file is not None:
        body = args.body_file.read_bytes()
        content_type = JSON_TYPE if args.json else FORM_TYPE
    else:
        if not args.event and not args.robot:
            raise ConfigError("send: give an EVENT name, --robot CODE or --body-file")
        if args.robot:
            payload = sample_call(args.robot, token, args.field)
        else:
            payload = sample_payload(args.event, token, args.field)
        if args.json:
            body, content_type = json.dumps(payload).encode(), JSON_TYPE
        else:
            body, content_type = form_body(payload), FORM_TYPE
    try:
        status, text = post(args.url, body, content_type)
    except (OSError, ValueError, http.client.HTTPException) as exc:
        # The URL's password hidden, in the URL and wherever the error quotes a part of it.
        why = redact(str(exc), url_secrets(args.url))
        log.error("cannot post to %s: %s", redact_url(args.url), why)
        return EXIT_FAILURE
    print(safe(f"{status} {redact(text, (token,))}"))
    return EXIT_OK if status == 200 else EXIT_FAILURE


def _token(settings: Settings, args: argparse.Namespace) -> str:
    """--token, --token-file, B24QUEUE_SEND_TOKEN, or the first of B24QUEUE_APP_TOKENS."""
    if args.token is not None:
        log.warning(
            "--token is visible to other users of this host (ps, /proc/<pid>/cmdline): "
            "prefer B24QUEUE_SEND_TOKEN or --token-file"
        )
        return str(args.token)
    if args.token_file is not None:
        where = f"send --token-file {args.token_file}"
        try:
            token: str = args.token_file.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{where}: cannot read it ({exc})") from None
        if not token:
            raise ConfigError(f"{where}: the file is empty")
        return token
    from_settings: str = settings.send_token.get_secret_value()
    return from_settings or next(iter(settings.app_tokens), "")


def _auth(token: str) -> dict[str, str]:
    domain = "example.bitrix24.com"
    return {
        "domain": domain,
        "client_endpoint": f"https://{domain}/rest/",
        "server_endpoint": "https://oauth.bitrix.info/rest/",
        "member_id": "0" * 32,
        "application_token": token,
    }


def sample_payload(event: str, token: str, overrides: list[str]) -> dict[str, Any]:
    """A Bitrix24-shaped event body; `overrides` are `key=value` in bracket form."""
    payload: dict[str, Any] = {
        "event": event.upper(),
        "event_handler_id": "1",
        "data": {"FIELDS": {"ID": "1"}},
        "ts": str(int(time.time())),
        "auth": _auth(token),
    }
    return _overridden(payload, overrides)


def sample_call(code: str, token: str, overrides: list[str]) -> dict[str, Any]:
    """A robot's or activity's call as Bitrix24 posts it (b24queue.bizproc), for `code`."""
    now = int(time.time())
    payload: dict[str, Any] = {
        "workflow_id": f"{now:x}a1b2c3d4.{now % 100_000_000:08d}",
        "code": code,
        "document_id": ["crm", "CCrmDocumentDeal", "DEAL_1"],
        "document_type": ["crm", "CCrmDocumentDeal", "DEAL"],
        "event_token": f"{now:x}.{now % 100_000_000:08d}|A1_1_1|sample-event-token",
        "properties": {},
        "use_subscription": "Y",
        "timeout_duration": "0",
        "ts": str(now),
        "auth": _auth(token),
    }
    return _overridden(payload, overrides)


def _overridden(payload: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
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
