"""Which host files the host VM needs, at their host paths: Python and the project with its
dependencies, the QEMU binaries of the inventory with their libraries and firmware, the L1
kernel and its cached artefacts, busybox and dropbear.

Pure selection: a list of paths (files, symlinks) walked from a few roots. Nothing is copied
here; image.py stages and packs them.
"""

from __future__ import annotations

import os
import re
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

from harness.core import proc
from harness.core.paths import REPO

# Parts of the stdlib and the venv nestvirt never imports inside (the bench's plotting stack
# is the bulk of the venv): left out to keep the image small and its build short.
STDLIB_SKIP = frozenset({"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3",
                         "pydoc_data", "site-packages", "config-3.11-x86_64-linux-gnu"})
VENV_SKIP = frozenset({"matplotlib", "numpy", "numpy.libs", "fontTools", "PIL", "pillow.libs",
                       "pip", "pygments", "mpl_toolkits", "kiwisolver", "contourpy", "pytest",
                       "_pytest", "avocado", "setuptools", "pkg_resources", "ruff"})
REPO_DIRS = ("harness", "templates", "guests", "ci")
REPO_FILES = ("pyproject.toml",)
# Small host files a Python/paramiko process or the dynamic loader reads at start.
ETC = ("/etc/passwd", "/etc/group", "/etc/nsswitch.conf", "/etc/hosts", "/etc/ld.so.cache",
       "/etc/localtime")
# coreutils' touch: busybox's cannot set nanoseconds (job.py puts the host's mtimes back).
# /bin/sh and cat: QEMU's exec: migration (the L1 snapshot's save and load) runs them.
# dmesg: `selftest --on host` reads the host VM kernel's log around each test.
HOST_TOOLS = ("/bin/busybox", "/usr/sbin/dropbear", "/usr/bin/env", "/usr/bin/cpio",
              "/usr/bin/touch", "/bin/sh", "/usr/bin/dash", "/usr/bin/cat",
              "/usr/bin/dmesg")
ELF = b"\x7fELF"


def walk(root: Path, skip: frozenset[str] = frozenset()) -> Iterator[Path]:
    """Every file and symlink under root (a symlinked dir is listed, not followed)."""
    if root.is_symlink() or root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip
                       and not (d.endswith((".dist-info", ".egg-info")) and d.split("-")[0] in skip)]
        base = Path(dirpath)
        for d in dirnames:
            if (base / d).is_symlink():
                yield base / d
        for f in filenames:
            yield base / f


def python_files() -> list[Path]:
    """The interpreter running nestvirt, its stdlib and the venv's site-packages."""
    out: list[Path] = [Path(sys.executable), Path(os.path.realpath(sys.executable))]
    stdlib = Path(sysconfig.get_path("stdlib"))
    out += walk(stdlib, STDLIB_SKIP)
    venv = Path(sys.prefix)
    if venv != Path(sys.base_prefix):
        out += [venv / "pyvenv.cfg", *walk(venv / "bin")]
        out += walk(Path(sysconfig.get_path("purelib")), VENV_SKIP)
    return out


def project_files(repo: Path = REPO) -> list[Path]:
    out: list[Path] = [repo / f for f in REPO_FILES if (repo / f).exists()]
    for d in REPO_DIRS:
        out += walk(repo / d, frozenset({".git"}))
    return out


def shared_libs(binaries: Iterable[Path]) -> set[Path]:
    """The libraries ldd lists for every dynamic ELF among binaries (and the loader)."""
    libs: set[Path] = set()
    for b in binaries:
        if b.is_symlink() or not b.is_file() or not _is_elf(b):
            continue
        cp = proc.run(["ldd", str(b)], 30, check=False)
        for line in cp.stdout.splitlines():
            m = re.search(r"(/\S+)\s+\(0x", line)
            if m:
                libs.add(Path(m.group(1)))
    return libs


def _is_elf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == ELF
    except OSError:
        return False


def with_parents_links(paths: Iterable[Path]) -> set[Path]:
    """paths plus every symlink met on the way to each (merged /usr: /lib -> usr/lib, a venv's
    python -> python3 -> /opt/.../python3.11), hop by hop, and the final target, so a path the
    host resolves resolves the same way in the image."""
    out: set[Path] = set()
    for p in paths:
        _resolve_into(Path(os.path.abspath(p)), out, 0)
    return out


def _resolve_into(p: Path, out: set[Path], depth: int) -> None:
    if depth > 20:
        return  # a symlink loop: the host cannot resolve it either
    cur = Path("/")
    parts = p.parts[1:]
    for i, part in enumerate(parts):
        cur = cur / part
        if cur.is_symlink():
            out.add(cur)
            target = Path(os.readlink(cur))
            hop = Path(os.path.normpath(cur.parent / target))
            _resolve_into(Path(hop, *parts[i + 1:]), out, depth + 1)
            return
    out.add(cur)


def select(*, extra_trees: Iterable[Path] = (), binaries: Iterable[Path] = ()) -> list[Path]:
    """The selection before libraries (cheap: a walk, no process): Python, the project, the
    given trees (cache entries, QEMU trees, firmware dirs) and binaries, host tools, /etc."""
    chosen: list[Path] = python_files() + project_files()
    for t in extra_trees:
        if t.exists():
            chosen += walk(t)
    chosen += [Path(b) for b in binaries]
    chosen += [Path(t) for t in (*HOST_TOOLS, *ETC) if Path(t).exists()]
    return sorted(set(chosen))


def complete(chosen: Iterable[Path]) -> list[Path]:
    """chosen plus the libraries of its ELF files and the symlinks on the way to each."""
    chosen = list(chosen)
    elves = [p for p in chosen if p.suffix == ".so" or ".so." in p.name
             or p.parent.name in ("bin", "sbin")]
    return sorted(with_parents_links([*chosen, *shared_libs(elves)]))
