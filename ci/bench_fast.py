#!/usr/bin/env python3
"""Fast start, measured: ratios within one run, never asserted (issue 13's targets beside).

1. boot_src: L1 from its saved image (restore + re-key + SSH) against a cold boot (boot +
   ready + SSH), alternated pairs. Target: restored <= 0.5 s.
2. migrate-nested multifd-zstd through the harness, every check, from the saved image,
   against the bare QEMU + qemu.qmp + paramiko script of ci/bench_migrate.py (cold boot, the
   same steps, on the same binary), alternated pairs, both sides passing. Target <= 1.0x.
3. the default smoke suite (`nestvirt run`) on this tree against a checkout of main (its own
   venv), alternated. Target: main / this >= 1.7x.
4. opt-in (--make-test-rounds N): `make test` on both trees, alternated. Target >= 1.7x.
   With --common, like for like: the suite has grown since main (new tests, the KVM host VM's
   boots), so each tree runs only the test ids both trees collect (`make setup`, ruff, then
   pytest -n 2 on those ids), each its own version of them.

    python ci/bench_fast.py [--pairs 5] [--smoke-rounds 1]
                            [--make-test-rounds 0 [--common [--exclude ID]...]]
                            [--baseline /work/wt/main-baseline] [--skip boot,migrate,smoke]
                            [--json OUT]

The baseline is a detached worktree of main with a venv of its own:
    git worktree add --detach /work/wt/main-baseline main && make -C /work/wt/main-baseline venv
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harness.core import proc  # noqa: E402
from harness.guest.image import build_l1, build_tools  # noqa: E402
from harness.guest.kernel import find_kernel  # noqa: E402
from harness.guest.l1 import RunKey  # noqa: E402
from harness.qemu.inventory import probe_host  # noqa: E402
from harness.scenario.engine import RunContext, run_variant, start_run_l1  # noqa: E402
from harness.scenario.spec import Variant  # noqa: E402
from harness.scenario.suite import SCENARIOS  # noqa: E402
from harness.vm.migration import MigrationMode  # noqa: E402


def _bench_migrate():
    spec = importlib.util.spec_from_file_location("bench_migrate", REPO / "ci" / "bench_migrate.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def one_boot(ctx: RunContext, start: str, out: Path) -> float:
    """Seconds from nothing to an SSH session in a ready L1 (the engine's boot_src)."""
    from dataclasses import replace

    key = RunKey.generate()
    t0 = time.monotonic()
    s = start_run_l1(replace(ctx, start=start), "src", out, key, cpu=ctx.host.l1_cpu)
    try:
        sh = s.shell(key)
        took = time.monotonic() - t0
        sh.close()
    finally:
        s.machine.shutdown()
    return took


def one_harness_migrate(ctx: RunContext) -> dict:
    t0 = time.monotonic()
    r = run_variant(Variant(SCENARIOS["migrate-nested"], MigrationMode("multifd-zstd")), ctx)
    return {"seconds": round(time.monotonic() - t0, 3), "verdict": r.verdict,
            "reason": r.reason[:200], "durations": r.durations, "start": r.params.get("start")}


def med(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 3) if xs else None


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def bench_boot(ctx: RunContext, pairs: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix="nvfast-boot-"))
    warm = one_boot(ctx, "snapshot", out)  # builds the image when it is not there yet
    runs: dict[str, list[float]] = {"snapshot": [], "cold": []}
    for i in range(pairs):
        for start in (("snapshot", "cold") if i % 2 == 0 else ("cold", "snapshot")):
            runs[start].append(round(one_boot(ctx, start, out), 3))
        print(f"boot pair {i + 1}: snapshot {runs['snapshot'][-1]:.3f}s cold "
              f"{runs['cold'][-1]:.3f}s load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    s, c = med(runs["snapshot"]), med(runs["cold"])
    return {"pairs": pairs, "first_start_s": round(warm, 3), "runs": runs,
            "median_snapshot_s": s, "median_cold_s": c, "snapshot_over_cold": ratio(s, c),
            "target_snapshot_s": 0.5}


def bench_migrate(ctx: RunContext, pairs: int) -> dict:
    bm = _bench_migrate()
    runs: dict[str, list[dict]] = {"harness": [], "bare": []}
    i = 0
    # A pair counts when both sides passed (TCG refuses a vCPU stopped in guest mode now and
    # then; a refused run is not a timing). Bounded to 3x the pairs asked for.
    while min(sum(r["verdict"] == "pass" for r in v) for v in runs.values()) < pairs \
            and i < 3 * pairs:
        for side in (("bare", "harness") if i % 2 == 0 else ("harness", "bare")):
            out = Path(tempfile.mkdtemp(prefix=f"nvfast-{side}-"))
            try:
                rec = (one_harness_migrate(replace_out(ctx, out)) if side == "harness"
                       else bm.one_bare(out, ctx.host.qemu))
            except Exception as e:  # noqa: BLE001 - one lost run is reported, the rest goes on
                rec = {"seconds": 0.0, "verdict": "error", "reason": repr(e)[:200]}
            rec["load"] = round(os.getloadavg()[0], 2)
            runs[side].append(rec)
            print(f"migrate round {i + 1} {side:8s} {rec['seconds']:6.2f}s {rec['verdict']} "
                  f"{rec.get('reason', '')[:80]}", file=sys.stderr, flush=True)
        i += 1
    passed = {s: [r["seconds"] for r in v if r["verdict"] == "pass"] for s, v in runs.items()}
    h, b = med(passed["harness"]), med(passed["bare"])
    return {"pairs": pairs, "runs": runs, "median_harness_s": h, "median_bare_s": b,
            "harness_over_bare": ratio(h, b), "target": 1.0}


def replace_out(ctx: RunContext, out: Path) -> RunContext:
    from dataclasses import replace

    return replace(ctx, out=out)


def _timed(argv: list[str], cwd: Path, limit: float, env: dict | None = None) -> dict:
    t0 = time.monotonic()
    cp = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=limit,
                        env={**os.environ, **(env or {})})
    return {"seconds": round(time.monotonic() - t0, 3), "rc": cp.returncode,
            "tail": (cp.stdout + cp.stderr).strip().splitlines()[-3:],
            # A run that failed is out of the median; its ids say whether it is a flake of
            # that tree's own (then --exclude them from both trees, like for like).
            "failed": [ln.split()[1] for ln in cp.stdout.splitlines()
                       if ln.startswith(("FAILED ", "ERROR ")) and len(ln.split()) > 1]}


def collected(tree: Path) -> list[str]:
    """The test ids a tree's own pytest collects from its tests/."""
    cp = subprocess.run([str(tree / ".venv/bin/pytest"), "--collect-only", "-q", "tests"],
                        cwd=tree, capture_output=True, text=True, timeout=600)
    return [ln.strip() for ln in cp.stdout.splitlines() if "::" in ln]


def _make_test(tree: Path, ids: list[str] | None) -> dict:
    """`make test`, or with ``ids`` what it does on those ids only: setup, ruff, pytest -n 2."""
    if ids is None:
        return _timed(["make", "test"], tree, 7200)
    t0 = time.monotonic()
    for step in (["make", "setup"], [str(tree / ".venv/bin/ruff"), "check", "."]):
        cp = subprocess.run(step, cwd=tree, capture_output=True, text=True, timeout=1800)
        if cp.returncode:
            return {"seconds": round(time.monotonic() - t0, 3), "rc": cp.returncode,
                    "tail": (cp.stdout + cp.stderr).strip().splitlines()[-3:]}
    rec = _timed([str(tree / ".venv/bin/pytest"), "-n", "2", "-q", "-rfEs", *ids], tree, 7200)
    rec["seconds"] = round(time.monotonic() - t0, 3)
    return rec


def bench_tree(baseline: Path, rounds: int, what: str, common: bool = False,
               exclude: tuple[str, ...] = ()) -> dict:
    """`nestvirt run` (smoke) or `make test` on this tree and on the baseline, alternated
    (``common``: make test on the ids both trees collect, less ``exclude``)."""
    trees = {"this": REPO, "main": baseline}
    runs: dict[str, list[dict]] = {"this": [], "main": []}
    ids: list[str] | None = None
    extra: dict = {}
    if common:
        this, main_ids = collected(REPO), collected(baseline)
        ours = set(this) - set(exclude)
        ids = [i for i in main_ids if i in ours]
        extra = {"ids_common": len(ids), "ids_this": len(this), "ids_main": len(main_ids),
                 "excluded": [i for i in exclude if i in set(this) & set(main_ids)]}
    for i in range(rounds):
        for side in (("main", "this") if i % 2 == 0 else ("this", "main")):
            tree = trees[side]
            if what == "smoke":
                out = Path(tempfile.mkdtemp(prefix=f"nvfast-smoke-{side}-"))
                rec = _timed([str(tree / ".venv/bin/nestvirt"), "run", "--out", str(out)], tree,
                             3600)
                doc = json.loads((out / "results.json").read_text()) if (
                    out / "results.json").exists() else {}
                rec["verdicts"] = [s.get("verdict") for s in doc.get("scenarios", [])]
            else:
                rec = _make_test(tree, ids)
            rec["load"] = round(os.getloadavg()[0], 2)
            runs[side].append(rec)
            print(f"{what} round {i + 1} {side}: {rec['seconds']:.1f}s rc {rec['rc']} "
                  f"{rec.get('verdicts', '')}", file=sys.stderr, flush=True)
    ok = {s: [r["seconds"] for r in v if r["rc"] == 0] for s, v in runs.items()}
    t, m = med(ok["this"]), med(ok["main"])
    return {"rounds": rounds, "baseline": str(baseline), "runs": runs, "median_this_s": t,
            "median_main_s": m, "main_over_this": ratio(m, t), "target": 1.7, **extra}


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds through every finally: each QEMU started here is reaped


def main() -> int:
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        return _main()
    except KeyboardInterrupt:
        print("bench_fast: interrupted: no figures written", file=sys.stderr)
        return 130
    finally:
        proc.reap_all()


def _main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--smoke-rounds", type=int, default=1)
    ap.add_argument("--make-test-rounds", type=int, default=0,
                    help="also time `make test` on both trees, N alternated rounds (long)")
    ap.add_argument("--common", action="store_true",
                    help="make test on the test ids both trees collect (like for like)")
    ap.add_argument("--exclude", action="append", default=[], metavar="ID",
                    help="with --common: leave this test id out on both trees (repeatable)")
    ap.add_argument("--baseline", type=Path, default=Path("/work/wt/main-baseline"))
    ap.add_argument("--skip", default="", help="comma list of boot, migrate, smoke")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    skip = {x for x in a.skip.split(",") if x}
    unknown = skip - {"boot", "migrate", "smoke"}
    if unknown or a.pairs < 1 or a.smoke_rounds < 0 or a.make_test_rounds < 0:
        print(f"bench_fast: bad arguments ({', '.join(sorted(unknown)) or 'a count below 0'})",
              file=sys.stderr)
        return 2
    needs_baseline = ("smoke" not in skip and a.smoke_rounds) or a.make_test_rounds
    if needs_baseline and not (a.baseline / ".venv/bin/nestvirt").exists():
        print(f"bench_fast: no baseline at {a.baseline} (git worktree add --detach {a.baseline} "
              f"main && make -C {a.baseline} venv), or --skip smoke", file=sys.stderr)
        return 2
    facts = probe_host("tcg")
    image = build_l1(find_kernel(), build_tools())
    ctx = RunContext(host=facts, image=image, out=Path(tempfile.mkdtemp(prefix="nvfast-")))
    doc: dict = {"qemu": facts.qemu.version, "accel": facts.accel, "label": "emulated (TCG)",
                 "argv": sys.argv, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if "boot" not in skip:
        doc["boot_src"] = bench_boot(ctx, a.pairs)
    if "migrate" not in skip:
        doc["migrate_nested"] = bench_migrate(ctx, a.pairs)
    if "smoke" not in skip and a.smoke_rounds:
        doc["smoke"] = bench_tree(a.baseline, a.smoke_rounds, "smoke")
    if a.make_test_rounds:
        doc["make_test"] = bench_tree(a.baseline, a.make_test_rounds, "make-test", a.common,
                                      tuple(a.exclude))
    summary = {k: {x: v[x] for x in v if x != "runs"} for k, v in doc.items()
               if isinstance(v, dict)}
    print(json.dumps({**{k: v for k, v in doc.items() if not isinstance(v, dict)}, **summary},
                     indent=2))
    if a.json:
        a.json.write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
