"""`nestvirt bench compression`: the argument parser and the command, called by the CLI."""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

from harness.bench.plan import QUICK, STUDY_MODES, Axes, Workload
from harness.core.errors import UsageError


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise UsageError(f"not a comma-separated list of integers: {text}") from e


def add_command(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("bench", help="performance studies (compression: modes x threads x workload "
                       "x bandwidth on the nested stack)")
    b.add_argument("study", choices=("compression",))
    b.add_argument("--quick", action="store_true",
                   help="none, multifd-zlib, multifd-zstd, compress wait on/off, xbzrle at 1 and 2 "
                        "threads, 3 repeats: a few minutes per binary on 2 cores")
    b.add_argument("--modes", help=f"comma-separated, of {', '.join(STUDY_MODES)} (default: all)")
    b.add_argument("--threads", help="threads/channels to sweep, e.g. 1,2,4 (default 1,2,4)")
    b.add_argument("--levels", help="compression levels to sweep (default: QEMU's own)")
    b.add_argument("--level-via", choices=("auto", "qmp", "global", "both"), default="auto",
                   help="how a multifd level reaches QEMU: auto = -global on QEMU before 9.0 (which "
                        "ignores the QMP one), QMP otherwise; both = a point each way")
    b.add_argument("--bandwidth-mib", help="max-bandwidth limits in MiB/s to sweep (0: none)")
    b.add_argument("--switchover-bw-mib", help="avail-switchover-bandwidth values (9.1+; 0: unset)")
    b.add_argument("--entropy", help="workload compressibility to sweep: pages compress about Nx (default 2)")
    b.add_argument("--pattern", help="workload patterns to sweep: seq,random,hot (default seq)")
    b.add_argument("--hot-pct", type=int, default=10, help="hot set size in percent of the region")
    b.add_argument("--mib", type=int, help="workload region MiB (default 64)")
    b.add_argument("--rate-mib-s", type=int, help="workload dirty rate MiB/s (default 32; quick 16)")
    b.add_argument("--workload-threads", type=int, default=2)
    b.add_argument("--repeat", type=int, help="runs per point (default 3)")
    b.add_argument("--seed", type=int, help="order of the runs (default: random, recorded)")
    b.add_argument("--bound-s", type=float, default=60.0,
                   help="a migration not done by then is cancelled and reported not converged")
    b.add_argument("--downtime-limit-ms", type=int)
    b.add_argument("--l2", action="store_true",
                   help="run L2's page counter in L1's KVM during the migrations (under TCG a stop in "
                        "guest mode is refused by the destination: such a run counts as refused)")
    b.add_argument("--qemu", action="append", default=[], metavar="NAME|PATH",
                   help="binaries to study (repeatable; default: every one of the inventory)")
    b.add_argument("--accel", default="auto", choices=("auto", "kvm", "tcg"))
    b.add_argument("--kernel", help="L1 kernel image (default: NESTVIRT_KERNEL, host, Debian)")
    b.add_argument("--modules", help="module tree for --kernel")
    b.add_argument("--out", type=Path, help="results directory (default results/<time>)")
    b.add_argument("--json", action="store_true", help="print bench.json instead of the tables")
    b.add_argument("--dry-run", action="store_true", help="print the points and what is pruned, run nothing")


def axes_from_args(a: argparse.Namespace) -> Axes:
    """The sweep the options describe (--quick as the base, options over it)."""
    base = QUICK if a.quick else Axes()
    w0 = base.workloads[0]
    entropies = _ints(a.entropy) if a.entropy else (w0.entropy,)
    patterns = tuple(x for x in (a.pattern or w0.pattern).split(",") if x)
    workloads = tuple(Workload(mib=a.mib or w0.mib, rate_mib_s=a.rate_mib_s or w0.rate_mib_s,
                               threads=a.workload_threads, entropy=e, pattern=p, hot_pct=a.hot_pct)
                      for e in entropies for p in patterns)
    return replace(
        base,
        modes=tuple(a.modes.split(",")) if a.modes else base.modes,
        threads=_ints(a.threads) if a.threads else base.threads,
        levels=_ints(a.levels) if a.levels else base.levels,
        bandwidth_mib=_ints(a.bandwidth_mib) if a.bandwidth_mib else base.bandwidth_mib,
        switchover_bw_mib=_ints(a.switchover_bw_mib) if a.switchover_bw_mib else base.switchover_bw_mib,
        workloads=workloads, level_via=a.level_via,
        repeat=a.repeat if a.repeat is not None else base.repeat,
        downtime_limit_ms=a.downtime_limit_ms)


def cmd_bench(a: argparse.Namespace) -> int:
    from harness.bench.study import StudyOptions, plan_study, point_results, run_study, text_report
    from harness.guest.image import build_l1, build_tools
    from harness.guest.kernel import find_kernel
    from harness.host.probe import warn_if_emulated
    from harness.qemu.inventory import probe_host, select
    from harness.results.record import link_latest, prepare_out, run_record, write_results
    from harness.scenario.engine import RunContext

    axes = axes_from_args(a)  # bad input is refused before anything starts
    if a.bound_s <= 0:
        raise UsageError("--bound-s must be more than 0")
    facts = probe_host(a.accel, None, extra=tuple(x for x in a.qemu if "/" in x))
    qemus = tuple(select(facts.qemus, s) for s in a.qemu) if a.qemu else facts.qemus
    seed = a.seed if a.seed is not None else random.randrange(1 << 30)
    opts = StudyOptions(axes=axes, qemus=qemus, seed=seed, bound_s=a.bound_s, quick=a.quick, l2=a.l2)
    plan = plan_study(opts)
    if a.dry_run:
        for p in plan.points:
            print(p.id)
        for x in plan.pruned:
            print(f"pruned {x.id}: {x.reason}")
        return 0
    if not plan.points:
        raise UsageError("no point to run: " + "; ".join(x.reason for x in plan.pruned[:3]))
    kernel = find_kernel(a.kernel, a.modules)
    out = prepare_out(a.out)
    warn_if_emulated(facts)
    image = build_l1(kernel, build_tools())
    ctx = RunContext(host=facts, image=image, out=out)
    info = run_record(out, image=image.to_json(), seed=seed, study="compression")
    t0 = time.monotonic()
    say = (lambda line: None) if a.json else (lambda line: print(line, file=sys.stderr, flush=True))
    say(f"nestvirt bench compression: {len(plan.points)} points x {axes.repeat} on "
        f"{', '.join(q.version for q in qemus)}, seed {seed}, {len(plan.pruned)} pruned")
    try:
        doc = run_study(ctx, opts, progress=say)
    finally:
        # On Ctrl-C too: run_study wrote bench.json with the runs that finished.
        if (out / "bench.json").exists():
            doc = json.loads((out / "bench.json").read_text())
            results = point_results(doc, out)
            info["seconds"] = round(time.monotonic() - t0, 2)
            write_results(out, facts.to_json(), results, info,
                          extra={"bench": {"file": "bench.json", "report": "report.html", "seed": seed}})
            link_latest(out)
    if a.json:
        print(json.dumps(doc, indent=1, default=str))
    else:
        print(text_report(doc))
        print(f"results: {out / 'results.json'} (tables.txt, bench.json, report.html)")
    return 1 if any(r.verdict == "error" for r in results) else 0
