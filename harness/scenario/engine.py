"""The engine that runs one variant: it alone sequences machines, guest programs, migration,
faults and checks. Runners (CLI, pytest, avocado) call run_variant() and read the ScenarioResult.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from harness.core import slow
from harness.core.errors import NestvirtError, StepTimeout
from harness.core.ports import free_port
from harness.guest.image import GUEST_TOOLS, L1Image
from harness.guest.l1 import CommandResult, L1Shell, RunKey
from harness.host.enlightenments import Profile, host_support, qemu_cpu_suffix, same_enlightenments
from harness.host.hvcpuid import supported_hv_flags
from harness.host.probe import HostFacts, QemuFacts
from harness.qemu.inventory import machine_for
from harness.remote.ssh import HostSpec
from harness.scenario import checks as ck
from harness.scenario import faults
from harness.scenario.binaries import lacks
from harness.scenario.destination import Destination, unfit_reason, where_am_i
from harness.scenario.faults import At
from harness.scenario.hv_checks import enlightenment_checks
from harness.scenario.l1start import StartedL1, start_l1
from harness.scenario.result import ScenarioResult, Timer, execute_guarded, finish
from harness.scenario.spec import ScenarioSpec, Variant
from harness.vm import snapshot
from harness.vm.guestmode import SvmTrace
from harness.vm.machine import Machine, MachineConfig, QmpCommandError
from harness.vm.migration import MigrationOutcome, migrate, summarize_stats
from harness.vm.tls import TlsCredentials, missing_tool


@dataclass(frozen=True)
class RunContext:
    """What every scenario of a run shares: host facts (the QEMU inventory with them), built
    L1, where results go, and where destinations start (dst_host: another host over SSH;
    None: this one).

    stall_timeout: a migration whose byte count stands still that long is cancelled.
    """

    host: HostFacts
    image: L1Image
    out: Path
    # Deadlines set by the guests' speed, stretched by the run's scale (core.slow).
    boot_timeout: float = field(default_factory=lambda: slow.scaled(60.0))
    migrate_timeout: float = field(default_factory=lambda: slow.scaled(120.0))
    dst_host: HostSpec | None = None
    stall_timeout: float | None = 15.0
    # How L1s start: "snapshot" (restored from the saved, booted image of their configuration,
    # re-keyed) or "cold" (booted). The checks are the same either way.
    start: str = "snapshot"

    @property
    def qemu(self) -> str:
        """The run's own binary (a variant without a QemuPlan runs it on both sides)."""
        return self.host.qemu.binary

    @property
    def accel(self) -> str:
        return self.host.accel

    def l1_cpu(self, profile: Profile) -> str:
        return self.host.l1_cpu + qemu_cpu_suffix(profile)

    def binaries(self, variant: Variant) -> tuple[QemuFacts | None, QemuFacts | None]:
        """(src, dst) facts of the binaries the variant names; None for one not in this host's
        inventory (a variant planned elsewhere)."""
        if variant.qemu is None:
            return self.host.qemu, self.host.qemu
        return self.host.binary(variant.qemu.src), self.host.binary(variant.qemu.dst)

    def machine(self, variant: Variant) -> str:
        return variant.qemu.machine if variant.qemu else machine_for(self.host.qemu)

    def unsupported_reason(self, variant: Variant) -> str | None:
        """Why this host cannot run the variant (a skip reason), from the probe's facts."""
        h = self.host
        src, dst = self.binaries(variant)
        plan = variant.qemu
        fault = faults.FAULTS[variant.spec.inject] if variant.spec.inject else None
        unfit = (unfit_reason(self.dst_host, variant.mode.transport)
                 or (fault.unfit(variant.mode.tls, self.dst_host is not None) if fault else None)
                 or missing_tool(variant.mode.tls))
        if unfit:
            return unfit
        if plan is not None and (src is None or dst is None):
            path, version = ((plan.src, plan.src_version) if src is None
                             else (plan.dst, plan.dst_version))
            return f"QEMU {version} ({path}) is not in this host's inventory (see nestvirt qemu)"
        assert src is not None and dst is not None
        missing = (lacks(variant.mode, plan, src, dst) if plan is not None
                   else variant.mode.unsupported_reason(h.qemu))
        return missing or nested_state_reason(variant.spec, h) or host_support(
            variant.profile, accel=h.accel, l1_nested=h.l1_nested, caps=h.kvm.caps,
            hv_supported=supported_hv_flags(h.kvm.hv_cpuid), qemu_hv_props=src.hv_props)


def nested_state_reason(spec: ScenarioSpec, host: HostFacts) -> str | None:
    """Why a scenario that needs KVM nested state cannot run here, or None."""
    if not spec.needs_nested_state:
        return None
    if host.accel != "kvm":
        return (f"needs KVM nested state (KVM_CAP_NESTED_STATE) to carry L1's vCPU in guest mode; "
                f"under {host.accel} QEMU has none and the destination refuses such a vCPU "
                "(target/i386/machine.c): runs in the KVM host VM (nestvirt run --in-hostvm, SVM) "
                "or on a KVM host")
    if not host.kvm.caps.get("nested_state"):
        return "needs KVM_CAP_NESTED_STATE, which this host's KVM lacks"
    return None


def guest_mode_watch(variant: Variant, host: HostFacts, src: QemuFacts) -> str | None:
    """Why the stop of this variant is not watched for guest mode, or None when it is.

    Watched: live nested migrations under an accel without nested state, where a stop that
    lands while L1 runs L2 cannot migrate (QEMU's rule, not a flake). Each stop is then recorded
    with where it landed, and with guest_mode_retries > 0 one in guest mode is cancelled and
    tried again (the policy); with 0 it goes ahead and the destination decides."""
    spec = variant.spec
    if spec.state != "nested" or spec.paused:
        return "not a live nested migration"
    if host.accel == "kvm":
        return "KVM carries guest mode in its nested state"
    if "pause-before-switchover" not in src.migration_capabilities:
        return f"QEMU {src.label} lacks the pause-before-switchover capability"
    return None


def qemu_record(variant: Variant, ctx: RunContext) -> dict:
    """What the result records of the binaries: name, path, version, machine type per side,
    how they were chosen, and the newer QEMUs' extras each one has."""
    src, dst = ctx.binaries(variant)
    machine = ctx.machine(variant)
    plan = variant.qemu
    out: dict = {"machine": machine, "pinned": bool(plan and plan.pinned),
                 "why": plan.why if plan else "the run's binary",
                 "cross_version": bool(plan and plan.cross_version),
                 "ram_extra_kib": plan.ram_extra_kib if plan else 0}
    for side, q, path in (("src", src, plan.src if plan else ctx.qemu),
                          ("dst", dst, plan.dst if plan else ctx.qemu)):
        out[side] = {"binary": path, "machine": machine,
                     "name": q.label if q else "", "version": q.version if q else "",
                     "has": {"dirty-limit": "dirty-limit" in q.migration_capabilities,
                             "zero-page-detection": "zero-page-detection" in q.migration_parameters,
                             "query-migrationthreads": "query-migrationthreads" in q.commands,
                             "legacy-compress": q.legacy_compress} if q else {}}
    return out


def run_variant(variant: Variant, ctx: RunContext) -> ScenarioResult:
    """Run one variant end to end; never raises for scenario failures, always reaps QEMU."""
    spec = variant.spec
    res = ScenarioResult(id=variant.id, scenario=spec.name, params=variant.params())
    workdir = ctx.out / re.sub(r"[^\w.+-]+", "_", variant.id)
    workdir.mkdir(parents=True, exist_ok=True)
    os.chmod(workdir, 0o700)  # it holds the run's private SSH key and TLS keys
    res.artifacts["dir"] = str(workdir)
    res.metrics["ran_on"] = where_am_i()
    # A src/dst enlightenment mismatch is a configuration error on any host: refuse it first.
    mismatch = same_enlightenments(variant.profile, variant.dst_profile or variant.profile)
    if mismatch:
        res.verdict, res.reason = "error", f"refused before migrating: {mismatch}"
        return finish(res, workdir)
    res.params["qemu"] = qemu_record(variant, ctx)
    skip = ctx.unsupported_reason(variant)
    if skip:
        res.verdict, res.reason = "skip", skip
        return finish(res, workdir)
    execute_guarded(_ScenarioRun(variant, ctx, workdir, res), res, workdir)
    return finish(res, workdir)


class _ScenarioRun:
    """The steps of one variant; state lives here for the length of one run only."""

    def __init__(self, variant: Variant, ctx: RunContext, workdir: Path,
                 res: ScenarioResult) -> None:
        self.spec, self.mode, self.ctx = variant.spec, variant.mode, ctx
        self.variant = variant
        self.workdir, self.res = workdir, res
        self.timer = Timer(res)
        self.key = RunKey.generate()
        self.key.save(workdir / "id_ecdsa")
        self.src: Machine | None = None
        self.dst: Machine | None = None
        self.shells: list[L1Shell] = []
        self.dest: Destination | None = None
        self.tls: TlsCredentials | None = None
        self.host_key = None  # pinned for src and dst alike: a re-keyed L1's host key

    def _destination(self) -> Destination:
        if self.dest is None:
            self.dest = Destination(self.ctx.dst_host, self.workdir, self.key, self.ctx.image,
                                    lambda cfg: launch_config(cfg, self.workdir))
            self.res.params["destination"] = self.dest.record()
        return self.dest

    # -- machines -------------------------------------------------------------------------
    def _config(self, name: str, tcg_svm_log: Path | None = None) -> MachineConfig:
        v = self.variant
        profile = v.profile if name == "src" else (v.dst_profile or v.profile)
        src, dst = self.ctx.binaries(v)
        # The source's key arrives through start_l1 (command line or re-key); a destination
        # boots nothing, its command line carries the key only to say whose run it is.
        return l1_config(self.ctx, name, self.key if name == "dst" else None,
                         cpu=self.ctx.l1_cpu(profile), mem_mib=self.spec.mem_mib,
                         smp=self.spec.smp, incoming=name == "dst",
                         mem_extra_kib=v.qemu.ram_extra_kib if v.qemu else 0,
                         qemu=src if name == "src" else dst, machine=self.ctx.machine(v),
                         tcg_svm_log=tcg_svm_log)

    def _start_src(self, tcg_svm_log: Path | None) -> StartedL1:
        src, _ = self.ctx.binaries(self.variant)
        started = start_l1(self._config("src", tcg_svm_log), self.key,
                           lambda cfg: launch_config(cfg, self.workdir), start=self.ctx.start,
                           qemu_version=src.version if src else "",
                           boot_timeout=self.ctx.boot_timeout,
                           file_uri=bool(src) and snapshot.reads_files(src.migration_capabilities))
        self.host_key = started.host_key
        self.res.params["start"] = started.record
        return started

    def _machine(self, name: str, incoming: bool, tcg_svm_log: Path | None = None,
                 faulty: bool = False) -> Machine:
        assert name == "dst" and incoming, "the source starts through start_l1"
        cfg = self._config(name)
        if faulty:  # a fault may start the first destination differently (faults.py)
            cfg = faults.shape_destination(self.spec.inject, cfg)
        return self._destination().launch(cfg, creds=self.tls)

    def _shell(self, m: Machine, timeout: float = 30.0, migrated: bool = False) -> L1Shell:
        """An SSH session into ``m``'s L1. ``migrated``: a destination after its migration,
        whose L1 was running and serving SSH all along: a stop of its vCPUs, or refusals on
        every try for REFUSED_FINAL_S, end the wait as a verdict instead of at its timeout."""
        sh = L1Shell(m.ssh_port, self.key, opener=m.l1_ssh_opener(), host_key=self.host_key,
                     death=m.death_watch(stopped_is_dead=migrated))
        self.shells.append(sh)
        sh.connect(timeout, refused_is_final_s=REFUSED_FINAL_S if migrated else None)
        return sh

    # -- steps ----------------------------------------------------------------------------
    def execute(self) -> None:
        spec = self.spec
        src_facts, _ = self.ctx.binaries(self.variant)
        assert src_facts is not None
        unwatched = guest_mode_watch(self.variant, self.ctx.host, src_facts)
        trace = None if unwatched else SvmTrace(self.workdir / "src-svm.log")
        if self.spec.state == "nested" and not self.spec.paused:
            n = self.variant.guest_mode_retries
            self.res.metrics["guest_mode_policy"] = unwatched or (
                f"retry: up to {n} time(s)" if n > 0 else "watch only: guest_mode_retries 0")
        with self.timer.phase("boot_src"):
            started = self._start_src(trace.path if trace else None)
            self.src = started.machine
            ready = started.ready
            self.res.metrics["l1_ready"] = ready
            if spec.state != "plain" and ready.get("kvm") != "yes":
                raise StepTimeout(f"L1 has no /dev/kvm (module {ready.get('module')}): "
                                  "cannot run an L2")
            sh = self._shell(self.src)
            self._destination()  # the link to another host is known before any fault acts
        with self.timer.phase("start_workloads"):
            status, dmesg_before = self._start_guest_programs(sh)
            l2_before = status.get("l2", {}).get("pass") if spec.state == "nested" else None
            self._fault("before-migrate", sh)
        if spec.paused:
            if spec.state == "nested":
                self._quiesce_l2(sh)
            self.src.qmp("stop")
        with self.timer.phase("start_dst"):
            self.tls = self._destination().make_tls(self.mode.tls)
            self._fault("before-dst")
            if self.tls is not None:
                self.res.params["tls"] = self.tls.describe()  # with what a fault changed
        outcome = self._migrate(trace)
        self._record_migration(outcome)
        check = ck.migration_completed(outcome.status, outcome.error, spec.state,
                                       outcome.dst_said)
        attempts = self.res.metrics.get("switchover_attempts")
        if attempts and (len(attempts) > 1 or attempts[-1].get("in_guest_mode")):
            check = replace(check, detail=check.detail + "; " + attempts_summary(attempts))
        self.res.checks.append(check)
        with self.timer.phase("verify"):
            self._fault("after-migrate")
            if outcome.status != "completed" and not spec.paused and self.src.alive():
                # A failed or cancelled migration must leave the source as it was.
                self._check_source(sh)
                if faults.retries(spec.inject):
                    outcome = self._retry(trace)
            elif outcome.status != "completed" and not spec.paused:
                self.res.checks.append(ck.source_intact(
                    None, None, None, error=f"the source QEMU is gone: {self.src.exit_story()}"))
            expected = "paused" if spec.paused else "running"
            if outcome.dst_status == "exited" or not self.dst.alive():
                self.dst.wait_exit(5.0)
            alive = self.dst.alive()
            console = self._console_new_lines()
            took = ck.dst_qemu_alive(
                alive, outcome.dst_status if alive else None, expected, self.dst.error_lines(),
                self.dst.returncode, console)
            last = (self.res.metrics.get("switchover_attempts") or [{}])[-1]
            if not took.ok and last.get("in_guest_mode"):
                # Said beside QEMU's own line: where the stop landed explains the refusal.
                took = replace(took, detail=f"{took.detail} (the stop landed in guest mode: "
                                            f"{last.get('why')})")
            self.res.checks.append(took)
            stands = alive and not took.ok and not spec.paused  # alive, but L1 does not run
            if not alive or outcome.status != "completed" or stands:
                # Nothing left to ask: the guest checks fail at once instead of timing out.
                why = ("destination QEMU is gone" if not alive
                       else f"migration {outcome.status}: L1 never ran on the destination"
                       if outcome.status != "completed"
                       else f"L1 does not run on the destination ({took.detail})")
                self.res.checks.append(ck.l1_ssh_on_dst(False, f"{why} ({spec.state} state)"))
                if outcome.status == "completed" and not spec.paused:
                    # L1 ran on the destination before QEMU went: its console is its last word
                    # (an oops from stale pages ends QEMU, as L1 panics under -no-reboot).
                    self.res.checks.append(ck.kernel_log_clean(console))
                return
            if spec.paused:
                self._fault("before-compare")
                self._check_identity()
            else:
                self._check_guest(l2_before, dmesg_before)

    def _migrate(self, trace: SvmTrace | None, first: bool = True) -> MigrationOutcome:
        """Start the destination and migrate; with the guest-mode policy (``trace``), a
        switchover that would land in guest mode is cancelled and tried again with a fresh
        destination, on the same source, up to the variant's retries; every attempt is kept.
        A fault acts on the first migration only (first=False: a retry after it)."""
        attempts: list[dict] = []
        tries = 1 + (self.variant.guest_mode_retries if trace else 0)
        for n in range(1, tries + 1):
            if self.dst is not None:
                self._set_aside_dst(n - 1)
            with self.timer.phase("start_dst"):
                self.dst = self._machine("dst", incoming=True, faulty=n == 1 and first)
            decide = None
            if trace is not None:
                decide = self._switchover_decision(trace, attempts, n, last=n == tries)
            with self.timer.phase("migrate"):
                outcome = migrate(self.src, self.dst, self.mode, self._uri(),
                                  self.ctx.migrate_timeout,
                                  on_started=(lambda: self._fault("during-migrate"))
                                  if n == 1 and first else None, before_switchover=decide,
                                  tls=self.tls, stall_timeout=self.ctx.stall_timeout)
            if trace is None:
                return outcome
            if not attempts or attempts[-1]["attempt"] != n:
                # No pre-switchover stop was reached (failed or timed out before it).
                attempts.append({"attempt": n, "action": "none: no pre-switchover stop"})
            attempts[-1].update(status=outcome.status, seconds=outcome.seconds,
                                dst_status=outcome.dst_status)
            self.res.metrics["switchover_attempts"] = attempts
            if outcome.switchover != "cancelled":
                return outcome
        raise AssertionError("unreachable: the last attempt always continues")

    def _switchover_decision(self, trace: SvmTrace, attempts: list[dict], n: int,
                             last: bool) -> Callable[[], bool]:
        def decide() -> bool:
            state = trace.read()  # at pre-switchover: the source's vCPU is stopped, it is final
            go = not state.in_guest_mode or last
            out_of = ("no retries left" if self.variant.guest_mode_retries
                      else "retries off")
            attempts.append({
                "attempt": n, "vmruns": state.vmruns, "vmexits": state.vmexits,
                "in_guest_mode": state.in_guest_mode,
                "action": ("continued" if not state.in_guest_mode else
                           f"continued: {out_of}, the destination decides" if last else
                           "cancelled: the stop landed in guest mode"),
                "why": state.describe()})
            return go
        return decide

    def _set_aside_dst(self, attempt: int) -> None:
        """End a cancelled attempt's destination and keep its files under attempt-N/."""
        assert self.dst is not None
        self.dst.shutdown()
        keep = self.workdir / f"attempt-{attempt}"
        keep.mkdir(exist_ok=True)
        for f in self.workdir.glob("dst-*"):
            f.rename(keep / f.name)
        self.dst = None

    def _quiesce_l2(self, sh: L1Shell) -> None:
        """Paused scenarios: nvmm leaves KVM_RUN and waits, so the stop lands with L1 outside
        guest mode (a vCPU in guest mode does not migrate without KVM nested state)."""
        r = sh.run("nvmm pause --pidfile /run/l2.pid --status /run/l2.status --timeout 10", 20)
        if r.rc != 0:
            raise StepTimeout(f"L2 did not pause: nvmm pause exit {r.rc}: {r.err.strip()[:200]}")
        self.res.metrics["l2_quiesced"] = _json_or_empty(r.out)

    def _start_guest_programs(self, sh: L1Shell) -> tuple[dict[str, dict], str]:
        s = self.spec
        cmds = []
        if s.l1_workload:
            cmds.append(f"l1work run --mib {s.l1_mib} --threads {s.l1_threads} "
                        f"--rate-mib-s {s.l1_rate_mib_s} --status /run/l1work.status "
                        "--result /run/l1work.verify --pidfile /run/l1work.pid")
        if s.state == "nested":
            size = (f"--pages {s.l2_pages}" if s.l2_payload == "pagecount"
                    else f"--iters {s.l2_iters}")
            cmds.append(f"nvmm run --payload {GUEST_TOOLS}/payloads/{s.l2_payload}.bin {size} "
                        "--status /run/l2.status --log /run/l2-serial.log "
                        "--result /run/l2.verify --pidfile /run/l2.pid")
        elif s.state == "bare":
            cmds.append("nvmm hold --pidfile /run/l2.pid --status /run/l2.status")
        # One exec: start them one after the other, each once the one before shows it is
        # working (so migration catches them mid-flight), then say their status and the kernel
        # log so far. In turn, not at once: L2 busy with exits takes L1's vCPU, and l1work
        # filling its region beside it missed the bound in 5 of 5 runs in the KVM host VM
        # (migrate-nested, pagecount L2; l1work alone fills it in seconds).
        ready = []
        if s.l1_workload:  # l1work writes its status once the whole region holds the pattern
            ready.append("grep -q '\"state\":\"running\"' /run/l1work.status 2>/dev/null")
        if s.state == "bare":
            ready.append("grep -q '\"state\":\"holding\"' /run/l2.status 2>/dev/null")
        if s.state == "nested":
            ready.append(f"[ \"$({L2_PASS})\" -ge 2 ] 2>/dev/null")
        start_s = slow.scaled(START_S)
        steps = [f"setsid {c} >/run/{c.split()[0]}.log 2>&1 </dev/null &\n{deadline_sh(start_s)}\n"
                 f"until {cond}; do {PAST_DEADLINE} && break; usleep 50000; done"
                 for c, cond in zip(cmds, ready, strict=True)]
        script = "\n".join(steps) or "true"
        r = sh.run_many({"start": script + "\n" + STATUS_SH, "dmesg": "dmesg"},
                        start_s * max(1, len(steps)) + 15)
        st = _status_of(r["start"].out if "start" in r else "")
        ok = (not s.l1_workload or st.get("l1work", {}).get("state") == "running") and (
            s.state == "plain"
            or (s.state == "bare" and st.get("l2", {}).get("state") == "holding")
            or (s.state == "nested" and st.get("l2", {}).get("pass", 0) >= 2))
        if not ok:
            logs = sh.run("tail -n 3 /run/l1work.log /run/nvmm.log 2>/dev/null", 10).out
            raise StepTimeout(f"guest programs did not start in {start_s:g}s each: {st} "
                              f"{logs.strip()}")
        self.res.metrics["guest_status_before"] = st
        return st, r["dmesg"].out if "dmesg" in r else ""

    def _status(self, sh: L1Shell) -> dict[str, dict]:
        return _status_of(sh.run(STATUS_SH, 10).out)

    def _l2_pass(self, sh: L1Shell) -> int | None:
        return self._status(sh).get("l2", {}).get("pass")

    def _uri(self) -> str:
        assert self.dst is not None
        unix_dir = self.dst.qmp_socket.parent if self.mode.transport == "unix" else None
        return self._destination().uri(self.mode.transport, unix_dir)

    def _check_source(self, sh: L1Shell) -> None:
        """source-intact: the source runs, its workload verifies, L2 advances (live runs)."""
        assert self.src is not None
        spec = self.spec
        try:
            state = self.src.qmp("query-status", timeout=10)["status"]
            report = self._verify(sh, "l1work", "/run/l1work") if spec.l1_workload else False
            l2 = _l2_samples(sh.run(L2_PROGRESS_SH, 20).out) if spec.state == "nested" else None
        except (StepTimeout, QmpCommandError) as e:
            self.res.checks.append(ck.source_intact(None, None, None, error=str(e)))
            return
        self.res.checks.append(ck.source_intact(state, report, l2))

    def _retry(self, trace: SvmTrace | None) -> MigrationOutcome:
        """The same source to a new destination, once the fault is undone (as QEMU's own cancel
        tests do); the destination checks then judge this one. The failed attempt's files are
        kept under attempt-N/."""
        self._destination().ensure_connected()  # a cut link may have dropped it
        self._set_aside_dst(len(list(self.workdir.glob("attempt-*"))) + 1)
        first_attempts = self.res.metrics.get("switchover_attempts")
        outcome = self._migrate(trace, first=False)
        self.res.metrics["retry"] = {"status": outcome.status, "error": outcome.error,
                                     "seconds": outcome.seconds,
                                     "migration": summarize_stats(outcome.stats),
                                     "switchover_attempts":
                                         self.res.metrics.get("switchover_attempts")}
        if first_attempts is not None:
            self.res.metrics["switchover_attempts"] = first_attempts
        else:
            self.res.metrics.pop("switchover_attempts", None)
        (self.workdir / "query-migrate-retry.json").write_text(json.dumps(outcome.stats, indent=2))
        self.res.checks.append(ck.retry_completed(outcome.status, outcome.error, outcome.seconds))
        return outcome

    def _record_migration(self, o: MigrationOutcome) -> None:
        self.res.metrics["migration"] = summarize_stats(o.stats)
        if o.threads:
            self.res.metrics["migration_threads"] = o.threads
        self.res.metrics["migration_seconds"] = o.seconds
        self.res.metrics["migration_status"] = o.status
        self.res.params["migration_settings"] = o.settings
        (self.workdir / "query-migrate.json").write_text(json.dumps(o.stats, indent=2))
        if o.dst_error:
            self.res.metrics["dst_error"] = o.dst_error
        if o.dst_lines:
            self.res.metrics["dst_lines"] = o.dst_lines[:10]
        if o.cancel_ms is not None:
            self.res.metrics["cancel_ms"] = round(o.cancel_ms, 1)

    def _fault(self, point: str, sh: L1Shell | None = None) -> None:
        link = self.dest.link if self.dest is not None else None
        faults.act(self.spec.inject, point, At(self.src, self.dst, sh, self.tls, link))

    # -- checks on a running destination ------------------------------------------------------
    def _check_guest(self, l2_before: int | None, dmesg_before: str) -> None:
        assert self.dst is not None
        add = self.res.checks.append
        try:
            sh = self._shell(self.dst, timeout=20, migrated=True)
            add(ck.l1_ssh_on_dst(True, f"SSH answered on port {self.dst.ssh_port}"))
        except StepTimeout as e:
            add(ck.l1_ssh_on_dst(False, f"{e}; {self._stuck_vcpu()}"))
            add(ck.kernel_log_clean(self._console_new_lines()))
            return
        dmesg_after, serial, stuck = "", "", None
        try:
            self._fault("in-guest", sh)
            dmesg_after, serial = self._guest_checks(sh, l2_before)
        except StepTimeout as e:
            # L1 stopped answering mid-check (a crashed L1 does that): a failure of the guest,
            # judged below by its console, not an error of the harness.
            stuck = str(e)
        add(ck.l1_responsive_on_dst(stuck))
        new = ck.new_log_lines(dmesg_before, dmesg_after) + self._console_new_lines()
        add(ck.kernel_log_clean(new))
        if dmesg_after and self.variant.profile.names:
            # Judged on the destination, after migration and with L2 having run there.
            dump = sh.run("nvmm cpuid-dump", 15)
            (self.workdir / "l1-cpuid-dst.txt").write_text(dump.out + dump.err)
            self.res.checks += enlightenment_checks(self.variant.profile, dump.out, dmesg_after)
        (self.workdir / "l1-dmesg-dst.txt").write_text(dmesg_after)
        if not stuck:
            (self.workdir / "l2-serial.log").write_text(serial)

    def _stuck_vcpu(self) -> str:
        """A destination L1 that does not answer: where its vCPU is (two register dumps a
        second apart, kept as dst-registers-silent.txt), so the verdict says hung, halted or
        busy rather than only 'no SSH'."""
        assert self.dst is not None
        if not self.dst.alive():
            return f"dst QEMU exited: {self.dst.exit_story()}"
        try:
            first = self.dst.hmp("info registers", timeout=10)
            time.sleep(1)
            second = self.dst.hmp("info registers", timeout=10)
        except (StepTimeout, QmpCommandError) as e:  # a dying QEMU: its words are the answer
            return f"no register dump: {str(e)[:120]}"
        (self.workdir / "dst-registers-silent.txt").write_text(first + "\n---\n" + second)
        return ck.vcpu_motion(first, second)

    def _guest_checks(self, sh: L1Shell, l2_before: int | None) -> tuple[str, str]:
        """The checks inside L1 on the destination, in two execs of concurrent parts (a fault
        acts between them); returns (dmesg, L2's serial log), gathered with the second."""
        spec, add = self.spec, self.res.checks.append
        first: dict[str, str] = {}
        if spec.l1_workload:
            first["l1work"] = VERIFY_SH.format(prog="l1work", base="/run/l1work")
        if spec.state == "nested":
            first["l2"] = L2_PROGRESS_SH
        got = sh.run_many(first, 40)
        if spec.l1_workload:
            add(ck.pattern_verified("l1-workload-pattern", _report(got.get("l1work")),
                                    "L1 workload"))
        if spec.state == "nested":
            samples = _l2_samples(got["l2"].out if "l2" in got else "")
            add(ck.l2_progress(l2_before, samples))
            self.res.metrics["l2_pass"] = {"src_before": l2_before, "dst": samples}
            self._fault("after-l2-progress", sh)
        second = {"dmesg": "dmesg", "serial": "cat /run/l2-serial.log 2>/dev/null"}
        if spec.state == "nested" and spec.l2_payload == "pagecount":
            second["nvmm"] = VERIFY_SH.format(prog="nvmm", base="/run/l2")  # the one with memory
        if spec.state == "bare":
            second["bare"] = (f"nvmm run --payload {GUEST_TOOLS}/payloads/cpuidloop.bin "
                              "--iters 1000 --reports 2")
        got = sh.run_many(second, 40)
        if "nvmm" in second:
            add(ck.pattern_verified("l2-memory-pattern", _report(got.get("nvmm")),
                                    "L2 page counter"))
        if "bare" in second:
            r = got.get("bare")
            if r is None:
                add(ck.l2_starts_on_dst(-1, "no answer from L1"))
            else:
                last = (r.out.strip().splitlines() or [""])[-1][:200]
                add(ck.l2_starts_on_dst(r.rc, last if r.rc == 0
                                        else f"exit {r.rc}: {r.err.strip()[:200]}"))
        if "dmesg" not in got:
            raise StepTimeout("L1 gave no kernel log")
        return got["dmesg"].out, got["serial"].out if "serial" in got else ""

    def _verify(self, sh: L1Shell, prog: str, base: str) -> dict | None:
        return _report(sh.run(VERIFY_SH.format(prog=prog, base=base), 25))

    def _console_new_lines(self) -> list[str]:
        # The destination's console only ever holds what L1 printed after migration.
        assert self.dst is not None
        return self.dst.console_lines()

    # -- checks on a paused destination -------------------------------------------------------
    def _check_identity(self) -> None:
        src, dst = self.src, self.dst
        assert src is not None and dst is not None
        if not dst.alive():
            return
        size = self.spec.mem_mib * 1024 * 1024
        dumps = {}
        for m in (src, dst):
            path = self.workdir / f"{m.config.name}-ram.bin"
            m.qmp("pmemsave", val=0, size=size, filename=str(path), timeout=120)
            dumps[m.config.name] = path
        cmp = ck.compare_ram_dumps(dumps["src"], dumps["dst"])
        for p in dumps.values():
            p.unlink()  # hundreds of MiB each: keep the digests, not the bytes
        self.res.metrics["ram"] = asdict(cmp)
        self.res.checks.append(ck.ram_identical(cmp, self.ctx.accel))
        regs = {m.config.name: m.hmp("info registers") for m in (src, dst)}
        for name, text in regs.items():
            (self.workdir / f"{name}-registers.txt").write_text(text)
        self.res.checks.append(ck.vcpu_identical(regs["src"], regs["dst"]))

    def teardown(self) -> None:
        for sh in self.shells:
            sh.close()
        for m in (self.dst, self.src):
            if m is not None:
                try:
                    m.shutdown()
                except (QmpCommandError, OSError):
                    pass
        # Megabytes of VMRUN/#VMEXIT lines: their counts at each stop are in the result.
        (self.workdir / "src-svm.log").unlink(missing_ok=True)
        try:
            self._fault("teardown")
        except NestvirtError as e:
            # Said, not raised: teardown must finish (the remote directory below).
            self.res.metrics["teardown_error"] = str(e)
        finally:
            if self.dest is not None:
                self.res.params["destination"] = self.dest.record()
                self.dest.close()


def launch_l1(ctx: RunContext, name: str, workdir: Path, key: RunKey, *, cpu: str,
              mem_mib: int = 512, smp: int = 1, incoming: bool = False, mem_extra_kib: int = 0,
              qemu: QemuFacts | None = None, machine: str | None = None,
              tcg_svm_log: Path | None = None, extra_args: tuple[str, ...] = ()) -> Machine:
    """Start one L1 QEMU from the run's image (not waiting for boot); reap with shutdown().

    ``qemu``: the binary (default the run's own), started as the inventory says (module dir,
    firmware dirs); ``machine``: its machine type (default that binary's newest q35);
    ``extra_args``: appended to QEMU's command line (e.g. a -global a study needs)."""
    return launch_config(l1_config(ctx, name, key, cpu=cpu, mem_mib=mem_mib, smp=smp,
                                   incoming=incoming, mem_extra_kib=mem_extra_kib, qemu=qemu,
                                   machine=machine, tcg_svm_log=tcg_svm_log,
                                   extra_args=extra_args), workdir)


def start_run_l1(ctx: RunContext, name: str, workdir: Path, key: RunKey, *, cpu: str,
                 mem_mib: int = 512, smp: int = 1) -> StartedL1:
    """One L1 of the run's image started the run's way (ctx.start: restored from its saved
    image, or booted cold), running and holding ``key``; reap with its machine's shutdown()."""
    return start_l1(l1_config(ctx, name, None, cpu=cpu, mem_mib=mem_mib, smp=smp), key,
                    lambda cfg: launch_config(cfg, workdir), start=ctx.start,
                    qemu_version=ctx.host.qemu.version, boot_timeout=ctx.boot_timeout,
                    file_uri=snapshot.reads_files(ctx.host.qemu.migration_capabilities))


def l1_config(ctx: RunContext, name: str, key: RunKey | None, *, cpu: str, mem_mib: int = 512,
              smp: int = 1, incoming: bool = False, mem_extra_kib: int = 0,
              qemu: QemuFacts | None = None, machine: str | None = None,
              tcg_svm_log: Path | None = None, extra_args: tuple[str, ...] = ()) -> MachineConfig:
    """What one L1 QEMU of the run's image is (see launch_l1); key None: a command line
    without the run's key (start_l1 adds it to a cold boot, or re-keys a restored L1)."""
    q = qemu or ctx.host.qemu
    append = L1_APPEND + (f" {key.cmdline_arg}" if key is not None else "")
    return MachineConfig(
        name=name, qemu=q.binary, accel=ctx.accel, cpu=cpu, kernel=ctx.image.kernel.image,
        initrd=ctx.image.initramfs, mem_mib=mem_mib, mem_extra_kib=mem_extra_kib, smp=smp,
        incoming=incoming,
        append=append,
        machine=machine or machine_for(q), module_dir=q.module_dir,
        firmware_dirs=q.firmware_dirs, tcg_svm_log=tcg_svm_log, extra_args=extra_args)


# L1's kernel command line, but for the run's key.
L1_APPEND = "console=ttyS0 panic=-1 loglevel=6"


def launch_config(cfg: MachineConfig, workdir: Path) -> Machine:
    """Start one QEMU on this host from its config; reap with shutdown()."""
    # A port taken between asking and QEMU's bind makes QEMU exit: retry with a new one.
    for attempt in range(3):
        m = Machine(cfg, workdir, free_port())
        try:
            m.launch(timeout=20)
            return m
        except StepTimeout as e:
            m.shutdown()
            if "hostfwd" not in str(e) or attempt == 2:
                raise
        except BaseException:
            m.shutdown()  # Ctrl-C mid-launch: nobody else knows this machine yet
            raise
    raise AssertionError("unreachable")


def attempts_summary(attempts: list[dict]) -> str:
    """One line over the switchover attempts of the guest-mode policy."""
    cancelled = sum(str(a.get("action", "")).startswith("cancelled") for a in attempts)
    line = f"switchover on attempt {len(attempts)}"
    if cancelled:
        line += f" ({cancelled} cancelled: the stop landed in guest mode)"
    last = attempts[-1]
    if last.get("in_guest_mode"):
        line += (f"; the last stop too ({last.get('why')}): under TCG the destination refuses "
                 "a vCPU in guest mode")
    return line


# Shell fragments run inside L1 (busybox sh). Times are read from /proc/uptime in hundredths,
# without a fork: under TCG every fork in L1 costs milliseconds.
L2_PASS = 's=; read -r s </run/l2.status 2>/dev/null; p=${s#*\\"pass\\":}; echo ${p%%[!0-9]*}'
PAST_DEADLINE = 'read -r t _ </proc/uptime; [ "${t%.*}${t#*.}" -ge "$end" ]'
STATUS_SH = ("cat /run/l1work.status 2>/dev/null; echo; echo ---; "
             "cat /run/l2.status 2>/dev/null")
VERIFY_SH = "{prog} verify --pidfile {base}.pid --result {base}.verify --timeout 15"
L2_DEADLINE_S = 5
START_S = 30  # each guest program's bound to show it is working, inside L1
# A migrated L1 whose SSH port refuses every try for this long has no dropbear: it served the
# source until the migration, so no boot is under way (measured: a refusal takes milliseconds).
REFUSED_FINAL_S = 3.0


def deadline_sh(seconds: float) -> str:
    """Sets $end, in /proc/uptime hundredths, `seconds` from now (see PAST_DEADLINE)."""
    return f'read -r t _ </proc/uptime; end=$(( ${{t%.*}}${{t#*.}} + {int(seconds * 100)} ))'


# L2's pass, sampled every 50 ms inside L1 until it went past the first sample (advancing:
# judged) or the deadline (stalled, or gone).
L2_PROGRESS_SH = (f"{deadline_sh(L2_DEADLINE_S)}; first=\n"
                  "while :; do s=; read -r s </run/l2.status 2>/dev/null; echo \"$s\"; "
                  "p=${s#*\\\"pass\\\":}; p=${p%%[!0-9]*}; "
                  'if [ -n "$p" ]; then [ -z "$first" ] && first=$p; '
                  '[ "$p" -gt "$first" ] && break; fi; '
                  f"{PAST_DEADLINE} && break; usleep 50000; done")


def _l2_samples(text: str) -> list[int]:
    """L2 pass numbers from status lines (L2_PROGRESS_SH), in order."""
    out = []
    for line in text.splitlines():
        p = _json_or_empty(line).get("pass")
        if isinstance(p, int):
            out.append(p)
    return out


def _status_of(text: str) -> dict[str, dict]:
    parts = text.split("---")
    return {"l1work": _json_or_empty(parts[0]), "l2": _json_or_empty(parts[-1])}


def _report(r: CommandResult | None) -> dict | None:
    """A verify client's JSON report, None when it gave none."""
    return (_json_or_empty(r.out) or None) if r is not None else None


def _json_or_empty(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        try:
            v = json.loads(line)
            return v if isinstance(v, dict) else {}
        except ValueError:
            continue
    return {}


def quote_cmd(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


Runner = Callable[[Variant, RunContext], ScenarioResult]
