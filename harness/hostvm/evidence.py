"""Where each inner L1's vCPU was when its migration stopped it, read from KVM's own nested
tracepoints in the host VM (kvm_nested_vmenter: KVM emulated L1's VMRUN, the vCPU enters guest
mode; kvm_nested_vmexit_inject: an exit reflected to L1, it leaves guest mode).

Pure parsing: trace text and the QEMU pid list in, a per-variant summary and a check out.
A source QEMU never runs its vCPU again after the stop, so the last of these events on its
vCPU thread says whether the stop caught guest mode; the destination's VMRUNs say L2 ran on
after the nested state was restored.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from harness.scenario.checks import Check

# "CPU 0/KVM-1527  (   1500) [001] d..1.  58.982: kvm_nested_vmenter: rip: 0x..."
_LINE = re.compile(r"^\s*(?P<comm>.+?)-(?P<tid>\d+)\s+\(\s*(?P<tgid>\d+|-+)\)\s+\[\d+\]\s+\S+\s+"
                   r"(?P<ts>\d+\.\d+):\s+(?P<event>\w+):")
ENTER = frozenset({"kvm_nested_vmenter", "kvm_nested_vmrun"})
LEAVE = frozenset({"kvm_nested_vmexit_inject"})
# "1500 /usr/bin/qemu-system-x86_64 ... -name nestvirt-src,debug-threads=on ...
#  -chardev file,id=console,path=/results/run/migrate-nested_none/src-console.log ..."
_ROLE = re.compile(r"-name nestvirt-(?P<role>src|dst)\b")
_DIR = re.compile(r"path=\S*/(?P<dir>[^/\s]+)/(?:src|dst)-console\.log")
CHECK = "stop-in-guest-mode"


@dataclass
class VcpuTrace:
    """The nested events of one QEMU's vCPU threads."""

    enters: int = 0
    leaves: int = 0
    last: str = ""  # "enter" | "leave" | ""
    first_ts: float = 0.0
    last_ts: float = 0.0

    @property
    def in_guest_mode(self) -> bool:
        return self.last == "enter"


def qemu_roles(pid_lines: Iterable[str]) -> dict[int, tuple[str, str]]:
    """pid -> (variant dir, role) for each inner QEMU the sampler saw."""
    roles: dict[int, tuple[str, str]] = {}
    for line in pid_lines:
        pid, _, cmd = line.strip().partition(" ")
        role, where = _ROLE.search(cmd), _DIR.search(cmd)
        if pid.isdigit() and role and where:
            roles[int(pid)] = (where.group("dir"), role.group("role"))
    return roles


def per_qemu(trace_lines: Iterable[str]) -> dict[int, VcpuTrace]:
    """tgid -> its vCPUs' nested events, in trace order."""
    out: dict[int, VcpuTrace] = {}
    for line in trace_lines:
        m = _LINE.match(line)
        if not m or not m.group("tgid").isdigit():
            continue
        ev = m.group("event")
        kind = "enter" if ev in ENTER else "leave" if ev in LEAVE else ""
        if not kind:
            continue
        t = out.setdefault(int(m.group("tgid")), VcpuTrace(first_ts=float(m.group("ts"))))
        t.enters += kind == "enter"
        t.leaves += kind == "leave"
        t.last, t.last_ts = kind, float(m.group("ts"))
    return out


def by_variant(trace_lines: Iterable[str], pid_lines: Iterable[str]) -> dict[str, dict[str, Any]]:
    """variant dir -> {"src": {...}, "dst": {...}} with each side's nested event summary."""
    roles = qemu_roles(pid_lines)
    out: dict[str, dict[str, Any]] = {}
    for pid, t in per_qemu(trace_lines).items():
        if pid in roles:
            d, role = roles[pid]
            out.setdefault(d, {})[role] = {**asdict(t), "in_guest_mode_at_end": t.in_guest_mode}
    return out


def guest_mode_check(summary: Mapping[str, Any] | None) -> Check:
    """stop-in-guest-mode: the source's vCPU was in L2 guest mode when the migration stopped
    it (its last nested event a VMRUN) and the destination ran L2 on (VMRUNs there)."""
    if not summary or "src" not in summary:
        return Check(CHECK, False, "no nested tracepoint events for the source's vCPU "
                     "(trace missing or L2 never ran)")
    src, dst = summary["src"], summary.get("dst") or {}
    where = ("in guest mode (last nested event: VMRUN)" if src["in_guest_mode_at_end"]
             else "outside guest mode (last nested event: an exit reflected to L1)")
    detail = (f"source stopped {where} after {src['enters']} VMRUNs; destination ran "
              f"{dst.get('enters', 0)} VMRUNs after restoring the nested state")
    return Check(CHECK, bool(src["in_guest_mode_at_end"] and dst.get("enters", 0) > 0), detail)
