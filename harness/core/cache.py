"""Where built and fetched artefacts live, and how their content keys are computed."""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from harness.core.errors import StepTimeout


def cache_root() -> Path:
    """NESTVIRT_CACHE > $XDG_CACHE_HOME/nestvirt > ~/.cache/nestvirt (created on demand)."""
    if os.environ.get("NESTVIRT_CACHE"):
        root = Path(os.environ["NESTVIRT_CACHE"])
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = Path(base) / "nestvirt"
    root.mkdir(parents=True, exist_ok=True)
    return root


def content_key(paths: Iterable[Path], extra: Iterable[str] = ()) -> str:
    """A short digest over file names and bytes (directories walked in sorted order)."""
    h = hashlib.sha256()
    for p in sorted(Path(x) for x in paths):
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            if "__pycache__" in f.parts:
                continue
            h.update(str(f.relative_to(p.parent) if p.is_dir() else f.name).encode())
            h.update(f.read_bytes())
    for e in extra:
        h.update(e.encode())
    return h.hexdigest()[:16]


def file_identity(path: str | Path) -> str:
    """Path, size and mtime: enough for files the cache names by content or a package owns, or
    a kernel or QEMU rebuilt in place (hashing a QEMU binary at every start would cost more
    than a restore)."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return f"{p}:missing"
    return f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def file_digest(path: Path) -> str:
    """sha256 of one file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def locked(name: str, timeout: float = 900.0) -> Iterator[None]:
    """Serialise builders of one cache entry across processes (pytest-xdist workers)."""
    path = cache_root() / f".lock-{name}"
    with open(path, "w") as fh:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StepTimeout(f"cache lock {path} held for {timeout:g}s") from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
