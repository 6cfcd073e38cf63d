"""Run KVM selftests in L1 (the kernel under test) or on the host; one ScenarioResult each.

One L1 of the run's own image starts (restored from its saved image, the same for every
selection, or booted cold), the selected binaries are copied into it over SSH as one cpio
archive, and it runs them one at a time through a small in-guest runner that kills each at its deadline
(some hang under emulation). Every test gets its own output and the slice of L1's kernel
log written while it ran. If L1 itself stops answering, that test is a timeout and a fresh
L1 runs the rest. Verdicts come from kselftest.classify; nothing here judges output.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.core import proc, scratch
from harness.core.errors import NestvirtError, SetupError, StepTimeout
from harness.guest.image import pack_tree
from harness.guest.kernel import Kernel
from harness.guest.kernlog import bad_lines
from harness.guest.l1 import L1Shell, RunKey
from harness.host.enlightenments import Profile, host_support, qemu_cpu_suffix
from harness.host.hvcpuid import supported_hv_flags
from harness.host.probe import HostFacts
from harness.results.views import text_table, verdict_counts
from harness.scenario import checks as ck
from harness.scenario.engine import RunContext, start_run_l1
from harness.scenario.result import ScenarioResult
from harness.scenario.spec import NO_PROFILE
from harness.selftests.build import (
    BuiltTest,
    SelftestBuild,
    build_tree,
    debian_source_for,
    fetch_debian_source,
    prebuilt,
)
from harness.selftests.kselftest import SelftestRun, classify
from harness.vm.machine import Machine, QmpCommandError

SCENARIO = "selftest"
GUEST_DIR = "/usr/lib/kselftest"
GUEST_RUNNER = f"{GUEST_DIR}/run-one"
OUTPUT_MAX = 1 << 20  # bytes of a test's output brought back; the rest is cut, and said so
# What the guest runner may take beyond the test's own deadline (dmesg, cat, SSH under TCG).
RUNNER_GRACE_S = 10.0
L1_RESTARTS = 3
DEFAULT_TIMEOUT_S = 120.0  # kselftest's kvm/settings value in 6.1, used when a build has none
# The memory tests map 1 GiB or more of guest memory (ENOMEM in a 512 MiB L1); TCG
# allocates L1's RAM lazily, so this costs nothing until touched.
L1_MEM_MIB = 2048
# One vCPU: with two, L1 under TCG sometimes locks up (both vCPUs spinning in the kernel with
# interrupts off) during or after hyperv_features, and later tests then time out. Two let
# max_guest_memory_test and rseq_test run instead of failing/skipping for want of a CPU.
L1_SMP = 1

# Runs one selftest in its own session and kills the session at the deadline. The flag is
# written before the kill, so "flag and status 137" means the deadline killed it, while a
# test that ended on its own just before the kill keeps its own status.
RUN_ONE = f"""#!/bin/sh
# run-one NAME SECONDS (written by nestvirt): run a KVM selftest, SIGKILL it at SECONDS.
name=$1; limit=$2
work=/run/kselftest/$name
rm -rf "$work"; mkdir -p "$work"
cd {GUEST_DIR}/kvm || exit 125
t0=$(cut -d' ' -f1 /proc/uptime)
setsid "./$name" >"$work/output" 2>&1 </dev/null &
pid=$!
( sleep "$limit"; echo >"$work/deadline"; kill -KILL -"$pid" 2>/dev/null ) &
dog=$!
wait "$pid"; rc=$?
kill "$dog" 2>/dev/null
t1=$(cut -d' ' -f1 /proc/uptime)
to=0; [ "$rc" = 137 ] && [ -e "$work/deadline" ] && to=1
echo "NESTVIRT-KSFT rc=$rc timed_out=$to t0=$t0 t1=$t1 bytes=$(wc -c <"$work/output")"
head -c {OUTPUT_MAX} "$work/output"
"""

_TRAILER = re.compile(r"^NESTVIRT-KSFT rc=(\d+) timed_out=([01]) t0=([\d.]+) t1=([\d.]+) "
                      r"bytes=(\d+)\s*$")


@dataclass(frozen=True)
class SelftestPlan:
    """What to run: which built tests, each with which deadline, where, with which L1 CPU."""

    build: SelftestBuild
    names: tuple[str, ...]
    timeout_s: float
    on: str = "l1"  # "l1" or "host"
    profile: Profile = NO_PROFILE
    mem_mib: int = L1_MEM_MIB
    smp: int = L1_SMP

    def tests(self) -> list[BuiltTest]:
        return [self.build.get(n) for n in self.names]


# -- which selftests ------------------------------------------------------------------------

def resolve_build(kernel: Kernel, kernel_tree: Path | None, selftests_dir: Path | None,
                  note: Callable[[str], None]) -> SelftestBuild:
    """--selftests DIR, else --kernel-tree DIR, else Debian's linux-source matching ``kernel``.

    ``note`` receives one-line warnings (a source that does not match the kernel).
    """
    if selftests_dir is not None:
        return prebuilt(selftests_dir)
    if kernel_tree is not None:
        return build_tree(kernel_tree, f"tree:{kernel_tree.resolve()}")
    package, version = debian_source_for(kernel)
    try:
        tree, info = fetch_debian_source(package, version)
    except SetupError as e:
        if version is None:
            raise
        note(f"{package}={version} (the kernel's own) cannot be fetched ({e}); "
             "using the newest: selftests may not match the kernel")
        tree, info = fetch_debian_source(package, None)
    if version is None:
        note(f"kernel {kernel.release} is not a Debian build: using {package}={info['version']}, "
             "which may not match it (pass --kernel-tree)")
    return build_tree(tree, f"debian:{package}={info['version']}", source_timings=info["timings"])


def selftest_payload(tests: list[BuiltTest], directory: Path) -> Path:
    """The tests' binaries (stripped) and the runner, as one newc archive to unpack at / in
    L1; written to ``directory`` (one per selection: packing it takes well under a second).

    Copied into a started L1 rather than added to its initramfs: an initramfs of its own
    would make each selection a configuration of its own, with an image to save first
    (measured: 19.4 s to build against 3 s for a cold boot), where every selection now
    starts from one saved image."""
    out = directory / "kselftest.cpio"
    stage = directory / "stage"
    stage.mkdir()
    kvm = stage / GUEST_DIR.lstrip("/") / "kvm"
    kvm.mkdir(parents=True)
    strip = shutil.which("strip")
    for t in tests:
        assert t.binary is not None
        # Debug info only serves addr2line, which L1 lacks: stripped, less to copy.
        if strip:
            proc.run([strip, "-o", str(kvm / t.name), str(t.binary)], 60)
        else:
            shutil.copy2(t.binary, kvm / t.name)
        (kvm / t.name).chmod(0o755)
    runner = stage / GUEST_RUNNER.lstrip("/")
    runner.write_text(RUN_ONE)
    runner.chmod(0o755)
    pack_tree(stage, out, 120)
    shutil.rmtree(stage)
    return out


def l1_mem_mib(asked: int, payload_bytes: int) -> int:
    """L1's memory for tests unpacked into its root (RAM): what was asked while they take an
    eighth of it at most (so every such selection shares one saved image), else 512 MiB
    more per 512 MiB of tests (a few sizes, a few images)."""
    need = -(-payload_bytes // (1 << 20))
    if need <= asked // 8:
        return asked
    return asked + -(-need // 512) * 512


# -- results that need no run ---------------------------------------------------------------

def _base_result(t: BuiltTest, plan: SelftestPlan) -> ScenarioResult:
    return ScenarioResult(
        id=f"{SCENARIO}/{t.name}", scenario=SCENARIO,
        params={"test": t.name, "relpath": t.relpath, "on": plan.on, "timeout_s": plan.timeout_s,
                "source": plan.build.source, "build_key": plan.build.key,
                "profile": {"name": plan.profile.name,
                            "cpu_suffix": qemu_cpu_suffix(plan.profile)}})


def build_error(t: BuiltTest, plan: SelftestPlan) -> ScenarioResult:
    """A test that did not build: error, with the compiler's first error line."""
    r = _base_result(t, plan)
    r.verdict, r.reason = "error", f"build failed: {t.error}"
    if t.log is not None:
        r.artifacts["build_log"] = str(t.log)
    r.durations["total"] = 0.0
    return r


def not_run(t: BuiltTest, plan: SelftestPlan, verdict: str, reason: str) -> ScenarioResult:
    r = _base_result(t, plan)
    r.verdict, r.reason = verdict, reason
    r.durations["total"] = 0.0
    return r


def judge(t: BuiltTest, plan: SelftestPlan, run: SelftestRun, dmesg: list[str], workdir: Path,
          extra: dict[str, Any] | None = None) -> ScenarioResult:
    """A ScenarioResult from one run: verdict by exit status, output and kernel log saved."""
    r = _base_result(t, plan)
    outcome = classify(run, plan.timeout_s)
    r.verdict, r.reason = outcome.verdict, outcome.reason
    r.durations["total"] = round(run.seconds, 3)
    r.metrics.update({"exit_code": run.rc, "timed_out": run.timed_out, "seconds": round(run.seconds, 3)})
    if run.timed_out:
        r.metrics["timeout_s"] = plan.timeout_s
        r.checks.append(ck.Check("selftest-deadline", False, f"still running after {plan.timeout_s:g} s"))
    elif run.rc is not None:
        r.checks.append(ck.Check("selftest-exit-status", run.rc in (0, 4), f"exit {run.rc}"))
    # Recorded, not judged: some selftests provoke KVM's warnings on purpose.
    bad = bad_lines(dmesg)
    r.metrics["kernel_log_lines"] = len(dmesg)
    if bad:
        r.metrics["kernel_log_bad"] = bad[:5]
    r.metrics.update(extra or {})
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "output.txt").write_text(run.output)
    (workdir / "dmesg.txt").write_text("\n".join(dmesg) + ("\n" if dmesg else ""))
    r.artifacts["dir"] = str(workdir)
    r.artifacts["output"] = str(workdir / "output.txt")
    r.artifacts["dmesg"] = str(workdir / "dmesg.txt")
    if t.log is not None:
        r.artifacts["build_log"] = str(t.log)
    (workdir / "result.json").write_text(json.dumps(r.to_json(), indent=2, default=str))
    return r


# -- in L1 ----------------------------------------------------------------------------------

class _L1:
    """One booted L1 with the selftests in it; replaced by a fresh one if it stops answering."""

    def __init__(self, ctx: RunContext, plan: SelftestPlan, payload: Path) -> None:
        self.ctx, self.plan, self.payload = ctx, plan, payload
        self.mem_mib = l1_mem_mib(plan.mem_mib, payload.stat().st_size)
        self.smp = plan.smp
        self.boots = 0
        self.machine: Machine | None = None
        self.shell: L1Shell | None = None
        self.start_record: dict[str, Any] = {}

    def start(self) -> None:
        self.stop()
        self.boots += 1
        name = "l1" if self.boots == 1 else f"l1-boot{self.boots}"
        workdir = self.ctx.out / "l1"
        workdir.mkdir(parents=True, exist_ok=True)
        key = RunKey.generate()
        key.save(workdir / f"{name}-id_ecdsa")
        started = start_run_l1(self.ctx, name, workdir, key, cpu=self.ctx.l1_cpu(self.plan.profile),
                               mem_mib=self.mem_mib, smp=self.smp)
        self.machine, ready = started.machine, started.ready
        if ready.get("kvm") != "yes":
            raise StepTimeout(f"L1 has no /dev/kvm (module {ready.get('module')}, "
                              f"nested {ready.get('nested')})")
        self.shell = L1Shell(self.machine.ssh_port, key, host_key=started.host_key)
        self.shell.connect(30)
        self.start_record = {**started.record, "tests": self._install()}

    def _install(self) -> dict[str, Any]:
        """Unpack the tests and the runner at / in L1; what was copied, and how long it took."""
        assert self.shell is not None
        data = self.payload.read_bytes()
        t0 = time.monotonic()
        # A second per MiB on top: the copy goes through an emulated L1's network stack.
        r = self.shell.run(f"cd / && cpio -idu && test -x {GUEST_RUNNER}",
                           30 + len(data) / (1 << 20), stdin=data)
        if r.rc != 0:
            raise NestvirtError(f"the selftests could not be copied into L1 (exit {r.rc}): "
                                f"{r.err.strip()[:200]}")
        return {"bytes": len(data), "seconds": round(time.monotonic() - t0, 3)}

    def run(self, t: BuiltTest) -> tuple[SelftestRun, list[str], dict[str, Any]]:
        """Run one test; on an unanswered runner return a timed-out run (L1 is then dead)."""
        assert self.shell is not None and self.machine is not None
        sh, limit = self.shell, self.plan.timeout_s
        before = sh.run("dmesg", 15).out
        t0 = time.monotonic()
        try:
            r = sh.run(f"{GUEST_RUNNER} {shlex.quote(t.name)} {limit:g}", limit + RUNNER_GRACE_S)
        except StepTimeout as e:
            seconds = time.monotonic() - t0
            if not self.machine.alive():
                return self._died(seconds)
            console = self.machine.console_tail(40).splitlines()
            # The in-guest deadline did not fire either: L1 itself is stuck, so a timeout.
            # Where its vCPUs are is the one clue left for a person.
            extra: dict[str, Any] = {"l1_unresponsive": True}
            try:
                extra["l1_registers"] = self.machine.hmp("info registers -a", timeout=10)
            except QmpCommandError as qe:
                extra["l1_registers"] = f"(info registers failed: {qe})"
            self.stop()
            run = SelftestRun(None, f"(no output: L1 stopped answering: {e})\n", seconds, timed_out=True)
            return run, ["[nestvirt: L1 stopped answering; its last console lines:]", *console], extra
        # No exit status (-1) is what SSH gives when the connection drops: a kernel that
        # panicked takes QEMU down (-no-reboot) a moment after.
        if r.rc == -1 and self.machine.wait_exit(5.0) is not None:
            return self._died(time.monotonic() - t0)
        run = parse_runner_output(r.out, r.rc, r.err)
        extra = {"wall_seconds": round(time.monotonic() - t0, 3)}
        try:
            dmesg = ck.new_log_lines(before, sh.run("dmesg", 15).out)
        except StepTimeout as e:
            # The test's own result stands; the next test gets a fresh L1.
            self.stop()
            dmesg, extra["l1_unresponsive_after"] = [f"[nestvirt: dmesg after the test failed: {e}]"], True
        return run, dmesg, extra

    def _died(self, seconds: float) -> tuple[SelftestRun, list[str], dict[str, Any]]:
        """The test's run when L1's QEMU exited under it: how, from stderr or L1's console."""
        assert self.machine is not None
        m = self.machine
        story = m.exit_story()
        console = m.console_tail(60).splitlines()
        self.stop()
        run = SelftestRun(None, f"(no output: L1's QEMU exited: {story})\n", seconds, crashed=story)
        return run, ["[nestvirt: L1's QEMU exited during the test; its last console lines:]", *console], \
            {"l1_exited": True}

    def stop(self) -> None:
        if self.shell is not None:
            self.shell.close()
            self.shell = None
        if self.machine is not None:
            try:
                self.machine.shutdown()
            except (QmpCommandError, OSError):
                pass
            self.machine = None


def parse_runner_output(text: str, rc: int, err: str = "") -> SelftestRun:
    """The guest runner's stdout (and stderr) -> SelftestRun; no trailer = the runner failed."""
    head, _, rest = text.partition("\n")
    m = _TRAILER.match(head)
    if not m:
        return SelftestRun(None, f"(runner failed with exit {rc}: {(text + err).strip()[:500]})\n", 0.0)
    status, timed_out, t0, t1, size = m.groups()
    output = rest
    if int(size) > OUTPUT_MAX:
        output += f"\n[nestvirt: output cut at {OUTPUT_MAX} of {size} bytes]\n"
    if err.strip():  # the runner's shell, e.g. "Killed" after a deadline
        output += "".join(f"[runner] {ln}\n" for ln in err.strip().splitlines())
    return SelftestRun(int(status), output, max(0.0, float(t1) - float(t0)), timed_out == "1")


Progress = Callable[[int, int, str], None]
Done = Callable[[ScenarioResult], None]


class _Results(dict):
    """Results by test name, each passed to ``done`` as it is recorded."""

    def __init__(self, done: Done | None) -> None:
        super().__init__()
        self.done = done

    def __setitem__(self, name: str, r: ScenarioResult) -> None:
        super().__setitem__(name, r)
        if self.done:
            self.done(r)


def run_in_l1(plan: SelftestPlan, ctx: RunContext, progress: Progress | None = None,
              done: Done | None = None) -> list[ScenarioResult]:
    """Boot L1 with the built tests and run each; every selected name gets a result, in
    ``plan.names`` order (``done`` sees each as it is recorded)."""
    results = _Results(done)
    runnable = []
    for t in plan.tests():
        if t.ok:
            runnable.append(t)
        else:
            results[t.name] = build_error(t, plan)
    skip = _profile_skip(plan.profile, ctx.host)
    if skip:
        for t in runnable:
            results[t.name] = not_run(t, plan, "skip", skip)
        runnable = []
    if runnable:
        with scratch.private_root("nestvirt-ksft-") as tmp:
            payload = selftest_payload(runnable, Path(tmp))
            l1 = _L1(ctx, plan, payload)
            try:
                _run_all(l1, plan, runnable, ctx.out, results, progress)
            finally:
                l1.stop()
    return [results[n] for n in plan.names]


def _run_all(l1: _L1, plan: SelftestPlan, runnable: list[BuiltTest], out: Path,
             results: _Results, progress: Progress | None) -> None:
    for i, t in enumerate(runnable, 1):
        if progress:
            progress(i, len(runnable), t.name)
        # Two tries: an L1 that stopped answering before the test began gets replaced.
        for attempt in (1, 2):
            if l1.machine is None:
                if l1.boots > L1_RESTARTS:
                    results[t.name] = not_run(t, plan, "error",
                                              f"not run: L1 restarted {L1_RESTARTS} times already")
                    break
                try:
                    l1.start()
                except NestvirtError as e:
                    l1.stop()
                    for rest in runnable[i - 1:]:
                        results[rest.name] = not_run(rest, plan, "error", f"L1 did not boot: {e}")
                    return
            try:
                run, dmesg, extra = l1.run(t)
            except NestvirtError as e:  # only before the runner started: the test did not run
                l1.stop()
                if attempt == 2:
                    results[t.name] = not_run(t, plan, "error", f"not run: L1 stopped answering: {e}")
                continue
            extra["l1_boot"] = l1.boots
            extra["l1_start"] = l1.start_record
            workdir = _workdir(out, t)
            registers = extra.pop("l1_registers", None)
            if registers is not None:
                workdir.mkdir(parents=True, exist_ok=True)
                (workdir / "l1-registers.txt").write_text(registers)
            results[t.name] = judge(t, plan, run, dmesg, workdir, extra)
            break


def _profile_skip(profile: Profile, host: HostFacts) -> str | None:
    return host_support(profile, accel=host.accel, l1_nested=host.l1_nested, caps=host.kvm.caps,
                        hv_supported=supported_hv_flags(host.kvm.hv_cpuid),
                        qemu_hv_props=host.qemu.hv_props)


def _workdir(out: Path, t: BuiltTest) -> Path:
    return out / "selftest" / re.sub(r"[^\w.+-]+", "_", t.name)


# -- on the host ----------------------------------------------------------------------------

def host_unsupported(host: HostFacts) -> str | None:
    """Why the selftests cannot run on this host's kernel (None: they can)."""
    if host.accel == "kvm":
        return None
    return f"--on host needs a usable KVM on this host; the probe says: {host.accel_reason}"


def run_on_host(plan: SelftestPlan, host: HostFacts, out: Path, progress: Progress | None = None,
                done: Done | None = None) -> list[ScenarioResult]:
    """Run each built test as a local process (own process group, killed at its deadline).

    On a host without a usable KVM every runnable test is a skip carrying the probe's reason:
    the tests were asked for and could not run here, which is not a failure of the kernel.
    """
    why = host_unsupported(host)
    results = _Results(done)
    tests = plan.tests()
    for i, t in enumerate(tests, 1):
        if not t.ok:
            results[t.name] = build_error(t, plan)
        elif why:
            results[t.name] = not_run(t, plan, "skip", why)
        else:
            if progress:
                progress(i, len(tests), t.name)
            workdir = _workdir(out, t)
            before = _host_dmesg()
            run = _run_local(t, plan.timeout_s, workdir)
            results[t.name] = judge(t, plan, run, ck.new_log_lines(before, _host_dmesg()), workdir)
    return [results[n] for n in plan.names]


def _run_local(t: BuiltTest, timeout_s: float, workdir: Path) -> SelftestRun:
    assert t.binary is not None
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "output.txt"
    t0 = time.monotonic()
    with open(log, "wb") as fh:
        p = proc.spawn([str(t.binary)], stdout=fh, stderr=subprocess.STDOUT, cwd=t.binary.parent)
    timed_out = False
    try:
        p.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    rc = proc.reap(p, grace=1.0)
    seconds = time.monotonic() - t0
    # Python reports death by signal N as -N; the guest runner's shell says 128+N.
    status = 128 - rc if rc is not None and rc < 0 else rc
    text = log.read_bytes()[:OUTPUT_MAX].decode(errors="replace")
    return SelftestRun(status, text, seconds, timed_out)


def _host_dmesg() -> str:
    cp = proc.run(["dmesg"], 15, check=False)
    return cp.stdout if cp.returncode == 0 else ""


# -- views ----------------------------------------------------------------------------------

def tap_name(r: ScenarioResult) -> str:
    """kselftest's own test naming in TAP ("selftests: kvm: state_test")."""
    return f"selftests: kvm: {r.params.get('test', r.id)}"


def summary_table(results: list[ScenarioResult]) -> str:
    rows = [("SELFTEST", "VERDICT", "EXIT", "TIME", "DETAIL")]
    for r in results:
        rc = r.metrics.get("exit_code")
        rows.append((r.params.get("test", r.id),
                     "TIMEOUT" if r.metrics.get("timed_out") else r.verdict.upper(),
                     "-" if rc is None else str(rc), f"{r.durations.get('total', 0):.1f}s",
                     r.reason[:90]))
    lines = text_table(rows)
    timeouts = sum(bool(r.metrics.get("timed_out")) for r in results)
    summary = verdict_counts(results) or "no selftests"
    lines.append(summary + (f" ({timeouts} of them timed out)" if timeouts else ""))
    return "\n".join(lines)
