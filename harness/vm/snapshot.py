"""A saved, booted machine: its state saved once per configuration as a migration stream in
the cache, and machines started from it with -incoming instead of booting.

Why a migration stream in a file (and not RAM in a memory-backend-file restored with
x-ignore-shared): the file needs no change to how a machine's RAM is set up, so a machine
started from it is the same machine as a cold one (its own later migration sends all its RAM
as usual); it is never written after it is made (a restore only reads it); and it is small
(L1's RAM is mostly zero pages, which the stream carries as markers). Uncompressed: zstd
made it a third (99 -> 34 MB) but its load 0.18-0.57 s against 0.09-0.18 s for the raw
stream (5 alternated loads each, QEMU 10.0.2, load average 4-5): a restore is paid at every
start, the disk once.

Knows nothing of what runs in the machine: the caller brings it to the state worth saving
(``prepare``) and makes a restored one its own (re-keying L1 is the scenario's business).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from harness.core.cache import cache_root, content_key, file_digest, file_identity, locked
from harness.core.errors import NestvirtError, StepTimeout
from harness.core.paths import TEMPLATES
from harness.vm.machine import Machine, MachineConfig, QmpCommandError

# Bump when what a saved image holds or how it is made changes: older images are then stale.
SNAPSHOT_FORMAT = 3
STREAM = "l1.stream"
META = "image.json"
# An image no start used for this long goes when another is built (each is ~100 MB; every
# change to what shapes L1 makes a new one), as does a builder's leftover after an hour.
UNUSED_DAYS = 14
LEFTOVER_S = 3600


class SnapshotUnusable(NestvirtError):
    """A saved image that cannot be used (stale, corrupt, refused by QEMU): rebuild it."""


@dataclass(frozen=True)
class SnapshotImage:
    """One saved machine: where its stream lies, what it must hash to, what it was."""

    key: str
    dir: Path
    sha256: str
    size: int
    format: int = SNAPSHOT_FORMAT
    qemu_version: str = ""
    created: float = 0.0
    save_seconds: float = 0.0
    quiet_s: float | None = None  # how long the vCPUs took to go idle before the save (None: never)
    ready: dict[str, str] = field(default_factory=dict)  # what prepare() returned at save time
    inputs: dict[str, Any] = field(default_factory=dict)  # what the key was computed from

    @property
    def stream(self) -> Path:
        return self.dir / STREAM

    def to_json(self) -> dict:
        d = asdict(self)
        d["dir"] = str(self.dir)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SnapshotImage:
        """Inverse of to_json; KeyError/TypeError on a malformed record."""
        return cls(key=str(d["key"]), dir=Path(d["dir"]), sha256=str(d["sha256"]),
                   size=int(d["size"]), format=int(d.get("format", 0)),
                   qemu_version=str(d.get("qemu_version", "")),
                   created=float(d.get("created", 0.0)),
                   save_seconds=float(d.get("save_seconds", 0.0)),
                   quiet_s=None if d.get("quiet_s") is None else float(d["quiet_s"]),
                   ready={str(k): str(v) for k, v in (d.get("ready") or {}).items()},
                   inputs=dict(d.get("inputs") or {}))


def _named_by_content(path: str | Path) -> str:
    """An initramfs is named by its content key (guest/image.py: build_l1): its name and
    size say what it is wherever it lies (a path would make a copy elsewhere a new image)."""
    p = Path(path)
    try:
        return f"{p.name}:{p.stat().st_size}"
    except OSError:
        return f"{p.name}:missing"


def key_inputs(cfg: MachineConfig, qemu_version: str, recipe: str = "") -> dict[str, Any]:
    """Everything that shapes the saved machine: binary, firmware, kernel, initramfs, machine
    type, CPU, memory, vCPUs, accel, the device set (the template), the command line, and the
    caller's recipe (a digest of how it prepares the machine before saving)."""
    return {
        "format": SNAPSHOT_FORMAT, "recipe": recipe,
        "qemu": file_identity(cfg.qemu), "qemu_version": qemu_version,
        "module_dir": cfg.module_dir,
        "firmware_dirs": [file_identity(d) for d in cfg.firmware_dirs],
        "kernel": file_identity(cfg.kernel), "initrd": _named_by_content(cfg.initrd),
        "machine": cfg.machine, "accel": cfg.accel, "cpu": cfg.cpu, "mem_mib": cfg.mem_mib,
        "mem_extra_kib": cfg.mem_extra_kib, "smp": cfg.smp, "append": cfg.append,
        "extra_args": list(cfg.extra_args),
        "template": content_key([TEMPLATES / "qemu-l1.j2"]),
    }


def snapshot_key(cfg: MachineConfig, qemu_version: str, recipe: str = "") -> str:
    """The content key of the image a config would be saved as."""
    return content_key([], extra=[json.dumps(key_inputs(cfg, qemu_version, recipe),
                                             sort_keys=True)])


def image_dir(key: str) -> Path:
    return cache_root() / "l1-snapshots" / key


def lookup(cfg: MachineConfig, qemu_version: str, recipe: str = "") -> SnapshotImage | None:
    """The saved image for this config if one is complete and current, else None."""
    key = snapshot_key(cfg, qemu_version, recipe)
    return _load(image_dir(key), key)


def stale_reason(d: Path, key: str) -> str | None:
    """Why the image in d cannot be used for key, or None. (The digest is checked at restore,
    concurrently with QEMU's load.)"""
    meta = d / META
    if not meta.is_file():
        return "no complete image"
    try:
        img = SnapshotImage.from_json(json.loads(meta.read_text()))
    except (ValueError, KeyError, TypeError) as e:
        return f"unreadable record: {e}"
    if img.key != key or img.format != SNAPSHOT_FORMAT:
        return f"record is for key {img.key} format {img.format}, not {key} format {SNAPSHOT_FORMAT}"
    try:
        size = (d / STREAM).stat().st_size
    except OSError:
        return "stream missing"
    if size != img.size:
        return f"stream is {size} bytes, the record says {img.size}"
    return None


def _load(d: Path, key: str) -> SnapshotImage | None:
    if stale_reason(d, key) is not None:
        return None
    return replace(SnapshotImage.from_json(json.loads((d / META).read_text())), dir=d)


def discard(image_or_dir: SnapshotImage | Path) -> None:
    """Remove a saved image (stale or corrupt): the next start builds it again."""
    d = image_or_dir.dir if isinstance(image_or_dir, SnapshotImage) else image_or_dir
    with locked(f"snapshot-{d.name}"):
        shutil.rmtree(d, ignore_errors=True)


def ensure(cfg: MachineConfig, qemu_version: str, launch: Callable[[MachineConfig], Machine],
           prepare: Callable[[Machine], dict[str, str]], *, recipe: str = "",
           timeout: float = 120.0) -> tuple[SnapshotImage, bool]:
    """The current saved image for cfg, building it first if there is none (or it is stale):
    (image, built). Two processes asking at once build it once (a lock per key).

    ``launch`` starts a machine from a config (the caller's port handling); ``prepare``
    brings a cold-booted one to the state worth saving and returns what a restore should
    know of it (e.g. its ready event)."""
    key = snapshot_key(cfg, qemu_version, recipe)
    d = image_dir(key)
    found = _load(d, key)
    if found is not None:
        return found, False
    with locked(f"snapshot-{key}"):
        found = _load(d, key)
        if found is not None:
            return found, False
        built = _build(cfg, qemu_version, recipe, key, d, launch, prepare, timeout)
    prune(keep=key)
    return built, True


def prune(keep: str = "", now: float | None = None) -> list[str]:
    """Remove images unused for UNUSED_DAYS and builders' leftovers; return what went."""
    root = cache_root() / "l1-snapshots"
    now = time.time() if now is None else now
    gone = []
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        try:
            if d.name.endswith(".tmp"):
                if now - d.stat().st_mtime > LEFTOVER_S:
                    shutil.rmtree(d, ignore_errors=True)
                    gone.append(d.name)
            elif d.name != keep and now - (d / META).stat().st_mtime > UNUSED_DAYS * 86400:
                discard(d)
                gone.append(d.name)
        except OSError:
            continue  # another process removed it meanwhile
    return gone


def _build(cfg: MachineConfig, qemu_version: str, recipe: str, key: str, d: Path,
           launch: Callable[[MachineConfig], Machine],
           prepare: Callable[[Machine], dict[str, str]], timeout: float) -> SnapshotImage:
    shutil.rmtree(d, ignore_errors=True)  # a stale one, or a half-made one
    tmp = d.with_name(f"{key}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    stream = tmp / STREAM
    m = launch(replace(cfg, incoming=False, control=False, tcg_svm_log=None))
    try:
        ready = prepare(m)
        quiet_s = wait_vcpus_idle(m.pid, timeout)
        t0 = time.monotonic()
        # Stopped first: one pass, and the vCPU is where prepare() left it (L1 idle, no L2: a
        # vCPU saved in SVM guest mode could not be restored under TCG).
        m.qmp("stop")
        m.qmp("migrate-set-capabilities",
              capabilities=[{"capability": "events", "state": True}])
        m.qmp("migrate-set-parameters", **{"max-bandwidth": 64 << 30})
        m.qmp("migrate", uri=f"exec:{_save_command(stream)}")
        _wait_migration(m, timeout, "saving the image")
        save_s = time.monotonic() - t0
    finally:
        m.shutdown()
    with open(stream, "rb") as f:
        os.fsync(f.fileno())
    img = SnapshotImage(key=key, dir=d, sha256=file_digest(stream), size=stream.stat().st_size,
                        qemu_version=qemu_version, created=time.time(),
                        save_seconds=round(save_s, 3), quiet_s=quiet_s, ready=dict(ready),
                        inputs=key_inputs(cfg, qemu_version, recipe))
    os.chmod(stream, 0o444)  # a restore reads it; nothing writes it again
    (tmp / META).write_text(json.dumps(img.to_json(), indent=2))
    tmp.rename(d)
    return img


# A vCPU counts as idle below this share of one CPU over one window (a halted TCG vCPU thread
# sleeps; an idle guest's timer ticks keep it just above 0).
IDLE_SHARE = 0.05
IDLE_WINDOW_S = 0.2


def _vcpu_ns(pid: int) -> int | None:
    """CPU nanoseconds of a QEMU's vCPU threads (named "CPU N/ACCEL" with debug-threads)."""
    total, found = 0, False
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                if not f.read().startswith("CPU "):
                    continue
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
            found = True
        except (OSError, ValueError, IndexError):
            continue
    return total if found else None


def wait_vcpus_idle(pid: int | None, timeout: float) -> float | None:
    """Wait until the machine's vCPUs are idle (under IDLE_SHARE over IDLE_WINDOW_S); return
    the seconds it took, or None when they were not within ``timeout`` (or cannot be seen).

    Why before a save: what the guest still had to do when it was stopped (the closing SSH
    session, freeing the zeroed pages) is done again after every restore, under TCG with an
    empty translation cache, before anything of the run: re-keying the restored L1 took
    114-124 ms of guest time to answer even a malformed line, 9 ms the second time."""
    if pid is None:
        return None
    t0 = time.monotonic()
    prev = _vcpu_ns(pid)
    while prev is not None and time.monotonic() - t0 < timeout:
        time.sleep(IDLE_WINDOW_S)
        now = _vcpu_ns(pid)
        if now is None:
            return None
        if now - prev < IDLE_SHARE * IDLE_WINDOW_S * 1e9:
            return round(time.monotonic() - t0, 3)
        prev = now
    return None


# Streams whose digest this process checked, by (path, inode, size, mtime): a write to one
# changes its mtime, and a stream is checked again. Another process checks for itself.
_VERIFIED: dict[tuple[str, int, int, int], str] = {}


def _identity(path: Path) -> tuple[str, int, int, int]:
    st = path.stat()
    return (str(path), st.st_ino, st.st_size, st.st_mtime_ns)


def _digest_once(path: Path) -> str:
    ident = _identity(path)
    if ident not in _VERIFIED:
        _VERIFIED.clear()  # one image a process restores at a time is the common case
        _VERIFIED[ident] = file_digest(path)
    return _VERIFIED[ident]


def reads_files(migration_capabilities: frozenset[str] | set[str]) -> bool:
    """Whether a QEMU loads a stream from a ``file:`` URI itself. The schema names no
    transports, but mapped-ram (9.0) works over file: only, and file: came before it (8.2):
    a binary with mapped-ram has it. 7.2 has neither and loads through ``exec:cat``."""
    return "mapped-ram" in migration_capabilities


def restore(cfg: MachineConfig, image: SnapshotImage,
            launch: Callable[[MachineConfig], Machine], timeout: float = 60.0, *,
            file_uri: bool = False) -> Machine:
    """A machine started from the image, loaded and paused (the caller continues it once it
    is ready to make it its own). The stream's digest is checked while QEMU loads it (once per
    process and stream as it is on disk). SnapshotUnusable (the machine already reaped) when
    QEMU refuses it or the bytes differ.

    ``file_uri`` (see reads_files): QEMU reads the file itself, with no cat process and no
    pipe between: 0.095-0.118 s against 0.126-0.170 s through exec:cat (QEMU 10.0.2, a 104 MB
    stream, 3 loads each, alternated). The stream is the same either way."""
    m = launch(replace(cfg, incoming=True))
    digest: dict[str, str] = {}

    def check() -> None:
        try:
            digest["sha"] = _digest_once(image.stream)
        except OSError as e:
            digest["sha"] = f"unreadable ({e})"
    hasher = threading.Thread(target=check, name="nestvirt-snapshot-digest", daemon=True)
    try:
        hasher.start()
        try:
            m.qmp("migrate-set-capabilities",
                  capabilities=[{"capability": "events", "state": True}])
            m.qmp("migrate-incoming", uri=load_uri(image.stream, file_uri))
            _wait_migration(m, timeout, "loading the image")
            status = m.qmp("query-status")["status"]
        except (StepTimeout, QmpCommandError) as e:
            raise SnapshotUnusable(f"QEMU did not take the saved image {image.key}: "
                                   f"{m.error_summary() if not m.alive() else e}") from e
        hasher.join(timeout)
        if digest.get("sha") != image.sha256:
            _VERIFIED.clear()
            raise SnapshotUnusable(f"saved image {image.key} is corrupt: sha256 "
                                   f"{digest.get('sha', 'unreadable')[:16]}..., the record says "
                                   f"{image.sha256[:16]}...")
        if status != "paused":
            raise SnapshotUnusable(f"saved image {image.key} loaded into status {status}, "
                                   "not paused")
        with contextlib.suppress(OSError):
            os.utime(image.dir / META)  # used: prune() keeps it
    except BaseException:
        m.shutdown()
        raise
    return m


def _wait_migration(m: Machine, timeout: float, what: str) -> None:
    ev = m.wait_qmp_event({"MIGRATION"}, timeout, match=lambda e: e.get("data", {}).get(
        "status") in ("completed", "failed", "cancelled"))
    status = ev["data"]["status"]
    if status != "completed":
        err = ""
        with contextlib.suppress(QmpCommandError):
            err = m.qmp("query-migrate").get("error-desc", "")
        raise StepTimeout(f"{what}: migration {status} {err}".strip())


def _save_command(path: Path) -> str:
    # exec: (not file:) works on every QEMU this project runs, 7.2 included.
    return f"cat > {shlex.quote(str(path))}"


def load_uri(path: Path, file_uri: bool) -> str:
    """The -incoming URI a restore loads ``path`` from (see reads_files)."""
    if file_uri and "," not in str(path):  # file: takes options after a comma
        return f"file:{path}"
    return f"exec:cat {shlex.quote(str(path))}"
