"""What the host VM runs: job.sh (chrooted in its root, the host's files at their host paths),
which runs nestvirt itself with ``--accel kvm`` and records KVM's nested tracepoints."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from harness.core import slow
from harness.core.cache import cache_root
from harness.core.paths import REPO
from harness.hostvm import cachedisk
from harness.vm import resetwatch

# Inside the host VM: where the inner run writes (the exchange disk carries /results back).
INNER_OUT = "/results/run"
# The cache disk, when the host VM has one (vm.qemu_argv's order of disks).
CACHE_DEVICE = "/dev/vdc"
# Where the job's own files (job.sh, a matrix file the user named) lie inside the host VM.
JOB_DIR = "/job"
TRACE = "/results/kvm-trace.txt"
# KVM's tracepoints that say where an inner L1's vCPU is: a VMRUN emulated for it enters guest
# mode, an exit reflected to it (vmexit_inject) leaves it.
# (Linux 6.1 names the entry kvm_nested_vmenter; before 5.x it was kvm_nested_vmrun.)
TRACE_EVENTS = ("kvm_nested_vmenter", "kvm_nested_vmrun", "kvm_nested_vmexit_inject")


INNER_SCALE = 2.0


def render_job(inner_args: Sequence[str], *, trace: bool = True, stdout: str = "",
               mtimes: Mapping[str, int] | None = None, cache: bool = False) -> str:
    """job.sh for ``python -m harness INNER_ARGS`` as this process's own interpreter and tree
    (``stdout``: a file inside the host VM for its standard output, else the console;
    ``cache``: mount the cache disk over the inner cache's saved L1 images first)."""
    py = shlex.quote(sys.executable)
    env = {"HOME": str(Path.home()), "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin:"
           "/usr/sbin:/sbin", "NESTVIRT_CACHE": str(cache_root()), "PYTHONDONTWRITEBYTECODE": "1",
           "LANG": "C.UTF-8",
           # Inner L1s that reset on their own (TCG's nested SVM) leave their registers.
           resetwatch.ENV: "1",
           # An inner L1 on KVM that TCG emulates runs 2-4x slower than an L1 on TCG here
           # (boot 6 s -> 12-25 s), and a loaded CI machine doubled a job's time again: its
           # deadlines stretch so that slow is not called a hang (the outer bound still holds).
           slow.ENV: f"{min(slow.MAX, INNER_SCALE * slow.factor()):g}"}
    lines = ["set -u", "ev() { echo \"NESTVIRT-HOSTVM $*\" > /dev/ttyS1; }",
             *(f"export {k}={shlex.quote(v)}" for k, v in env.items()),
             f"cd {shlex.quote(str(REPO))}", f"mkdir -p {INNER_OUT}"]
    # mkfs.ext4 -d keeps whole seconds only; caches keyed on nanosecond mtimes (the QEMU probe
    # cache) would miss and probe every binary again under TCG: put the host's times back.
    for path, ns in sorted((mtimes or {}).items()):
        lines.append(f"/usr/bin/touch -m -h -d @{ns // 10**9}.{ns % 10**9:09d} {shlex.quote(path)}")
    if cache:
        lines += cachedisk.mount_lines(CACHE_DEVICE, str(cache_root()))
    if trace:
        t = "/sys/kernel/tracing"
        # One clock for all CPUs: the order of a vCPU thread's events is read across the
        # per-CPU buffers, and TCG's per-CPU local clocks need not agree (the thread moves).
        lines += [f"echo 16384 > {t}/buffer_size_kb", f"echo global > {t}/trace_clock",
                  f"echo 1 > {t}/options/record-tgid",
                  *(f"[ -e {t}/events/kvm/{e} ] && echo 1 > {t}/events/kvm/{e}/enable"
                    for e in TRACE_EVENTS),
                  # Which QEMU each traced pid is, the inner run's QMP transcripts say (a
                  # shell scanning /proc for new QEMUs took most of the one vCPU: 60 s against
                  # 37 s for migrate-nested).
                  f"cat {t}/trace_pipe > {TRACE} 2>/dev/null &", "tracer=$!"]
    argv = " ".join(shlex.quote(a) for a in inner_args)
    lines += ["ev job-start", f"{py} -X frozen_modules=on -m harness {argv}"
              + (f" > {shlex.quote(stdout)}" if stdout else ""), "rc=$?"]
    if trace:
        lines += ["echo 0 > /sys/kernel/tracing/events/kvm/enable",
                  "sleep 0.5; kill $tracer 2>/dev/null"]
    if cache:
        lines += cachedisk.unmount_lines(str(cache_root()))
    lines += ["exit $rc", ""]
    return "\n".join(lines)
