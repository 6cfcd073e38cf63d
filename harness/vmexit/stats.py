"""Statistics of vmexit figures, pure functions over recorded numbers: percentiles, summaries,
savings against the baseline, TSC rate from the kernel log, the figures table."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from harness.scenario import checks as ck
from harness.scenario.result import ScenarioResult
from harness.vmexit.plan import BASELINE, Loop


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


