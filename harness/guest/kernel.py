"""Find the L1 kernel: --kernel > NESTVIRT_KERNEL > the host's > Debian's cloud kernel (fetched)."""

from __future__ import annotations

import os
import platform
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.core import proc
from harness.core.cache import cache_root, locked
from harness.core.errors import SetupError, UsageError

DEBIAN_KERNEL_META = "linux-image-cloud-amd64"


@dataclass(frozen=True)
class Kernel:
    """A bootable kernel image and the module tree that matches it."""

    image: Path
    modules: Path  # .../lib/modules/<release>
    release: str
    origin: str  # "--kernel", "NESTVIRT_KERNEL", "host", "debian:<package>"

    def to_json(self) -> dict:
        return {"image": str(self.image), "modules": str(self.modules),
                "release": self.release, "origin": self.origin}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Kernel:
        """Inverse of to_json; KeyError/TypeError on a malformed record."""
        return cls(Path(d["image"]), Path(d["modules"]), str(d["release"]), str(d["origin"]))


def find_kernel(kernel: str | None = None, modules: str | None = None) -> Kernel:
    """Resolve the L1 kernel by precedence; raise UsageError for a bad explicit path."""
    if modules and not kernel and not os.environ.get("NESTVIRT_KERNEL"):
        raise UsageError("--modules goes with --kernel (or NESTVIRT_KERNEL): alone it would "
                         "be ignored")
    if kernel:
        return _explicit(Path(kernel), modules, "--kernel")
    if os.environ.get("NESTVIRT_KERNEL"):
        return _explicit(Path(os.environ["NESTVIRT_KERNEL"]), modules, "NESTVIRT_KERNEL")
    release = platform.release()
    image = Path(f"/boot/vmlinuz-{release}")
    mods = Path(f"/lib/modules/{release}")
    # Ubuntu keeps vmlinuz root-only: an unreadable image is as good as none.
    if image.is_file() and os.access(image, os.R_OK) and (mods / "kernel").is_dir():
        return Kernel(image, mods, release, "host")
    return debian_kernel()


def kernel_format(image: Path) -> str | None:
    """'bzImage' or 'ELF' for a file QEMU's -kernel can boot as Linux; None otherwise.

    A bzImage carries the x86 boot protocol's "HdrS" magic at 0x202 (Documentation/x86/
    boot.rst); an uncompressed vmlinux is an ELF file."""
    try:
        with open(image, "rb") as fh:
            head = fh.read(0x206)
    except OSError:
        return None
    if head[0x202:0x206] == b"HdrS":
        return "bzImage"
    if head[:4] == b"\x7fELF":
        return "ELF"
    return None


def _explicit(image: Path, modules: str | None, origin: str) -> Kernel:
    if not image.is_file():
        raise UsageError(f"{origin}: kernel image {image} does not exist")
    if kernel_format(image) is None:
        raise UsageError(f"{origin}: {image} is not a Linux kernel image (no bzImage 'HdrS' "
                         "header at 0x202, not ELF)")
    if modules:
        mods = Path(modules)
        if not (mods / "kernel").is_dir() and not (mods / "modules.builtin").is_file():
            raise UsageError(f"--modules {mods}: not a module tree (lib/modules/RELEASE with "
                             "kernel/ inside)")
    else:
        # A kernel from a package tree sits at <root>/boot/vmlinuz-R with <root>/lib/modules/R.
        rel = image.name.removeprefix("vmlinuz-")
        mods = image.parent.parent / "lib" / "modules" / rel
        if not mods.is_dir():
            mods = Path("/lib/modules") / rel
    if not mods.is_dir():
        raise UsageError(f"{origin}: no module tree for {image} (give --modules DIR)")
    builtin = mods / "modules.builtin"
    if not any((mods / "kernel").rglob("kvm.ko*")) and not (
            builtin.is_file() and "/kvm.ko" in builtin.read_text(errors="replace")):
        # Said before anything starts; the image build would say it only after the probe.
        raise UsageError(f"{origin}: module tree {mods} has no kvm module (kvm.ko), nor is it "
                         "built in: L1 could not run KVM")
    return Kernel(image.resolve(), mods.resolve(), mods.name, origin)


def debian_kernel(timeout: float = 600) -> Kernel:
    """Download Debian's cloud kernel .deb into the cache (no install) and unpack it once."""
    with locked("kernel"):
        return _debian_kernel(timeout)


def _debian_kernel(timeout: float) -> Kernel:
    root = cache_root() / "kernels"
    root.mkdir(parents=True, exist_ok=True)
    for done in sorted(root.glob("*/.complete")):
        return _from_tree(done.parent, f"debian:{done.parent.name}")
    if not shutil.which("apt-get"):
        raise SetupError("no usable kernel: not on the host, and apt-get is missing to fetch "
                         f"{DEBIAN_KERNEL_META}; pass --kernel PATH")
    depends = proc.run(["apt-cache", "depends", DEBIAN_KERNEL_META], 60).stdout
    m = re.search(r"Depends:\s*(linux-image-\S+)", depends)
    if not m:
        raise SetupError(f"cannot resolve {DEBIAN_KERNEL_META} (run apt-get update?)")
    package = m.group(1)
    dest = root / package
    dl = root / ".download"
    shutil.rmtree(dl, ignore_errors=True)
    dl.mkdir()
    proc.run(["apt-get", "download", package], timeout, cwd=dl)
    debs = list(dl.glob("*.deb"))
    if not debs:
        raise SetupError(f"apt-get download {package} produced no .deb")
    shutil.rmtree(dest, ignore_errors=True)
    proc.run(["dpkg-deb", "-x", str(debs[0]), str(dest)], timeout)
    shutil.rmtree(dl, ignore_errors=True)
    (dest / ".complete").write_text(package + "\n")
    return _from_tree(dest, f"debian:{package}")


def _from_tree(tree: Path, origin: str) -> Kernel:
    images = sorted((tree / "boot").glob("vmlinuz-*"))
    if not images:
        raise SetupError(f"{tree}: no boot/vmlinuz-*")
    rel = images[0].name.removeprefix("vmlinuz-")
    return Kernel(images[0], tree / "lib" / "modules" / rel, rel, origin)
