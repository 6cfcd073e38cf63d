"""The host VM's read-only root image: the selected host files at their host paths, packed
into an ext4 file by ``mkfs.ext4 -d`` (no root needed), cached by the selection's key.

Why an image and not a share: the Debian cloud kernel has no 9p; virtiofs would need a daemon
per boot (Debian 12 has only QEMU 7.2's C virtiofsd) and a FUSE round trip per file lookup
under TCG, where Python's start stats thousands of files; a block device is read once into
the host VM's page cache. Measured in README ("The KVM host VM").
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.core import proc
from harness.core.cache import cache_root, locked
from harness.core.errors import SetupError

# Bumped when the image's layout changes: older images are then rebuilt.
IMAGE_FORMAT = "hostvm-image-1"
# Room for the filesystem's own metadata above the bytes of the files.
SLACK = 1.15
SLACK_MIB = 96
# Images kept in the cache: this one and the one before (a run still booting may hold it).
KEEP = 2


@dataclass(frozen=True)
class RootImage:
    """A built image: where it is, its key, how many files and bytes went in."""

    path: Path
    key: str
    files: int
    bytes: int

    def to_json(self) -> dict:
        return {"path": str(self.path), "key": self.key, "files": self.files,
                "bytes": self.bytes}


def selection_key(paths: Sequence[Path]) -> str:
    """A digest over each path's name, kind, size, mtime and link target: what changed on the
    host (a file edited, a package upgraded) changes the key; nothing is read but inodes."""
    h = hashlib.sha256(IMAGE_FORMAT.encode())
    for p in paths:
        try:
            st = p.lstat()
        except OSError:
            h.update(f"\0{p}:missing".encode())
            continue
        link = os.readlink(p) if stat.S_ISLNK(st.st_mode) else ""
        h.update(f"\0{p}:{st.st_mode:o}:{st.st_size}:{st.st_mtime_ns}:{link}".encode())
    return h.hexdigest()[:16]


def image_path(key: str) -> Path:
    return cache_root() / "hostvm" / f"root-{key}.ext4"


def build_image(key: str, paths: Iterable[Path], timeout: float = 300) -> RootImage:
    """Stage paths (hard links where the filesystem allows, else copies) and pack them.
    Reused when an image of this key exists. SetupError names what failed."""
    out = image_path(key)
    with locked(f"hostvm-image-{key}"):
        meta = out.with_suffix(".files")
        if out.exists() and meta.exists():
            n, size = (int(x) for x in meta.read_text().split())
            return RootImage(out, key, n, size)
        if not shutil.which("mkfs.ext4"):
            raise SetupError("mkfs.ext4 is missing (apt-get install e2fsprogs): the host VM "
                             "image cannot be built")
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = out.with_name(f"stage-{key}")
        shutil.rmtree(stage, ignore_errors=True)
        try:
            n, size = stage_files(paths, stage)
            tmp = out.with_suffix(".tmp")
            tmp.unlink(missing_ok=True)
            mib = int(size * SLACK / 2**20) + SLACK_MIB
            proc.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-N", str(n + n // 4 + 4096),
                      "-O", "^has_journal", "-L", "nestvirt-root", "-E", "root_owner=0:0",
                      "-d", str(stage), str(tmp), f"{mib}M"], timeout)
            tmp.rename(out)
            meta.write_text(f"{n} {size}\n")
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        prune(out.parent, keep=KEEP)
        return RootImage(out, key, n, size)


def prune(directory: Path, keep: int) -> list[Path]:
    """Remove all but the ``keep`` newest images (every edit of the project makes a new one)."""
    images = sorted(directory.glob("root-*.ext4"), key=lambda p: p.stat().st_mtime, reverse=True)
    gone = images[keep:]
    for p in gone:
        p.unlink(missing_ok=True)
        p.with_suffix(".files").unlink(missing_ok=True)
    return gone


def stage_files(paths: Iterable[Path], stage: Path) -> tuple[int, int]:
    """Recreate paths under stage at their own absolute paths; (files, bytes)."""
    n = size = 0
    dirs: set[Path] = set()
    for p in paths:
        try:
            st = p.lstat()
        except OSError:
            continue  # gone since selection (a temp file): the image simply lacks it
        if stat.S_ISDIR(st.st_mode):
            continue
        # At the parent's real path: the symlinks on the way (/lib -> usr/lib) are entries
        # of their own, so the host's path resolves the same way in the image.
        parent = Path(os.path.realpath(p.parent))
        dest = stage / str(parent).lstrip("/") / p.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dirs.add(parent)
        if stat.S_ISLNK(st.st_mode):
            if not dest.is_symlink():
                os.symlink(os.readlink(p), dest)
        elif stat.S_ISREG(st.st_mode):
            if not dest.exists():
                try:
                    os.link(p, dest)
                except OSError:
                    shutil.copy2(p, dest)
            size += st.st_size
        n += 1
    # Directory times as on the host (caches key on them, e.g. the QEMU probe cache).
    for d in sorted(dirs, key=lambda x: -len(x.parts)):
        cur = d
        while cur != cur.parent:
            target = stage / str(cur).lstrip("/")
            try:
                st = cur.stat()
                os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
            except OSError:
                pass
            cur = cur.parent
    return n, size
