"""Nested vmexit cost: TSC cycles per exit in L1 and L2 loops, per enlightenment profile.

One run: resolve profiles -> skip (with the reason) those this host cannot run -> boot one L1
per profile, at most two alive -> repetitions interleaved A B A B between the L1s -> migrate
the first profile's L1 and time the L2 CPUID loop again on the destination -> statistics,
savings against ``none``, published references -> one ScenarioResult (scenario "vmexit").

Everything from "statistics" on is pure and works on recorded numbers (tests/test_vmexit.py).
Under TCG every figure carries TCG_LABEL: the TSC there follows host time and each "exit" is
emulated, so a figure is a relative smoke signal, never a hardware exit cost.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from . import checks as ck
from .enlightenments import Profile, host_support, qemu_cpu_suffix, resolve_profile
from .errors import StepTimeout, UsageError
from .hvcpuid import decode_l1_cpuid, enlightenment_checks, supported_hv_flags
from .l1 import L1Shell, RunKey
from .machine import Machine, QmpCommandError
from .migration import MigrationMode, migrate, summarize_stats
from .ports import free_port
from .scenario import (
    TOOLS,
    RunContext,
    ScenarioResult,
    Variant,
    execute_guarded,
    judge_failed_checks,
    launch_l1,
    save_result,
)

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
_EXIT_BUDGET_S = {"kvm": 0.0002, "tcg": 0.003}

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
    ``nvmm run --payload``. ``payload`` is a file name under TOOLS/payloads or an absolute path;
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
        path = payload if payload.startswith("/") else f"{TOOLS}/payloads/{payload}"
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


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); ``q`` in [0, 1]."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(values: Iterable[float]) -> dict[str, float | int]:
    """n, median, min, max, p10, p90, q1, q3, iqr of the values (rounded to 0.1)."""
    s = sorted(values)
    if not s:
        raise ValueError("no values to summarize")
    q1, q3 = percentile(s, 0.25), percentile(s, 0.75)
    r = lambda v: round(v, 1)  # noqa: E731 - a local shorthand
    return {"n": len(s), "median": r(percentile(s, 0.5)), "min": r(s[0]), "max": r(s[-1]),
            "p10": r(percentile(s, 0.1)), "p90": r(percentile(s, 0.9)), "q1": r(q1),
            "q3": r(q3), "iqr": r(q3 - q1)}


def saving_percent(baseline: float, value: float) -> float | None:
    """How much cheaper ``value`` is than ``baseline``, in percent (negative: dearer)."""
    if not baseline:
        return None
    return round(100.0 * (baseline - value) / baseline, 1)


def parse_reports(stdout: str) -> list[dict[str, Any]]:
    """nvmm's report lines (JSON objects with cycles_per_exit); anything else is skipped."""
    out = []
    for line in stdout.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("cycles_per_exit"), (int, float)):
            out.append(rec)
    return out


def nvmm_error_line(stderr: str, rc: int) -> str:
    """nvmm's own diagnostic (its last ``nvmm:`` line), else the last stderr line, else the code."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    own = [ln for ln in lines if ln.startswith("nvmm:")]
    return (own or lines or [f"exit status {rc}, nothing on stderr"])[-1][:300]


_TSC_REFINED = re.compile(r"tsc: Refined TSC clocksource calibration: ([\d.]+) MHz")
_TSC_DETECTED = re.compile(r"tsc: Detected ([\d.]+) MHz")
_CPUINFO_MHZ = re.compile(r"^cpu MHz\s*:\s*([\d.]+)", re.MULTILINE)
_DMESG_STAMP = re.compile(r"^\[[^\]]*\] ")


def tsc_mhz(dmesg: str, cpuinfo: str = "") -> tuple[float | None, str]:
    """L1's TSC frequency and where it came from: the refined calibration beats the first
    detection (both in dmesg), /proc/cpuinfo's "cpu MHz" is the fallback."""
    for pattern, text, what in ((_TSC_REFINED, dmesg, "dmesg"), (_TSC_DETECTED, dmesg, "dmesg"),
                                (_CPUINFO_MHZ, cpuinfo, "/proc/cpuinfo")):
        found = pattern.findall(text)
        if found:
            line = [ln.strip() for ln in text.splitlines() if pattern.search(ln)][-1]
            return float(found[-1]), f"{what}: {_DMESG_STAMP.sub('', line)}"
    return None, "not found in dmesg or /proc/cpuinfo"


@dataclass
class LoopRun:
    """One execution of one loop in one L1: its samples after the warm-up report."""

    profile: str
    machine: str  # "src", or "dst" after migration
    level: str
    kind: str
    rep: int
    pair: str  # runs with the same pair key were interleaved with each other
    samples: list[float]
    instruction: str = ""  # the kind nvmm reported (vmmcall on AMD, vmcall on Intel)
    error: str | None = None


def loop_run(profile: str, machine: str, loop: Loop, rep: int, pair: str, rc: int, stdout: str,
             stderr: str) -> LoopRun:
    """Judge one nvmm execution: samples after the warm-up, or the error carrying nvmm's line."""
    reports = parse_reports(stdout)
    run = LoopRun(profile, machine, loop.level, loop.kind, rep, pair,
                  [float(r["cycles_per_exit"]) for r in reports[1:]],
                  str(reports[0].get("kind", "")) if reports else "")
    if rc != 0:
        run.error = f"exit {rc}: {nvmm_error_line(stderr, rc)}"
    elif not reports:
        run.error = f"no report lines: {nvmm_error_line(stderr, rc)}"
    elif not run.samples:
        run.error = f"only {len(reports)} report(s): nothing left after the warm-up report"
    return run


_LEVELS = {"l1": 0, "l2": 1}
_KINDS = {"cpuid": 0, "vmcall": 1, "pio": 2}


def build_figures(runs: Sequence[LoopRun], contexts: Mapping[tuple[str, str], dict[str, Any]],
                  label: str | None, profile_order: Sequence[str] = ()) -> list[dict[str, Any]]:
    """One figure per (profile, machine, level, kind) from the runs that produced samples.

    ``contexts`` maps (profile, machine) to what the figure must be read with (TSC frequency,
    kernels, QEMU, accel, pinning); every figure carries it and the label.
    """
    groups: dict[tuple[str, str, str, str], list[LoopRun]] = {}
    for r in runs:
        if r.samples:
            groups.setdefault((r.profile, r.machine, r.level, r.kind), []).append(r)
    order = {p: i for i, p in enumerate(profile_order)}
    figures = []
    for key in sorted(groups, key=lambda k: (order.get(k[0], len(order)), k[0], k[1] != "src",
                                             _LEVELS.get(k[2], 9), _KINDS.get(k[3], 9), k[3])):
        profile, machine, level, kind = key
        rs = groups[key]
        ctx = dict(contexts.get((profile, machine), {}))
        stats = summarize(v for r in rs for v in r.samples)
        mhz = ctx.get("tsc_mhz")
        figures.append({
            "profile": profile, "machine": machine, "level": level, "kind": kind,
            "instruction": next((r.instruction for r in rs if r.instruction), kind),
            "unit": "tsc_cycles_per_exit", "runs": len(rs), **stats,
            "ns_per_exit_median": round(stats["median"] * 1000.0 / mhz, 1) if mhz else None,
            "label": label, "context": ctx,
        })
    return figures


def savings(figures: Sequence[Mapping[str, Any]], runs: Sequence[LoopRun], label: str | None,
            baseline: str = BASELINE) -> list[dict[str, Any]]:
    """For each profile other than ``baseline``: percent saved per (level, kind) on src.

    ``saving_percent`` compares the pooled medians; ``paired_saving_percent`` is the median of
    the per-repetition savings between runs that were interleaved (same pair key).
    """
    base = {(f["level"], f["kind"]): f for f in figures
            if f["profile"] == baseline and f["machine"] == "src"}
    rep_median = {(r.profile, r.level, r.kind, r.pair): percentile(sorted(r.samples), 0.5)
                  for r in runs if r.samples and r.machine == "src"}
    out = []
    for f in figures:
        b = base.get((f["level"], f["kind"]))
        if f["profile"] == baseline or f["machine"] != "src" or b is None:
            continue
        paired = [saving_percent(m0, rep_median[(f["profile"], lv, kd, pair)])
                  for (p, lv, kd, pair), m0 in rep_median.items()
                  if p == baseline and (lv, kd) == (f["level"], f["kind"])
                  and (f["profile"], lv, kd, pair) in rep_median]
        paired_ok = sorted(x for x in paired if x is not None)
        out.append({
            "profile": f["profile"], "vs": baseline, "level": f["level"], "kind": f["kind"],
            "baseline_median": b["median"], "median": f["median"],
            "saving_percent": saving_percent(b["median"], f["median"]),
            "paired_saving_percent": round(percentile(paired_ok, 0.5), 1) if paired_ok else None,
            "pairs": len(paired_ok), "label": label,
        })
    return out


def not_slower_after_migration(before: Mapping[str, Any] | None, after: Mapping[str, Any] | None,
                               tolerance_pct: float) -> ck.Check:
    """The L2 CPUID loop on dst is at most ``tolerance_pct`` slower (medians) than on src."""
    name = "l2-cpuid-not-slower-after-migration"
    if not before or not after:
        return ck.Check(name, False, f"no figure to compare (src {bool(before)}, dst {bool(after)})")
    change = -(saving_percent(before["median"], after["median"]) or 0.0)
    detail = (f"median {before['median']:.1f} -> {after['median']:.1f} cycles/exit "
              f"({change:+.1f}%, tolerance +{tolerance_pct:g}%)")
    return ck.Check(name, change <= tolerance_pct, detail)


def _num(v: Any) -> str:
    return "-" if v is None else (f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}")


def figures_table(res: ScenarioResult) -> str:
    """The figures of a vmexit result as a console table; every row shows its label."""
    m = res.metrics
    sav = {(s["profile"], s["level"], s["kind"]): s for s in m.get("savings", [])}
    rows = [("PROFILE", "ON", "LEVEL", "EXIT", "N", "MEDIAN", "P10", "P90", "MIN", "MAX",
             "NS/EXIT", "SAVING", "LABEL")]
    for f in m.get("figures", []):
        s = sav.get((f["profile"], f["level"], f["kind"])) if f["machine"] == "src" else None
        saved = s["saving_percent"] if s else None
        rows.append((f["profile"], f["machine"], f["level"], f["instruction"], str(f["n"]),
                     _num(f["median"]), _num(f["p10"]), _num(f["p90"]), _num(f["min"]),
                     _num(f["max"]), _num(f["ns_per_exit_median"]),
                     "-" if saved is None else f"{saved:+.1f}%",
                     f["label"] or "hardware (KVM)"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=False)) + "  " + r[-1]
             for r in rows] if len(rows) > 1 else ["no figures"]
    unit = "TSC cycles per exit"
    ctx = next((f["context"] for f in m.get("figures", [])), {})
    if ctx:
        pin = ctx.get("pinning", {})
        pinned = {True: "pinned to", False: "not pinned, may run on"}.get(pin.get("pinned"), "on")
        unit += (f"; TSC {ctx.get('tsc_mhz')} MHz; host {ctx.get('host_cpu_model')}, "
                 f"kernel {ctx.get('host_kernel')}; L1 kernel {ctx.get('l1_kernel')}; "
                 f"QEMU {ctx.get('qemu_version')} accel {ctx.get('accel')}, {pinned} "
                 f"CPUs {pin.get('cpus')}")
    lines.append(f"({unit})")
    mig = m.get("migration") or {}
    if mig.get("after"):
        lines.append(f"after migration ({mig.get('mode')}): L2 cpuid median "
                     f"{_num(mig['before']['median'])} -> {_num(mig['after']['median'])} "
                     f"({mig['change_percent']:+.1f}%)")
    elif mig.get("skipped") or mig.get("error"):
        lines.append(f"migration: {mig.get('skipped') or mig.get('error')}")
    for name, why in m.get("skipped", {}).items():
        lines.append(f"profile {name}: SKIP: {why}")
    for r in m.get("references", []):
        what = (f"{r['without_cycles']} -> {r['with_cycles']} cycles ({r['saving_percent']}% saved)"
                if r.get("with_cycles") is not None else f"~{r['saving_cycles']} cycles saved")
        lines.append(f"reference (hardware) {r['setup']}, {r['enlightenment']}: {what}")
    if m.get("label"):
        lines.append(f"NOTE: {m['label']}")
    return "\n".join(lines)


# --- the run ------------------------------------------------------------------------------------


def profile_skip_reason(ctx: RunContext, profile: Profile) -> str | None:
    """Why this host cannot run ``profile`` (ctx.unsupported_reason's profile half)."""
    h = ctx.host
    return host_support(profile, accel=h.accel, l1_nested=h.l1_nested, caps=h.kvm.caps,
                        hv_supported=supported_hv_flags(h.kvm.hv_cpuid),
                        qemu_hv_props=h.qemu.hv_props)


def pinning(pid: int | None) -> dict[str, Any]:
    """The QEMU process's CPU affinity: pinned when it may not run on every online CPU."""
    online = os.cpu_count() or 0
    try:
        cpus = sorted(os.sched_getaffinity(pid)) if pid else None
    except OSError:
        cpus = None
    return {"qemu_pid": pid, "cpus": cpus, "host_cpus": online,
            "pinned": None if cpus is None else len(cpus) < online}


@dataclass
class _L1:
    """One booted L1 for one profile, with what its figures must be read with."""

    profile: Profile
    machine: Machine
    shell: L1Shell
    nested: str = ""
    context: dict[str, Any] = field(default_factory=dict)
    failed_loops: set[tuple[str, str]] = field(default_factory=set)


def run_vmexit(ctx: RunContext, plan: VmexitPlan, run_id: str | None = None) -> ScenarioResult:
    """Run one vmexit measurement end to end; never raises for failures, always reaps QEMU."""
    rid = run_id or f"{SCENARIO}/{','.join(p.name for p in plan.profiles)}"
    res = ScenarioResult(id=rid, scenario=SCENARIO, params=plan.to_json())
    workdir = ctx.out / re.sub(r"[^\w.+-]+", "_", rid)
    workdir.mkdir(parents=True, exist_ok=True)
    res.artifacts["dir"] = str(workdir)
    run = _VmexitRun(ctx, plan, workdir, res)
    execute_guarded(run, res, workdir)
    run.summarize()
    return _judge(res, workdir)


def run_vmexit_variant(variant: Variant, ctx: RunContext) -> ScenarioResult:
    """`nestvirt run vmexit`: the defaults, comparing the run's profile with ``none`` if given."""
    if variant.spec.inject:
        return ScenarioResult(id=variant.id, scenario=SCENARIO, verdict="error",
                              reason=f"--inject {variant.spec.inject} does not apply to vmexit")
    h = ctx.host
    if variant.profile.names:
        # Already resolved by the run (it may be a --hv list, which has no name to resolve).
        base = resolve_profile(BASELINE, None, l1_nested=h.l1_nested, vendor=h.vendor)
        profiles: tuple[Profile, ...] = (base, variant.profile)
    else:
        profiles = plan_profiles([], [], l1_nested=h.l1_nested, vendor=h.vendor)
    plan = default_plan(profiles, h.accel, mode=variant.mode)
    return run_vmexit(ctx, plan, run_id=variant.id)


def _judge(res: ScenarioResult, workdir: Path) -> ScenarioResult:
    """Failed checks make a fail (an error after them is appended); figures make a pass."""
    if not judge_failed_checks(res) and res.verdict == "":
        skipped = res.metrics.get("skipped", {})
        if res.metrics.get("figures"):
            res.verdict = "pass"
        elif skipped and len(skipped) == len(res.params.get("profiles", [])):
            res.verdict = "skip"
            res.reason = "; ".join(f"{n}: {why}" for n, why in skipped.items())[:1000]
        else:
            res.verdict, res.reason = "error", "no figure was produced"
    return save_result(res, workdir)


class _VmexitRun:
    """The steps of one vmexit run; state lives here for the length of one run only."""

    def __init__(self, ctx: RunContext, plan: VmexitPlan, workdir: Path,
                 res: ScenarioResult) -> None:
        self.ctx, self.plan, self.workdir, self.res = ctx, plan, workdir, res
        self.key = RunKey.generate()
        self.key.save(workdir / "id_ecdsa")
        self.machines: list[Machine] = []
        self.shells: list[L1Shell] = []
        self.runs: list[LoopRun] = []
        self.contexts: dict[tuple[str, str], dict[str, Any]] = {}
        self.label = label_for(ctx.accel)
        acc = ctx.accel if ctx.accel in _EXIT_BUDGET_S else "tcg"
        self.loop_timeout = 30.0 + plan.reports * plan.iters * _EXIT_BUDGET_S[acc]
        self.tolerance = AFTER_MIGRATION_TOLERANCE_PCT[acc]

    def _phase(self, name: str, t0: float) -> None:
        self.res.durations[name] = round(self.res.durations.get(name, 0.0) + time.monotonic() - t0, 3)

    # -- machines -----------------------------------------------------------------------------
    def _boot(self, profile: Profile) -> _L1:
        t0 = time.monotonic()
        name = "l1-" + re.sub(r"[^\w.-]+", "_", profile.name)
        m = launch_l1(self.ctx, name, self.workdir, self.key, cpu=self.ctx.l1_cpu(profile))
        self.machines.append(m)
        ready = m.wait_guest_event("ready", self.ctx.boot_timeout)
        if ready.get("kvm") != "yes":
            raise StepTimeout(f"L1 ({profile.name}) has no /dev/kvm (module {ready.get('module')}): "
                              "cannot run an L2")
        l1 = _L1(profile, m, self._shell(m))
        self._describe(l1, "src")
        self._phase("boot", t0)
        return l1

    def _shell(self, m: Machine, timeout: float = 30.0) -> L1Shell:
        sh = L1Shell(m.ssh_port, self.key)
        self.shells.append(sh)
        sh.connect(timeout)
        return sh

    def _describe(self, l1: _L1, machine: str) -> None:
        """Record L1's own facts (kernel, TSC, vendor, CPUID view) for this profile's figures."""
        sh, p = l1.shell, l1.profile
        caps = sh.run("nvmm caps", 15)
        if caps.rc != 0:
            raise StepTimeout(f"nvmm caps failed in L1 ({p.name}): {nvmm_error_line(caps.err, caps.rc)}")
        info = json.loads(caps.out.strip().splitlines()[-1])
        l1.nested = "svm" if info.get("svm") else "vmx" if info.get("vmx") else (
            "svm" if info.get("cpu_vendor") in ("AuthenticAMD", "HygonGenuine") else "vmx")
        dmesg = sh.run("dmesg", 15).out
        mhz, source = tsc_mhz(dmesg, sh.run("cat /proc/cpuinfo", 15).out)
        h = self.ctx.host
        l1.context = {
            "tsc_mhz": mhz, "tsc_source": source, "host_cpu_model": h.cpu_model,
            "host_kernel": h.host_kernel, "l1_kernel": sh.run("uname -r", 10).out.strip(),
            "qemu_version": h.qemu.version, "accel": h.accel, "l1_cpu": self.ctx.l1_cpu(p),
            "l1_cpu_vendor": info.get("cpu_vendor"), "l1_nested": l1.nested,
            "pinning": pinning(l1.machine.pid),
        }
        self.contexts[(p.name, machine)] = l1.context
        dump = sh.run("nvmm cpuid-dump", 15)
        (self.workdir / f"{l1.machine.config.name}-cpuid.txt").write_text(dump.out + dump.err)
        if machine == "src":
            try:
                view = decode_l1_cpuid(dump.out)
                rec: dict[str, Any] = asdict(view)
                rec["features"] = sorted(view.features)
                rec["vendor"] = view.vendor
            except ValueError as e:
                rec = {"error": str(e)}
            self.res.metrics.setdefault("l1_cpuid", {})[p.name] = rec

    def _hv_checks(self, l1: _L1) -> None:
        """The enlightenment checks, on L1's log after its loops ran (eVMCS warns when L2 runs)."""
        p = l1.profile
        if not p.names:
            return
        dmesg = l1.shell.run("dmesg", 15).out
        (self.workdir / f"{l1.machine.config.name}-dmesg.txt").write_text(dmesg)
        dump = l1.shell.run("nvmm cpuid-dump", 15).out
        found = enlightenment_checks(p, dump, dmesg)
        self.res.checks += [replace(c, name=f"{c.name}@{p.name}") for c in found]

    # -- steps --------------------------------------------------------------------------------
    def execute(self) -> None:
        skipped: dict[str, str] = {}
        runnable: list[Profile] = []
        for p in self.plan.profiles:
            why = profile_skip_reason(self.ctx, p)
            if why:
                skipped[p.name] = why
            else:
                runnable.append(p)
        self.res.metrics["skipped"] = skipped
        if not runnable:
            return
        first, others = runnable[0], runnable[1:]
        base = self._boot(first)
        # Each other profile is paired with the first; at most two L1s are alive at once.
        for g, other in enumerate(others or [None]):
            partner = self._boot(other) if other is not None else None
            group = [base] + ([partner] if partner else [])
            for rep in range(self.plan.repeat):
                for l1 in group:  # A B A B ...: drift on the host hits both profiles alike
                    self._measure_all(l1, rep, pair=f"{g}.{rep}")
            if partner is not None:
                self._hv_checks(partner)
                self._retire(partner)
        self._hv_checks(base)
        if self.plan.migrate:
            self._migrate_and_measure(base)
        else:
            self.res.metrics["migration"] = {"skipped": "not asked for (--no-migrate)"}

    def _measure_all(self, l1: _L1, rep: int, pair: str, machine: str = "src",
                     loops: Sequence[Loop] | None = None) -> None:
        t0 = time.monotonic()
        for loop in loops or self.plan.loops:
            if (loop.level, loop.kind) in l1.failed_loops:
                continue  # a loop that crashed once is reported once, not re-run
            cmd = loop.command(l1.nested, self.plan.iters, self.plan.reports)
            r = l1.shell.run(cmd, self.loop_timeout)
            run = loop_run(l1.profile.name, machine, loop, rep, pair, r.rc, r.out, r.err)
            self.runs.append(run)
            if run.error:
                l1.failed_loops.add((loop.level, loop.kind))
        self._phase("measure" if machine == "src" else "measure_dst", t0)

    def _retire(self, l1: _L1) -> None:
        l1.shell.close()
        l1.machine.shutdown()

    def _migrate_and_measure(self, src: _L1) -> None:
        mig: dict[str, Any] = {"profile": src.profile.name, "mode": self.plan.mode.compression,
                               "label": self.label}
        self.res.metrics["migration"] = mig
        why = self.plan.mode.unsupported_reason(self.ctx.host.qemu)
        if why:
            mig["skipped"] = why
            return
        t0 = time.monotonic()
        dst = launch_l1(self.ctx, src.machine.config.name + "-dst", self.workdir, self.key,
                        cpu=self.ctx.l1_cpu(src.profile), incoming=True)
        self.machines.append(dst)
        uri = f"tcp:127.0.0.1:{free_port()}"
        outcome = migrate(src.machine, dst, self.plan.mode, uri, self.ctx.migrate_timeout)
        self._phase("migrate", t0)
        (self.workdir / "query-migrate.json").write_text(json.dumps(outcome.stats, indent=2))
        stats = summarize_stats(outcome.stats)
        mig.update({"status": outcome.status, "seconds": outcome.seconds,
                    "downtime_ms": stats.get("downtime_ms"), "dst_status": outcome.dst_status})
        self.res.metrics["migration_seconds"] = outcome.seconds  # the shared console table's column
        if outcome.dst_error:
            mig["dst_error"] = outcome.dst_error
        self.res.checks.append(ck.migration_completed(outcome.status, outcome.error, "plain"))
        alive = dst.alive()
        self.res.checks.append(ck.dst_qemu_alive(alive, outcome.dst_status if alive else None, "running",
                                                 dst.error_lines(), dst.returncode, dst.console_lines()))
        src.shell.close()
        src.machine.shutdown()  # paused after migration; frees its CPU and memory for dst
        if outcome.status != "completed" or not alive or outcome.dst_status != "running":
            mig["error"] = outcome.error or outcome.dst_error or f"destination {outcome.dst_status}"
            return
        moved = _L1(src.profile, dst, self._shell(dst), nested=src.nested)
        moved.context = {**src.context, "pinning": pinning(dst.pid)}
        self.contexts[(src.profile.name, "dst")] = moved.context
        # One discarded run first: right after migration dst is cold (TCG retranslates L1's
        # code, KVM refaults guest memory into EPT/NPT), and that is not the steady state.
        t0 = time.monotonic()
        cmd = MIGRATION_LOOP.command(moved.nested, self.plan.iters, self.plan.reports)
        r = moved.shell.run(cmd, self.loop_timeout)
        warm = loop_run(src.profile.name, "dst", MIGRATION_LOOP, -1, "dst.warmup", r.rc, r.out, r.err)
        mig["dst_warmup_samples"] = warm.samples
        self._phase("measure_dst", t0)
        if warm.error:
            self.runs.append(warm)
            return
        for rep in range(self.plan.repeat):
            self._measure_all(moved, rep, pair=f"dst.{rep}", machine="dst", loops=[MIGRATION_LOOP])

    def teardown(self) -> None:
        for sh in self.shells:
            sh.close()
        for m in reversed(self.machines):
            try:
                m.shutdown()
            except (QmpCommandError, OSError):
                pass

    # -- figures ------------------------------------------------------------------------------
    def summarize(self) -> None:
        """Figures, savings, migration comparison and loop checks from whatever ran."""
        m, label = self.res.metrics, self.label
        order = [p.name for p in self.plan.profiles]
        figures = build_figures(self.runs, self.contexts, label, order)
        m["label"] = label
        m["accel"] = self.ctx.accel
        m["figures"] = figures
        m["savings"] = savings(figures, self.runs, label)
        m["references"] = [r.to_json() for r in REFERENCES]
        (self.workdir / "vmexit-runs.json").write_text(
            json.dumps([asdict(r) for r in self.runs], indent=2))
        # One check per loop that was run: where it crashed, nvmm's own line is the detail.
        by_loop: dict[tuple[str, str, str, str], list[LoopRun]] = {}
        for r in self.runs:
            by_loop.setdefault((r.profile, r.machine, r.level, r.kind), []).append(r)
        for (profile, machine, level, kind), rs in by_loop.items():
            bad = next((r for r in rs if r.error), None)
            name = f"vmexit-loop@{profile}:{machine}:{level}-{kind}"
            if bad:
                self.res.checks.append(ck.Check(name, False, bad.error or ""))
            else:
                n = sum(len(r.samples) for r in rs)
                self.res.checks.append(ck.Check(name, True, f"{len(rs)} run(s), {n} samples"))
        mig = m.get("migration")
        if mig and mig.get("status") == "completed" and not mig.get("error"):
            fig = {(f["machine"], f["level"], f["kind"]): f for f in figures
                   if f["profile"] == mig["profile"]}
            before = fig.get(("src", MIGRATION_LOOP.level, MIGRATION_LOOP.kind))
            after = fig.get(("dst", MIGRATION_LOOP.level, MIGRATION_LOOP.kind))
            if before and after:
                keys = ("n", "median", "p10", "p90")
                mig["before"] = {k: before[k] for k in keys}
                mig["after"] = {k: after[k] for k in keys}
                mig["change_percent"] = -(saving_percent(before["median"], after["median"]) or 0.0)
                mig["tolerance_percent"] = self.tolerance
            if after or not any(r.error for r in self.runs if r.machine == "dst"):
                self.res.checks.append(not_slower_after_migration(before, after, self.tolerance))
