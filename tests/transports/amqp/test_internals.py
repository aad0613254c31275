"""The private paths into aiormq and aio-pika (`transports/amqp/internals.py`): on with the
installed releases (a test that fails, not skips, when pyproject and the code disagree), every
private name they use still there, a WARNING naming each one that is off, and the
blocked-connection check right both ways, aiormq's own flag and the public `Connection.ready()`.

The connections here are real aiormq connections to a stub peer in this process that speaks
just enough AMQP 0-9-1 to open a connection and a channel, and sends Connection.Blocked and
Unblocked when told to, as RabbitMQ does in a memory or disk alarm.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import tomllib
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import aiormq
import pytest
from packaging.requirements import Requirement
from packaging.version import Version
from pamqp import commands as spec
from pamqp import frame
from pamqp.header import ProtocolHeader
from pamqp.heartbeat import Heartbeat

from b24queue.errors import BrokerUnavailableError
from b24queue.settings import load_settings
from b24queue.transports import transport_for
from b24queue.transports.amqp import internals
from tests.support.processes import ROOT

PYPROJECT = ROOT / "pyproject.toml"


def test_every_path_is_on_with_the_installed_releases() -> None:
    on = internals.ON
    assert on == internals.Paths(publish=True, consume=True, blocked_flag=True, failover=True), (
        f"installed {internals.INSTALLED}, tested aiormq {sorted(internals.TESTED_AIORMQ)} and "
        f"aio-pika {sorted(internals.TESTED_AIO_PIKA)}: {internals.off(on, several_nodes=True)}"
    )


def neighbours(version: str) -> set[str]:
    """The releases next to this one: the previous and next patch, the next minor and major."""
    major, minor, patch = Version(version).release[:3]
    found = {f"{major}.{minor}.{patch + 1}", f"{major}.{minor + 1}.0", f"{major + 1}.0.0"}
    if patch:
        found.add(f"{major}.{minor}.{patch - 1}")
    return found


@pytest.mark.parametrize(
    ("distribution", "tested"),
    [("aiormq", internals.TESTED_AIORMQ), ("aio-pika", internals.TESTED_AIO_PIKA)],
)
def test_pyproject_allows_the_tested_releases_and_none_beside_them(
    distribution: str, tested: frozenset[str]
) -> None:
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    pins = [r.specifier for r in map(Requirement, dependencies) if r.name == distribution]
    assert len(pins) == 1, f"pyproject names {distribution} {len(pins)} times"
    pin = pins[0]
    assert all(pin.contains(v) for v in tested), (pin, tested)
    untested = set().union(*map(neighbours, tested)) - tested
    assert not [v for v in untested if pin.contains(v)], f"{distribution}{pin} allows untested"


class StubPeer:
    """The broker's side of an AMQP connection, just enough of it: the handshake, channels
    opened (with confirms) and closed, the connection closed; and `send` for a frame of the
    test's own on channel 0."""

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"amqp://guest:guest@127.0.0.1:{port}/"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def close(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def send(self, value: Any) -> None:
        for writer in self._writers:
            writer.write(frame.marshal(value, 0))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        await reader.readexactly(len(ProtocolHeader().marshal()))
        capabilities = {"publisher_confirms": True, "connection.blocked": True, "basic.nack": True}
        answer = spec.Connection.Start(server_properties={"capabilities": capabilities})
        writer.write(frame.marshal(answer, 0))
        replies: dict[type[Any], Any] = {
            spec.Connection.StartOk: spec.Connection.Tune(channel_max=64, frame_max=131072),
            spec.Connection.Open: spec.Connection.OpenOk(),
            spec.Channel.Open: spec.Channel.OpenOk(),
            spec.Confirm.Select: spec.Confirm.SelectOk(),
            spec.Channel.Close: spec.Channel.CloseOk(),
            spec.Connection.Close: spec.Connection.CloseOk(),
        }
        try:
            while True:
                header = await reader.readexactly(7)
                rest = await reader.readexactly(int.from_bytes(header[3:7]) + 1)
                _, channel, value = frame.unmarshal(header + rest)
                reply = replies.get(type(value))
                if reply is not None:
                    writer.write(frame.marshal(reply, channel))
                elif not isinstance(value, spec.Connection.TuneOk | Heartbeat):
                    raise AssertionError(f"the stub does not answer {value!r}")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.transport.abort()


@pytest.fixture
async def peer() -> AsyncIterator[StubPeer]:
    stub = StubPeer()
    await stub.start()
    try:
        yield stub
    finally:
        await stub.close()


async def test_every_private_name_used_is_on_the_installed_classes(peer: StubPeer) -> None:
    """An upgrade that renames or drops one fails here, by name."""
    connection = await aiormq.connect(peer.url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        owners = {
            "aiormq.Channel (instance)": channel,
            "aiormq.Channel": aiormq.Channel,
            "aiormq.Connection (instance)": connection,
            "aio_pika.RobustConnection": aio_pika.RobustConnection,
        }
        missing = [
            f"{owner}.{name}"
            for owner, names in internals.PRIVATE_NAMES.items()
            for name in names
            if not hasattr(owners[owner], name)
        ]
        assert not missing, f"gone from the installed releases ({internals.INSTALLED}): {missing}"
        # The attributes read, of the kinds they are read as.
        assert isinstance(internals.channel_lock(channel), asyncio.Lock)
        assert isinstance(getattr(channel, internals.CLOSE_EVENT), asyncio.Event)
        assert isinstance(getattr(connection, internals.UNBLOCKED), asyncio.Event)
        assert not internals.closing(channel)
        await channel.close()
        assert internals.closing(channel)
    finally:
        await connection.close()


async def until(predicate: Any, what: str) -> None:
    for _ in range(200):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("flag", [True, False], ids=["aiormq's flag", "Connection.ready()"])
async def test_blocked_follows_the_brokers_blocked_and_unblocked(
    peer: StubPeer, monkeypatch: pytest.MonkeyPatch, flag: bool
) -> None:
    """Both ways give the same answers: with the flag (the tested releases) and without it
    (any other: the public `ready()`, asked without waiting)."""
    monkeypatch.setattr(internals, "ON", dataclasses.replace(internals.ON, blocked_flag=flag))
    connection = await aiormq.connect(peer.url)
    try:
        assert not internals.blocked(connection)
        peer.send(spec.Connection.Blocked(reason="low on memory"))
        await until(lambda: internals.blocked(connection), "blocked")
        for _ in range(100):  # asked often: each time the same, and nothing left waiting
            assert internals.blocked(connection)
        peer.send(spec.Connection.Unblocked())
        await until(lambda: not internals.blocked(connection), "unblocked")
        await asyncio.wait_for(connection.ready(), 1)
        peer.send(spec.Connection.Blocked(reason="low on disk"))
        await until(lambda: internals.blocked(connection), "blocked again")
    finally:
        await connection.close()
    assert internals.blocked(connection)  # closed while blocked: the same both ways


def other_aiormq(monkeypatch: pytest.MonkeyPatch) -> str:
    """Simulate the aiormq release after the newest tested one (and a tested aio-pika)."""
    newest = Version(max(internals.TESTED_AIORMQ, key=Version))
    other = f"{newest.major}.{newest.minor}.{newest.micro + 1}"
    pika = next(iter(internals.TESTED_AIO_PIKA))
    monkeypatch.setattr(internals, "INSTALLED", {"aiormq": other, "aio-pika": pika})
    monkeypatch.setattr(internals, "ON", internals.paths(other, pika))
    monkeypatch.setattr(internals, "_warned", False)
    return other


def test_another_release_turns_its_paths_off_with_one_warning_each_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    other = other_aiormq(monkeypatch)
    tested = ", ".join(sorted(internals.TESTED_AIORMQ))
    on = internals.ON
    assert on == internals.Paths(publish=False, consume=False, blocked_flag=False, failover=True)
    with caplog.at_level(logging.WARNING, logger=internals.__name__):
        internals.warn_if_off(several_nodes=True)
        internals.warn_if_off(several_nodes=True)  # once per process
    lines = [r.getMessage() for r in caplog.records if r.name == internals.__name__]
    assert len(lines) == 3, lines
    for line, path in zip(
        lines,
        ["direct publish path", "direct delivery path", "blocked-connection flag"],
        strict=True,
    ):
        assert path in line and f"aiormq {other} is installed" in line
        assert f"tested with {tested} only" in line


def test_the_failover_is_named_only_where_there_are_nodes_to_fail_over_to(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    aiormq_version = next(iter(internals.TESTED_AIORMQ))
    monkeypatch.setattr(internals, "INSTALLED", {"aiormq": aiormq_version, "aio-pika": "99.0"})
    on = internals.paths(aiormq_version, "99.0")
    assert internals.off(on, several_nodes=False) == []
    (line,) = internals.off(on, several_nodes=True)
    assert line.startswith("the cluster failover is off: aio-pika 99.0 is installed")
    assert "first node of B24QUEUE_AMQP_URL" in line


async def test_the_ingress_and_the_worker_say_so_as_they_start(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    settings = load_settings(
        broker_url="amqp://guest:guest@127.0.0.1:1/",
        connect_timeout_s=0.2,
        reconnect_interval_s=0.05,
    )
    transport = transport_for(settings)
    for start in ("ingress", "worker"):
        other = other_aiormq(monkeypatch)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=internals.__name__):
            if start == "ingress":
                transport.publisher("pytest")
            else:  # (nothing listens on that port: it gives up after connect_timeout_s)
                with pytest.raises(BrokerUnavailableError):
                    await transport.open_workers([])
        lines = [r.getMessage() for r in caplog.records if r.name == internals.__name__]
        assert len(lines) == 3 and all(f"aiormq {other} is installed" in x for x in lines), start
