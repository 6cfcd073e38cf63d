"""The study's engine: per chain (one binary, one workload) boot one L1, start the workload,
then migrate it again and again, each destination becoming the next source, one run per
(point, repeat) in the chain's random order. Each run goes through a counting relay (bytes on
the wire, vm/wire.py) with every QEMU thread of both sides sampled from /proc
(vm/threadcpu.py); the guest's own progress log says how much it slowed down; the L1 workload
is verified after every migration, and an L1 that failed it is replaced before the next run.

The first migration of each chain is a warm-up: it carries the calc-dirty-rate taken during a
migration and is kept apart from the figures.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.bench.plan import Chain, Point
from harness.core.errors import NestvirtError, StepTimeout
from harness.core.ports import free_port
from harness.guest.image import GUEST_TOOLS
from harness.guest.l1 import L1Shell, RunKey
from harness.host.probe import QemuFacts
from harness.qemu.inventory import machine_for
from harness.scenario.binaries import LOST_WRITE_EXTRA_KIB, LOST_WRITE_FIXED
from harness.scenario.engine import RunContext, launch_l1
from harness.vm.machine import Machine, QmpCommandError
from harness.vm.migration import migrate, summarize_stats
from harness.vm.threadcpu import ThreadCpuSampler, by_kind
from harness.vm.wire import CountingRelay

STATUS = "/run/l1work.status"
PROGRESS = "/run/l1work.progress"
MODE_CAPS = ("multifd", "compress", "xbzrle")
SAMPLE_S = 0.05
# Guest progress "before": this long up to the migrate command, and no verify in it (a verify
# holds l1work's writers still while it reads the region).
BEFORE_WINDOW_S = 1.0
DIRTY_RATE_S = 1


@dataclass
class RunRecord:
    """One migration of the study, everything measured about it."""

    point: str
    repeat: int  # -1: the chain's warm-up run
    order: int  # position in the whole study
    qemu: str
    status: str = ""
    converged: bool = False
    error: str | None = None
    seconds: float = 0.0  # harness wall time of the migrate step
    stats: dict[str, Any] = field(default_factory=dict)
    wire: dict[str, Any] = field(default_factory=dict)
    threads: dict[str, list[dict]] = field(default_factory=dict)
    cpu: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    unattributed_s: dict[str, float] = field(default_factory=dict)
    sampler: dict[str, float] = field(default_factory=dict)
    guest: dict[str, Any] = field(default_factory=dict)
    dirty_rate: dict[str, Any] | None = None
    load: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def warmup(self) -> bool:
        return self.repeat < 0

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in (
            "point", "repeat", "order", "qemu", "status", "converged", "error", "seconds",
            "stats", "wire", "threads", "cpu", "unattributed_s", "sampler", "guest",
            "dirty_rate", "load")}


@dataclass
class ChainRecord:
    qemu: str
    workload: str
    ram_extra_kib: int = 0
    boots: int = 0
    dirty_rate_before: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    runs: list[RunRecord] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"qemu": self.qemu, "workload": self.workload, "ram_extra_kib": self.ram_extra_kib,
                "boots": self.boots, "dirty_rate_before": self.dirty_rate_before,
                "notes": self.notes, "runs": [r.to_json() for r in self.runs]}


def progress_rate(samples: list[tuple[float, int]], t0: float, t1: float) -> float | None:
    """Bytes per second the guest wrote in [t0, t1] of its own clock, from its progress lines
    (linear between lines); None when the lines do not cover the window."""
    if len(samples) < 2 or t1 <= t0 or samples[0][0] > t0 or samples[-1][0] < t1:
        return None

    def at(t: float) -> float:
        for (ta, ba), (tb, bb) in zip(samples, samples[1:], strict=False):
            if ta <= t <= tb:
                return ba + (bb - ba) * ((t - ta) / (tb - ta) if tb > ta else 1.0)
        return float(samples[-1][1])

    return (at(t1) - at(t0)) / (t1 - t0)


def event_span_ms(events: list[dict]) -> float | None:
    """From the last MIGRATION "setup" event to the "completed" one after it, by QEMU's own
    event timestamps: the migration's length without query-migrate (a cross-check of it)."""
    def ts(e: dict) -> float:
        t = e.get("timestamp") or {}
        return float(t.get("seconds", 0)) + float(t.get("microseconds", 0)) / 1e6

    setup = done = None
    for e in events:
        status = (e.get("data") or {}).get("status")
        if e.get("event") != "MIGRATION":
            continue
        if status == "setup":
            setup, done = ts(e), None
        elif status == "completed" and setup is not None:
            done = ts(e)
    return round((done - setup) * 1000, 1) if setup is not None and done is not None else None


def parse_progress(text: str) -> list[tuple[float, int]]:
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out.append((float(parts[0]), int(parts[1])))
            except ValueError:
                continue
    return out


class _Chain:
    """One chain's machines and state; reaps every QEMU it started in close()."""

    def __init__(self, ctx: RunContext, chain: Chain, qemu: QemuFacts, workdir: Path,
                 timeout: float, order0: int, l2: bool = False) -> None:
        self.ctx, self.chain, self.q, self.workdir = ctx, chain, qemu, workdir
        self.l2 = l2
        self.timeout = timeout
        self.order = order0
        self.key = RunKey.generate()
        workdir.mkdir(parents=True, exist_ok=True)
        self.key.save(workdir / "id_ecdsa")
        extra = (LOST_WRITE_EXTRA_KIB if qemu.version_tuple < LOST_WRITE_FIXED
                 and ctx.accel != "kvm" else 0)
        self.rec = ChainRecord(qemu=qemu.version, workload=chain.workload.key, ram_extra_kib=extra)
        if extra:
            self.rec.notes.append(f"L1 RAM + {extra} KiB on QEMU {qemu.version} under TCG: off the "
                                  "dirty bitmap's word, clear of its lost-write bug (fixed in 9.0)")
        self.src: Machine | None = None
        self.shell: L1Shell | None = None
        self.machines: list[Machine] = []
        self.shells: list[L1Shell] = []
        self.n = 0
        self.quiet_since = 0.0  # when the workload last ran unhindered from (after a verify)

    # -- machines ------------------------------------------------------------------------------
    def _launch(self, incoming: bool, extra_args: tuple[str, ...]) -> Machine:
        self.n += 1
        m = launch_l1(self.ctx, f"m{self.n}", self.workdir, self.key, cpu=self.ctx.host.l1_cpu,
                      incoming=incoming, mem_extra_kib=self.rec.ram_extra_kib, qemu=self.q,
                      machine=machine_for(self.q), extra_args=extra_args)
        self.machines.append(m)
        return m

    def _connect(self, m: Machine) -> L1Shell:
        sh = L1Shell(m.ssh_port, self.key)
        self.shells.append(sh)
        sh.connect(30)
        return sh

    def boot(self, extra_args: tuple[str, ...]) -> None:
        """A fresh L1 with the chain's workload running (replacing any previous one)."""
        self._retire(self.src)
        self.rec.boots += 1
        self.src = self._launch(False, extra_args)
        ready = self.src.wait_guest_event("ready", self.ctx.boot_timeout)
        if ready.get("kvm") != "yes":
            raise StepTimeout(f"L1 has no /dev/kvm (module {ready.get('module')}): not the nested stack")
        self.shell = self._connect(self.src)
        w = self.chain.workload
        self.shell.run(f"setsid l1work run {w.l1work_args()} --status {STATUS} "
                       f"--result /run/l1work.verify --pidfile /run/l1work.pid --progress {PROGRESS} "
                       ">/run/l1work.log 2>&1 </dev/null &", 10)
        if self.l2:
            # L2's page counter in L1's KVM: the whole nested stack runs while L1 migrates.
            self.shell.run(f"setsid nvmm run --payload {GUEST_TOOLS}/payloads/pagecount.bin --pages 128 "
                           "--status /run/l2.status --log /run/l2-serial.log --result /run/l2.verify "
                           "--pidfile /run/l2.pid >/run/nvmm.log 2>&1 </dev/null &", 10)
        deadline = time.monotonic() + 30
        while self._status().get("state") != "running" or (self.l2 and self._l2_pass() is None):
            if time.monotonic() > deadline:
                log = self.shell.run("cat /run/l1work.log /run/nvmm.log", 10).out.strip()
                raise StepTimeout(f"the guest programs did not start in 30 s: {log[:300]}")
            time.sleep(0.2)
        self.quiet_since = time.monotonic()

    def _l2_pass(self) -> int | None:
        assert self.shell is not None
        r = self.shell.run("cat /run/l2.status 2>/dev/null", 10)
        try:
            return int(json.loads(r.out.strip().splitlines()[-1])["pass"])
        except (ValueError, IndexError, KeyError, TypeError):
            return None

    def _status(self) -> dict[str, Any]:
        assert self.shell is not None
        r = self.shell.run(f"cat {STATUS} 2>/dev/null", 10)
        try:
            return json.loads(r.out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return {}

    def _retire(self, m: Machine | None) -> None:
        if m is None:
            return
        try:
            m.shutdown()
        except (QmpCommandError, OSError):
            pass

    def close(self) -> None:
        for sh in self.shells:
            sh.close()
        for m in self.machines:
            self._retire(m)

    # -- measurements --------------------------------------------------------------------------
    def dirty_rate(self, m: Machine, start: bool = True, wait: bool = True) -> dict[str, Any] | None:
        """calc-dirty-rate by page sampling (the one mode TCG survives, FACTS) and its answer."""
        try:
            if start:
                m.qmp("calc-dirty-rate", **{"calc-time": DIRTY_RATE_S, "mode": "page-sampling"})
            if not wait:
                return None
            deadline = time.monotonic() + DIRTY_RATE_S + 10
            while time.monotonic() < deadline:
                got = m.qmp("query-dirty-rate")
                if got.get("status") == "measured":
                    return {"dirty_rate_mib_s": got.get("dirty-rate"), "mode": got.get("mode"),
                            "calc_time_s": got.get("calc-time"),
                            "sample_pages": got.get("sample-pages")}
                time.sleep(0.2)
            return {"error": f"not measured within {DIRTY_RATE_S + 10} s"}
        except QmpCommandError as e:
            return {"error": str(e)}

    def one(self, point: Point, repeat: int, next_args: tuple[str, ...],
            dirty_during: bool = False) -> RunRecord:
        """Migrate the current L1 once with ``point``; on success the destination is the new
        source. ``next_args``: the destination's extra arguments (it is the next run's source)."""
        assert self.src is not None and self.shell is not None
        rec = RunRecord(point=point.id, repeat=repeat, order=self.order, qemu=self.q.version)
        self.order += 1
        rec.load = os.getloadavg()
        src = self.src
        dst = self._launch(True, next_args)
        off = {c: False for c in MODE_CAPS
               if c in self.q.migration_capabilities and c not in point.mode.capabilities()}
        quiet = self.quiet_since + BEFORE_WINDOW_S + 0.2 - time.monotonic()
        if quiet > 0:
            time.sleep(quiet)
        off0 = self._clock_offset()
        h0 = time.monotonic()
        dst_port = free_port()
        t_mig: list[float] = []

        def started() -> None:
            t_mig.append(time.monotonic())
            if dirty_during:
                self.dirty_rate(src, start=True, wait=False)

        with CountingRelay(("127.0.0.1", dst_port)) as relay:
            sampler = ThreadCpuSampler({"src": src.pid or 0, "dst": dst.pid or 0}, SAMPLE_S)
            try:
                out = migrate(src, dst, point.mode, relay.uri, self.timeout, on_started=started,
                              dst_uri=f"tcp:127.0.0.1:{dst_port}", extra_caps=off,
                              thread_names=False)
            finally:
                relay.wait_idle(5.0)
                sampler.stop()
            wire = relay.close()
        rec.status, rec.error, rec.seconds = out.status, out.error, out.seconds
        rec.converged = out.status == "completed"
        rec.stats = summarize_stats(out.stats)
        rec.stats["settings"] = out.settings
        rec.stats["event_total_ms"] = event_span_ms(src.events_seen)
        rec.wire = wire.to_json()
        t0 = t_mig[0] if t_mig else h0
        total_s = (rec.stats.get("total_time_ms") or rec.stats.get("event_total_ms")
                   or out.seconds * 1000) / 1000
        t1 = t0 + total_s
        for side in ("src", "dst"):
            threads = sampler.window(side, t0, t1)
            rec.threads[side] = [t.to_json() for t in threads]
            rec.cpu[side] = by_kind(threads)
            rec.unattributed_s[side] = round(sampler.unattributed_s(side, t0, t1), 4)
        rec.sampler = {"cpu_s": round(sampler.own_cpu_s, 4), "share": round(sampler.own_share, 4),
                       "rounds": sampler.rounds, "interval_s": SAMPLE_S,
                       "relay_cpu_s": round(wire.cpu_s, 4)}
        if dirty_during:
            rec.dirty_rate = self.dirty_rate(src, start=False)
        if rec.converged and (not dst.alive() or out.dst_status not in ("running", None)):
            # Completed on the source, refused by the destination (under TCG: a vCPU stopped in
            # guest mode while L2 ran): not a migration that happened.
            rec.converged, rec.status = False, "refused"
            rec.error = f"destination {out.dst_status}: {out.dst_error or dst.error_summary()}"
            try:
                src.qmp("cont")  # postmigrate -> running: the chain goes on from the source
            except QmpCommandError:
                pass
        if rec.converged:
            self._retire(src)
            self.src, self.shell = dst, self._connect(dst)
        else:
            # Not converged (cancelled at the bound) or refused: the source runs on.
            self._retire(dst)
            if not src.alive():
                raise StepTimeout(f"the source QEMU is gone after a {out.status} migration: "
                                  f"{src.error_summary()}")
        self._guest(rec, off0, h0, t0, t1)
        return rec

    def _clock_offset(self) -> float | None:
        """L1's clock minus ours, now (mid-point of the read): maps host times into L1's."""
        assert self.shell is not None
        a = time.monotonic()
        r = self.shell.run("cat /proc/uptime", 10)
        b = time.monotonic()
        try:
            return float(r.out.split()[0]) - (a + b) / 2
        except (ValueError, IndexError):
            return None

    def _guest(self, rec: RunRecord, off0: float | None, h0: float, t0: float, t1: float) -> None:
        """The guest's write rate before and during the migration (its own clock), and its
        pattern verified on whichever machine runs it now."""
        assert self.shell is not None
        # The offset is taken again afterwards: L1's clock stands still while it is stopped
        # (the downtime, and longer on a loaded host), so the migration's end maps with it.
        off1 = self._clock_offset()
        if off0 is None or off1 is None:
            rec.guest = {"error": "L1's clock could not be read"}
            return
        g_before = h0 + off0
        start, end = t0 + off0, t1 + off1
        text = self.shell.run(f"awk '$1 >= {g_before - BEFORE_WINDOW_S - 1:.3f}' {PROGRESS}", 15).out
        samples = parse_progress(text)
        before = progress_rate(samples, g_before - BEFORE_WINDOW_S, g_before)
        during = progress_rate(samples, start, max(end, start + 0.01))
        v = self.shell.run("l1work verify --pidfile /run/l1work.pid --result /run/l1work.verify "
                           "--timeout 15", 25)
        try:
            verify = json.loads(v.out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            verify = {"ok": False, "error": (v.err or v.out).strip()[:200]}
        if self.l2:
            l2 = self.shell.run("nvmm verify --pidfile /run/l2.pid --result /run/l2.verify --timeout 15", 25)
            try:
                l2v = json.loads(l2.out.strip().splitlines()[-1])
            except (ValueError, IndexError):
                l2v = {"ok": False, "error": (l2.err or l2.out).strip()[:200]}
            verify = {**verify, "ok": bool(verify.get("ok")) and bool(l2v.get("ok")), "l2": l2v,
                      "l2_pass": self._l2_pass()}
        self.quiet_since = time.monotonic()
        rec.guest = {
            "rate_before_mib_s": None if before is None else round(before / 2**20, 3),
            "rate_during_mib_s": None if during is None else round(during / 2**20, 3),
            "during_vs_before": (round(during / before, 3) if before and during is not None
                                 else None),
            "window_s": round(t1 - t0, 3), "guest_clock_lost_s": round(off0 - off1, 3),
            "samples": [samples[0][0], samples[-1][0]] if samples else [],
            "verify_ok": bool(verify.get("ok")),
            "verify": {k: verify.get(k) for k in ("ok", "bad_pages", "first_bad", "error", "l2",
                                                  "l2_pass") if k in verify}}


def run_chain(ctx: RunContext, chain: Chain, qemu: QemuFacts, workdir: Path, timeout: float,
              order0: int = 0, warmup: bool = True,
              progress: Callable[[RunRecord], None] | None = None, l2: bool = False,
              into: list[ChainRecord] | None = None) -> ChainRecord:
    """Every run of ``chain`` (a warm-up first when ``warmup``); never raises for what QEMU or
    the guest did: a run that could not happen is recorded with its error. Always reaps.
    ``into`` gets the record before the first run, so an interrupted study keeps its runs."""
    c = _Chain(ctx, chain, qemu, workdir, timeout, order0, l2=l2)
    if into is not None:
        into.append(c.rec)
    runs = list(chain.runs)
    if warmup and runs:
        runs.insert(0, (runs[0][0], -1))
    try:
        for i, (point, repeat) in enumerate(runs):
            nxt = runs[i + 1][0].global_args() if i + 1 < len(runs) else ()
            try:
                if c.src is None or not c.src.alive():
                    c.boot(point.global_args())
                    if c.rec.dirty_rate_before is None:
                        assert c.src is not None
                        c.rec.dirty_rate_before = c.dirty_rate(c.src)
                elif point.global_args() != _args_of(c.src):
                    # A level that only -global carries: this source was started without it.
                    c.boot(point.global_args())
                rec = c.one(point, repeat, nxt, dirty_during=repeat < 0)
                if not rec.guest.get("verify_ok", False):
                    # A broken L1 must not carry on into the next run: boot a fresh one then.
                    c._retire(c.src)
                    c.src = None
            except NestvirtError as e:
                rec = RunRecord(point=point.id, repeat=repeat, order=c.order, qemu=qemu.version,
                                status="error", error=str(e)[:500], load=os.getloadavg())
                c.order += 1
                c._retire(c.src)
                c.src = None
            c.rec.runs.append(rec)
            if progress is not None:
                progress(rec)
    finally:
        c.close()
    return c.rec


def _args_of(m: Machine) -> tuple[str, ...]:
    return tuple(m.config.extra_args)


def chain_dir(out: Path, index: int, chain: Chain, qemu: QemuFacts) -> Path:
    return out / "chains" / re.sub(r"[^\w.+-]+", "_", f"{index:02d}-{qemu.version}-{chain.workload.key}")
