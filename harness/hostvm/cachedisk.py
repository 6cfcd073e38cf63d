"""The host VM's cache disk: a writable ext4 file that carries the inner run's saved L1 images
(``l1-snapshots``) from one host VM boot to the next.

Why: every host VM boot starts from a read-only image under a tmpfs overlay, so an inner run
built its L1 image again on every boot (about 50 s of a 130 s nested scenario, README "KVM
host VM"). An image saved under the host VM's KVM holds `-cpu host` state, which is the host
VM's CPU: the disk is keyed on what decides that CPU (the outer QEMU, -cpu, kvm_amd options,
the host VM's kernel), and the images on it keep their own content keys and digests, so a
stale or damaged one is rebuilt inside, never used.

One host VM at a time may write a disk: the first holds its lock for the whole boot, a second
at once boots without it (and builds its images afresh, as before).
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.core import proc
from harness.core.cache import cache_root, content_key, file_identity
from harness.core.errors import SetupError, StepTimeout

# Bumped when the disk's layout changes: older disks are then made again.
DISK_FORMAT = "hostvm-cache-1"
# Sparse: only what is written takes room. A saved L1 is 90-160 MiB; an inner run of every
# binary and mode keeps a few.
DISK_MIB = 4096
LABEL = "nestvirt-cache"
# The cache subdirectories the disk holds inside the host VM (under its NESTVIRT_CACHE).
CARRIED = "l1-snapshots"
# Inside: below this much free room the job empties the disk before the run (an image half
# written for want of room would only be rebuilt).
MIN_FREE_MIB = 1024


@dataclass(frozen=True)
class CacheDisk:
    """The disk a host VM boot carries, or why it has none (``path`` None)."""

    key: str
    path: Path | None
    state: str  # reused, created, repaired, remade (damaged beyond repair), busy, off
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "path": str(self.path) if self.path else None,
                "state": self.state, "detail": self.detail}


def disk_key(identity: dict[str, Any]) -> str:
    """The key of the disk for a host VM of this identity (HostVmSpec.to_json): what decides
    the CPU that an inner `-cpu host` sees, nothing else (not the root image, which changes
    with every edit of the project, nor memory)."""
    kernel = identity.get("kernel") or {}
    cpu_inputs = {"format": DISK_FORMAT, "qemu": file_identity(identity.get("qemu") or ""),
                  "qemu_version": identity.get("qemu_version"), "cpu": identity.get("cpu"),
                  "npt": identity.get("npt"), "kvm_amd": sorted(identity.get("kvm_amd") or []),
                  "smp": identity.get("smp"), "kernel": file_identity(kernel.get("image") or ""),
                  "kernel_release": kernel.get("release")}
    return content_key([], extra=[json.dumps(cpu_inputs, sort_keys=True)])


def disk_path(key: str) -> Path:
    return cache_root() / "hostvm" / f"cache-{key}.ext4"


def make_disk(path: Path, timeout: float = 60) -> None:
    """An empty, sparse ext4 file (journalled: a host VM that dies mid-write leaves a disk
    that e2fsck repairs, and the saved images are written under a temporary name first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    # A small journal and few inodes (a saved image is two files): 20 MiB taken, not 70.
    proc.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-J", "size=16", "-N", "4096", "-L", LABEL,
              "-E", "root_owner=0:0", str(tmp), f"{DISK_MIB}M"], timeout)
    tmp.rename(path)


def check_disk(path: Path, timeout: float = 120) -> tuple[str, str]:
    """(state, detail) after e2fsck: reused (clean), repaired (e2fsck fixed it: a host VM that
    died without unmounting), remade (beyond repair: made again, empty)."""
    try:
        cp = proc.run(["e2fsck", "-p", str(path)], timeout, check=False)
    except StepTimeout:
        cp = None
    # e2fsck: 0 clean, 1 errors corrected, 2 corrected (reboot: only for a mounted root);
    # 4 and above left uncorrected or failed.
    if cp is not None and cp.returncode == 0:
        return "reused", ""
    if cp is not None and cp.returncode in (1, 2):
        said = (cp.stdout + cp.stderr).strip().splitlines()
        return "repaired", said[-1][:200] if said else "e2fsck corrected it"
    why = "e2fsck ran past its bound" if cp is None else \
        f"e2fsck exit {cp.returncode}: {(cp.stdout + cp.stderr).strip()[-200:]}"
    path.unlink(missing_ok=True)
    make_disk(path)
    return "remade", why


@contextmanager
def held(identity: dict[str, Any], *, enabled: bool = True) -> Iterator[CacheDisk]:
    """The cache disk for this host VM, checked or made, and locked for as long as the caller
    runs the host VM; ``path`` None when off, or when another host VM holds it now."""
    key = disk_key(identity)
    if not enabled:
        yield CacheDisk(key, None, "off", "--hostvm-no-cache")
        return
    path = disk_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield CacheDisk(key, None, "busy", "another host VM holds this cache disk now")
            return
        try:
            if path.exists():
                state, detail = check_disk(path)
            else:
                make_disk(path)
                state, detail = "created", ""
        except (SetupError, StepTimeout, OSError) as e:
            # Without its disk the host VM still runs: its inner images are built afresh.
            yield CacheDisk(key, None, "off", f"cache disk unusable: {e}")
            return
        os.utime(path)  # the newest disk is the one in use (prune keeps it)
        try:
            yield CacheDisk(key, path, state, detail)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def prune(keep: int = 2) -> list[Path]:
    """Remove all but the ``keep`` disks used last (a new outer QEMU or kernel makes a new
    one), skipping any a host VM holds now."""
    d = cache_root() / "hostvm"
    disks = sorted(d.glob("cache-*.ext4"), key=lambda p: p.stat().st_mtime, reverse=True)
    gone = []
    for p in disks[keep:]:
        with open(p.with_suffix(".lock"), "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def mount_lines(device: str, cache_dir: str) -> list[str]:
    """job.sh's lines that mount the disk over the inner cache's CARRIED directory (and empty
    it when nearly full), reporting a ``cache`` event; the inner run goes on without it when
    the mount fails."""
    target = f"{cache_dir}/{CARRIED}"
    return [f"mkdir -p {target}",
            f"if mount -t ext4 -o noatime {device} {target} 2>/tmp/cache-mount.err; then",
            f"  free=$(df -m {target} | awk 'NR==2 {{print $4}}')",
            f"  if [ \"${{free:-0}}\" -lt {MIN_FREE_MIB} ]; then rm -rf {target}/* {target}/.[!.]*; "
            "ev cache emptied=1 free_mib=$free; fi",
            # A saved image is a directory named by its key (not lost+found, nor a builder's
            # leftover *.tmp).
            f"  ev cache mounted=1 images=$(ls {target} | grep -c '^[0-9a-f]*$') "
            f"free_mib=$(df -m {target} | awk 'NR==2 {{print $4}}')",
            "else",
            "  ev cache mounted=0 error=$(head -c 120 /tmp/cache-mount.err | tr ' ' _)",
            "fi"]


def unmount_lines(cache_dir: str) -> list[str]:
    """After the inner run: everything on the disk written back and the disk unmounted (a
    clean filesystem for the next boot's e2fsck)."""
    return ["sync", f"umount {cache_dir}/{CARRIED} 2>/dev/null || sync"]
