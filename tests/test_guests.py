"""Guest build: module order from .modinfo, the initramfs contents, and the guest programs."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from harness.core.errors import SetupError, StepTimeout
from harness.core.ports import free_port
from harness.guest.image import L1Image, build_tools, module_depends, module_load_order
from harness.scenario.engine import RunContext
from harness.scenario.spec import NO_PROFILE
from harness.vm.machine import Machine, MachineConfig


def test_module_depends_parses_modinfo():
    blob = b"\x7fELF...\x00license=GPL\x00depends=virtio_ring,virtio,net_failover\x00vermagic=6.1"
    assert module_depends(blob) == ["virtio_ring", "virtio", "net_failover"]
    assert module_depends(b"\x00depends=\x00") == []


def test_load_order_puts_dependencies_first(l1_image: L1Image):
    order = list(l1_image.modules)
    for dep, mod in [("irqbypass", "kvm"), ("kvm", "kvm_amd"), ("kvm", "kvm_intel"),
                     ("virtio_ring", "virtio_net"), ("failover", "net_failover"),
                     ("net_failover", "virtio_net"), ("virtio_pci_modern_dev", "virtio_pci")]:
        if dep in order and mod in order:
            assert order.index(dep) < order.index(mod), (dep, mod, order)
    assert "kvm" in order


def test_kernel_without_kvm_is_refused(tmp_path: Path):
    (tmp_path / "kernel/net").mkdir(parents=True)
    with pytest.raises(SetupError, match="no kvm module"):
        module_load_order(tmp_path)


def test_initramfs_holds_what_l1_needs(l1_image: L1Image):
    names = subprocess.run(["cpio", "-t", "--quiet", "-F", str(l1_image.initramfs)],
                           capture_output=True, text=True, timeout=60).stdout.split()
    for needed in ("init", "bin/busybox", "usr/sbin/dropbear", "lib/modules/kvm.ko",
                   "usr/lib/nestvirt/nvmm", "usr/lib/nestvirt/l1work",
                   "usr/lib/nestvirt/payloads/pagecount.bin", "etc/passwd"):
        assert needed in names, needed


def test_tools_cache_is_reused():
    a = build_tools()
    t0 = time.monotonic()
    b = build_tools()
    assert a == b and time.monotonic() - t0 < 2


def _run_l1work(tools_dir: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(tools_dir / "l1work"), *args], capture_output=True, text=True,
                          timeout=30)


def test_l1work_oracle_verifies_then_catches_corruption(tmp_path: Path):
    """The L1 workload's own oracle, run on the host: passes, then fails after a flipped byte."""
    tools = build_tools()
    pid, res = tmp_path / "pid", tmp_path / "res"
    p = subprocess.Popen([str(tools.dir / "l1work"), "run", "--mib", "8", "--threads", "2",
                          "--rate-mib-s", "64", "--pidfile", str(pid), "--result", str(res)])
    try:
        deadline = time.monotonic() + 10
        while not pid.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        ok = _run_l1work(tools.dir, tmp_path, "verify", "--pidfile", str(pid), "--result", str(res))
        assert ok.returncode == 0 and json.loads(ok.stdout)["ok"], ok.stdout + ok.stderr
        _run_l1work(tools.dir, tmp_path, "corrupt", "--pidfile", str(pid))
        bad = _run_l1work(tools.dir, tmp_path, "verify", "--pidfile", str(pid), "--result", str(res))
        report = json.loads(bad.stdout)
        assert bad.returncode == 1 and not report["ok"] and report["bad_pages"] >= 1
        assert report["first_bad"][0]["page"] == 5
    finally:
        p.terminate()
        p.wait(timeout=10)


def panicking_l1(ctx: RunContext, tmp_path: Path) -> Machine:
    """An L1 with no init in reach: its kernel panics at boot (panic=-1 asks for a reboot)."""
    cfg = MachineConfig(name="l1", qemu=ctx.qemu, accel=ctx.accel, cpu=ctx.l1_cpu(NO_PROFILE),
                        kernel=ctx.image.kernel.image, initrd=ctx.image.initramfs,
                        append="console=ttyS0 panic=-1 rdinit=/nonexistent root=/dev/nonexistent")
    return Machine(cfg, tmp_path, free_port())


@pytest.mark.qemu
def test_an_l1_that_panics_at_boot_says_so_not_just_exit_0(ctx: RunContext, tmp_path: Path):
    # No init in reach: the kernel panics, panic=-1 under -no-reboot ends QEMU with 0 and no
    # stderr. The boot error must carry the panic from L1's console.
    m = panicking_l1(ctx, tmp_path)
    try:
        m.launch(timeout=20)
        with pytest.raises(StepTimeout) as e:
            m.wait_guest_event("ready", 120)
    finally:
        m.shutdown()
    assert m.returncode == 0
    assert "QEMU exited: status 0, no stderr" in str(e.value)
    assert "Kernel panic - not syncing" in str(e.value), str(e.value)


def _anon_region(pid: int, size: int) -> tuple[int, int]:
    """Start and end of the anonymous mapping of exactly ``size`` bytes (l1work's region)."""
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split()
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if hi - lo == size and len(parts) < 6:
            return lo, hi
    raise AssertionError(f"no anonymous {size}-byte mapping in /proc/{pid}/maps")


@pytest.mark.parametrize("pattern", ["seq", "random", "hot"])
@pytest.mark.parametrize("entropy", [1, 2, 4])
def test_l1work_entropy_compresses_as_said_and_every_pattern_verifies(tmp_path: Path, pattern: str,
                                                                      entropy: int):
    """--entropy N pages compress about N times (zlib over the live region, as QEMU's would),
    each --pattern keeps the one-edge oracle (it passes while running and catches a flipped
    byte), and --progress lines count the bytes written."""
    import zlib

    tools = build_tools()
    pid, res, prog = tmp_path / "pid", tmp_path / "res", tmp_path / "progress"
    mib = 4
    p = subprocess.Popen([str(tools.dir / "l1work"), "run", "--mib", str(mib), "--threads", "2",
                          "--rate-mib-s", "64", "--pidfile", str(pid), "--result", str(res),
                          "--entropy", str(entropy), "--pattern", pattern, "--hot-pct", "25",
                          "--progress", str(prog)])
    try:
        deadline = time.monotonic() + 10
        while not pid.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        for _ in range(3):  # several edges: the sweep moves between verifies
            ok = _run_l1work(tools.dir, tmp_path, "verify", "--pidfile", str(pid), "--result", str(res))
            assert ok.returncode == 0 and json.loads(ok.stdout)["ok"], ok.stdout + ok.stderr
            time.sleep(0.15)
        lo, hi = _anon_region(p.pid, mib << 20)
        with open(f"/proc/{p.pid}/mem", "rb") as mem:
            mem.seek(lo)
            data = mem.read(hi - lo)
        ratio = len(data) / len(zlib.compress(data, 1))
        assert entropy * 0.85 < ratio < entropy * 1.15 + 0.1, f"entropy {entropy}: zlib ratio {ratio:.2f}"
        _run_l1work(tools.dir, tmp_path, "corrupt", "--pidfile", str(pid))
        bad = _run_l1work(tools.dir, tmp_path, "verify", "--pidfile", str(pid), "--result", str(res))
        report = json.loads(bad.stdout)
        assert bad.returncode == 1 and report["first_bad"][0]["page"] == 5, bad.stdout
        lines = [tuple(map(float, x.split())) for x in prog.read_text().splitlines()]
        assert len(lines) >= 3 and lines[-1][1] > lines[0][1] and lines[-1][0] > lines[0][0]
    finally:
        p.terminate()
        p.wait(timeout=10)


@pytest.mark.qemu
def test_with_reset_registers_on_a_reset_l1_is_dumped_and_ends_as_before(
        ctx: RunContext, tmp_path: Path, monkeypatch):
    # The same panicking L1, with NESTVIRT_RESET_REGISTERS=1: its reboot (panic=-1) pauses it
    # instead of ending QEMU; the watcher dumps its registers, then quits QEMU: exit 0 as
    # under -no-reboot, and the story names where the vCPU was.
    from harness.vm import resetwatch

    monkeypatch.setenv(resetwatch.ENV, "1")
    m = panicking_l1(ctx, tmp_path)
    try:
        m.launch(timeout=20)
        assert "reboot=shutdown,shutdown=pause" in m.argv and "-no-reboot" not in m.argv
        with pytest.raises(StepTimeout) as e:
            m.wait_guest_event("ready", 120)
    finally:
        m.shutdown()
    assert m.returncode == 0
    dump = m.reset_dump.read_text()
    assert "== info registers -a" in dump and "RIP=" in dump and "== x/12i $pc" in dump
    assert "L1 reset itself at CPU#0 RIP=" in str(e.value), str(e.value)
    assert "Kernel panic - not syncing" in str(e.value)


def test_reset_summary_names_each_vcpu():
    from harness.vm.resetwatch import summary

    regs = ("CPU#0\nRAX=1 RBX=2\nRIP=ffffffff81000000 RFL=00000046 [---] CPL=0 II=0 A20=1 SMM=0 "
            "HLT=0\nRSP=ffffc90000003f00\nCR0=80050033 CR2=0000000000000010 CR3=0000000001000000"
            "\nCPU#1\nRIP=ffffffff81000100 CPL=3 HLT=1 RSP=1\n")
    assert summary(regs) == ("CPU#0 RIP=ffffffff81000000 RSP=ffffc90000003f00 CR2=0000000000000010 "
                             "CR3=0000000001000000 CPL=0 HLT=0; CPU#1 RIP=ffffffff81000100 RSP=1 "
                             "CPL=3 HLT=1")
    assert summary("") == ""


def test_l1work_readers_count_reads_in_a_third_progress_column(tmp_path: Path):
    """--readers N adds threads that only read (the third progress column grows while the
    written bytes grow too), --pin is accepted, and the region still verifies."""
    tools = build_tools()
    pid, res, prog = tmp_path / "pid", tmp_path / "res", tmp_path / "progress"
    p = subprocess.Popen([str(tools.dir / "l1work"), "run", "--mib", "2", "--threads", "1",
                          "--readers", "1", "--pin", "--rate-mib-s", "16", "--pidfile", str(pid),
                          "--result", str(res), "--progress", str(prog)])
    try:
        deadline = time.monotonic() + 10
        while (not prog.exists() or len(prog.read_text().splitlines()) < 4) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        ok = _run_l1work(tools.dir, tmp_path, "verify", "--pidfile", str(pid), "--result", str(res))
        assert ok.returncode == 0 and json.loads(ok.stdout)["ok"], ok.stdout + ok.stderr
        rows = [tuple(map(float, x.split())) for x in prog.read_text().splitlines()]
        assert len(rows) >= 3 and all(len(r) == 3 for r in rows), rows[:3]
        assert rows[-1][1] > rows[0][1] and rows[-1][2] > rows[0][2]
    finally:
        p.terminate()
        p.wait(timeout=10)
