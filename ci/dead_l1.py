#!/usr/bin/env python3
"""How long after L1 dies does the harness give its verdict?

Two ways for L1 to die on the destination, each run --runs times on migrate-plain:

* ``sysrq``: during a guest step, L1 crashes itself (echo c > /proc/sysrq-trigger); under
  panic=-1 and -no-reboot its QEMU exits;
* ``halt``: the same with panic=0 first: the kernel stops after the panic and its QEMU lives
  on, so only the console says that L1 is dead;
* ``nmi``: right after the migration, an NMI panics L1 (unknown_nmi_panic) while the harness
  starts to SSH into it.

The deaths are defined here, not taken from the fault table, so the same script measures a
tree that lacks them (the main branch before the console watch): run it from that tree with
--tree. Prints seconds from the death (the fault's action done) to the verdict (run_variant
returned), per case: median, min, max.

    nice -n 5 .venv/bin/python ci/dead_l1.py --runs 3
    nice -n 5 .venv/bin/python ci/dead_l1.py --runs 3 --tree /work/main
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tree", type=Path, default=Path(__file__).resolve().parent.parent)
    args = ap.parse_args()
    sys.path.insert(0, str(args.tree.resolve()))
    import harness
    from harness.guest.image import build_l1, build_tools
    from harness.guest.kernel import find_kernel
    from harness.qemu.inventory import probe_host
    from harness.scenario import faults
    from harness.scenario.engine import RunContext, run_variant
    from harness.scenario.spec import Variant
    from harness.scenario.suite import SCENARIOS
    from harness.vm.migration import MigrationMode

    print(f"tree: {Path(harness.__file__).parent.parent}", file=sys.stderr)
    died: list[float] = []

    def mark(action):
        def run(at):
            action(at)
            died.append(time.monotonic())
        return run

    def sysrq(at):
        at.shell().run("echo c > /proc/sysrq-trigger", 10)

    def halt(at):
        # panic=0: the kernel stops after the panic and QEMU lives on: only the console says.
        at.shell().run("echo 0 > /proc/sys/kernel/panic; echo c > /proc/sysrq-trigger", 10)

    def arm_nmi(at):
        at.shell().run("echo 1 > /proc/sys/kernel/unknown_nmi_panic", 10)

    def nmi(at):
        at.destination().qmp("inject-nmi")

    cases = {
        "sysrq": faults.Fault("measure-sysrq", "L1 crashes itself in a guest step",
                              {"in-guest": sysrq}, must_fail="l1-responsive-on-dst",
                              scenario="migrate-plain", needs_paused=False),
        "halt": faults.Fault("measure-halt", "L1 panics and halts in a guest step (QEMU lives)",
                             {"in-guest": halt}, must_fail="l1-responsive-on-dst",
                             scenario="migrate-plain", needs_paused=False),
        "nmi": faults.Fault("measure-nmi", "an NMI panics L1 as SSH starts",
                            {"before-migrate": arm_nmi, "after-migrate": mark(nmi)},
                            must_fail="l1-ssh-on-dst", scenario="migrate-plain",
                            needs_paused=False),
    }
    facts = probe_host("auto")
    image = build_l1(find_kernel(), build_tools())
    rows = []
    with tempfile.TemporaryDirectory(prefix="dead-l1-") as tmp:
        ctx = RunContext(host=facts, image=image, out=Path(tmp))
        for case, fault in cases.items():
            faults.FAULTS[fault.name] = fault
            took, how = [], []
            for _ in range(args.runs):
                died.clear()
                t_send = []
                if case in ("sysrq", "halt"):
                    # The death is the write reaching L1: time it as the command is sent.
                    inner = fault.actions["in-guest"]

                    def timed(at, inner=inner, t_send=t_send):
                        t_send.append(time.monotonic())
                        inner(at)
                    faults.FAULTS[fault.name] = replace(fault, actions={"in-guest": timed})
                spec = replace(SCENARIOS["migrate-plain"], inject=fault.name, l1_rate_mib_s=8)
                r = run_variant(Variant(spec, MigrationMode("none", downtime_limit_ms=5000)), ctx)
                end = time.monotonic()
                start = (t_send or died or [None])[0]
                if start is None:
                    print(f"{case}: the death was never reached: {r.verdict} {r.reason[:200]}",
                          file=sys.stderr)
                    continue
                took.append(end - start)
                failed = [c for c in r.checks if not c.ok]
                how.append(f"{r.verdict}: {failed[0].name}: {failed[0].detail[:150]}"
                           if failed else f"{r.verdict}: {r.reason[:150]}")
                print(f"{case}: {end - start:.1f}s  {how[-1]}", file=sys.stderr, flush=True)
            del faults.FAULTS[fault.name]
            if took:
                rows.append((case, statistics.median(took), min(took), max(took), len(took)))
    print(f"{'case':6} {'median_s':>8} {'min_s':>6} {'max_s':>6} runs")
    for case, med, lo, hi, n in rows:
        print(f"{case:6} {med:8.1f} {lo:6.1f} {hi:6.1f} {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
