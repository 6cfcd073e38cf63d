"""KVM selftest binaries from a kernel tree (or a directory of prebuilt ones), cached by content.

The default tree is Debian's linux-source package matching the L1 kernel, fetched with
`apt-get download` and reduced to the files the selftests need. A build copies that subset,
runs `make headers`, then builds every selftest statically with `make -k`, so one test that
does not compile (dirty_log_test in Debian's 6.1 tree) is recorded with the compiler's first
error line and the others still build. Builds live under cache_root() named by a digest of
the subset's sources and the compiler, so a warm run does no compiling.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.core import proc
from harness.core.cache import cache_root, locked
from harness.core.errors import SetupError, UsageError
from harness.guest.kernel import Kernel
from harness.selftests import kselftest

KVM_DIR = "tools/testing/selftests/kvm"

# What `make headers` plus the KVM selftests' Makefile read, found by building from nothing
# but these (6.1): 22 MB of the 1.3 GB tree. Top-level Makefile, scripts/ and the arch/x86
# pieces serve `make headers` (it builds arch/x86/tools/relocs and the syscall tables too).
TREE_SUBSET = (
    "Makefile",
    "scripts",
    "include/uapi",
    "arch/x86/Makefile",
    "arch/x86/include/uapi",
    "arch/x86/include/asm",
    "arch/x86/entry/syscalls",
    "arch/x86/tools",
    "tools/include",
    "tools/arch/x86",
    "tools/build",
    "tools/lib",
    "tools/scripts",
    KVM_DIR,
    "tools/testing/selftests/rseq",
    "tools/testing/selftests/lib.mk",
    "tools/testing/selftests/kselftest.h",
    "tools/testing/selftests/kselftest_harness.h",
)

# Files whose bytes decide what the build produces; build products in a user's tree are not.
_SOURCE_SUFFIXES = {".c", ".h", ".S", ".s", ".mk", ".include", ".tbl", ".sh", ".pl", ".py",
                    ".awk", ".lds", ".cfg", ".y", ".l"}
_SOURCE_NAMES = ("Makefile", "Kbuild", "Kconfig", "Build", "settings", "config")

# Bump when the build recipe changes, so old cache entries are not reused.
RECIPE = "kvm-selftests-static-v1"

# Variables in the caller's environment that would change what make builds.
_MAKE_ENV_DROP = ("ARCH", "CROSS_COMPILE", "LLVM", "CC", "LD", "CFLAGS", "LDFLAGS", "LDLIBS",
                  "EXTRA_CFLAGS", "O", "OUTPUT", "KBUILD_OUTPUT", "MAKEFLAGS", "MFLAGS",
                  "KHDR_INCLUDES", "INSTALL_HDR_PATH")

_LIST_MK = "nestvirt-list:\n\t@echo $(TEST_GEN_PROGS)\n"
_SETTINGS_TIMEOUT = re.compile(r"^\s*timeout\s*=\s*(\d+)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class BuiltTest:
    """One selftest of a build: its binary, or why there is none."""

    name: str
    relpath: str  # as the Makefile names it, e.g. "x86_64/state_test"
    binary: Path | None
    error: str = ""  # the compiler's first error line (or another one-line reason)
    log: Path | None = None

    @property
    def ok(self) -> bool:
        return self.binary is not None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "relpath": self.relpath,
                "binary": str(self.binary) if self.binary else None, "error": self.error,
                "log": str(self.log) if self.log else None}


@dataclass(frozen=True)
class SelftestBuild:
    """The selftests available to run, from one source, as built (or found) once.

    ``timeout_s`` is the kselftest ``settings`` timeout of the KVM directory, if it has one.
    ``timings`` holds seconds per setup step (download, extract, headers, build), as measured
    when the step ran; ``cached`` says this process reused a finished build.
    """

    dir: Path
    key: str
    source: str
    tests: tuple[BuiltTest, ...]
    timeout_s: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    cached: bool = False

    def names(self) -> list[str]:
        return [t.name for t in self.tests]

    def get(self, name: str) -> BuiltTest:
        for t in self.tests:
            if t.name == name:
                return t
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        return {"dir": str(self.dir), "key": self.key, "source": self.source,
                "timeout_s": self.timeout_s, "timings": self.timings, "cached": self.cached,
                "built": sum(t.ok for t in self.tests), "failed": sum(not t.ok for t in self.tests),
                "tests": [t.to_json() for t in self.tests]}


# -- which source ---------------------------------------------------------------------------

def kernel_banner(image: Path) -> str:
    """The version string an x86 bzImage carries in its setup header ("" if it has none)."""
    with open(image, "rb") as f:
        head = f.read(0x10000)  # the string sits in the setup code: at most 64 sectors + 512
    if len(head) < 0x210 or head[0x202:0x206] != b"HdrS":
        return ""
    (offset,) = struct.unpack_from("<H", head, 0x20E)
    start = offset + 0x200
    if not offset or start >= len(head):
        return ""
    return head[start:].split(b"\0", 1)[0].decode(errors="replace")


def debian_source_for(kernel: Kernel) -> tuple[str, str | None]:
    """(package, version) of the linux-source matching the kernel; version None = newest.

    A Debian kernel's banner ends with "Debian 6.1.192-2 (date)": that is the source version.
    """
    m = re.match(r"(\d+)\.(\d+)", kernel.release)
    if not m:
        raise UsageError(f"kernel release {kernel.release!r}: cannot tell its version; "
                         "pass --kernel-tree or --selftests")
    package = f"linux-source-{m.group(1)}.{m.group(2)}"
    v = re.search(r"\bDebian (\d[\w.+~:-]*)", kernel_banner(kernel.image))
    return package, (v.group(1) if v else None)


def fetch_debian_source(package: str, version: str | None, timeout: float = 900) -> tuple[Path, dict]:
    """Download Debian's linux-source .deb (no install) and extract TREE_SUBSET once.

    Returns the tree's root and what was recorded when it was fetched (version, timings).
    """
    with locked(f"linux-source-{package}"):
        return _fetch_debian_source(package, version, timeout)


def _fetch_debian_source(package: str, version: str | None, timeout: float) -> tuple[Path, dict]:
    root = cache_root() / "linux-source"
    root.mkdir(parents=True, exist_ok=True)
    wanted = f"{package}_{version}" if version else None
    for done in sorted(root.glob(f"{package}_*/.complete")):
        info = json.loads(done.read_text())
        if wanted is None or done.parent.name == wanted:
            return done.parent / info["top"], info
    if not shutil.which("apt-get"):
        raise SetupError(f"apt-get is missing to fetch {package}: pass --kernel-tree or --selftests")
    if not shutil.which("xz"):
        raise SetupError(f"xz is needed to unpack {package} (apt-get install xz-utils)")
    dl = root / ".download"
    shutil.rmtree(dl, ignore_errors=True)
    dl.mkdir()
    t0 = time.monotonic()
    spec = f"{package}={version}" if version else package
    try:
        proc.run(["apt-get", "download", "-q", spec], timeout, cwd=dl)
    except SetupError as e:
        raise SetupError(f"cannot download {spec} (run apt-get update?): {e}") from e
    debs = sorted(dl.glob("*.deb"))
    if not debs:
        raise SetupError(f"apt-get download {spec} produced no .deb")
    got = proc.run(["dpkg-deb", "-f", str(debs[0]), "Version"], 60).stdout.strip()
    download_s = time.monotonic() - t0
    dest = root / f"{package}_{got}"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir()
    t0 = time.monotonic()
    top = _extract_subset(debs[0], dest, package, timeout)
    extract_s = time.monotonic() - t0
    shutil.rmtree(dl, ignore_errors=True)
    info = {"package": package, "version": got, "top": top,
            "timings": {"download": round(download_s, 2), "extract": round(extract_s, 2)}}
    (dest / ".complete").write_text(json.dumps(info, indent=1))
    return dest / top, info


def _extract_subset(deb: Path, dest: Path, package: str, timeout: float) -> str:
    """Pull usr/src/<package>.tar.xz out of the .deb, then only TREE_SUBSET out of it."""
    tarball = dest / "source.tar.xz"
    proc.run(["dpkg-deb", "-x", str(deb), str(dest / "deb")], timeout)
    found = list((dest / "deb/usr/src").glob(f"{package}.tar.*"))
    if not found:
        raise SetupError(f"{deb.name} holds no usr/src/{package}.tar.*")
    found[0].rename(tarball)
    shutil.rmtree(dest / "deb")
    top = package  # the tarball's top directory, as Debian names it
    members = [f"{top}/{p}" for p in TREE_SUBSET]
    # xz decompression is the cost (~7 s here); -T2 lets it use both cores.
    tar = ["tar", "-x", "-C", str(dest), "--no-wildcards", *members]
    # check=False: a tree of another version may lack a member; the test below decides.
    proc.run(["sh", "-c", 'xz -dc -T2 "$0" | "$@"', str(tarball), *tar], timeout, check=False)
    tarball.unlink()
    if not (dest / top / KVM_DIR / "Makefile").exists():
        raise SetupError(f"{package} has no {KVM_DIR}/Makefile")
    return top


# -- building -------------------------------------------------------------------------------

def tree_key(tree: Path) -> str:
    """Digest of the subset's source files, the compiler's version and the recipe."""
    h = hashlib.sha256(RECIPE.encode())
    h.update(_tool_version("gcc").encode())
    for rel in TREE_SUBSET:
        p = tree / rel
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else []
        for f in files:
            if not _is_source(f):
                continue
            h.update(str(f.relative_to(tree)).encode() + b"\0")
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _is_source(f: Path) -> bool:
    return f.suffix in _SOURCE_SUFFIXES or f.name.startswith(_SOURCE_NAMES)


def _tool_version(tool: str) -> str:
    if not shutil.which(tool):
        return "absent"
    return proc.run([tool, "--version"], 30, check=False).stdout.split("\n", 1)[0]


def build_tree(tree: Path, source: str, *, jobs: int = 2, timeout: float = 900,
               source_timings: dict[str, float] | None = None) -> SelftestBuild:
    """Build (or reuse) every KVM selftest of a kernel tree; never writes into ``tree``."""
    tree = tree.resolve()
    if not (tree / KVM_DIR / "Makefile").is_file():
        raise UsageError(f"--kernel-tree {tree}: no {KVM_DIR}/Makefile")
    for tool in ("make", "gcc"):
        if not shutil.which(tool):
            raise SetupError(f"{tool} is needed to build the KVM selftests (apt-get install {tool})")
    key = tree_key(tree)
    with locked(f"selftests-{key}"):
        return _build_tree(tree, source, key, jobs, timeout, source_timings or {})


def _build_tree(tree: Path, source: str, key: str, jobs: int, timeout: float,
                source_timings: dict[str, float]) -> SelftestBuild:
    out = cache_root() / f"selftests-{key}"
    if (out / ".complete").exists():
        return _load(out, cached=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    src, bins, logs = tmp / "src", tmp / "bin", tmp / "logs"
    logs.mkdir(parents=True)
    timings = dict(source_timings)
    t0 = time.monotonic()
    _copy_subset(tree, src)
    timings["copy"] = round(time.monotonic() - t0, 2)
    env = _make_env()
    t0 = time.monotonic()
    hdr = proc.run(["make", "-s", f"-j{jobs}", "headers"], timeout, cwd=src, env=env, check=False)
    (logs / "headers.log").write_text(hdr.stdout + hdr.stderr)
    if hdr.returncode != 0:
        raise SetupError(f"make headers failed in a copy of {tree}: "
                         f"{kselftest.first_build_error(hdr.stdout + hdr.stderr)}")
    timings["headers"] = round(time.monotonic() - t0, 2)
    kvm = src / KVM_DIR
    make = ["make", "-C", str(kvm), f"OUTPUT={bins}", "LDFLAGS=-static"]
    relpaths = _list_tests(kvm, make, env, bins)
    t0 = time.monotonic()
    # -k: a test that does not compile must not stop the others.
    build = proc.run([*make, "-k", f"-j{jobs}"], timeout, env=env, check=False)
    (logs / "build.log").write_text(build.stdout + build.stderr)
    timings["build"] = round(time.monotonic() - t0, 2)
    t0 = time.monotonic()
    tests = []
    for rel in relpaths:
        binary = bins / rel
        name = _unique_name(rel, relpaths)
        if binary.is_file() and os.access(binary, os.X_OK):
            tests.append(BuiltTest(name, rel, binary))
            continue
        # Rebuild alone for a log that is this test's only (-j output interleaves).
        one = proc.run([*make, str(binary)], timeout, env=env, check=False)
        log = logs / f"{name}.log"
        log.write_text(one.stdout + one.stderr)
        # Paths relative to the tree: the copy it was built in is gone once the build is done.
        error = kselftest.first_build_error(one.stdout + one.stderr).replace(f"{src}/", "")
        tests.append(BuiltTest(name, rel, None, error, log))
    timings["failed_rebuilds"] = round(time.monotonic() - t0, 2)
    settings = kvm / "settings"
    manifest = {"key": key, "source": source, "tree": str(tree), "timings": timings,
                "timeout_s": _settings_timeout(settings),
                # Relative to the entry: it is built in .tmp and renamed when complete.
                "tests": [{"name": t.name, "relpath": t.relpath, "built": t.ok, "error": t.error,
                           "log": str(t.log.relative_to(tmp)) if t.log else None} for t in tests]}
    shutil.rmtree(src)  # the binaries are the cache entry; the copy was only to build in
    (tmp / "build.json").write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    (out / ".complete").write_text(key + "\n")
    return _load(out, cached=False)


def _copy_subset(tree: Path, dest: Path) -> None:
    """Copy TREE_SUBSET, leaving out objects and git data a developer's tree may hold."""
    ignore = shutil.ignore_patterns("*.o", "*.a", "*.d", ".*.cmd", ".git")
    for rel in TREE_SUBSET:
        p = tree / rel
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if p.is_dir():
            shutil.copytree(p, target, ignore=ignore, symlinks=True)
        elif p.is_file():
            shutil.copy2(p, target)


def _make_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _MAKE_ENV_DROP}
    env["LC_ALL"] = "C"  # plain-ASCII compiler messages, the same on every machine
    return env


def _list_tests(kvm: Path, make: list[str], env: dict[str, str], bins: Path) -> list[str]:
    """TEST_GEN_PROGS as the Makefile computes it for this arch, relative to OUTPUT."""
    listing = bins.parent / "list.mk"
    listing.write_text(_LIST_MK)
    cp = proc.run([*make, "-s", "-f", "Makefile", "-f", str(listing), "nestvirt-list"], 120,
                  env=env, check=False)
    if cp.returncode != 0:
        raise SetupError(f"cannot list the KVM selftests: {kselftest.first_build_error(cp.stderr)}")
    prefix = str(bins) + "/"
    rels = [w.removeprefix(prefix) for w in cp.stdout.split() if w.startswith(prefix)]
    if not rels:
        raise SetupError(f"{kvm}/Makefile lists no selftests for this architecture")
    return rels


def _unique_name(rel: str, all_rels: list[str]) -> str:
    base = rel.rsplit("/", 1)[-1]
    clash = sum(r.rsplit("/", 1)[-1] == base for r in all_rels) > 1
    return rel.replace("/", "-") if clash else base


def _settings_timeout(path: Path) -> float | None:
    if not path.is_file():
        return None
    m = _SETTINGS_TIMEOUT.search(path.read_text(errors="replace"))
    return float(m.group(1)) if m else None


def _load(out: Path, cached: bool) -> SelftestBuild:
    m = json.loads((out / "build.json").read_text())
    tests = tuple(
        BuiltTest(t["name"], t["relpath"], out / "bin" / t["relpath"] if t["built"] else None,
                  t["error"], out / t["log"] if t["log"] else None)
        for t in m["tests"])
    return SelftestBuild(out, m["key"], m["source"], tests, m.get("timeout_s"), m["timings"], cached)


# -- prebuilt -------------------------------------------------------------------------------

def prebuilt(directory: Path) -> SelftestBuild:
    """Selftest binaries someone built already (e.g. `make install` output): every ELF
    executable under ``directory``. A dynamically linked one is listed with the reason it
    cannot run in L1, whose initramfs has no C library."""
    directory = directory.resolve()
    if not directory.is_dir():
        raise UsageError(f"--selftests {directory}: not a directory")
    found = sorted(f for f in directory.rglob("*") if f.is_file() and os.access(f, os.X_OK)
                   and _elf_kind(f) is not None)
    if not found:
        raise UsageError(f"--selftests {directory}: no executable ELF files")
    rels = [str(f.relative_to(directory)) for f in found]
    h = hashlib.sha256(b"prebuilt")
    tests = []
    for f, rel in zip(found, rels, strict=True):
        h.update(rel.encode() + b"\0" + f.read_bytes())
        name = _unique_name(rel, rels)
        if _elf_kind(f) == "dynamic":
            tests.append(BuiltTest(name, rel, None, "dynamically linked: L1 has no C library "
                                   "(build with LDFLAGS=-static)"))
        else:
            tests.append(BuiltTest(name, rel, f))
    settings = next((p for p in (directory / "settings", directory / "kvm/settings") if p.is_file()),
                    directory / "settings")
    return SelftestBuild(directory, h.hexdigest()[:16], f"prebuilt:{directory}", tuple(tests),
                         _settings_timeout(settings), {}, cached=True)


def _elf_kind(path: Path) -> str | None:
    """"static" or "dynamic" for a 64-bit little-endian ELF executable, else None."""
    with open(path, "rb") as f:
        head = f.read(64)
        if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
            return None
        phoff, = struct.unpack_from("<Q", head, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    for i in range(phnum):
        (p_type,) = struct.unpack_from("<I", table, i * phentsize)
        if p_type == 3:  # PT_INTERP: needs a dynamic loader
            return "dynamic"
    return "static"
