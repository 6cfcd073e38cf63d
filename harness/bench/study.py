"""One compression study end to end: plan the points on the inventory's binaries, run the
chains, summarize, check the knobs, and write bench.json, tables.txt, report.html and a
results.json in the common schema (one result per point)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.bench.knobs import check_all
from harness.bench.plan import SCENARIO, TCG_LABEL, Axes, Plan, chains, expand
from harness.bench.report import render_html
from harness.bench.run import RunRecord, chain_dir, run_chain
from harness.bench.stats import summarize_point
from harness.bench.tables import all_tables, render_text
from harness.host.probe import HostFacts, QemuFacts
from harness.scenario.checks import Check
from harness.scenario.engine import RunContext
from harness.scenario.result import ScenarioResult


@dataclass(frozen=True)
class StudyOptions:
    axes: Axes
    qemus: tuple[QemuFacts, ...]
    seed: int
    bound_s: float = 60.0  # a migration not completed by then is cancelled: "not converged"
    quick: bool = False
    warmup: bool = True
    l2: bool = False  # L2's page counter runs in L1's KVM during every migration


def dirty_limit_reason(host: HostFacts) -> str | None:
    """Why the dirty-limit vs auto-converge comparison cannot run here (None: it can)."""
    if host.accel != "kvm":
        return ("dirty-limit needs KVM with a dirty ring (-accel kvm,dirty-ring-size=N); this host "
                f"runs {host.accel}, where QEMU refuses it: it runs as the "
                "dirty-limit scenario in the KVM host VM (nestvirt run --in-hostvm dirty-limit) "
                "or on a KVM host")
    if not any("dirty-limit" in q.migration_capabilities for q in host.qemus):
        return "no QEMU of the inventory has the dirty-limit capability (8.1+)"
    return ("the dirty-limit comparison is its own scenario, not a point of this study: "
            "nestvirt run dirty-limit (here: --in-hostvm)")


def plan_study(opts: StudyOptions) -> Plan:
    return expand(opts.axes, opts.qemus)


def run_study(ctx: RunContext, opts: StudyOptions,
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every chain; returns the study document (also written to ctx.out/bench.json)."""
    plan = plan_study(opts)
    order = chains(plan, opts.seed)
    by_binary = {q.binary: q for q in opts.qemus}
    t0 = time.monotonic()
    load0 = os.getloadavg()
    chain_recs = []
    done = 0
    total = sum(len(c.runs) + (1 if opts.warmup else 0) for c in order)

    def tick(r: RunRecord) -> None:
        nonlocal done
        done += 1
        if progress:
            el = int(time.monotonic() - t0)
            tag = "warm-up" if r.warmup else f"#{r.repeat + 1}"
            extra = f" {r.stats.get('total_time_ms')} ms" if r.converged else f" {r.error or ''}"[:120]
            progress(f"[{done}/{total} {el // 60}:{el % 60:02d}] {r.point} {tag}: {r.status}{extra} "
                     f"(load {r.load[0]:.1f})")

    try:
        for i, ch in enumerate(order):
            q = by_binary[ch.qemu]
            run_chain(ctx, ch, q, chain_dir(ctx.out, i, ch, q), opts.bound_s,
                      order0=sum(len(c.runs) for c in chain_recs), warmup=opts.warmup,
                      progress=tick, l2=opts.l2, into=chain_recs)
    finally:
        # Reached on Ctrl-C too: the runs that finished are written.
        doc = assemble(ctx.host, opts, plan, [c.to_json() for c in chain_recs], load0,
                       os.getloadavg(), time.monotonic() - t0)
        write_outputs(ctx.out, doc)
    return doc


def assemble(host: HostFacts, opts: StudyOptions, plan: Plan, chain_docs: Sequence[dict[str, Any]],
             load0: Sequence[float], load1: Sequence[float], seconds: float) -> dict[str, Any]:
    """The study document from its chains' records (pure: tests feed it recorded runs)."""
    runs = [r for c in chain_docs for r in c["runs"]]
    summaries = [summarize_point(p.to_json(), [r for r in runs if r["point"] == p.id and r["repeat"] >= 0])
                 for p in plan.points]
    checks = [c.to_json() for c in check_all(summaries)]
    shares = [r["sampler"].get("share") for r in runs if r.get("sampler")]
    relay = [r["sampler"].get("relay_cpu_s") for r in runs if r.get("sampler")]
    notes = sorted({n for c in chain_docs for n in c.get("notes", [])})
    dl = dirty_limit_reason(host)
    if dl:
        notes.append(f"dirty-limit vs auto-converge: skipped: {dl}")
    notes.append("L2 (the page counter) ran in L1's KVM during every migration; under TCG a stop that "
                 "lands in guest mode is refused by the destination (counted as refused, the source "
                 "runs on)" if opts.l2 else
                 "L1 ran its KVM (loaded, no L2 running): --l2 runs L2's page counter too")
    if any(p.level_via == "global" for p in plan.points):
        notes.append("multifd levels on QEMU before 9.0 are set with -global migration.multifd-<codec>-level=N "
                     "on the source: over QMP that QEMU reads them back and ignores them")
    load = [r.get("load") for r in runs if r.get("load")]
    facts = [("accel", host.accel), ("QEMU", ", ".join(f"{q.version} ({q.binary})" for q in opts.qemus)),
             ("host CPU", host.cpu_model), ("host kernel", host.host_kernel),
             ("seed", str(opts.seed)),
             ("L2", "page counter running" if opts.l2 else "none"), ("repeats", str(opts.axes.repeat)),
             ("bound", f"{opts.bound_s:g} s per migration"),
             ("runs", f"{len(runs)} migrations ({sum(1 for r in runs if r['repeat'] < 0)} warm-up) "
                      f"in {seconds:.0f} s"),
             ("load during runs", f"1-min load {min(x[0] for x in load):.2f}..{max(x[0] for x in load):.2f}"
              if load else "-"),
             ("harness samplers", f"thread sampler {100 * max(shares):.2f}% of one core at most; relay "
                                  f"{max(relay):.3f} CPU-s per run at most" if shares else "-")]
    return {"schema": 1, "kind": SCENARIO, "quick": opts.quick, "accel": host.accel,
            "tcg_label": TCG_LABEL, "seed": opts.seed, "bound_s": opts.bound_s,
            "axes": opts.axes.to_json(), "load_before": [round(x, 2) for x in load0],
            "load_after": [round(x, 2) for x in load1], "seconds": round(seconds, 1),
            "facts": facts, "notes": notes, "pruned": [p.to_json() for p in plan.pruned],
            "points": summaries, "knob_checks": checks, "chains": list(chain_docs)}


def point_results(doc: dict[str, Any], out: Path) -> list[ScenarioResult]:
    """Each point as a ScenarioResult (the common results.json schema)."""
    res = []
    for s in doc["points"]:
        p = s["point"]
        r = ScenarioResult(id=f"{SCENARIO}/{s['id']}", scenario=SCENARIO,
                           params={"point": p, "migration": p["mode"],
                                   "qemu": {"src": {"version": p["qemu_version"], "binary": p["qemu"]},
                                            "dst": {"version": p["qemu_version"], "binary": p["qemu"]}}})
        f = s["figures"]
        r.metrics["migration"] = {k: f[k]["median"] for k in ("total_time_ms", "downtime_ms", "setup_time_ms")
                                  if k in f}
        if "pages_per_second" in f:
            r.metrics["migration"]["ram_pages_per_second"] = f["pages_per_second"]["median"]
        r.metrics["migration_status"] = "completed" if s["converged"] else "not-converged"
        r.metrics["bench"] = s
        r.metrics["label"] = TCG_LABEL if doc["accel"] != "kvm" else ""
        r.checks.append(Check("l1-workload-pattern", not s["guest_broken"],
                              f"l1work verified after each of {s['converged']} migration(s)"
                              if not s["guest_broken"]
                              else f"l1work failed its verify after {s['guest_broken']} migration(s)"))
        mine = [c for c in doc["knob_checks"] if c["where"] == s["id"]]
        r.checks += [Check(f"knob-{c['knob']}", c["took_effect"], c["detail"]) for c in mine]
        if s["guest_broken"] or any(not c["took_effect"] for c in mine):
            r.verdict = "fail"
            r.reason = "; ".join(c.detail for c in r.checks if not c.ok)[:1000]
        elif s["converged"]:
            r.verdict = "pass"
            if s["converged"] < s["runs"]:
                r.reason = f"converged in {s['converged']} of {s['runs']} runs"
        elif s["errors"]:
            r.verdict, r.reason = "error", str(s["errors"][0])[:500]
        else:
            r.verdict = "pass"
            r.reason = f"did not converge in any of {s['runs']} runs (bounded at {doc['bound_s']:g} s)"
        r.artifacts["dir"] = str(out)
        res.append(r)
    return res


def write_outputs(out: Path, doc: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(doc, indent=1, default=str))
    (out / "tables.txt").write_text(text_report(doc))
    (out / "report.html").write_text(render_html(doc))


def text_report(doc: dict[str, Any]) -> str:
    head = []
    if doc["accel"] != "kvm":
        head.append(f"NOTE: {doc['tcg_label']}")
    head.append(f"load average at start {' '.join(map(str, doc['load_before']))}, at end "
                f"{' '.join(map(str, doc['load_after']))} (shared machine: figures are noisy)")
    head += [f"{k}: {v}" for k, v in doc["facts"]]
    head += [f"note: {n}" for n in doc["notes"]]
    return "\n".join(head) + "\n\n" + "\n".join(render_text(t) for t in all_tables(doc))
