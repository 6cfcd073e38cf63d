"""What a vmexit run measures: the timed loops, the profiles paired against the baseline, their
sizes per accel, and the published reference figures.

Under TCG every figure carries TCG_LABEL: the TSC there follows host time and each "exit" is
emulated, so a figure is a relative smoke signal, never a hardware exit cost.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from harness.core.errors import UsageError
from harness.guest.image import GUEST_TOOLS
from harness.host.enlightenments import Profile, qemu_cpu_suffix, resolve_profile
from harness.vm.migration import MigrationMode

SCENARIO = "vmexit"
BASELINE = "none"

TCG_LABEL = ("emulated (TCG): not a hardware exit cost; relative smoke signal only, "
             "never compare with hardware references")

# The profiles compared when none are named: the baseline, and the eVMCS profile a Linux L1
# actually adopts (plain `evmcs` keeps the KVM signature, so Linux L1 never uses eVMCS there).
DEFAULT_PROFILES = (BASELINE, "evmcs-linux")

# Defaults per accel. Under TCG an L2 exit costs ~0.1-0.3 ms of host time (measured here), so
# the loops are kept short; on hardware they are long enough to swamp the report exit.
DEFAULT_ITERS = {"kvm": 20000, "tcg": 500}
DEFAULT_REPORTS = {"kvm": 11, "tcg": 6}
DEFAULT_REPEAT = 3

# Upper bound of one exit's host time when sizing a loop's timeout (TCG: ~10x the worst seen).
# "kvm-on-tcg": a real KVM whose own CPU is TCG (the KVM host VM): an L2 exit there runs
# through two emulated SVM levels, and 12000 exits did not finish in 32 s at the hardware budget.
_EXIT_BUDGET_S = {"kvm": 0.0002, "tcg": 0.003, "kvm-on-tcg": 0.01}
# What /proc/cpuinfo's model name says on a CPU that QEMU's TCG emulates.
TCG_CPU_MODEL = "QEMU TCG CPU"


def exit_budget_key(accel: str, cpu_model: str) -> str:
    """Which per-exit budget sizes the loops' timeouts: the accel's, unless KVM itself runs
    on an emulated CPU."""
    if accel == "kvm" and cpu_model.startswith(TCG_CPU_MODEL):
        return "kvm-on-tcg"
    return accel if accel in _EXIT_BUDGET_S else "tcg"

# How much slower the L2 CPUID loop may be on the destination before the run fails. Hardware
# exit costs repeat within a few percent; TCG timings on a shared host swing 2-4x per report,
# so there the check only catches gross breakage.
AFTER_MIGRATION_TOLERANCE_PCT = {"kvm": 25.0, "tcg": 100.0}

# Vendor-native hypercall payloads: VMMCALL on AMD/SVM, VMCALL on Intel/VMX.
VMCALL_PAYLOADS = {"svm": "vmcallloop.bin", "vmx": "vmcallloop-intel.bin"}


@dataclass(frozen=True)
class Reference:
    """A published nested exit cost (hardware, TSC cycles of a tight loop in L2)."""

    id: str
    setup: str
    enlightenment: str
    source: str
    without_cycles: int | None = None
    with_cycles: int | None = None
    saving_cycles: int | None = None

    @property
    def saving_percent(self) -> float | None:
        if self.without_cycles and self.with_cycles is not None:
            return round(100.0 * (self.without_cycles - self.with_cycles) / self.without_cycles, 1)
        return None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["saving_percent"] = self.saving_percent
        d["hardware"] = True
        return d


REFERENCES: tuple[Reference, ...] = (
    Reference("hyperv-on-kvm-evmcs", "Hyper-V (WS2016) as L1 on KVM, CPUID loop in L2", "hv-evmcs",
              "KVM eVMCS patch series cover letter", without_cycles=15200, with_cycles=13700),
    Reference("kvm-on-hyperv-evmcs", "KVM as L1 on Hyper-V, CPUID loop in L2", "hv-evmcs",
              'Linux commit "x86/kvm: use Enlightened VMCS when running on Hyper-V"',
              without_cycles=18890, with_cycles=8304),
    Reference("enlightened-msr-bitmap", "KVM as L1 on Hyper-V, with eVMCS", "hv-emsr-bitmap",
              "shared/FACTS.md (upstream commit not pinned here)", saving_cycles=700),
)


@dataclass(frozen=True)
class Loop:
    """One timed loop: where it runs, which exit it causes, and (for L2) the payload.

    ``level`` "l1" is ``nvmm l1loop`` in L1 itself (the single-level baseline), "l2" is
    ``nvmm run --payload``. ``payload`` is a file name under GUEST_TOOLS/payloads or an absolute path;
    None for an L2 vmcall loop means the vendor-native payload (VMCALL_PAYLOADS).
    """

    level: str
    kind: str
    payload: str | None = None

    def __post_init__(self) -> None:
        assert self.level in ("l1", "l2"), self.level

    def command(self, nested: str, iters: int, reports: int) -> str:
        if self.level == "l1":
            return f"nvmm l1loop --kind {shlex.quote(self.kind)} --iters {iters} --reports {reports}"
        payload = self.payload or VMCALL_PAYLOADS.get(nested, VMCALL_PAYLOADS["vmx"])
        path = payload if payload.startswith("/") else f"{GUEST_TOOLS}/payloads/{payload}"
        return f"nvmm run --payload {shlex.quote(path)} --iters {iters} --reports {reports}"


DEFAULT_LOOPS: tuple[Loop, ...] = (
    Loop("l1", "cpuid"),
    Loop("l2", "cpuid", "cpuidloop.bin"),  # the reference case of the published figures
    Loop("l2", "vmcall"),
    Loop("l2", "pio", "pioloop.bin"),
)
MIGRATION_LOOP = DEFAULT_LOOPS[1]


@dataclass(frozen=True)
class VmexitPlan:
    """What to measure. Profiles come resolved; the first one is the one migrated."""

    profiles: tuple[Profile, ...]
    reports: int = DEFAULT_REPORTS["tcg"]
    iters: int = DEFAULT_ITERS["tcg"]
    repeat: int = DEFAULT_REPEAT
    migrate: bool = True
    mode: MigrationMode = field(default_factory=lambda: MigrationMode("multifd-zstd"))
    loops: tuple[Loop, ...] = DEFAULT_LOOPS

    def __post_init__(self) -> None:
        check_numbers(self.reports, self.iters, self.repeat)
        if not self.profiles:
            raise UsageError("vmexit needs at least one profile")
        names = [p.name for p in self.profiles]
        if len(set(names)) != len(names):
            raise UsageError(f"profile given twice: {', '.join(names)}")

    def to_json(self) -> dict[str, Any]:
        return {"profiles": [{"name": p.name, "flags": list(p.flags), "cpu_suffix": qemu_cpu_suffix(p),
                              "notes": list(p.notes)} for p in self.profiles],
                "reports": self.reports, "iters": self.iters, "repeat": self.repeat,
                "warmup_reports_discarded": 1, "migrate": self.migrate,
                "migration": self.mode.to_json(), "loops": [asdict(lp) for lp in self.loops]}


def check_numbers(reports: int, iters: int, repeat: int) -> None:
    """UsageError unless the loop sizes can produce a figure (the first report is warm-up)."""
    if reports < 2:
        raise UsageError(f"--reports {reports}: need at least 2 (the first is discarded as warm-up)")
    if iters < 1:
        raise UsageError(f"--iters {iters}: need at least 1")
    if repeat < 1:
        raise UsageError(f"--repeat {repeat}: need at least 1")


def plan_profiles(names: Sequence[str], hv_lists: Sequence[str], *, l1_nested: str,
                  vendor: str) -> tuple[Profile, ...]:
    """Resolve --profile names and --hv lists; ``none`` always comes first (the baseline).

    Each --hv list is its own profile, named by the list. Bad names or dependency gaps raise
    UsageError (the same one line `nestvirt run` gives).
    """
    profiles = [resolve_profile(n, None, l1_nested=l1_nested, vendor=vendor) for n in names]
    for hv in hv_lists:
        profiles.append(replace(resolve_profile(None, hv, l1_nested=l1_nested, vendor=vendor),
                                name=hv))
    if not profiles:
        profiles = [resolve_profile(n, None, l1_nested=l1_nested, vendor=vendor)
                    for n in DEFAULT_PROFILES]
    out: list[Profile] = []
    for p in profiles:
        if p.name not in {q.name for q in out}:
            out.append(p)
    if BASELINE not in {p.name for p in out}:
        out.insert(0, resolve_profile(BASELINE, None, l1_nested=l1_nested, vendor=vendor))
    out.sort(key=lambda p: p.name != BASELINE)  # stable: the rest keep their order
    return tuple(out)


def default_plan(profiles: tuple[Profile, ...], accel: str, **overrides: Any) -> VmexitPlan:
    """A plan with the accel's default loop sizes; overrides that are None are ignored."""
    acc = accel if accel in DEFAULT_ITERS else "tcg"
    args: dict[str, Any] = {"reports": DEFAULT_REPORTS[acc], "iters": DEFAULT_ITERS[acc],
                            "repeat": DEFAULT_REPEAT}
    args.update({k: v for k, v in overrides.items() if v is not None})
    return VmexitPlan(profiles=profiles, **args)


# --- statistics and labels (pure) -------------------------------------------------------------


def label_for(accel: str) -> str | None:
    """The label every figure carries: TCG_LABEL unless the exits ran on hardware (kvm)."""
    return None if accel == "kvm" else TCG_LABEL


