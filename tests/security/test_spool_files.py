"""Issue 36, item 6: a spool file another user planted in a shared spool folder (another uid,
world-writable, a symbolic link) is never merged, listed or replayed: the ingress and
`b24queue spool` skip it with a warning naming it, and its forged events are not published.
Nor does the helper that creates private files follow a symbolic link.

Against the real RabbitMQ, with real `b24queue ingress` (its start merges stray spools and
forwards them) and `b24queue spool` processes."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
from pathlib import Path

import pytest

from b24queue.errors import ConfigError
from b24queue.events.envelope import Envelope, envelope_for
from b24queue.ingress.spool import Spool, slot_path
from b24queue.secrets.files import private_file
from b24queue.testing import make_event
from tests.support.processes import ROOT, start, stop
from tests.support.rabbitmq import Broker, cli_env
from tests.support.redis_server import free_port
from tests.support.wait import wait_until

pytestmark = pytest.mark.broker

NOBODY = 65534


def deal(title: str) -> Envelope:
    return envelope_for(make_event("ONCRMDEALADD", {"FIELDS": {"ID": "1", "TITLE": title}}))


async def spool_with(path: Path, waiting: str, quarantined: str) -> None:
    """A spool file as an ingress leaves it: one event waiting, one set aside."""
    async with Spool(path, 10) as spool:
        await spool.put(deal(quarantined))
        await spool.put(deal(waiting))
        [(row_id, _), _] = await spool.oldest(2)
        await spool.quarantine(row_id, "refused")


async def plant(kind: str, tmp_path: Path, spool_dir: Path) -> Path:
    """Another user's spool file for slot 2 of the spool in `spool_dir`, holding forged events."""
    planted = slot_path(spool_dir / "spool.sqlite3", 2)
    if kind == "symlink":
        # A link to a spool file elsewhere (say, another ingress's): followed, its events would
        # be taken from it and published from here.
        elsewhere = tmp_path / "elsewhere" / "spool.sqlite3"
        await spool_with(elsewhere, "forged-waiting", "forged-quarantined")
        planted.symlink_to(elsewhere)
        return planted
    await spool_with(planted, "forged-waiting", "forged-quarantined")
    if kind == "other_uid":
        if os.geteuid() != 0:
            pytest.skip("giving a file to another user needs root")
        for name in (planted, Path(f"{planted}.lock")):
            os.chown(name, NOBODY, NOBODY)
    else:  # world-writable: ours, but anyone may have written the events in it
        planted.chmod(0o666)
    return planted


async def cli(broker: Broker, spool: Path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "b24queue", *args, cwd=ROOT,
        env=cli_env(broker, B24QUEUE_SPOOL_PATH=str(spool)),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def titles(broker: Broker, queue: str) -> set[str]:
    got = await broker.take(queue, await broker.depth(queue)) if await broker.depth(queue) else []
    return {json.loads(m.body)["data"]["FIELDS"]["TITLE"] for m in got}


@pytest.mark.parametrize("kind", ["other_uid", "world_writable", "symlink"])
async def test_a_planted_spool_file_is_skipped_with_a_warning_and_not_published(
    kind: str, broker: Broker, tmp_path: Path
) -> None:
    spool_dir = tmp_path / "shared"
    base = spool_dir / "spool.sqlite3"
    await spool_with(slot_path(base, 1), "ours-waiting", "ours-quarantined")  # left by us
    planted = await plant(kind, tmp_path, spool_dir)
    queue = await broker.bind_queue("all", "#")

    # The ingress's start merges the stray spools and forwards them: ours only.
    log = tmp_path / "ingress.log"
    env = cli_env(broker, B24QUEUE_SPOOL_PATH=str(base))
    args = ("ingress", "--host", "127.0.0.1", "--port", str(free_port()))

    async def forwarded() -> bool:
        return await broker.depth(queue) > 0

    ingress = await start(*args, env=env, log=log)
    try:
        await wait_until(forwarded, 30, "our spooled event forwarded")
    finally:
        assert await stop(ingress, log) == 0
    assert await titles(broker, queue) == {"ours-waiting"}
    warning = next(ln for ln in log.read_text().splitlines() if "skipped" in ln)
    assert "WARNING" in warning and f"spool file {planted} skipped" in warning
    why = {"other_uid": f"uid {NOBODY}", "world_writable": "mode 0666", "symlink": "symbolic link"}
    assert why[kind] in warning

    # `b24queue spool list` shows our spool (its quarantined event merged in), not the planted
    # one, and says why; `spool replay` publishes ours, never the planted one's.
    code, out, err = await cli(broker, base, "spool", "list", "--json")
    assert code == 0, err
    listed = json.loads(out)
    assert [Path(f["path"]).name for f in listed["files"]] == ["spool.sqlite3"]
    assert f"spool file {planted} skipped" in err
    code, out, err = await cli(broker, base, "spool", "replay")
    assert code == 0 and "replayed 1 " in out, (out, err)
    assert await titles(broker, queue) == {"ours-quarantined"}
    assert os.path.lexists(planted)  # left where it was, for the operator to look at


async def test_the_private_file_helper_never_follows_a_symbolic_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("someone else's file\n")
    victim.chmod(0o644)
    spool_dir = tmp_path / "shared"
    spool_dir.mkdir()
    (spool_dir / "spool.sqlite3").symlink_to(victim)
    with pytest.raises(ConfigError, match="symbolic link"):
        async with Spool(spool_dir / "spool.sqlite3", 10):
            pass
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644  # not made ours (0600)
    assert victim.read_text() == "someone else's file\n"

    # A link to where no file is yet: following it would create a file there.
    (tmp_path / "other").mkdir()
    dangling = tmp_path / "other" / "created.db"
    (spool_dir / "store.sqlite3").symlink_to(dangling)
    with pytest.raises(ConfigError, match="symbolic link"):
        private_file(spool_dir / "store.sqlite3")
    assert not dangling.exists()

    # Nor beside the file: SQLite's -wal of a database, planted as a link.
    (tmp_path / "wal-target").write_text("x")
    (tmp_path / "wal-target").chmod(0o644)
    (spool_dir / "queue.sqlite3-wal").symlink_to(tmp_path / "wal-target")
    with pytest.raises(ConfigError, match="symbolic link"):
        private_file(spool_dir / "queue.sqlite3")
    assert stat.S_IMODE((tmp_path / "wal-target").stat().st_mode) == 0o644


async def test_another_users_file_is_not_taken_as_our_private_file(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    planted = tmp_path / "spool.sqlite3"
    await spool_with(planted, "forged", "forged-too")
    os.chown(planted, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match=f"belongs to uid {NOBODY}"):
        async with Spool(planted, 10):
            pass


# Whether another process could take the byte SQLite's users lock in the `-shm` file (its
# "DMS" slot: 120 + 8): the first process to get it exclusively truncates the file, under the
# mappings of every connection still open on it (SIGBUS).
_DMS_PROBE = """
import fcntl, sys
with open(sys.argv[1], "r+b") as f:
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 128)
    except OSError:
        print("held")
    else:
        print("free")
"""


async def test_opening_a_database_again_keeps_its_open_connections_locks(tmp_path: Path) -> None:
    """private_file() on a database this process has open (a second store on one file) must not
    drop the first connection's POSIX locks: closing any descriptor of a file drops them all.
    One puller of two died of SIGBUS that way (its -shm truncated by the other's first open)."""
    import sqlite3

    path = tmp_path / "portals.db"
    private_file(path)
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE t (x)")
    db.execute("INSERT INTO t VALUES (1)")
    db.commit()
    shm = Path(f"{path}-shm")
    (tmp_path / "loose").write_text("x")

    async def probe() -> str:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _DMS_PROBE, str(shm), stdout=asyncio.subprocess.PIPE
        )
        out, _ = await proc.communicate()
        return out.decode().strip()

    assert await probe() == "held"  # the connection's shared lock, seen from another process
    shm.chmod(0o644)  # one left by an older version: tightened, through no locking descriptor
    private_file(path)  # as a second store on the same file does
    assert stat.S_IMODE(shm.stat().st_mode) == 0o600
    assert await probe() == "held"
    assert db.execute("SELECT x FROM t").fetchall() == [(1,)]
    db.close()
