"""Nested vmexit cost, the engine: boot one L1 per profile (at most two alive), interleave the
loop repetitions A B A B between them, migrate the first profile's L1 and time the L2 CPUID
loop again on the destination, then judge one ScenarioResult (scenario "vmexit").

What is measured comes from plan.py; the statistics from stats.py (pure, tested on recorded
numbers). Under TCG every figure carries TCG_LABEL.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from harness.core import slow
from harness.core.errors import StepTimeout
from harness.core.ports import free_port
from harness.guest.l1 import L1Shell, RunKey
from harness.host.enlightenments import Profile, host_support, resolve_profile
from harness.host.hvcpuid import decode_l1_cpuid, supported_hv_flags
from harness.scenario import checks as ck
from harness.scenario.engine import RunContext, launch_l1, start_run_l1
from harness.scenario.hv_checks import enlightenment_checks
from harness.scenario.result import ScenarioResult, execute_guarded, judge_failed_checks, save_result
from harness.scenario.spec import Variant
from harness.vm.machine import Machine, QmpCommandError
from harness.vm.migration import migrate, summarize_stats
from harness.vmexit.plan import (
    _EXIT_BUDGET_S,
    AFTER_MIGRATION_TOLERANCE_PCT,
    BASELINE,
    MIGRATION_LOOP,
    REFERENCES,
    SCENARIO,
    Loop,
    VmexitPlan,
    default_plan,
    exit_budget_key,
    label_for,
    plan_profiles,
)
from harness.vmexit.stats import (
    LoopRun,
    build_figures,
    loop_run,
    not_slower_after_migration,
    nvmm_error_line,
    saving_percent,
    savings,
    tsc_mhz,
)


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
        budget = exit_budget_key(ctx.accel, ctx.host.cpu_model)
        self.loop_timeout = slow.scaled(30.0 + plan.reports * plan.iters * _EXIT_BUDGET_S[budget])
        acc = ctx.accel if ctx.accel in AFTER_MIGRATION_TOLERANCE_PCT else "tcg"
        self.tolerance = AFTER_MIGRATION_TOLERANCE_PCT[acc]
        self.host_keys: dict[str, Any] = {}  # machine name -> the host key its L1 was given

    def _phase(self, name: str, t0: float) -> None:
        self.res.durations[name] = round(self.res.durations.get(name, 0.0) + time.monotonic() - t0, 3)

    # -- machines -----------------------------------------------------------------------------
    def _boot(self, profile: Profile) -> _L1:
        t0 = time.monotonic()
        name = "l1-" + re.sub(r"[^\w.-]+", "_", profile.name)
        started = start_run_l1(self.ctx, name, self.workdir, self.key,
                               cpu=self.ctx.l1_cpu(profile))
        m = started.machine
        self.machines.append(m)
        self.host_keys[m.config.name] = started.host_key  # pinned, the destination's too
        self.res.params.setdefault("start", {})[profile.name] = started.record
        ready = started.ready
        if ready.get("kvm") != "yes":
            raise StepTimeout(f"L1 ({profile.name}) has no /dev/kvm (module {ready.get('module')}): "
                              "cannot run an L2")
        l1 = _L1(profile, m, self._shell(m))
        self._describe(l1, "src")
        self._phase("boot", t0)
        return l1

    def _shell(self, m: Machine, timeout: float = 30.0) -> L1Shell:
        sh = L1Shell(m.ssh_port, self.key, host_key=self.host_keys.get(m.config.name))
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
        self.host_keys[dst.config.name] = self.host_keys.get(src.machine.config.name)
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
