"""Files that hold secrets (portal tokens, spooled bodies with access tokens). Stdlib only."""

from __future__ import annotations

import os
from pathlib import Path

PRIVATE_MODE = 0o600


def private_file(path: Path) -> Path:
    """Create `path` (and its folder) readable by its owner only, whatever the umask; tighten it
    if it exists. SQLite creates its -wal and -shm files with the mode of the database file, so
    they follow; ones left by an older version are tightened here too."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, PRIVATE_MODE)
    try:
        os.fchmod(fd, PRIVATE_MODE)
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm", "-journal"):
        side = Path(f"{path}{suffix}")
        if side.exists():
            side.chmod(PRIVATE_MODE)
    return path
