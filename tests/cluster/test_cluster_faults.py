"""A three-node RabbitMQ cluster (`rabbitmq/cluster.sh`) losing nodes under load (`make
faults-cluster`): a real ingress and two real workers, a steady load through the ingress, and
(1) SIGKILL of the node the ingress is connected to, (2) SIGKILL of the node leading the consumer
queue, (3) a node stopped gracefully and started again, (4) two of three nodes lost for a moment
(the queues stop taking messages: the ingress spools, then forwards). Each time every event
answered 200 must be handled at least once. The summary prints the duplicates, the share of
requests answered 200 during the fault and the time until events are handled promptly again."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from b24queue.settings import Settings, load_settings
from tests.support.faults import CLUSTER_SUMMARY, SteadyLoad, handled
from tests.support.processes import ROOT, env_for, start, start_workers, stop
from tests.support.proxy import free_port
from tests.support.samples import SAMPLE_TOKEN
from tests.support.wait import wait_until

CLUSTER = ROOT / "rabbitmq" / "cluster.sh"
PORTS = (5681, 5682, 5683)
RATE_PER_S = 100
DURATION_S = 30.0  # long enough to see the pipeline recover after the slowest fault
AFTER_FAULT_S = 20.0  # and the load goes on at least this long after the fault ends
LONGEST_S = 240.0  # a fault still under way by then ends the load (and fails the run)
FAULT_AT_S = 5.0
PROMPT_S = 1.0  # "handled promptly": within this of being accepted


def node_url(n: int) -> str:
    return f"amqp://guest:guest@127.0.0.1:{PORTS[n - 1]}/"


def urls(*order: int) -> str:
    return ",".join(node_url(n) for n in order)


def mgmt(*order: int) -> str:
    return ",".join(f"http://127.0.0.1:{PORTS[n - 1] + 10000}" for n in order)


def cluster(*args: str) -> str:
    out = subprocess.run(
        ["bash", str(CLUSTER), *args], capture_output=True, text=True, timeout=600, check=True
    )
    return out.stdout


def leader(queue: str) -> int:
    token = base64.b64encode(b"guest:guest").decode()
    for port in PORTS:
        req = urllib.request.Request(
            f"http://127.0.0.1:{port + 10000}/api/queues/%2F/{queue}",
            headers={"Authorization": f"Basic {token}"},
        )
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                name = json.load(resp)["leader"]
        except (OSError, KeyError, ValueError):
            continue
        return int(name.split("@")[0].removeprefix("b24c"))
    raise AssertionError(f"no node knows the leader of {queue}")


def kill(n: int) -> None:
    os.kill(int(cluster("pid", str(n)).strip()), signal.SIGKILL)


@pytest.fixture(scope="module", autouse=True)
def _cluster_up() -> None:
    cluster("start")


@pytest.fixture(autouse=True)
def _all_nodes_back() -> Any:
    yield
    cluster("start")  # whatever a scenario took down comes back before the next


async def run_scenario(
    name: str, tmp_path: Path, fault: Callable[[str], Awaitable[None]], *, queue_on: int = 1
) -> dict[str, Any]:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    record, times = tmp_path / "record.txt", tmp_path / "times.txt"
    base = dict(
        app_tokens=SAMPLE_TOKEN,
        exchange=f"{prefix}.events",
        unrouted=f"{prefix}.unrouted",
        shutdown_timeout_s=20.0,
    )
    settings: Settings = load_settings(
        broker_url=urls(1, 2, 3), management_url=mgmt(1, 2, 3), **base
    )
    queue = f"{prefix}.cluster"
    env = env_for(settings, record, B24QT_QUEUE=queue, B24QT_PREFETCH="16", B24QT_TIMES=str(times))
    env["B24QUEUE_MANAGEMENT_URL"] = settings.management_url
    env["B24QUEUE_EXCHANGE"], env["B24QUEUE_UNROUTED"] = settings.exchange, settings.unrouted
    # The topology from one node: the queue's first leader is the node that declared it.
    declaring = settings.model_copy(
        update={"amqp_url": urls(queue_on, *(n for n in (1, 2, 3) if n != queue_on))}
    )
    topo_env = {**env, "B24QUEUE_BROKER_URL": declaring.amqp_url}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "b24queue", "topology", "tests.support.consumers:FaultRecorder",
        cwd=ROOT, env=topo_env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode()
    workers = await start_workers(env, tmp_path, "tests.support.consumers:FaultRecorder")
    port = free_port()
    ingress_env = {**env}
    ingress = await start("ingress", "--host", "127.0.0.1", "--port", str(port),
        env=ingress_env, log=tmp_path / "ingress.log",
    )  # fmt: skip
    await wait_until(lambda: _ready(port), 60, "the ingress ready")
    load = SteadyLoad(f"http://127.0.0.1:{port}/b24/events")
    window: list[float] = []

    async def timed_fault() -> None:
        await asyncio.sleep(FAULT_AT_S)
        window.append(time.time())
        await fault(queue)
        window.append(time.time())

    def duration() -> float:
        """At least DURATION_S, and AFTER_FAULT_S past the fault's end (a slow machine takes
        longer to start nodes again; the recovery must still be seen under load)."""
        if len(window) < 2:  # the fault is still under way (or not yet begun)
            return LONGEST_S
        return max(DURATION_S, window[1] - load.started_at + AFTER_FAULT_S)

    task = asyncio.create_task(timed_fault())
    await load.run(duration, RATE_PER_S)
    await task
    want = set(load.accepted)
    deadline = time.monotonic() + 120
    while not want <= set(handled(record)) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    for proc in (*workers, ingress):
        assert await stop(proc) == 0
    seen = handled(record)
    lost = want - set(seen)
    fault_from, fault_to = window
    answers = [(load.started_at + t, s) for t, s in load.answers]
    during = [s for t, s in answers if fault_from <= t <= fault_to + 1.0]
    row = {
        "fault": name,
        "sent": load.sent,
        "accepted": len(load.accepted),
        "lost": len(lost),
        "duplicates": len(seen) - len(set(seen)),
        "ok_during": f"{sum(1 for s in during if s == 200)}/{len(during)}",
        "fault_s": round(fault_to - fault_from, 1),
        "recovered_after_s": _recovered_after(load, times, fault_from),
    }
    CLUSTER_SUMMARY.append(row)
    print(f"\ncluster fault: {row}")
    if lost:
        text = "".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in tmp_path.glob("*.log"))
        pytest.fail(f"{len(lost)} accepted events never handled\n{text}")
    # Not only nothing lost: every request answered 200 (the spool covers what the cluster
    # cannot take), and the pipeline back to handling events promptly before the run ended.
    assert row["accepted"] == row["sent"], row
    assert row["recovered_after_s"] is not None, row
    return row


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def _recovered_after(load: SteadyLoad, times: Path, fault_from: float) -> float | None:
    """Seconds from the fault until every later event was answered 200 and handled within
    PROMPT_S of its 200 (None: never within the run)."""
    handled_at: dict[str, float] = {}
    if times.exists():
        for line in times.read_text().splitlines():
            message_id, at = line.split()
            handled_at.setdefault(message_id, float(at))
    late = [
        at
        for message_id, at in load.accepted_at.items()
        if at >= fault_from and handled_at.get(message_id, float("inf")) - at > PROMPT_S
    ]
    refused = [load.started_at + t for t, s in load.answers if s != 200]
    last_bad = max([*late, *refused], default=fault_from)
    if last_bad >= load.started_at + load.ran_s - PROMPT_S:
        return None
    return round(last_bad - fault_from, 1)


async def test_sigkill_of_the_node_the_ingress_is_connected_to(tmp_path: Path) -> None:
    async def fault(queue: str) -> None:
        await asyncio.to_thread(kill, 1)  # the first URL: the ingress's (and workers') node

    await run_scenario("sigkill ingress's node", tmp_path, fault)


async def test_sigkill_of_the_node_leading_the_consumer_queue(tmp_path: Path) -> None:
    async def fault(queue: str) -> None:
        n = await asyncio.to_thread(leader, queue)
        assert n != 1, "the queue was declared from node 3: it should not lead on node 1"
        await asyncio.to_thread(kill, n)  # the ingress and workers stay connected to node 1

    await run_scenario("sigkill queue leader", tmp_path, fault, queue_on=3)


async def test_a_node_stopped_gracefully_and_started_again(tmp_path: Path) -> None:
    async def fault(queue: str) -> None:
        await asyncio.to_thread(cluster, "stop-node", "2")
        await asyncio.sleep(2)
        await asyncio.to_thread(cluster, "start-node", "2")

    await run_scenario("graceful stop/start", tmp_path, fault)


async def test_two_of_three_nodes_lost_for_a_moment(tmp_path: Path) -> None:
    async def fault(queue: str) -> None:
        await asyncio.to_thread(kill, 2)
        await asyncio.to_thread(kill, 3)
        await asyncio.sleep(3)  # no majority: the queues take nothing, the ingress spools
        await asyncio.to_thread(cluster, "start")

    await run_scenario("two of three lost", tmp_path, fault)
