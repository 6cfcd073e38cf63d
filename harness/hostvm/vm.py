"""Boot the host VM under TCG, hand it a job on the exchange disk, watch its event line with
deadlines, and read its results back after power-off. A hung, silent or dead host VM becomes
an Outcome with the console's last words, never a hang; the QEMU is always reaped."""

from __future__ import annotations

import io
import re
import tarfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.core import proc
from harness.core.errors import UsageError
from harness.guest.kernel import Kernel
from harness.guest.kernlog import bad_lines
from harness.host.probe import firmware_args, launch_env
from harness.hostvm.image import RootImage

EVENT = "NESTVIRT-HOSTVM "
# The host VM kernel's own last words when it dies (before KVM's complaints about a guest).
FATAL_LINE = re.compile(r"Kernel panic|BUG:|Oops|general protection fault|Out of memory")
# What two inner L1s at once need (512 MiB each, their QEMUs, the host VM's kernel, Python
# and tmpfs for results): below this the inner run would die of memory, so refuse it.
MIN_MEM_MIB = 2048
DEFAULT_MEM_MIB = 3072
# One vCPU: with two, TCG's emulation of nested SVM under the host VM's KVM failed most runs
# that kept an L2 exiting (the host VM's kernel dying of a recursive page fault in a KVM vCPU
# thread, inner L1s resetting or wedging on VMRUN: 7 of 7 exit-cost runs, 3 of 10
# migrate-nested repeats, migrate-bare never passing); with one, the same runs passed (README,
# "KVM host VM"). Two inner L1s still fit: they take turns on the one vCPU.
DEFAULT_SMP = 1
# TCG's vCPU threading for the host VM: "single" (one thread runs all vCPUs in turn) or
# "multi" (MTTCG, QEMU's default on x86: one thread per vCPU).
TCG_THREADS = ("single", "multi")
DEFAULT_TCG_THREAD = "multi"
# kvm_amd's options that select which of TCG's emulated SVM features the host VM's KVM uses
# (the init reports each one's value in its kvm event).
KVM_AMD_OPTIONS = ("npt", "vls", "vgif", "avic", "lbrv", "nrips", "tsc_scaling",
                   "pause_filter_count", "intercept_smi")
EXCHANGE_MIB = 512


@dataclass(frozen=True)
class HostVmSpec:
    """One host VM: the outer QEMU (TCG), its CPU, memory, vCPUs, kernel and disks."""

    qemu: str
    qemu_version: str
    module_dir: str
    firmware_dirs: tuple[str, ...]
    kernel: Kernel
    initramfs: Path
    image: RootImage
    mem_mib: int = DEFAULT_MEM_MIB
    smp: int = DEFAULT_SMP
    cpu: str = "max"
    tcg_thread: str = DEFAULT_TCG_THREAD
    npt: bool = True  # the host VM's KVM on TCG-emulated nested paging, or shadow paging
    # More kvm_amd options ("vls=0", "vgif=0"): each turns off one SVM feature that TCG
    # emulates for the host VM's KVM, to tell which emulation a fault comes from.
    kvm_amd: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The host VM's identity, as results record it."""
        return {"qemu": self.qemu, "qemu_version": self.qemu_version, "accel": "tcg",
                "cpu": self.cpu, "tcg_thread": self.tcg_thread, "npt": self.npt,
                "kvm_amd": list(self.kvm_amd),
                "mem_mib": self.mem_mib, "smp": self.smp,
                "kernel": self.kernel.to_json(), "initramfs": str(self.initramfs),
                "image": self.image.to_json()}


def check_spec(spec: HostVmSpec) -> None:
    """UsageError for a host VM that cannot carry two inner L1s or cannot nest SVM."""
    if spec.mem_mib < MIN_MEM_MIB:
        raise UsageError(f"--hostvm-mem {spec.mem_mib}: the host VM needs at least {MIN_MEM_MIB} "
                         "MiB to run two inner L1s at once")
    if spec.smp < 1:
        raise UsageError(f"--hostvm-smp {spec.smp}: needs at least 1 vCPU")
    if spec.tcg_thread not in TCG_THREADS:
        raise UsageError(f"--hostvm-tcg-thread {spec.tcg_thread}: one of {', '.join(TCG_THREADS)}")
    for opt in spec.kvm_amd:
        name, eq, value = opt.partition("=")
        if name not in KVM_AMD_OPTIONS or not eq or not re.fullmatch(r"[0-9]+|[YN]", value):
            raise UsageError(f"--hostvm-kvm-amd {opt}: one of {', '.join(KVM_AMD_OPTIONS)} "
                             "as NAME=NUMBER (e.g. vls=0)")
    if "-svm" in spec.cpu.split(",") or "svm=off" in spec.cpu.split(","):
        raise UsageError(f"--hostvm-cpu {spec.cpu}: SVM is turned off; the host VM's KVM "
                         "needs nested SVM (TCG offers no VMX)")


def kvm_amd_arg(spec: HostVmSpec) -> str:
    """The kernel command line's ``nestvirt.kvm_amd=a=1,b=0`` (the init passes it to insmod)."""
    opts = ([] if spec.npt else ["npt=0"]) + list(spec.kvm_amd)
    return f" nestvirt.kvm_amd={','.join(opts)}" if opts else ""


def qemu_argv(spec: HostVmSpec, workdir: Path, exchange: Path, job_blocks: int,
              cache_disk: Path | None = None) -> list[str]:
    """The outer QEMU's command line. Disks in this order, so the host VM names them vda (the
    root image), vdb (the exchange disk) and vdc (the cache disk, when there is one)."""
    cache = ["-drive", f"file={cache_disk},if=none,id=cache,format=raw",
             "-device", "virtio-blk-pci,drive=cache"] if cache_disk else []
    return [spec.qemu, *firmware_args(spec.firmware_dirs), "-name", "nestvirt-hostvm",
            "-machine", "q35", "-accel", f"tcg,thread={spec.tcg_thread}", "-cpu", spec.cpu,
            "-m", str(spec.mem_mib), "-smp", str(spec.smp), "-nodefaults", "-display", "none", "-no-reboot",
            "-kernel", str(spec.kernel.image), "-initrd", str(spec.initramfs),
            "-append", f"console=ttyS0 panic=-1 loglevel=4 rdinit=/init nestvirt.job_blocks={job_blocks}"
            + kvm_amd_arg(spec),
            "-drive", f"file={spec.image.path},if=none,id=root,format=raw,readonly=on",
            "-device", "virtio-blk-pci,drive=root",
            "-drive", f"file={exchange},if=none,id=xchg,format=raw,cache=unsafe",
            "-device", "virtio-blk-pci,drive=xchg", *cache,
            "-chardev", f"file,id=console,path={workdir / 'hostvm-console.log'}",
            "-serial", "chardev:console",
            "-chardev", f"file,id=events,path={workdir / 'hostvm-events.log'}",
            "-serial", "chardev:events"]


def parse_event(line: str) -> dict[str, str] | None:
    """``NESTVIRT-HOSTVM name k=v ...`` -> {"event": name, k: v}; None for other lines."""
    if not line.startswith(EVENT):
        return None
    parts = line[len(EVENT):].split()
    if not parts:
        return None
    ev = {"event": parts[0]}
    for p in parts[1:]:
        k, _, v = p.partition("=")
        ev[k] = v
    return ev


@dataclass
class Outcome:
    """How a host VM run ended. ``status``: ok (the job ran and results came back), fatal (its
    init refused: no SVM, no KVM, a bad image), silent (no heartbeat within the silence
    bound: hung), died (QEMU exited before results), deadline (ran past the run's bound)."""

    status: str
    reason: str = ""
    job_rc: int | None = None
    events: list[dict[str, str]] = field(default_factory=list)
    console_tail: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    qemu_rc: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "reason": self.reason, "job_rc": self.job_rc,
                "events": [e for e in self.events if e.get("event") != "beat"][-30:],
                "console_tail": self.console_tail, "seconds": self.seconds,
                "qemu_rc": self.qemu_rc}


def make_exchange(path: Path, files: Mapping[str, str]) -> int:
    """A raw disk holding a tar of the job's files (name -> text), sized for the results;
    returns the tar's length in 512-byte blocks (the init reads only those)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o755, int(time.time())
            tar.addfile(info, io.BytesIO(data))
    with open(path, "wb") as f:
        f.write(buf.getvalue())
        f.truncate(EXCHANGE_MIB << 20)
    return -(-len(buf.getvalue()) // 512)


def read_results(exchange: Path, dest: Path) -> list[str]:
    """Unpack the tar the host VM wrote onto the exchange disk into dest; names unpacked.
    Members that would land outside dest (absolute, ``..``, links) are refused."""
    dest.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    with tarfile.open(exchange, mode="r:") as tar:
        for m in tar:
            if not (m.isfile() or m.isdir()):
                continue
            target = (dest / m.name).resolve()
            if not target.is_relative_to(dest.resolve()):
                continue
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(m)
            if src is not None:
                target.write_bytes(src.read())
                names.append(m.name.removeprefix("./"))
    return names


def tail(path: Path, n: int = 15) -> list[str]:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [ln for ln in lines if ln.strip()][-n:]


def run_job(spec: HostVmSpec, files: Mapping[str, str], workdir: Path, *, deadline_s: float,
            boot_s: float = 60, silence_s: float = 30, results: Path | None = None,
            on_event=None, cache_disk: Path | None = None) -> Outcome:
    """Boot the host VM with ``files`` as its job (job.sh runs chrooted in its root), wait for
    power-off within ``deadline_s`` (boot to ready within ``boot_s``; a heartbeat at least
    every ``silence_s``), then unpack its results into ``results``. Always reaps QEMU.
    ``cache_disk``: a writable disk the job mounts as vdc (cachedisk.py)."""
    workdir.mkdir(parents=True, exist_ok=True)
    exchange = workdir / "hostvm-exchange.raw"
    blocks = make_exchange(exchange, files)
    events_log = workdir / "hostvm-events.log"
    events_log.write_text("")
    console = workdir / "hostvm-console.log"
    out = Outcome("deadline")
    t0 = time.monotonic()
    with open(workdir / "hostvm-qemu.stderr", "wb") as err:
        p = proc.spawn(qemu_argv(spec, workdir, exchange, blocks, cache_disk), stdout=err, stderr=err,
                       env=launch_env(spec.module_dir))
    seen = 0
    last_heard = t0
    ready_at = None
    try:
        while True:
            now = time.monotonic()
            with open(events_log, errors="replace") as f:
                f.seek(seen)
                chunk = f.read()
            if chunk and chunk.endswith("\n"):
                seen += len(chunk.encode())
                for line in chunk.splitlines():
                    ev = parse_event(line.strip())
                    if ev is None:
                        continue
                    ev["t"] = f"{now - t0:.2f}"
                    out.events.append(ev)
                    last_heard = now
                    if on_event:
                        on_event(ev)
                    name = ev["event"]
                    if name == "ready":
                        ready_at = now
                        out.seconds["boot_to_ready"] = round(now - t0, 2)
                    elif name == "job-done":
                        out.job_rc = int(ev.get("rc", "-1"))
                        out.seconds["job"] = round(now - (ready_at or t0), 2)
                    elif name == "fatal":
                        out.status = "fatal"
                        out.reason = f"host VM init: {ev.get('what')}: " \
                                     f"{ev.get('detail', '').replace('_', ' ')}"
            if p.poll() is not None:
                out.qemu_rc = p.returncode
                done = any(e["event"] == "results-written" for e in out.events)
                if done:
                    out.status = "ok"
                elif out.status != "fatal":
                    out.status = "died"
                    out.reason = (f"host VM QEMU exited ({p.returncode}) before its results "
                                  f"were written; last event: "
                                  f"{out.events[-1]['event'] if out.events else 'none'}")
                break
            if ready_at is None and now - t0 > boot_s:
                out.status, out.reason = "silent", f"host VM not ready after {boot_s:g}s"
                break
            if now - last_heard > silence_s:
                out.status, out.reason = "silent", (f"host VM silent for {silence_s:g}s (no "
                                                    "heartbeat): hung")
                break
            if now - t0 > deadline_s:
                out.status, out.reason = "deadline", f"host VM run past its {deadline_s:g}s bound"
                break
            time.sleep(0.1)
    finally:
        rc = proc.reap(p)
        out.qemu_rc = out.qemu_rc if out.qemu_rc is not None else rc
        out.seconds["total"] = round(time.monotonic() - t0, 2)
    if out.status != "ok":
        err_lines = tail(workdir / "hostvm-qemu.stderr", 3)
        out.console_tail = tail(console) + [f"qemu: {ln}" for ln in err_lines]
        lines = tail(console, 400)
        hurt = [ln.strip() for ln in lines if FATAL_LINE.search(ln)] or bad_lines(lines)
        if hurt:  # the host VM's kernel said why it died: that line leads the reason
            out.reason += f"; host VM kernel: {hurt[0][:200]}" + \
                (f" ... {hurt[-1][:200]}" if len(hurt) > 1 else "")
    if out.status == "ok" and results is not None:
        try:
            read_results(exchange, results)
        except (tarfile.TarError, OSError) as e:
            out.status, out.reason = "died", f"host VM results unreadable: {e}"
    exchange.unlink(missing_ok=True)
    return out
