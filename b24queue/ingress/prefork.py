"""Several ingress processes on one port (`B24QUEUE_INGRESS_PROCESSES`): one Python process
saturates one core, so a busy ingress runs about one per core.

The parent binds the listening socket and starts the children, each a whole ingress (own event
loop, broker connection, spool file) that accepts from the shared socket. The parent only
supervises: it forwards SIGTERM/SIGINT (each child then drains as a single ingress does), and if a
child dies unasked it stops the others and exits non-zero, for the service manager to restart
the lot. Prometheus metrics of all children are summed through prometheus_client's multiprocess
mode, so any child's /metrics answers for the whole ingress.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from b24queue.auth.tokens import verifier_from_settings
from b24queue.errors import EXIT_FAILURE, B24QueueError
from b24queue.ingress.spool import merge_stray_spools
from b24queue.settings import ENV_PREFIX, Settings
from b24queue.telemetry.metrics import forget_process


class ListenError(B24QueueError):
    """The ingress's address is taken or not ours to bind."""


log = logging.getLogger(__name__)

_POLL_S = 0.2


def child_env(settings: Settings, metrics_dir: str) -> dict[str, str]:
    """The parent's environment (children read their settings from it, as the parent did), plus
    the CLI flags that matter to a child (how many they are: each takes its share of the
    per-portal rate), and the shared metrics directory."""
    env = dict(os.environ)
    env[ENV_PREFIX + "INGRESS_PROCESSES"] = str(settings.ingress_processes)
    env[ENV_PREFIX + "LOG_LEVEL"] = settings.log_level
    env[ENV_PREFIX + "LOG_FORMAT"] = settings.log_format
    env["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    return env


def run(settings: Settings) -> int:
    count = settings.ingress_processes
    verifier_from_settings(settings)  # a configuration error stops us here, before any child
    address = (settings.http_host, settings.http_port)
    try:
        sock = socket.create_server(address, backlog=1024)
    except OSError as exc:
        raise ListenError(f"cannot listen on {address[0]}:{address[1]}: {exc.strerror}") from None
    if settings.spool_enabled:
        # Events spooled by a process slot this run does not have (fewer processes than
        # before) go to slot 0's spool, whose forwarder then moves them on.
        merge_stray_spools(Path(settings.spool_path), keep=count)
    metrics_dir = tempfile.mkdtemp(prefix="b24queue-metrics-")
    env = child_env(settings, metrics_dir)
    stopping = False

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    children: list[subprocess.Popen[bytes]] = []
    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for slot in range(count):
            argv = [sys.executable, "-m", "b24queue", "ingress"]
            argv += ["--child-slot", str(slot), "--listen-fd", str(sock.fileno())]
            # Own session: a Ctrl-C reaches them once, through the parent, not twice.
            children.append(
                subprocess.Popen(  # noqa: S603 - our own interpreter and module
                    argv, env=env, pass_fds=(sock.fileno(),), start_new_session=True
                )
            )
        host, port = sock.getsockname()[:2]
        log.info("ingress: %d processes on http://%s:%d%s", count, host, port, settings.http_path)
        return _supervise(children, metrics_dir, lambda: stopping)
    finally:
        sock.close()  # the children hold their own copies
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _supervise(
    children: list[subprocess.Popen[bytes]], metrics_dir: str, stopping: Callable[[], bool]
) -> int:
    running = list(children)
    failed = 0  # exit code of the first child that died unasked
    while running:
        time.sleep(_POLL_S)
        for child in [c for c in running if c.poll() is not None]:
            running.remove(child)
            forget_process(child.pid, metrics_dir)
            if stopping() or failed:
                continue
            failed = child.returncode or EXIT_FAILURE
            log.error(
                "ingress process %d exited (code %s) unasked: stopping the others",
                child.pid,
                child.returncode,
            )
            for other in running:
                other.send_signal(signal.SIGTERM)
    if failed:
        return failed if failed > 0 else EXIT_FAILURE  # killed by a signal: negative
    codes = [c.returncode for c in children]
    return next((code for code in codes if code), 0)
