"""Build L1 artefacts from guests/ and templates/: tools, and an initramfs cached by content."""

from __future__ import annotations

import lzma
import os
import re
import shutil
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from harness.core import proc
from harness.core.cache import cache_root, content_key, file_digest, locked
from harness.core.errors import SetupError, UsageError
from harness.core.paths import GUESTS, TEMPLATES
from harness.guest.kernel import Kernel

# What L1 must load: KVM for either vendor (init picks by CPU flag) and the network path.
ROOT_MODULES = ("kvm_amd", "kvm_intel", "virtio_net", "virtio_pci")
# Where the guest programs live inside L1 (the initramfs puts them there).
GUEST_TOOLS = "/usr/lib/nestvirt"
DROPBEAR = "/usr/sbin/dropbear"
BUSYBOX = "/bin/busybox"


@dataclass(frozen=True)
class GuestTools:
    """Static programs built from guests/: the L2 VMM, its payloads and the L1 workload."""

    dir: Path
    key: str

    @property
    def payloads(self) -> Path:
        return self.dir / "payloads"


@dataclass(frozen=True)
class L1Image:
    """Everything QEMU needs to boot L1: kernel, initramfs and the kernel command line base."""

    kernel: Kernel
    initramfs: Path
    key: str
    tools: GuestTools
    modules: tuple[str, ...]

    def to_json(self) -> dict:
        return {"kernel": self.kernel.to_json(), "initramfs": str(self.initramfs),
                "key": self.key, "tools": str(self.tools.dir), "modules": list(self.modules)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> L1Image:
        """Inverse of to_json (results.json run.image); UsageError when the record is
        malformed or its cached files are gone."""
        try:
            tools_dir = Path(d["tools"])
            image = cls(kernel=Kernel.from_json(d["kernel"]), initramfs=Path(d["initramfs"]),
                        key=str(d["key"]),
                        tools=GuestTools(tools_dir, tools_dir.name.removeprefix("tools-")),
                        modules=tuple(d.get("modules", ())))
        except (KeyError, TypeError) as e:
            raise UsageError(f"image record: missing {e}") from e
        for what, path in (("kernel", image.kernel.image), ("initramfs", image.initramfs)):
            if not path.is_file():
                raise UsageError(f"cached {what} {path} is gone (the cache was cleaned): run the "
                                 "original command again to rebuild it")
        return image


def build_tools(timeout: float = 300) -> GuestTools:
    """Compile guests/ with its Makefile into a cache dir named by the sources' digest."""
    key = content_key([GUESTS])
    with locked(f"tools-{key}"):
        return _build_tools(key, timeout)


def _build_tools(key: str, timeout: float) -> GuestTools:
    out = cache_root() / f"tools-{key}"
    if (out / ".complete").exists():
        return GuestTools(out, key)
    if not shutil.which("gcc") or not shutil.which("make"):
        raise SetupError("gcc and make are needed to build guests/ (apt-get install gcc make)")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    proc.run(["make", "-s", "-C", str(GUESTS), f"OUT={tmp}"], timeout)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    (out / ".complete").write_text(key + "\n")
    return GuestTools(out, key)


def module_index(modules_dir: Path) -> dict[str, Path]:
    """Map module name (underscored) to its file under lib/modules/<rel>/kernel."""
    index: dict[str, Path] = {}
    for f in (modules_dir / "kernel").rglob("*.ko*"):
        name = re.sub(r"\.ko(\.xz|\.zst|\.gz)?$", "", f.name).replace("-", "_")
        index[name] = f
    return index


def module_depends(ko: bytes) -> list[str]:
    """Read the depends= field of a module's .modinfo (Debian's .deb ships no modules.dep)."""
    m = re.search(rb"(?:^|\x00)depends=([^\x00]*)", ko)
    if not m or not m.group(1):
        return []
    return [d.decode().replace("-", "_") for d in m.group(1).split(b",") if d]


def read_module(path: Path) -> bytes:
    """Module bytes, decompressed: busybox insmod loads plain ELF only."""
    if path.name.endswith(".xz"):
        return lzma.decompress(path.read_bytes())
    if path.name.endswith(".zst"):
        plain = cache_root() / f".module-{os.getpid()}.ko"
        proc.run(["zstd", "-dcq", str(path)], 60, stdout_path=plain)
        data = plain.read_bytes()
        plain.unlink()
        return data
    return path.read_bytes()


def module_load_order(modules_dir: Path, roots: tuple[str, ...] = ROOT_MODULES) -> list[str]:
    """Dependencies first; roots absent from the tree (built in) are skipped, KVM is required."""
    index = module_index(modules_dir)
    if "kvm" not in index and not _builtin(modules_dir, "kvm"):
        raise SetupError(f"kernel {modules_dir.name} has no kvm module: L1 cannot run KVM")
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str, needed_by: str | None = None) -> None:
        if name in seen:
            return
        seen.add(name)
        if name not in index:
            if needed_by is not None and not _builtin(modules_dir, name):
                # A module's depends= names modules only: this one is missing from the tree.
                raise SetupError(f"kernel {modules_dir.name}: module {needed_by} needs {name}, "
                                 f"which is not in {modules_dir}")
            return  # a root built in, or absent; init reports a module that fails to load
        for dep in module_depends(read_module(index[name])):
            visit(dep, name)
        order.append(name)

    for r in roots:
        visit(r)
    return order


def _builtin(modules_dir: Path, name: str) -> bool:
    builtin = modules_dir / "modules.builtin"
    return builtin.exists() and f"/{name}.ko" in builtin.read_text()


def render_init(modules: list[str]) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.get_template("l1-init.sh.j2").render(modules=modules)


def build_l1(kernel: Kernel, tools: GuestTools, timeout: float = 120) -> L1Image:
    """Assemble (or reuse) the L1 initramfs: busybox, modules, dropbear, tools, init."""
    with locked("initramfs"):
        return _build_l1(kernel, tools, timeout)


def _build_l1(kernel: Kernel, tools: GuestTools, timeout: float) -> L1Image:
    for tool in (BUSYBOX, DROPBEAR):
        if not Path(tool).exists():
            raise SetupError(f"{tool} is missing (apt-get install busybox-static dropbear-bin)")
    if not shutil.which("cpio"):
        raise SetupError("cpio is missing (apt-get install cpio)")
    order = module_load_order(kernel.modules)
    index = module_index(kernel.modules)
    key = content_key(
        [TEMPLATES / "l1-init.sh.j2"],
        extra=[kernel.release, tools.key, file_digest(Path(BUSYBOX)), file_digest(Path(DROPBEAR)),
               *(f"{m}:{index[m].stat().st_size}" for m in order)],
    )
    out = cache_root() / f"initramfs-{key}.cpio"
    if out.exists():
        return L1Image(kernel, out, key, tools, tuple(order))
    stage = cache_root() / f"stage-{key}"
    shutil.rmtree(stage, ignore_errors=True)
    for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "run", "etc", "root/.ssh",
              "lib/modules", "usr/bin", "usr/sbin", "var/log"):
        (stage / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, stage / "bin/busybox")
    _copy_with_libs(Path(DROPBEAR), stage)
    for m in order:
        (stage / "lib/modules" / f"{m}.ko").write_bytes(read_module(index[m]))
    for f in tools.dir.rglob("*"):
        if f.is_file() and f.name != ".complete":
            dest = stage / GUEST_TOOLS.lstrip("/") / f.relative_to(tools.dir)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest)
    for prog in ("nvmm", "l1work", "nvrekey"):
        if (tools.dir / prog).exists():
            os.symlink(f"{GUEST_TOOLS}/{prog}", stage / "bin" / prog)
    (stage / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (stage / "etc/group").write_text("root:x:0:\n")
    (stage / "etc/shells").write_text("/bin/sh\n")
    pack_initramfs(stage, render_init(order), out, timeout)
    shutil.rmtree(stage, ignore_errors=True)
    return L1Image(kernel, out, key, tools, tuple(order))


def _copy_with_libs(binary: Path, stage: Path) -> None:
    """Copy a dynamic binary and every library ldd lists (with the loader) into stage."""
    dest = stage / str(binary).lstrip("/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(binary, dest)
    for line in proc.run(["ldd", str(binary)], 30).stdout.splitlines():
        m = re.search(r"(/\S+)\s+\(0x", line)
        if not m:
            continue
        lib = Path(m.group(1))
        target = stage / str(lib).lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(lib.resolve(), target)


def pack_tree(stage: Path, out: Path, timeout: float) -> None:
    """Every file under ``stage`` as one newc cpio at ``out``, paths relative to stage (an
    initramfs, or files to unpack at / in a running L1). Uncompressed on purpose:
    decompression in an emulated guest costs more than the bytes."""
    files = "\n".join(str(p.relative_to(stage)) for p in sorted(stage.rglob("*"))) + "\n"
    proc.run(["cpio", "-o", "-H", "newc", "--quiet"], timeout, cwd=stage, input=files,
             stdout_path=out)


def pack_initramfs(stage: Path, init_text: str, out: Path, timeout: float) -> None:
    """Write ``init_text`` as the stage's executable /init and pack the stage as a newc cpio
    at ``out`` (under a temporary name first, so a reader never sees half of it)."""
    init = stage / "init"
    init.write_text(init_text)
    init.chmod(init.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    tmp = out.with_suffix(".tmp")
    pack_tree(stage, tmp, timeout)
    tmp.rename(out)
