"""Coverage-guided fuzzing (atheris / libFuzzer) of the decoder and of the whole ingress app, in
process. Run by tests/security/test_fuzz.py (a short run in `make test`) and `make fuzz` (long):

    python -m tests.fuzz.ingress_target -atheris_runs=20000 -rss_limit_mb=768 CORPUS_DIR

The first input byte picks the path: 0 form / 1 JSON through decode -> validate -> envelope;
2 form / 3 JSON / 4 any content type through the aiohttp app with a static token and an in-memory
sink. Whatever the input: no exception but BadEventError from the decoder, no 500 from the app,
nothing published for a refusal, and every accepted event's message is strict JSON without an
`application_token` key at any depth, with bounded headers.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import signal
import sys
from typing import Any

import atheris

with atheris.instrument_imports(include=["b24queue"]):
    from aiohttp.test_utils import TestClient, TestServer

    from b24queue.auth.tokens import StaticTokens
    from b24queue.errors import BadEventError
    from b24queue.events.envelope import MAX_HEADER_CHARS, Envelope, envelope_for
    from b24queue.events.event import FORM_TYPE, JSON_TYPE, parse_event
    from b24queue.ingress.app import create_app
    from b24queue.settings import load_settings
    from b24queue.transports.amqp.publisher import check_size

TOKEN = "9d1c7e5a3b8f4e2d6c0a9b7e5d3c1f8a"
TYPES = (FORM_TYPE, JSON_TYPE, "text/plain", "", "application/json; charset=latin-1")


def _no_constant(name: str) -> Any:
    raise AssertionError(f"published JSON has {name}")


def holds_token_key(root: Any) -> bool:
    """Whether an `application_token` key is anywhere in `root` (bot events repeat it deep)."""
    stack = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "application_token" in node:
                return True
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


def check_envelope(envelope: Envelope) -> None:
    body = json.loads(envelope.body, parse_constant=_no_constant)
    assert isinstance(body, dict)
    assert not holds_token_key(body), "token published"
    assert sum(len(k) + len(v) for k, v in envelope.headers.items()) <= MAX_HEADER_CHARS
    assert "\n" not in envelope.routing_key and "*" not in envelope.routing_key
    check_size(envelope)


class Sink:
    def __init__(self) -> None:
        self.published: list[Envelope] = []

    async def publish(self, envelope: Envelope) -> None:
        self.published.append(envelope)

    def is_ready(self) -> bool:
        return True


class App:
    """One app and client for the whole run (a request over loopback per input)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.sink = Sink()
        settings = load_settings(app_tokens=TOKEN, max_body_bytes=64 * 1024)
        app = create_app(settings, self.sink, StaticTokens((TOKEN,)))
        self.client: TestClient[Any, Any] = TestClient(TestServer(app), loop=self.loop)
        self.loop.run_until_complete(self.client.start_server())

    def close(self) -> None:
        self.loop.run_until_complete(self.client.close())
        self.loop.close()

    def post(self, content_type: str, body: bytes) -> None:
        self.loop.run_until_complete(self._post(content_type, body))

    async def _post(self, content_type: str, body: bytes) -> None:
        before = len(self.sink.published)
        headers = {"Content-Type": content_type} if content_type else {}
        # The client's own session: TestClient.post keeps every response until the end of the
        # run (to close them), which would grow by a few kB an input.
        url = self.client.make_url("/b24/events")
        async with self.client.session.post(url, data=body, headers=headers) as resp:
            text = await resp.text()
        assert resp.status in (200, 400, 401, 413, 415), (resp.status, text[:300])
        answer = json.loads(text)
        if resp.status == 200:
            [envelope] = self.sink.published[before:]
            assert answer["message_id"] == envelope.message_id
            check_envelope(envelope)
        else:
            assert "error" in answer and len(self.sink.published) == before
        del self.sink.published[:]


_app: App | None = None


def one_input(data: bytes) -> None:
    global _app
    if not data:
        return
    mode, body = data[0] % 5, data[1:]
    if mode < 2:
        try:
            envelope = envelope_for(parse_event(TYPES[mode], body))
        except BadEventError:
            return
        check_envelope(envelope)
        return
    if _app is None:
        _app = App()
    content_type = TYPES[mode - 2] if mode < 4 else TYPES[body[0] % len(TYPES) if body else 0]
    _app.post(content_type, body)


def at_exit() -> None:
    """The run is over: stop the per-input alarm, then close the app.

    atheris ends a bounded run (-atheris_runs) with sys.exit from inside its last input and
    leaves libFuzzer's per-input timer armed (a SIGALRM every timeout/2 + 1 s). Python's
    finalization then sets SIGALRM back to its default action (atheris registered a Python
    handler for it), so a tick during a slow exit on a busy machine killed a clean run with
    signal 14 after its "Done" line. Fuzzing is over here; nothing is left to time out.
    """
    signal.setitimer(signal.ITIMER_REAL, 0)
    if _app is not None:
        _app.close()


def main() -> None:
    # With a seed corpus, a token-bearing body is easy to reach: mutations keep the token.
    logging.disable(logging.CRITICAL)  # refusals are logged; thousands a second here
    atexit.register(at_exit)
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
