"""The host VM's first stage: busybox, the modules to reach its disks and run KVM with nesting,
and the init that mounts the root image and runs the job (templates/hostvm-init.sh.j2)."""

from __future__ import annotations

import shutil
from pathlib import Path

import jinja2

from harness.core.cache import cache_root, content_key, file_digest, locked
from harness.core.errors import SetupError
from harness.core.paths import TEMPLATES
from harness.guest.image import (
    BUSYBOX,
    module_index,
    module_load_order,
    pack_initramfs,
    read_module,
)
from harness.guest.kernel import Kernel

# The disks (virtio-blk over PCI), the overlay root, and KVM for AMD with nesting.
ROOT_MODULES = ("virtio_blk", "virtio_pci", "overlay", "kvm_amd")
TEMPLATE = "hostvm-init.sh.j2"
# Seconds between heartbeats on the event line: a host VM silent for a few of these is hung.
BEAT_S = 2


def render_init(modules: list[str], beat_s: int = BEAT_S) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.get_template(TEMPLATE).render(modules=modules, beat_s=beat_s)


def build_initramfs(kernel: Kernel, timeout: float = 120) -> Path:
    """The first-stage initramfs for kernel, cached by the content of everything in it."""
    if not Path(BUSYBOX).exists():
        raise SetupError(f"{BUSYBOX} is missing (apt-get install busybox-static)")
    order = module_load_order(kernel.modules, ROOT_MODULES)
    index = module_index(kernel.modules)
    missing = [m for m in ("virtio_blk", "overlay", "kvm_amd") if m not in index]
    if missing:
        raise SetupError(f"kernel {kernel.release} lacks module(s) {', '.join(missing)} the host "
                         "VM needs (give --kernel with them)")
    key = content_key([TEMPLATES / TEMPLATE],
                      extra=[kernel.release, file_digest(Path(BUSYBOX)),
                             *(f"{m}:{index[m].stat().st_size}" for m in order)])
    out = cache_root() / "hostvm" / f"initramfs-{key}.cpio"
    with locked(f"hostvm-initramfs-{key}"):
        if out.exists():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = out.with_name(f"stage-init-{key}")
        shutil.rmtree(stage, ignore_errors=True)
        try:
            for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "lib/modules"):
                (stage / d).mkdir(parents=True)
            shutil.copy2(BUSYBOX, stage / "bin/busybox")
            for m in order:
                (stage / "lib/modules" / f"{m}.ko").write_bytes(read_module(index[m]))
            pack_initramfs(stage, render_init(order), out, timeout)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return out
