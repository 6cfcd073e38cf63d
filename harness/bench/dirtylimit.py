"""KVM's dirty ring and dirty limit, the engine of scenario ``dirty-limit`` (KVM only: in the
KVM host VM, `nestvirt run --in-hostvm dirty-limit`, or on a KVM host).

One L1 (2 vCPUs, ``-accel kvm,dirty-ring-size=N``) runs ``l1work`` unthrottled, so it dirties
faster than the throttled stream can send. Then, in order:

1. calc-dirty-rate in dirty-ring mode: the per-vCPU rates (``vcpu-dirty-rate``);
2. set-vcpu-dirty-limit below the rate measured, measured again, cancel-vcpu-dirty-limit;
3. migrate with auto-converge (CPU throttling), then migrate on with the dirty-limit
   capability (per-vCPU dirty restraint), both at the same max-bandwidth, and the guest's own
   write progress (l1work's --progress) measured during each migration against before it.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from harness.core import slow
from harness.core.errors import NestvirtError, StepTimeout
from harness.guest.l1 import L1Shell, RunKey
from harness.scenario import checks as ck
from harness.scenario.engine import RunContext, l1_config, launch_config
from harness.scenario.result import ScenarioResult, execute_guarded, finish
from harness.scenario.spec import Variant
from harness.vm.machine import Machine
from harness.vm.migration import MigrationOutcome, migrate, summarize_stats

SCENARIO = "dirty-limit"
RING_SCENARIO = "dirty-ring"  # phases 1 and 2 only (no migration): the quick KVM check
RING = 4096  # dirty-ring-size: entries per vCPU (a power of two; QEMU's own example value)
SMP = 2
L1_MIB = 128  # l1work's region: more than the stream moves in a second at BANDWIDTH
BANDWIDTH_MIB = 12  # below what l1work dirties in the host VM (~29 MB/s over 2 vCPUs)
LIMIT_FLOOR_MB = 1
CALC_S = 1
MIGRATE_BOUND_S = 150
# dirty-limit first: in the KVM host VM an auto-converge run has ended the source L1 (QEMU
# exit 0, no stderr: a reset under -no-reboot), and the chain needs a live L1 to go on.
POLICIES = ("dirty-limit", "auto-converge")
PROGRESS = "/run/l1work.progress"


def skip_reason(ctx: RunContext) -> str | None:
    h = ctx.host
    if h.accel != "kvm":
        return ("needs KVM with a dirty ring (-accel kvm,dirty-ring-size=N); runs in the KVM "
                "host VM (nestvirt run --in-hostvm dirty-limit, SVM) or on a KVM host")
    if not h.kvm.caps.get("dirty_log_ring"):
        return "this host's KVM has no dirty ring (KVM_CAP_DIRTY_LOG_RING)"
    q = h.qemu
    if "dirty-limit" not in q.migration_capabilities or "set-vcpu-dirty-limit" not in q.commands:
        return f"QEMU {q.version} lacks the dirty-limit capability or set-vcpu-dirty-limit (8.1+)"
    return None


def run_dirty_limit_variant(variant: Variant, ctx: RunContext) -> ScenarioResult:
    res = ScenarioResult(id=variant.id, scenario=variant.spec.name, params=variant.params())
    workdir = ctx.out / variant.id.replace("/", "_")
    workdir.mkdir(parents=True, exist_ok=True)
    res.artifacts["dir"] = str(workdir)
    why = skip_reason(ctx)
    if why:
        res.verdict, res.reason = "skip", why
        return finish(res, workdir)
    execute_guarded(_DirtyRun(variant, ctx, workdir, res), res, workdir)
    return finish(res, workdir)


def rate_between(lines: list[str], t0: float, t1: float) -> float | None:
    """MiB/s the guest wrote between L1 times t0 and t1, from l1work's "t bytes" lines."""
    pts = []
    for ln in lines:
        parts = ln.split()
        if len(parts) == 2:
            try:
                pts.append((float(parts[0]), int(parts[1])))
            except ValueError:
                continue
    inside = [p for p in pts if t0 <= p[0] <= t1]
    if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
        return None
    return (inside[-1][1] - inside[0][1]) / 2**20 / (inside[-1][0] - inside[0][0])


class _DirtyRun:
    def __init__(self, variant: Variant, ctx: RunContext, workdir: Path, res: ScenarioResult):
        self.v, self.ctx, self.workdir, self.res = variant, ctx, workdir, res
        self.key = RunKey.generate()
        self.key.save(workdir / "id_ecdsa")
        self.machines: list[Machine] = []
        self.shells: list[L1Shell] = []

    def _l1(self, name: str, incoming: bool) -> Machine:
        cfg = l1_config(self.ctx, name, self.key, cpu=self.ctx.l1_cpu(self.v.profile), smp=SMP,
                        mem_mib=self.v.spec.mem_mib, incoming=incoming,
                        machine=self.ctx.machine(self.v))
        m = launch_config(replace(cfg, accel_opts=f"dirty-ring-size={RING}"), self.workdir)
        self.machines.append(m)
        return m

    def _shell(self, m: Machine) -> L1Shell:
        sh = L1Shell(m.ssh_port, self.key)
        self.shells.append(sh)
        sh.connect(60)
        return sh

    def _uptime(self, sh: L1Shell) -> float:
        return float(sh.run("cut -d' ' -f1 /proc/uptime", 20).out.split()[0])

    def _dirty_rate(self, m: Machine) -> dict[str, Any]:
        m.qmp("calc-dirty-rate", **{"calc-time": CALC_S, "mode": "dirty-ring"})
        deadline = time.monotonic() + CALC_S + 30
        while time.monotonic() < deadline:
            r = m.qmp("query-dirty-rate")
            if r.get("status") == "measured":
                return r
            time.sleep(0.3)
        raise StepTimeout("calc-dirty-rate (dirty-ring) did not measure within its bound")

    def execute(self) -> None:
        t = time.monotonic()
        src = self._l1("src", incoming=False)
        ready = src.wait_guest_event("ready", self.ctx.boot_timeout * 2)
        self.res.metrics["l1_ready"] = ready
        sh = self._shell(src)
        self.res.durations["boot_src"] = round(time.monotonic() - t, 3)
        sh.run(f"setsid l1work run --mib {L1_MIB} --threads {SMP} --rate-mib-s 0 "
               f"--status /run/l1work.status --result /run/l1work.verify "
               f"--pidfile /run/l1work.pid --progress {PROGRESS} >/run/l1work.log 2>&1 "
               "</dev/null &", 20)
        start_s = slow.scaled(60)
        deadline = time.monotonic() + start_s
        while '"running"' not in sh.run("cat /run/l1work.status 2>/dev/null", 20).out:
            if time.monotonic() > deadline:
                raise StepTimeout(f"l1work did not start in {start_s:g}s")
            time.sleep(0.5)
        # 1. the dirty ring's per-vCPU rates
        before = self._dirty_rate(src)
        self.res.metrics["dirty_rate"] = before
        self.res.checks.append(dirty_ring_check(before, SMP))
        # 2. a per-vCPU limit below what was measured, measured again
        top = max((v.get("dirty-rate", 0) for v in before.get("vcpu-dirty-rate", [])), default=0)
        limit = max(LIMIT_FLOOR_MB, top // 4)
        t_free = self._uptime(sh)
        time.sleep(2)
        t_set = self._uptime(sh)
        # While limited, L1's vCPUs (dropbear's too) may be held for seconds: no SSH until
        # the limit is cancelled; the window's end is L1's start plus the host's elapsed time.
        h0 = time.monotonic()
        src.qmp("set-vcpu-dirty-limit", **{"dirty-rate": limit})
        time.sleep(1.5)
        limited = self._dirty_rate(src)
        shown = src.qmp("query-vcpu-dirty-limit")
        t_cancel = t_set + (time.monotonic() - h0)
        src.qmp("cancel-vcpu-dirty-limit")
        lines = sh.run(f"cat {PROGRESS}", 30).out.splitlines()
        guest = {"before": _round(rate_between(lines, t_free, t_set)),
                 "limited": _round(rate_between(lines, t_set + 0.5, t_cancel))}
        self.res.metrics["vcpu_dirty_limit"] = {"limit_mb_s": limit, "measured": limited,
                                                "query": shown, "guest_mib_s": guest}
        self.res.checks.append(vcpu_limit_check(guest, limited, limit))
        if self.v.spec.name == RING_SCENARIO:
            return
        # 3. auto-converge, then dirty-limit, at the same bandwidth
        comparison = []
        cur, cur_sh = src, sh
        for policy in POLICIES:
            dst = self._l1(f"dst-{policy}", incoming=True)
            caps = {"auto-converge": policy == "auto-converge",
                    "dirty-limit": policy == "dirty-limit"}
            if policy == "dirty-limit":
                # Converges only when all vCPUs together dirty less than the stream sends.
                cur.qmp("migrate-set-parameters", **{"vcpu-dirty-limit": migrate_limit(),
                                                     "x-vcpu-dirty-limit-period": 500})
            mode = replace(self.v.mode, max_bandwidth_mib=BANDWIDTH_MIB)
            t_start = self._uptime(cur_sh)
            t0 = time.monotonic()
            try:
                o = migrate(cur, dst, mode, "tcp:127.0.0.1:0", timeout=MIGRATE_BOUND_S,
                            extra_caps=caps, stall_timeout=60)
            except NestvirtError as e:  # a side died mid-migration: that is this row's result
                who = "source" if not cur.alive() else "destination" if not dst.alive() else ""
                story = (cur if who == "source" else dst).exit_story() if who else ""
                o = MigrationOutcome(status=f"{who or 'qmp'}-died",
                                     error=f"{e}" + (f"; the {who} exited: {story}" if who else ""))
            wall = time.monotonic() - t0
            row: dict[str, Any] = {"policy": policy, "status": o.status,
                                   "seconds": round(wall, 2), **summarize_stats(o.stats)}
            for k in ("cpu-throttle-percentage", "dirty-limit-throttle-time-per-round",
                      "dirty-limit-ring-full-time"):
                if k in o.stats:
                    row[k.replace("-", "_")] = o.stats[k]
            if o.status == "completed" and not dst.alive():
                o.status, o.error = "dst-died", f"the destination exited: {dst.exit_story()}"
            if o.status == "completed":
                dsh = self._shell(dst)
                t_end = self._uptime(dsh)
                lines = dsh.run(f"cat {PROGRESS}", 30).out.splitlines()
                row["guest_mib_s_before"] = _round(rate_between(lines, t_start - 5, t_start))
                row["guest_mib_s_during"] = _round(rate_between(lines, t_start, t_end))
                cur.shutdown()
                cur, cur_sh = dst, dsh
            else:
                row["error"] = o.error or o.dst_error
            comparison.append(row)
            self.res.metrics["comparison"] = comparison
            self.res.checks.append(ck.Check(f"migration-completed-{policy}",
                                            o.status == "completed",
                                            f"{policy}: {o.status} in {wall:.1f}s"
                                            + (f": {row.get('error')}" if row.get("error")
                                               else "")))
            if o.status != "completed":
                break
        self.res.checks.append(progress_check(comparison))
        verify = cur_sh.run("l1work verify --pidfile /run/l1work.pid --result /run/l1work.verify "
                            "--timeout 30", 60)
        self.res.checks.append(ck.Check("l1-workload-pattern", verify.rc == 0,
                                        (verify.out + verify.err).strip()[-300:]))

    def teardown(self) -> None:
        for sh in self.shells:
            sh.close()
        for m in self.machines:
            m.shutdown()


def migrate_limit(bandwidth_mib: int = BANDWIDTH_MIB, smp: int = SMP) -> int:
    """The per-vCPU dirty limit (MB/s) for the migration: half the stream over the vCPUs."""
    return max(LIMIT_FLOOR_MB, bandwidth_mib // (2 * smp))


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def dirty_ring_check(r: dict[str, Any], smp: int) -> ck.Check:
    """dirty-ring-rate: measured in dirty-ring mode, one rate per vCPU, the guest dirtying."""
    rates = [v.get("dirty-rate", 0) for v in r.get("vcpu-dirty-rate", [])]
    ok = r.get("mode") == "dirty-ring" and len(rates) == smp and sum(rates) > 0
    return ck.Check("dirty-ring-rate", ok, f"mode {r.get('mode')}, {r.get('dirty-rate')} MB/s, "
                    f"per vCPU {rates}")


def vcpu_limit_check(guest: dict[str, float | None], after: dict[str, Any],
                     limit: int) -> ck.Check:
    """vcpu-dirty-limit: under set-vcpu-dirty-limit the guest's own write rate (l1work's
    progress, not QEMU's estimate) fell below four fifths of what it was just before."""
    a = [v.get("dirty-rate", 0) for v in after.get("vcpu-dirty-rate", [])]
    b, lim = guest.get("before"), guest.get("limited")
    ok = b is not None and lim is not None and b > 0 and lim <= 0.8 * b
    return ck.Check("vcpu-dirty-limit", ok, f"limit {limit} MB/s per vCPU: the guest wrote "
                    f"{b} MiB/s before, {lim} MiB/s under the limit; QEMU's dirty-ring rates "
                    f"under it {a} MB/s")


def progress_check(rows: list[dict[str, Any]]) -> ck.Check:
    """guest-progress-measured: the guest's own writes were measured during every migration
    (it kept running under each throttle, and how fast is in the comparison)."""
    got = {r["policy"]: r.get("guest_mib_s_during") for r in rows}
    ok = len(got) == len(POLICIES) and all(v is not None and v > 0 for v in got.values())
    return ck.Check("guest-progress-measured", ok, ", ".join(f"{k}: {v} MiB/s" for k, v in
                                                            got.items()))
