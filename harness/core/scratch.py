"""Private temp roots (0700) that say whose they are, and the janitor that removes those of
runs that died without cleaning up (a SIGKILLed harness cannot).

Each root holds a small owner file: the pid and its start time (so a reused pid is not taken
for the owner). A root is swept only when that process is gone, a zombie, or another process
now; roots without an owner file (another tool's, an older harness's) are never touched.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from harness.core.proc import pid_state

PREFIX = "nestvirt-"
OWNER = ".owner"


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime), counted after the ")" that ends the command name.
    return stat.rsplit(")", 1)[1].split()[19]


def private_dir(prefix: str = PREFIX, parent: str | Path | None = None) -> Path:
    """A new 0700 directory under the temp dir (or ``parent``), owned by this process."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    (d / OWNER).write_text(f"{os.getpid()} {_start_time(os.getpid())}\n")
    return d


def owner_alive(d: Path) -> bool | None:
    """Whether the process that made ``d`` still runs; None when ``d`` names no owner."""
    try:
        pid_s, start = (d / OWNER).read_text().split()
        pid = int(pid_s)
    except (OSError, ValueError):
        return None
    if pid_state(pid) in ("Z", "X", "gone"):
        return False
    return _start_time(pid) == start


def sweep(parent: str | Path | None = None) -> list[Path]:
    """Remove the private roots of dead owners under the temp dir (or ``parent``); returns
    what was removed."""
    removed = []
    base = Path(parent or tempfile.gettempdir())
    try:
        candidates = [d for d in base.iterdir() if d.name.startswith(PREFIX) and d.is_dir()]
    except OSError:
        return removed
    for d in candidates:
        if owner_alive(d) is False:
            shutil.rmtree(d, ignore_errors=True)
            if not d.exists():
                removed.append(d)
    return removed


@contextmanager
def private_root(prefix: str = PREFIX) -> Iterator[str]:
    """private_dir() for the length of a block (removed after it, also on error)."""
    d = private_dir(prefix)
    try:
        yield str(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)
