"""Assemble a host VM from what this host has: the L1 image built here first (so the inner run
finds it cached), the inventory's QEMUs, the root image and the first-stage initramfs."""

from __future__ import annotations

import compileall
import os
import time
from dataclasses import dataclass
from pathlib import Path

from harness.core.cache import cache_root
from harness.core.errors import SetupError
from harness.core.paths import REPO
from harness.guest.image import L1Image, build_l1, build_tools
from harness.guest.kernel import Kernel, find_kernel
from harness.hostvm import files
from harness.hostvm.image import build_image, image_path, selection_key
from harness.hostvm.initramfs import build_initramfs
from harness.hostvm.vm import DEFAULT_MEM_MIB, DEFAULT_SMP, DEFAULT_TCG_THREAD, HostVmSpec, check_spec
from harness.qemu.inventory import SYSTEM_MODULE_DIR, Inventory, load_inventory, newest, select


@dataclass(frozen=True)
class Prepared:
    spec: HostVmSpec
    l1: L1Image
    seconds: dict[str, float]
    built: bool  # the root image was (re)built now
    mtimes: dict[str, int]  # paths whose nanosecond mtime the image loses (see job.py)


def keyed_mtimes(inv: Inventory) -> dict[str, int]:
    """The paths the inventory's probe cache keys on, with their nanosecond mtimes."""
    out: dict[str, int] = {}
    for q in inv.qemus:
        for p in (q.binary, q.module_dir, SYSTEM_MODULE_DIR, *q.firmware_dirs):
            try:
                ns = os.stat(p).st_mtime_ns if p else 0
            except OSError:
                continue
            if ns % 10**9:
                out[p] = ns
    return out


def image_trees(inv: Inventory, l1: L1Image) -> list[Path]:
    """The directories beside Python and the project the inner run needs, at host paths."""
    cache = cache_root()
    trees = [l1.kernel.modules.parent.parent.parent, l1.tools.dir, l1.initramfs,
             cache / "qemu-probe"]
    for q in inv.qemus:
        root = Path(q.binary).resolve()
        if root.is_relative_to(cache):
            trees.append(Path(*root.parts[:len(cache.parts) + 2]))  # CACHE/qemu/<tree>
        if q.module_dir:
            trees.append(Path(q.module_dir))
        trees += [Path(d) for d in q.firmware_dirs]
    trees += [Path(SYSTEM_MODULE_DIR), Path("/usr/share/qemu"), Path("/usr/share/seabios"),
              Path("/usr/lib/ipxe/qemu")]
    return [t for t in trees if t.exists()]


def prepare(*, kernel: str | None = None, modules: str | None = None, qemu: str | None = None,
            mem_mib: int = DEFAULT_MEM_MIB, smp: int = DEFAULT_SMP, cpu: str = "max",
            tcg_thread: str = DEFAULT_TCG_THREAD, npt: bool = True,
            kvm_amd: tuple[str, ...] = (), build: bool = True, extra_trees: tuple[Path, ...] = ()) -> Prepared:
    """Everything a host VM boot needs, built or reused. ``build=False`` builds nothing and
    raises SetupError when the image is missing (``hostvm status``). ``extra_trees``: more
    directories the inner command needs at their host paths (built selftests)."""
    t0 = time.monotonic()
    k: Kernel = find_kernel(kernel, modules)
    tools = build_tools()
    l1 = build_l1(k, tools)
    inv = load_inventory()
    q = select(inv.qemus, qemu, "--hostvm-qemu") if qemu else newest(inv.qemus)
    if q is None:
        raise SetupError("no usable QEMU for the host VM (nestvirt qemu list)")
    seconds = {"l1_image": round(time.monotonic() - t0, 2)}
    t1 = time.monotonic()
    if build:
        # The inner Python reads bytecode from the read-only image: compile it here once.
        for d in (REPO / "harness",):
            compileall.compile_dir(str(d), quiet=1, workers=1)
    chosen = files.select(extra_trees=[*image_trees(inv, l1), *extra_trees],
                          binaries=[Path(x.binary) for x in inv.qemus])
    key = selection_key(chosen)
    seconds["select"] = round(time.monotonic() - t1, 2)
    built = False
    if not image_path(key).exists():
        if not build:
            raise SetupError("the host VM image is not built (nestvirt hostvm build)")
        t2 = time.monotonic()
        image = build_image(key, files.complete(chosen))
        seconds["image_build"] = round(time.monotonic() - t2, 2)
        built = True
    else:
        image = build_image(key, [])
    initrd = build_initramfs(k)
    spec = HostVmSpec(qemu=q.binary, qemu_version=q.version, module_dir=q.module_dir,
                      firmware_dirs=q.firmware_dirs, kernel=k, initramfs=initrd, image=image,
                      mem_mib=mem_mib, smp=smp, cpu=cpu, tcg_thread=tcg_thread, npt=npt,
                      kvm_amd=kvm_amd)
    check_spec(spec)
    return Prepared(spec, l1, seconds, built, keyed_mtimes(inv))
