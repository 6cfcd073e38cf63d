"""The engine that runs one variant: it alone sequences machines, guest programs, migration,
faults and checks. Runners (CLI, pytest, avocado) call run_variant() and read the ScenarioResult.
"""

from __future__ import annotations

import json
import re
import shlex
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.core.errors import StepTimeout
from harness.core.ports import free_port
from harness.guest.image import GUEST_TOOLS, L1Image
from harness.guest.l1 import L1Shell, RunKey
from harness.host.enlightenments import Profile, host_support, qemu_cpu_suffix, same_enlightenments
from harness.host.hvcpuid import supported_hv_flags
from harness.host.probe import HostFacts
from harness.scenario import checks as ck
from harness.scenario import faults
from harness.scenario.faults import At
from harness.scenario.hv_checks import enlightenment_checks
from harness.scenario.result import ScenarioResult, Timer, execute_guarded, finish
from harness.scenario.spec import Variant
from harness.vm.machine import Machine, MachineConfig, QmpCommandError
from harness.vm.migration import MigrationOutcome, migrate, summarize_stats


@dataclass(frozen=True)
class RunContext:
    """What every scenario of a run shares: host facts, built L1, where results go."""

    host: HostFacts
    image: L1Image
    out: Path
    boot_timeout: float = 60.0
    migrate_timeout: float = 120.0

    @property
    def qemu(self) -> str:
        return self.host.qemu.binary

    @property
    def accel(self) -> str:
        return self.host.accel

    def l1_cpu(self, profile: Profile) -> str:
        return self.host.l1_cpu + qemu_cpu_suffix(profile)

    def unsupported_reason(self, variant: Variant) -> str | None:
        """Why this host cannot run the variant (a skip reason), from the probe's facts."""
        h = self.host
        return variant.mode.unsupported_reason(h.qemu) or host_support(
            variant.profile, accel=h.accel, l1_nested=h.l1_nested, caps=h.kvm.caps,
            hv_supported=supported_hv_flags(h.kvm.hv_cpuid), qemu_hv_props=h.qemu.hv_props)


def run_variant(variant: Variant, ctx: RunContext) -> ScenarioResult:
    """Run one variant end to end; never raises for scenario failures, always reaps QEMU."""
    spec = variant.spec
    res = ScenarioResult(id=variant.id, scenario=spec.name, params=variant.params())
    workdir = ctx.out / re.sub(r"[^\w.+-]+", "_", variant.id)
    workdir.mkdir(parents=True, exist_ok=True)
    res.artifacts["dir"] = str(workdir)
    # A src/dst enlightenment mismatch is a configuration error on any host: refuse it first.
    mismatch = same_enlightenments(variant.profile, variant.dst_profile or variant.profile)
    if mismatch:
        res.verdict, res.reason = "error", f"refused before migrating: {mismatch}"
        return finish(res, workdir)
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

    # -- machines -------------------------------------------------------------------------
    def _machine(self, name: str, incoming: bool) -> Machine:
        v = self.variant
        profile = v.profile if name == "src" else (v.dst_profile or v.profile)
        return launch_l1(self.ctx, name, self.workdir, self.key, cpu=self.ctx.l1_cpu(profile),
                         mem_mib=self.spec.mem_mib, smp=self.spec.smp, incoming=incoming)

    def _shell(self, m: Machine, timeout: float = 30.0) -> L1Shell:
        sh = L1Shell(m.ssh_port, self.key)
        self.shells.append(sh)
        sh.connect(timeout)
        return sh

    # -- steps ----------------------------------------------------------------------------
    def execute(self) -> None:
        spec = self.spec
        with self.timer.phase("boot_src"):
            self.src = self._machine("src", incoming=False)
            ready = self.src.wait_guest_event("ready", self.ctx.boot_timeout)
            self.res.metrics["l1_ready"] = ready
            if spec.state != "plain" and ready.get("kvm") != "yes":
                raise StepTimeout(f"L1 has no /dev/kvm (module {ready.get('module')}): "
                                  "cannot run an L2")
            sh = self._shell(self.src)
        with self.timer.phase("start_workloads"):
            self._start_guest_programs(sh)
            l2_before = self._l2_pass(sh) if spec.state == "nested" else None
            dmesg_before = sh.run("dmesg", 15).out
            self._fault("before-migrate", sh)
        if spec.paused:
            self.src.qmp("stop")
        with self.timer.phase("start_dst"):
            self.dst = self._machine("dst", incoming=True)
        with self.timer.phase("migrate"):
            uri = self._uri()
            outcome = migrate(self.src, self.dst, self.mode, uri, self.ctx.migrate_timeout,
                              on_started=lambda: self._fault("during-migrate"))
        self._record_migration(outcome)
        self.res.checks.append(ck.migration_completed(outcome.status, outcome.error, spec.state))
        with self.timer.phase("verify"):
            self._fault("after-migrate")
            expected = "paused" if spec.paused else "running"
            if outcome.dst_status == "exited" or not self.dst.alive():
                self.dst.wait_exit(5.0)
            alive = self.dst.alive()
            console = self._console_new_lines()
            self.res.checks.append(ck.dst_qemu_alive(
                alive, outcome.dst_status if alive else None, expected, self.dst.error_lines(),
                self.dst.returncode, console))
            if not alive or outcome.status != "completed":
                # Nothing left to ask: the guest checks fail at once instead of timing out.
                why = ("destination QEMU is gone" if not alive
                       else f"migration {outcome.status}: L1 never ran on the destination")
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

    def _start_guest_programs(self, sh: L1Shell) -> None:
        s = self.spec
        cmds = []
        if s.l1_workload:
            cmds.append(f"l1work run --mib {s.l1_mib} --threads {s.l1_threads} "
                        f"--rate-mib-s {s.l1_rate_mib_s} --status /run/l1work.status "
                        "--result /run/l1work.verify --pidfile /run/l1work.pid")
        if s.state == "nested":
            cmds.append(f"nvmm run --payload {GUEST_TOOLS}/payloads/pagecount.bin --pages {s.l2_pages} "
                        "--status /run/l2.status --log /run/l2-serial.log "
                        "--result /run/l2.verify --pidfile /run/l2.pid")
        elif s.state == "bare":
            cmds.append("nvmm hold --pidfile /run/l2.pid --status /run/l2.status")
        for c in cmds:
            prog = c.split()[0]
            sh.run(f"setsid {c} >/run/{prog}.log 2>&1 </dev/null &", 10)
        # Wait until each program shows it is working, so migration catches it mid-flight.
        deadline = time.monotonic() + 30
        while True:
            st = self._status(sh)
            # l1work writes its status once the whole region holds the pattern.
            ok = (not s.l1_workload or st.get("l1work", {}).get("state") == "running") and (
                s.state == "plain"
                or (s.state == "bare" and st.get("l2", {}).get("state") == "holding")
                or (s.state == "nested" and st.get("l2", {}).get("pass", 0) >= 2))
            if ok:
                self.res.metrics["guest_status_before"] = st
                return
            if time.monotonic() > deadline:
                logs = sh.run("tail -n 3 /run/l1work.log /run/nvmm.log 2>/dev/null", 10).out
                raise StepTimeout(f"guest programs did not start in 30s: {st} {logs.strip()}")
            time.sleep(0.2)

    def _status(self, sh: L1Shell) -> dict[str, dict]:
        r = sh.run("cat /run/l1work.status 2>/dev/null; echo; echo ---; "
                   "cat /run/l2.status 2>/dev/null", 10)
        parts = r.out.split("---")
        return {"l1work": _json_or_empty(parts[0]), "l2": _json_or_empty(parts[-1])}

    def _l2_pass(self, sh: L1Shell) -> int | None:
        return self._status(sh).get("l2", {}).get("pass")

    def _uri(self) -> str:
        if self.mode.transport == "unix":
            assert self.dst is not None
            return f"unix:{self.dst.qmp_socket.with_name('migration.sock')}"
        return f"tcp:127.0.0.1:{free_port()}"

    def _record_migration(self, o: MigrationOutcome) -> None:
        self.res.metrics["migration"] = summarize_stats(o.stats)
        self.res.metrics["migration_seconds"] = o.seconds
        self.res.metrics["migration_status"] = o.status
        self.res.params["migration_settings"] = o.settings
        (self.workdir / "query-migrate.json").write_text(json.dumps(o.stats, indent=2))
        if o.dst_error:
            self.res.metrics["dst_error"] = o.dst_error

    def _fault(self, point: str, sh: L1Shell | None = None) -> None:
        faults.act(self.spec.inject, point, At(self.src, self.dst, sh))

    # -- checks on a running destination ------------------------------------------------------
    def _check_guest(self, l2_before: int | None, dmesg_before: str) -> None:
        assert self.dst is not None
        add = self.res.checks.append
        try:
            sh = self._shell(self.dst, timeout=20)
            add(ck.l1_ssh_on_dst(True, f"SSH answered on port {self.dst.ssh_port}"))
        except StepTimeout as e:
            add(ck.l1_ssh_on_dst(False, str(e)))
            add(ck.kernel_log_clean(self._console_new_lines()))
            return
        dmesg_after, stuck = "", None
        try:
            self._fault("in-guest", sh)
            self._guest_checks(sh, l2_before)
            dmesg_after = sh.run("dmesg", 15).out
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
            log = sh.run("cat /run/l2-serial.log 2>/dev/null", 10).out
            (self.workdir / "l2-serial.log").write_text(log)

    def _guest_checks(self, sh: L1Shell, l2_before: int | None) -> None:
        spec, add = self.spec, self.res.checks.append
        if spec.l1_workload:
            add(ck.pattern_verified("l1-workload-pattern",
                                    self._verify(sh, "l1work", "/run/l1work"), "L1 workload"))
        if spec.state == "nested":
            samples = []
            for _ in range(3):
                p = self._l2_pass(sh)
                if p is not None:
                    samples.append(p)
                time.sleep(0.4)
            add(ck.l2_progress(l2_before, samples))
            self.res.metrics["l2_pass"] = {"src_before": l2_before, "dst": samples}
            self._fault("after-l2-progress", sh)
            add(ck.pattern_verified("l2-memory-pattern", self._verify(sh, "nvmm", "/run/l2"),
                                    "L2 page counter"))
        if spec.state == "bare":
            r = sh.run(f"nvmm run --payload {GUEST_TOOLS}/payloads/cpuidloop.bin --iters 1000 "
                       "--reports 2", 30)
            last = (r.out.strip().splitlines() or [""])[-1][:200]
            add(ck.l2_starts_on_dst(r.rc, last if r.rc == 0 else f"exit {r.rc}: {r.err.strip()[:200]}"))

    def _verify(self, sh: L1Shell, prog: str, base: str) -> dict | None:
        r = sh.run(f"{prog} verify --pidfile {base}.pid --result {base}.verify --timeout 15", 25)
        report = _json_or_empty(r.out)
        return report or None

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
        self.res.checks.append(ck.ram_identical(cmp))
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


def launch_l1(ctx: RunContext, name: str, workdir: Path, key: RunKey, *, cpu: str,
              mem_mib: int = 512, smp: int = 1, incoming: bool = False) -> Machine:
    """Start one L1 QEMU from the run's image (not waiting for boot); reap with shutdown()."""
    cfg = MachineConfig(
        name=name, qemu=ctx.qemu, accel=ctx.accel, cpu=cpu, kernel=ctx.image.kernel.image,
        initrd=ctx.image.initramfs, mem_mib=mem_mib, smp=smp, incoming=incoming,
        append=f"console=ttyS0 panic=-1 loglevel=6 {key.cmdline_arg}")
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
    raise AssertionError("unreachable")


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
