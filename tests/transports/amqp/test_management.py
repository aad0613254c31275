"""The management client against a stand-in HTTP server: what is not the API's JSON is a
ManagementError (a proxy's login page must not crash a worker at start)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from b24queue.errors import ManagementError
from b24queue.settings import load_settings
from b24queue.transports.amqp.management import ManagementClient


class LoginPage(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<html><body>Please sign in</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture
def login_page() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), LoginPage)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_an_answer_that_is_not_json_is_a_management_error(login_page: str) -> None:
    client = ManagementClient(load_settings(management_url=login_page))
    with pytest.raises(ManagementError, match="not JSON"):
        client.queues()
    with pytest.raises(ManagementError):
        client.queue_bindings("q", "b24.events")


async def test_stale_binding_pruning_is_best_effort_for_a_worker(login_page: str) -> None:
    from b24queue.queues import QueueSpec
    from b24queue.transports.amqp.bindings import prune

    settings = load_settings(management_url=login_page)
    spec = QueueSpec("q", ("ONX",), (1.0,))
    assert await prune(settings, [(spec, object())], required=False) == []  # type: ignore[list-item]
    with pytest.raises(ManagementError):
        await prune(settings, [(spec, object())], required=True)  # type: ignore[list-item]
