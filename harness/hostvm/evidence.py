"""Where each inner L1's vCPU was when its migration stopped it, read from KVM's own nested
tracepoints in the host VM (kvm_nested_vmenter: KVM emulated L1's VMRUN, the vCPU enters guest
mode; kvm_nested_vmexit_inject: an exit reflected to L1, it leaves guest mode).

Pure parsing: trace text and the QEMUs' QMP transcripts in, a per-variant summary and a check out.
A source QEMU never runs its vCPU again after the stop, so the last of these events on its
vCPU thread says whether the stop caught guest mode; the destination's VMRUNs say L2 ran on
after the nested state was restored.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from harness.scenario.checks import Check

# "CPU 0/KVM-1527  (   1500) [001] d..1.  58.982: kvm_nested_vmenter: rip: 0x..."
_LINE = re.compile(r"^\s*(?P<comm>.+?)-(?P<tid>\d+)\s+\(\s*(?P<tgid>\d+|-+)\)\s+\[\d+\]\s+\S+\s+"
                   r"(?P<ts>\d+\.\d+):\s+(?P<event>\w+):")
ENTER = frozenset({"kvm_nested_vmenter", "kvm_nested_vmrun"})
LEAVE = frozenset({"kvm_nested_vmexit_inject"})
# Each inner QEMU's QMP transcript, RUN/<variant>/{src,dst}-qmp.jsonl, opens with a "connected"
# record carrying its pid; --repeat N nests each repeat as RUN/<variant>_<i>/<variant>/, so the
# variant is the transcript's whole directory, not its last part.
_TRANSCRIPT = re.compile(r"^(?P<dir>.+)/(?P<role>src|dst)-qmp\.jsonl$")
CHECK = "kvm-nested-state"


@dataclass
class VcpuTrace:
    """The nested events of one QEMU's vCPU threads (each thread judged on its own)."""

    enters: int = 0
    leaves: int = 0
    first_ts: float = 0.0
    last_ts: float = 0.0
    first: dict[int, str] = field(default_factory=dict)  # tid -> "enter" | "leave"
    last: dict[int, str] = field(default_factory=dict)

    @property
    def ended_in_guest_mode(self) -> bool:
        """A vCPU's last event was a VMRUN: it was in L2 when it stopped for good."""
        return "enter" in self.last.values()

    @property
    def began_in_guest_mode(self) -> bool:
        """A vCPU's first event was an exit from L2: it started in guest mode, which only a
        restored nested state does (a fresh L1 enters L2 by VMRUN first)."""
        return "leave" in self.first.values()

    def summary(self) -> dict[str, Any]:
        return {"enters": self.enters, "leaves": self.leaves, "first_ts": self.first_ts,
                "last_ts": self.last_ts, "ended_in_guest_mode": self.ended_in_guest_mode,
                "began_in_guest_mode": self.began_in_guest_mode}


def qemu_roles(transcripts: Iterable[tuple[str, Iterable[str]]]) -> dict[int, tuple[str, str]]:
    """pid -> (variant dir as the inner run wrote it, role), from (transcript path, its lines)
    pairs: every "connected" record of a src or dst transcript (a relaunch adds one)."""
    roles: dict[int, tuple[str, str]] = {}
    for path, lines in transcripts:
        where = _TRANSCRIPT.match(path)
        if not where:
            continue
        for line in lines:
            if '"connected"' not in line:
                continue  # most lines are QMP traffic: skip them before parsing
            try:
                rec = json.loads(line)
                pid = rec["msg"]["pid"] if rec.get("dir") == "connected" else None
            except (ValueError, KeyError, TypeError):
                continue
            if isinstance(pid, int):
                roles[pid] = (where.group("dir"), where.group("role"))
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
        ts, tid = float(m.group("ts")), int(m.group("tid"))
        t = out.setdefault(int(m.group("tgid")), VcpuTrace(first_ts=ts))
        t.enters += kind == "enter"
        t.leaves += kind == "leave"
        t.first.setdefault(tid, kind)
        t.last[tid], t.last_ts = kind, ts
    return out


def by_variant(trace_lines: Iterable[str],
               roles: Mapping[int, tuple[str, str]]) -> dict[str, dict[str, Any]]:
    """variant dir (the inner path) -> {"src": {...}, "dst": {...}}: each side's nested event
    summary (``roles``: qemu_roles). Two QEMUs in one role for one variant (a retried variant)
    keep the later one."""
    out: dict[str, dict[str, Any]] = {}
    for pid, t in per_qemu(trace_lines).items():
        if pid in roles:
            d, role = roles[pid]
            out.setdefault(d, {})[role] = t.summary()
    return out


def nested_state_check(summary: Mapping[str, Any] | None) -> Check:
    """kvm-nested-state: L2 ran on the source and ran on after the destination restored the
    nested state; the detail says where the source's vCPU was when it stopped (its last nested
    event a VMRUN: in guest mode) and how the destination began. How it began is recorded, not
    judged: a stop seen in guest mode was followed by a destination whose first event was a
    VMRUN too (the restore may trace as one), so it cannot tell the two cases apart."""
    if not summary or "src" not in summary:
        return Check(CHECK, False, "no nested tracepoint events for the source's vCPU "
                     "(trace missing, or L2 never ran)")
    src, dst = summary["src"], summary.get("dst") or {}
    if not dst.get("enters"):
        return Check(CHECK, False, f"the source ran {src['enters']} VMRUNs, the destination "
                     "none: L2 did not run on after the restore")
    where = "in guest mode" if src["ended_in_guest_mode"] else "in L1 (outside guest mode)"
    began = "an exit from L2" if dst["began_in_guest_mode"] else "a VMRUN"
    return Check(CHECK, True, f"source stopped {where} after {src['enters']} VMRUNs; "
                 f"destination began with {began} and ran {dst['enters']} VMRUNs")
