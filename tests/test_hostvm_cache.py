"""The host VM's cache disk: keyed on what decides the inner `-cpu host`, made, checked,
repaired or made again, held by one host VM at a time, and carried from one real host VM boot
to the next."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from harness.hostvm import cachedisk
from harness.hostvm.job import CACHE_DEVICE
from harness.hostvm.prepare import prepare
from harness.hostvm.vm import run_job

IDENTITY = {"qemu": "/usr/bin/qemu-system-x86_64", "qemu_version": "10.0.2", "cpu": "max",
            "npt": True, "kvm_amd": [], "smp": 1, "mem_mib": 3072,
            "kernel": {"image": "/boot/vmlinuz", "release": "6.1.0-28-cloud-amd64"},
            "image": {"key": "aaaa"}}


@pytest.mark.parametrize("field,value,same", [
    ("cpu", "EPYC", False), ("kvm_amd", ["vls=0"], False), ("npt", False, False),
    ("qemu_version", "7.2.22", False), ("smp", 2, False),
    ("kernel", {"image": "/boot/vmlinuz", "release": "6.1.0-29-cloud-amd64"}, False),
    # Neither the host VM's memory nor its root image (new with every edit) shape the CPU.
    ("mem_mib", 4096, True), ("image", {"key": "bbbb"}, True),
])
def test_the_disk_key_follows_what_decides_the_inner_cpu(field, value, same):
    assert (cachedisk.disk_key({**IDENTITY, field: value}) == cachedisk.disk_key(IDENTITY)) is same


def test_a_kernel_rebuilt_in_place_is_another_disk(tmp_path: Path):
    k = tmp_path / "bzImage"
    k.write_bytes(b"one")
    ident = {**IDENTITY, "kernel": {"image": str(k), "release": "6.13.0-rc1"}}
    before = cachedisk.disk_key(ident)
    k.write_bytes(b"rebuilt")
    assert cachedisk.disk_key(ident) != before


@pytest.fixture
def cache(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("NESTVIRT_CACHE", str(tmp_path))
    return tmp_path


def test_a_disk_is_made_then_reused_and_one_host_vm_holds_it(cache: Path):
    with cachedisk.held(IDENTITY) as first:
        assert first.state == "created" and first.path and first.path.is_file()
        # Sparse: 4 GiB named, a journal's worth taken.
        assert first.path.stat().st_size == cachedisk.DISK_MIB << 20
        assert first.path.stat().st_blocks * 512 < 32 << 20
        with cachedisk.held(IDENTITY) as second:
            assert second.path is None and second.state == "busy"
    with cachedisk.held(IDENTITY) as again:
        assert again.state == "reused" and again.path == first.path
    with cachedisk.held(IDENTITY, enabled=False) as off:
        assert off.path is None and off.state == "off"


def test_a_damaged_disk_is_made_again_never_used(cache: Path):
    with cachedisk.held(IDENTITY) as d:
        path = d.path
    assert path is not None
    with open(path, "r+b") as f:  # the primary superblock and its first groups' descriptors
        f.seek(1024)
        f.write(b"\xff" * 8192)
    with cachedisk.held(IDENTITY) as d:
        assert d.state == "remade" and "e2fsck exit" in d.detail
    cp = subprocess.run(["e2fsck", "-n", str(path)], capture_output=True, text=True)
    assert cp.returncode == 0, cp.stdout  # a clean, empty filesystem again


def test_old_disks_are_pruned_but_not_one_in_use(cache: Path):
    idents = [{**IDENTITY, "cpu": f"model{i}"} for i in range(4)]
    paths = []
    for i, ident in enumerate(idents):
        with cachedisk.held(ident) as d:
            assert d.path is not None
            os.utime(d.path, (1000 + i, 1000 + i))
            paths.append(d.path)
    with cachedisk.held(idents[0]):  # the oldest, but in use now (its time made newest)
        os.utime(paths[0], (1, 1))
        gone = cachedisk.prune(keep=2)
    assert set(gone) == {paths[1]} and paths[0].exists() and paths[2].exists()


def _marker_job(n: int) -> str:
    """A job that mounts the cache disk as render_job does, reads what the last boot left on
    it and leaves its own number."""
    target = f"{cachedisk.cache_root()}/{cachedisk.CARRIED}"
    return "\n".join([
        "set -u", 'ev() { echo "NESTVIRT-HOSTVM $*" > /dev/ttyS1; }',
        *cachedisk.mount_lines(CACHE_DEVICE, str(cachedisk.cache_root())),
        f"cat {target}/marker > /results/seen 2>/dev/null || echo none > /results/seen",
        f"echo boot{n} > {target}/marker",
        *cachedisk.unmount_lines(str(cachedisk.cache_root())), "exit 0", ""])


@pytest.mark.qemu
def test_what_one_host_vm_boot_saves_the_next_one_finds(tmp_path: Path):
    p = prepare()
    ident = {**p.spec.to_json(), "cpu": "max,test-only-key"}  # a disk of its own
    try:
        seen = []
        for n in (1, 2):
            with cachedisk.held(ident) as d:
                assert d.path is not None, d
                out = run_job(p.spec, {"job.sh": _marker_job(n)}, tmp_path / f"b{n}",
                              deadline_s=120, results=tmp_path / f"b{n}" / "back",
                              cache_disk=d.path)
            assert out.status == "ok" and out.job_rc == 0, out.to_json()
            ev = [e for e in out.events if e["event"] == "cache"]
            assert ev and ev[-1]["mounted"] == "1", out.events
            seen.append((tmp_path / f"b{n}" / "back" / "seen").read_text().strip())
            # Unmounted before power-off: the next e2fsck finds it clean.
            assert d.path and subprocess.run(["e2fsck", "-n", str(d.path)],
                                             capture_output=True).returncode == 0
        assert seen == ["none", "boot1"]
    finally:
        cachedisk.disk_path(cachedisk.disk_key(ident)).unlink(missing_ok=True)


def test_the_job_mounts_the_disk_only_when_the_host_vm_has_one():
    from harness.hostvm.job import render_job

    target = f"{cachedisk.cache_root()}/{cachedisk.CARRIED}"
    with_disk = render_job(["run"], cache=True)
    assert f"mount -t ext4 -o noatime {CACHE_DEVICE} {target}" in with_disk
    # Mounted before the inner run starts, unmounted after it ends.
    assert with_disk.index(CACHE_DEVICE) < with_disk.index("-m harness run") \
        < with_disk.index(f"umount {target}")
    assert CACHE_DEVICE not in render_job(["run"])
