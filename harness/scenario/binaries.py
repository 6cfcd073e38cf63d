"""Which QEMU binaries run a variant, decided once where variants are planned (the suite, a
matrix, the command line) and written into the variant as a QemuPlan.

- Nothing named: the run's binary (the inventory's newest) on both sides. A mode it lacks
  (legacy compress on >= 9.1) runs on the newest binary that has it, when the inventory has one;
  the plan says so in ``why``.
- Named (``--qemu``, ``--src-qemu``/``--dst-qemu``, ``$NESTVIRT_QEMU``, matrix axes ``qemu`` /
  ``dst_qemu``): exactly those, never swapped; a mode one of them lacks stays a skip.
- Machine type: the newest versioned q35 both binaries have (pc-q35-7.2 for 7.2 and 10.0);
  for one binary alone, its own newest (what plain "q35" means there).
- A mode moved to a QEMU before 9.0 under TCG (legacy compress on 7.2) is there for the mode,
  not for that binary's lost-write bug: L1 gets 8 KiB more RAM, which keeps the migration off
  the code path of the bug, and the plan says so. A binary the user named runs as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Protocol

from harness.core.errors import UsageError
from harness.host.probe import QemuFacts
from harness.qemu.inventory import common_machine, machine_for, newest, select
from harness.scenario.spec import QemuPlan, Variant
from harness.vm.migration import MigrationMode

# QEMU before 9.0 under TCG loses guest writes when a live migration needs 4+ dirty syncs: the
# dirty bitmap's 64-bit word fast path does not reset TCG's TLB (fixed by 03bfc2188f06). A RAM
# size off that word (64 pages) sends the sync down the per-page slow path, which does: with
# 512 MiB + 8 KiB, 12 of 12 runs passed at 3-23 syncs (README, known findings).
LOST_WRITE_FIXED = (9, 0, 0)
LOST_WRITE_EXTRA_KIB = 8


class InventoryLike(Protocol):
    """What planning reads of the probe (HostFacts has it)."""

    accel: str
    qemu: QemuFacts
    qemus: tuple[QemuFacts, ...]
    qemu_pin: str


def plan_qemu(mode: MigrationMode, host: InventoryLike, src: str | None = None,
              dst: str | None = None) -> QemuPlan:
    """The binaries and machine type that run ``mode``. Whether they can is asked apart
    (``lacks``), so a pinned pair that cannot becomes a skip naming it, never another pair.

    UsageError (one line) when a selector names no binary of the inventory, or when the two
    binaries share no versioned machine type.
    """
    qemus: Sequence[QemuFacts] = host.qemus or (host.qemu,)
    pinned = bool(src or dst or host.qemu_pin)
    why = f"pinned by {host.qemu_pin}" if host.qemu_pin else "the newest binary"
    extra_kib = 0
    if src or dst:
        a = select(qemus, src, "--src-qemu") if src else host.qemu
        b = select(qemus, dst, "--dst-qemu") if dst else a
        why = "named: " + (f"{a.label} -> {b.label}" if a.binary != b.binary else a.label)
    else:
        a = b = host.qemu
        missing = mode.unsupported_reason(a)
        if missing and not pinned:
            alt = newest(q for q in qemus if mode.unsupported_reason(q) is None)
            if alt is not None:
                a = b = alt
                why = (f"{mode.compression} is not in {host.qemu.label} ({missing}): runs on "
                       f"{alt.label}, the newest binary that has it")
                if alt.version_tuple < LOST_WRITE_FIXED and host.accel != "kvm":
                    extra_kib = LOST_WRITE_EXTRA_KIB
                    why += (f"; L1 RAM + {extra_kib} KiB, off the dirty bitmap's word, keeps it "
                            "clear of that QEMU's TCG lost-write bug (fixed in 9.0)")
    machine = common_machine(a, b) if a.binary != b.binary else machine_for(a)
    if machine is None:
        raise UsageError(f"QEMU {a.label} -> {b.label}: no machine type in common "
                         f"({a.label} has {_span(a)}, {b.label} has {_span(b)})")
    return QemuPlan(src=a.binary, dst=b.binary, machine=machine, src_version=a.version,
                    dst_version=b.version, src_name=a.label, dst_name=b.label, pinned=pinned,
                    why=why, ram_extra_kib=extra_kib)


def lacks(mode: MigrationMode, plan: QemuPlan, src: QemuFacts, dst: QemuFacts) -> str | None:
    """Why the plan's binaries cannot run ``mode`` (a skip or prune reason), or None."""
    for side, q in (("source", src), ("destination", dst)):
        missing = mode.unsupported_reason(q)
        if missing:
            where = f"the {side} QEMU {q.label}" if plan.cross_version else f"QEMU {q.label}"
            pin = " (named for this run: not swapped for another binary)" if plan.pinned else ""
            return f"{missing}: {where}{pin}"
    return None


def _span(q: QemuFacts) -> str:
    if not q.machine_types:
        return "no versioned q35 type"
    return f"{q.machine_types[0]}..{q.machine_types[-1]}"


def plan_variants(variants: Sequence[Variant], host: InventoryLike, src: str | None = None,
                  dst: str | None = None) -> list[Variant]:
    """Each variant with its QemuPlan. UsageError at once for a selector that names nothing or a
    pair with no common machine type (bad input: one line, exit 2, before anything starts)."""
    return [replace(v, qemu=plan_qemu(v.mode, host, src, dst)) for v in variants]
