"""Files that hold secrets (portal tokens, spooled bodies with access tokens). Stdlib only.

Such a file is ours alone: a regular file, owned by this process's user, opened never through a
symbolic link (a link planted in a shared folder would have us create, chmod or write another
file; a file planted there by another user would have us read its forged contents)."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from b24queue.errors import ConfigError

PRIVATE_MODE = 0o600
_SIDE_FILES = ("-wal", "-shm", "-journal")


class NotPrivateError(ConfigError):
    """A file that should hold our secrets is not ours alone; `why` says how."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"{path}: {why}")
        self.path = path
        self.why = why


def private_file(path: Path) -> Path:
    """Create `path` (and its folder) readable by its owner only, whatever the umask; tighten it
    if it exists. SQLite creates its -wal and -shm files with the mode of the database file, so
    they follow; ones left by an older version are tightened here too. `NotPrivateError` for a
    symbolic link or another user's file, at `path` or beside it.

    A file that exists is never opened for reading or writing here: closing any descriptor of a
    file drops every POSIX lock this process holds on it, and SQLite's locks are POSIX locks. A
    second store opened on a database this process already has open would have dropped the
    first connection's lock on its `-shm`; another process could then take the database as its
    first user and truncate that file under the first connection's mapping (SIGBUS)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for name, create in ((path, True), *((Path(f"{path}{s}"), False) for s in _SIDE_FILES)):
        try:
            found = os.lstat(name)
        except FileNotFoundError:
            if create:
                _create(name)
            continue
        if stat.S_ISLNK(found.st_mode):
            raise NotPrivateError(name, "is a symbolic link (never followed here)")
        why = _not_ours(found, exact_mode=False)
        if why:
            raise NotPrivateError(name, why)
        if stat.S_IMODE(found.st_mode) != PRIVATE_MODE:
            _tighten(name)
    return path


def _create(path: Path) -> None:
    """A new file (or one another process created meanwhile), checked and made 0600: nobody holds
    a lock on a file that did not exist a moment ago, or it is SQLite's own first open."""
    fd = _open(path, os.O_CREAT | os.O_RDWR)
    try:
        why = _not_ours(os.fstat(fd), exact_mode=False)
        if why:
            raise NotPrivateError(path, why)
        os.fchmod(fd, PRIVATE_MODE)
    finally:
        os.close(fd)


def _tighten(path: Path) -> None:
    """chmod 0600 of the very file checked, through a descriptor that holds no lock: Linux's
    O_PATH (closing it keeps the process's POSIX locks), chmod through /proc/self/fd."""
    o_path = getattr(os, "O_PATH", 0)
    if not o_path:  # not Linux: a plain descriptor (its close drops this process's locks)
        fd = _open(path, os.O_RDONLY)
        try:
            os.fchmod(fd, PRIVATE_MODE)
        finally:
            os.close(fd)
        return
    fd = _open(path, o_path)
    try:
        why = _not_ours(os.fstat(fd), exact_mode=False)
        if why:
            raise NotPrivateError(path, why)
        os.chmod(f"/proc/self/fd/{fd}", PRIVATE_MODE)
    finally:
        os.close(fd)


def open_private(path: Path) -> int:
    """A read-only descriptor of an existing file that only we could have written: a regular
    file (not through a symbolic link), ours, with no permission for group or others (0600).
    Checked on the open descriptor, so the file checked is the file opened. `NotPrivateError`
    (`FileNotFoundError` when there is none)."""
    fd = _open(path, os.O_RDONLY)
    try:
        why = _not_ours(os.fstat(fd), exact_mode=True)
    except BaseException:
        os.close(fd)
        raise
    if why:
        os.close(fd)
        raise NotPrivateError(path, why)
    return fd


def side_files(path: Path) -> list[Path]:
    """The files SQLite keeps beside a database (journal, WAL, shared memory)."""
    return [Path(f"{path}{suffix}") for suffix in _SIDE_FILES]


def _open(path: Path, flags: int) -> int:
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, PRIVATE_MODE)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotPrivateError(path, "is a symbolic link (never followed here)") from None
        raise


def _not_ours(st: os.stat_result, *, exact_mode: bool) -> str | None:
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_uid != os.geteuid():
        return f"belongs to uid {st.st_uid}, not to this process's uid {os.geteuid()}"
    if exact_mode and st.st_mode & 0o077:
        mode = stat.S_IMODE(st.st_mode)
        return f"has mode {mode:04o}: other users may have written it (0600 expected)"
    return None
