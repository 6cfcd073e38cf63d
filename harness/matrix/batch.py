"""The command-line side of matrix runs: `run --matrix/-j/--repeat/--until-fail/--variant-json`,
`matrix` (expand and list) and `report` (views of one results.json).

Thin on purpose: variants come from harness.matrix.files, run through harness.matrix.workers (which calls
the one engine, scenario.run_variant), and every view is rendered from results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from harness.core.errors import UsageError
from harness.guest.image import L1Image
from harness.matrix.files import (
    PARTS,
    Plan,
    PlannedVariant,
    combination_scenarios,
    expand_matrix,
    load_matrix,
    matrix_id,
    needs,
    plan_from_variants,
)
from harness.matrix.workers import (
    FAILURE_VERDICTS,
    HostBudget,
    Job,
    collect_records,
    job_out,
    run_jobs,
    signatures_json,
)
from harness.results import known
from harness.results.record import (
    exit_status,
    link_latest,
    load_results,
    prepare_out,
    run_record,
    write_results,
)
from harness.results.repro import compare_failure, load_variant_file
from harness.results.views import tap, tap_name, view_paths, write_views
from harness.scenario.result import ScenarioResult
from harness.scenario.spec import GUEST_MODE_RETRIES, Variant

# --until-fail without --repeat: how many attempts before calling a variant stable enough.
UNTIL_FAIL_ATTEMPTS = 10
# Pruned variants listed one per line up to this many; beyond, counted per reason.
PRUNED_LISTED = 40


def add_run_options(r: argparse.ArgumentParser) -> None:
    """Options `run` gains for matrix, parallel, repeated and replayed runs."""
    r.add_argument("--matrix", type=Path, metavar="FILE",
                   help="run the variants of a matrix file (ci/smoke.yaml, ci/nightly.yaml)")
    r.add_argument("--matrix-part", choices=("split", *PARTS), default="split",
                   help="which of the matrix's combinations run: split (default) those with "
                   "in_hostvm: true in one KVM host VM and the rest here; here, hostvm or all "
                   "of them here")
    r.add_argument("-j", "--jobs", type=int, default=None, metavar="N",
                   help="variants at once, each in its own process (0: as many as the host "
                        "budget allows); never more than the host's CPUs and memory allow")
    r.add_argument("--repeat", type=int, metavar="N",
                   help="run every variant N times and report each one's failure rate")
    r.add_argument("--until-fail", action="store_true",
                   help="stop at the first failure (fail, error or known issue) and say which "
                        f"attempt it was (at most --repeat attempts, default {UNTIL_FAIL_ATTEMPTS})")
    r.add_argument("--variant-json", type=Path, metavar="FILE",
                   help="re-run one exact variant: a repro bundle's variant.json (same cached "
                        "kernel and initramfs) or a bare variant")


def mode_knobs(args: argparse.Namespace) -> dict[str, Any]:
    """The MigrationMode knobs `run` was given, keyed by MigrationMode field."""
    return {"channels": args.channels, "threads": args.threads,
            "decompress_threads": args.decompress_threads, "level": args.level,
            "wait_thread": args.wait_thread == "on", "xbzrle_cache_mib": args.xbzrle_cache_mib,
            "transport": args.transport, "downtime_limit_ms": args.downtime_limit_ms,
            "max_bandwidth_mib": args.max_bandwidth_mib, "tls": args.tls,
            "auto_converge": args.auto_converge}


def run_options(args: argparse.Namespace) -> dict[str, Any]:
    """Where destinations start and how long a still migration may stand, checked:
    {"dst_host": HostSpec | None, "stall_timeout": seconds, "start": snapshot | cold}."""
    from harness.remote.ssh import HostSpec

    stall = getattr(args, "stall_timeout", 15.0)
    if stall is not None and stall <= 0:
        raise UsageError(f"--stall-timeout {stall:g}: must be more than 0 seconds")
    dst = None
    if getattr(args, "dst_host", None):
        for opt, path in (("--dst-key", args.dst_key), ("--dst-known-hosts", args.dst_known_hosts)):
            if path is not None and not Path(path).is_file():
                raise UsageError(f"{opt} {path}: no such file")
        dst = HostSpec.parse(args.dst_host, key_file=args.dst_key,
                             known_hosts=args.dst_known_hosts)
        if args.transport == "unix":
            raise UsageError("--transport unix cannot cross hosts: drop it with --dst-host")
    elif any(getattr(args, o, None) for o in ("dst_key", "dst_known_hosts")):
        raise UsageError("--dst-key and --dst-known-hosts go with --dst-host")
    return {"dst_host": dst, "stall_timeout": stall,
            "start": "cold" if getattr(args, "cold", False) else "snapshot"}


def check_injects(variants: Iterable[Variant], dst_host: Any, parallel: int = 1) -> None:
    """A deliberate fault this run cannot show is bad input, said before anything starts."""
    from harness.scenario.faults import FAULTS

    for v in variants:
        fault = FAULTS.get(v.spec.inject or "")
        if fault is None:
            continue
        why = fault.unfit(v.mode.tls, dst_host is not None)
        if why:
            raise UsageError(why)
        if fault.needs_remote and parallel > 1:
            raise UsageError(f"inject {fault.name} acts on the link every parallel variant uses: "
                             "run it with -j 1")


def wants_batch(args: argparse.Namespace) -> bool:
    """True when `run` should go through the matrix runner rather than the plain loop."""
    return bool(getattr(args, "matrix", None) or getattr(args, "variant_json", None)
                or getattr(args, "jobs", None) is not None or getattr(args, "repeat", None)
                or getattr(args, "until_fail", False))


# --------------------------------------------------------------------------------------------
# run


def cmd_run_batch(args: argparse.Namespace) -> int:
    """`nestvirt run` with --matrix, -j, --repeat, --until-fail or --variant-json."""
    from harness.guest.image import build_l1, build_tools
    from harness.guest.kernel import find_kernel
    from harness.host.enlightenments import resolve_profile
    from harness.host.probe import warn_if_emulated
    from harness.qemu.inventory import probe_host
    from harness.scenario.binaries import plan_variants
    from harness.scenario.suite import apply_profile, expand

    if args.repeat is not None and args.repeat < 1:
        raise UsageError("--repeat must be at least 1")
    if args.jobs is not None and args.jobs < 0:
        raise UsageError("-j must be 0 (as many as fit) or a positive number")
    repeat = args.repeat or (UNTIL_FAIL_ATTEMPTS if args.until_fail else 1)
    knobs = mode_knobs(args)
    opts = run_options(args)
    # Everything the user typed is checked before anything starts.
    vdoc = matrix = variants = None
    pinned = getattr(args, "src_qemu", None) or getattr(args, "dst_qemu", None)
    if args.variant_json:
        if (args.matrix or args.scenarios or args.compression or args.inject or args.profile
                or args.hv or pinned):
            raise UsageError("--variant-json runs one exact variant: no SCENARIO, --matrix, "
                             "--compression, --inject, --profile, --hv or --src/--dst-qemu")
        vdoc = load_variant_file(args.variant_json)
        variant = Variant.from_json(vdoc["variant"])
    elif args.matrix:
        if args.scenarios or args.compression or args.profile or args.hv or pinned:
            raise UsageError("--matrix sets scenarios, compression, profiles and binaries itself: "
                             "drop SCENARIO/--compression/--profile/--hv/--src-qemu/--dst-qemu "
                             "(its axes qemu and dst_qemu name binaries)")
        matrix = load_matrix(args.matrix)
    elif args.matrix_part != "split":
        raise UsageError("--matrix-part goes with --matrix")
    else:
        variants = expand(args.scenarios, args.compression, knobs, inject=args.inject,
                          guest_mode_retries=args.guest_mode_retries)
    sigs = [] if args.no_known_issues else known.load(args.known_issues or known.DEFAULT_FILE)
    image = L1Image.from_json(vdoc["image"]) if vdoc and vdoc.get("image") else None
    kernel = None if image else find_kernel(args.kernel, args.modules)
    # Paths the run names join the inventory: the matrix's qemu axes, a replayed variant's own.
    extra: list[str | None] = [getattr(args, "src_qemu", None), getattr(args, "dst_qemu", None)]
    extra += matrix_paths(matrix) if matrix is not None else []
    if vdoc is not None and variant.qemu is not None:
        # Gone from this host: the engine skips it, saying which binary is missing.
        extra += [p for p in (variant.qemu.src, variant.qemu.dst) if Path(p).exists()]
    facts = probe_host(args.accel, getattr(args, "qemu", None), extra=extra)
    out = prepare_out(args.out)
    warn_if_emulated(facts)
    if vdoc and vdoc.get("qemu") and vdoc["qemu"].get("version") not in (None, facts.qemu.version):
        print(f"nestvirt: warning: variant ran on QEMU {vdoc['qemu']['version']}, this one is "
              f"{facts.qemu.version} ({facts.qemu.binary})", file=sys.stderr)
    hostvm_part = None
    if matrix is not None:
        part = "here" if args.matrix_part == "split" else args.matrix_part
        plan = expand_matrix(matrix, facts, inject=args.inject, part=part)
        hostvm_part = _hostvm_part(args, matrix) if args.matrix_part == "split" else None
    elif vdoc is not None:
        # The bundle's id (without a repeat's "#k"), so the re-run reads like the original.
        vid = (vdoc.get("id") or matrix_id(variant)).split("#")[0]
        plan = Plan("variant", str(args.variant_json),
                    (PlannedVariant(0, vid, variant, needs(variant.spec), str(args.variant_json)),))
    else:
        profile = resolve_profile(args.profile, args.hv, l1_nested=facts.l1_nested,
                                  vendor=facts.vendor)
        planned = plan_variants(variants or [], facts, getattr(args, "src_qemu", None),
                                getattr(args, "dst_qemu", None))
        plan = plan_from_variants(apply_profile(planned, profile, l1_nested=facts.l1_nested,
                                                vendor=facts.vendor), "suite", "command line")
    if matrix is not None and args.guest_mode_retries != GUEST_MODE_RETRIES:
        plan = replace(plan, variants=tuple(
            replace(pv, variant=replace(pv.variant, guest_mode_retries=args.guest_mode_retries))
            for pv in plan.variants))
    budget = HostBudget()
    if facts.accel == "kvm":
        plan = fit_kvm_vcpus(plan, budget.cpus)
    parallel = args.jobs if args.jobs else (budget.cpus if args.jobs == 0 else 1)
    check_injects((pv.variant for pv in plan.variants), opts["dst_host"], parallel)
    if image is None:
        assert kernel is not None
        image = build_l1(kernel, build_tools())
    dst = opts["dst_host"]
    jobs = make_jobs(plan, repeat, out, facts.to_json(), image.to_json(), signatures_json(sigs),
                     run={"dst_host": dst.to_json() if dst else None,
                          "stall_timeout": opts["stall_timeout"], "start": opts["start"]})
    run_info = run_record(out, image=image.to_json(), jobs=parallel, repeat=repeat,
                          until_fail=args.until_fail,
                          budget={"cpus": budget.cpus, "mem_reserve_mib": budget.mem_reserve_mib})
    extra: dict[str, Any] = {"matrix": {"name": plan.name, "source": plan.source,
                                        "variants": len(plan.variants),
                                        "part": getattr(args, "matrix_part", "split"),
                                        "in_hostvm": len(hostvm_part.combos) if hostvm_part
                                        else 0},
                             "pruned": [p.to_json() for p in plan.pruned]}
    print(f"nestvirt: {plan.name}: {len(plan.variants)} variant(s)"
          + (f" x {repeat} attempts" if repeat > 1 else "")
          + (f", {len(plan.pruned)} pruned" if plan.pruned else "")
          + (f", {len(hostvm_part.combos)} combination(s) after them in the KVM host VM"
             if hostvm_part else "")
          + f"; {parallel} at once, host budget {budget.cpus} CPU(s)", file=sys.stderr)
    host = facts.to_json()
    records: dict[tuple[int, int], dict[str, Any]] = {}
    t0 = time.monotonic()
    stop: dict[str, Any] = {}
    inside: list[ScenarioResult] = []  # the host VM part's results, after this host's

    def save() -> list[ScenarioResult]:
        ordered = [records[k] for k in sorted(records)]
        results = [ScenarioResult.from_json(r["result"]) for r in ordered] + inside
        if repeat > 1:
            extra["repeats"] = failure_rates(ordered)
        if stop:
            extra["until_fail"] = stop
        run_info["seconds"] = round(time.monotonic() - t0, 2)
        write_results(out, host, results, run_info, extra)
        return results

    def on_done(job: Job, record: dict[str, Any]) -> bool:
        records[(job.index, job.attempt)] = record
        print(progress_line(len(records), len(jobs), time.monotonic() - t0, record),
              file=sys.stderr, flush=True)
        save()
        if args.until_fail and record["result"]["verdict"] in FAILURE_VERDICTS and not stop:
            stop.update({"id": job.id.split("#")[0], "attempt": job.attempt, "of": repeat,
                         "verdict": record["result"]["verdict"]})
            return False
        return True

    try:
        run_jobs(jobs, parallel=parallel, budget=budget, on_done=on_done)
        if hostvm_part is not None and not stop:
            inner_host, got, info = hostvm_part.run(out)
            inside.extend(got)
            # The host VM's identity and how it went, its inner probe as the part's host.
            extra["hostvm"] = {**info["hostvm"], "host": inner_host, "seconds": info["seconds"],
                               "inner": info.get("inner"),
                               "results": str(out / hostvm_part.subdir / "results.json")}
    finally:
        # Reached on Ctrl-C too: what finished is kept, and every view is written from it.
        results = save()
        write_views(out / "results.json")
        link_latest(out)
    if args.json:
        print((out / "results.json").read_text())
    else:
        print(console_summary(json.loads((out / "results.json").read_text()), results))
        print(f"results: {out / 'results.json'}")
    if vdoc is not None and vdoc.get("original") and results:
        print(compare_failure(vdoc["original"], results[-1]))
    return exit_status(results)


class _HostVMPart:
    """A matrix's in_hostvm combinations, bound to their host VM (made before any run)."""

    def __init__(self, args: argparse.Namespace, matrix: Any) -> None:
        from harness.hostvm.command import HOSTVM_PART_DIR, prepare_from

        self.args, self.matrix = args, matrix
        self.combos = combination_scenarios(matrix, "hostvm")
        self.subdir = HOSTVM_PART_DIR
        # Its options checked and its image built now: bad input is said before anything runs.
        self.prepared = prepare_from(args)

    def run(self, out: Path) -> tuple[dict[str, Any], list[ScenarioResult], dict[str, Any]]:
        from harness.hostvm.command import run_matrix_hostvm_part

        return run_matrix_hostvm_part(self.args, self.args.raw_argv, self.prepared, out,
                                      self.matrix_text(), self.combos)

    def matrix_text(self) -> str:
        return Path(self.matrix.source).read_text()


def _hostvm_part(args: argparse.Namespace, matrix: Any) -> _HostVMPart | None:
    from harness.matrix.files import has_hostvm_part

    if not has_hostvm_part(matrix):
        return None
    if getattr(args, "dst_host", None):
        raise UsageError("in_hostvm combinations do not combine with --dst-host")
    if getattr(args, "accel", None) == "tcg":
        raise UsageError("in_hostvm combinations run with --accel kvm in the host VM; drop "
                         "--accel tcg or run --matrix-part here")
    return _HostVMPart(args, matrix)


def fit_kvm_vcpus(plan: Plan, cpus: int) -> Plan:
    """Under KVM a vCPU is a host thread that runs when its guest does, not a core TCG keeps
    busy: a variant with more vCPUs than the host has CPUs still runs (alone: it holds them
    all), where under TCG it is skipped. The one-vCPU KVM host VM runs dirty-ring's 2-vCPU L1
    this way."""
    fitted = tuple(replace(pv, needs=replace(pv.needs, cpus=min(pv.needs.cpus, cpus)))
                   for pv in plan.variants)
    return replace(plan, variants=fitted)


def matrix_paths(matrix: Any) -> list[str]:
    """Binary paths a matrix's qemu / dst_qemu axes name (they join the inventory)."""
    from harness.matrix.files import QEMU_AXES

    return [v for block in matrix.blocks for k in QEMU_AXES for v in block.get(k, [])
            if isinstance(v, str) and "/" in v]


def make_jobs(plan: Plan, repeat: int, out: Path, host: dict[str, Any], image: dict[str, Any],
              signatures: Iterable[dict[str, Any]],
              run: Mapping[str, Any] | None = None) -> list[Job]:
    """Attempt-major order (every variant once, then again), so --until-fail spreads its tries
    across variants and a run cut short still covers each one."""
    jobs = []
    sigs = tuple(signatures)
    for attempt in range(1, repeat + 1):
        for pv in plan.variants:
            jid = pv.id if repeat == 1 else f"{pv.id}#{attempt}"
            jobs.append(Job(index=pv.index, attempt=attempt, id=jid,
                            variant=pv.variant.to_json(),
                            out=str(job_out(out, jid, pv.variant.id)), host=host, image=image,
                            needs=pv.needs, signatures=sigs, of=repeat, run=dict(run or {})))
    return jobs


def progress_line(done: int, total: int, elapsed: float, record: Mapping[str, Any]) -> str:
    """One line per finished variant: "[ 3/12  1:05] id VERDICT 18.2s reason"."""
    r = record["result"]
    m, s = divmod(int(elapsed), 60)
    took = r.get("durations", {}).get("total")
    took_s = f" {took:.1f}s" if isinstance(took, (int, float)) else ""
    why = f"  {r['reason'][:90]}" if r.get("reason") else ""
    width = len(str(total))
    return f"[{done:>{width}}/{total} {m:d}:{s:02d}] {r['id']} {r['verdict'].upper()}{took_s}{why}"


def failure_rates(records: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per variant over its attempts: runs, fails (fail+error+known-issue), rate, first fail.

    Skips are not runs (nothing was judged). ``rate`` is fails/runs, None without runs.
    """
    by: dict[int, dict[str, Any]] = {}
    for rec in records:
        r = rec["result"]
        row = by.setdefault(rec["index"], {
            "id": rec["id"].split("#")[0], "runs": 0, "fails": 0, "passes": 0, "skips": 0,
            "known_issues": 0, "errors": 0, "first_fail_attempt": None, "verdicts": []})
        v = r["verdict"]
        row["verdicts"].append(v)
        if v == "skip":
            row["skips"] += 1
            continue
        row["runs"] += 1
        if v == "pass":
            row["passes"] += 1
        if v in FAILURE_VERDICTS:
            row["fails"] += 1
            row["known_issues"] += v == "known-issue"
            row["errors"] += v == "error"
            if row["first_fail_attempt"] is None or rec["attempt"] < row["first_fail_attempt"]:
                row["first_fail_attempt"] = rec["attempt"]
    out = []
    for _, row in sorted(by.items()):
        row["rate"] = round(row["fails"] / row["runs"], 3) if row["runs"] else None
        out.append(row)
    return out


def console_summary(doc: Mapping[str, Any], results: list[ScenarioResult]) -> str:
    """The console table plus what a matrix run adds: pruned, failure rates, until-fail."""
    from harness.results.views import console_table

    lines = [console_table(results)]
    pruned = doc.get("pruned") or []
    if pruned:
        lines.append(f"pruned (invalid combinations, not run): {len(pruned)}")
        if len(pruned) <= PRUNED_LISTED:
            lines += [f"  {p['id']}: {p['reason']}" for p in pruned]
        else:
            counts: dict[str, int] = {}
            for p in pruned:
                counts[p["reason"]] = counts.get(p["reason"], 0) + 1
            lines += [f"  {n} x {why}" for why, n in sorted(counts.items(), key=lambda x: -x[1])]
            lines.append("  (every one with its id in results.json \"pruned\")")
    reps = doc.get("repeats") or []
    if reps:
        lines.append("failure rate per variant:")
        w = max(len(r["id"]) for r in reps)
        lines.append(f"  {'VARIANT'.ljust(w)}  RUNS  FAILS  RATE   FIRST-FAIL")
        for r in reps:
            rate = "-" if r["rate"] is None else f"{100 * r['rate']:.0f}%"
            first = r["first_fail_attempt"] or "-"
            lines.append(f"  {r['id'].ljust(w)}  {r['runs']:>4}  {r['fails']:>5}  {rate:>4}   "
                         f"{first}")
    stop = doc.get("until_fail")
    if stop:
        lines.append(f"until-fail: {stop['id']} was {stop['verdict']} on attempt {stop['attempt']} "
                     f"(of at most {stop['of']}); stopped there")
    elif doc.get("run", {}).get("until_fail"):
        lines.append(f"until-fail: no failure in {doc['run'].get('repeat')} attempt(s) per variant")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# merging runner records (pytest workers, avocado tasks)


def merge_records(records: list[Mapping[str, Any]], out: Path, run_info: dict[str, Any],
                  extra: dict[str, Any] | None = None, name: str = "results.json") -> Path:
    """Write one results.json from per-variant records, in input order."""
    ordered = sorted(records, key=lambda r: (r.get("index", 0), r.get("attempt", 1)))
    results = [ScenarioResult.from_json(r["result"]) for r in ordered]
    host = ordered[0]["host"] if ordered else {}
    if ordered and "image" not in run_info:
        run_info = {**run_info, "image": ordered[0].get("image")}
    extra = dict(extra or {})
    if any(r.get("of", 1) > 1 for r in ordered):
        extra.setdefault("repeats", failure_rates(list(ordered)))
    # Written beside, then moved: an avocado job dir has a results.json of its own.
    with tempfile.TemporaryDirectory(dir=out, prefix=".merge-") as tmp:
        return write_results(Path(tmp), host, results, run_info, extra).replace(out / name)


# --------------------------------------------------------------------------------------------
# matrix and report commands


def add_commands(sub: Any) -> None:
    """The `matrix` and `report` subcommands (sub: the parser's subparsers)."""
    m = sub.add_parser("matrix", help="expand a matrix file: variants, pruned ones and why")
    m.add_argument("file", type=Path, metavar="FILE")
    m.add_argument("--accel", default="auto", choices=("auto", "kvm", "tcg"))
    m.add_argument("--json", action="store_true")
    m.add_argument("--avocado-recipe", type=Path, metavar="OUT.json",
                   help="write an avocado runnables recipe: `avocado run OUT.json`")
    m.add_argument("--kernel", help="L1 kernel image for the recipe's runs")
    m.add_argument("--modules", help="module tree for --kernel")
    m.add_argument("--known-issues", type=Path, metavar="FILE")
    m.add_argument("--no-known-issues", action="store_true")
    m.add_argument("--qemu", metavar="NAME|PATH",
                   help="the binary of variants whose block names none (default: the newest)")
    rp = sub.add_parser("report", help="views of a results.json: console, --html, --tap, --junit")
    rp.add_argument("results", type=Path, metavar="RESULTS",
                    help="a results.json, or a directory of per-variant records to merge "
                         "(a pytest --nestvirt-out dir, an avocado job dir)")
    rp.add_argument("--html", type=Path, metavar="OUT.html")
    rp.add_argument("--tap", nargs="?", const=Path(""), type=Path, metavar="OUT.tap",
                    help="TAP 13 (default: results.tap beside RESULTS)")
    rp.add_argument("--junit", nargs="?", const=Path(""), type=Path, metavar="OUT.xml",
                    help="JUnit XML (default: junit.xml beside RESULTS)")


def cmd_matrix(args: argparse.Namespace) -> int:
    from harness.qemu.inventory import probe_host

    spec = load_matrix(args.file)
    facts = probe_host(args.accel, args.qemu, extra=matrix_paths(spec))
    plan = expand_matrix(spec, facts)
    if args.avocado_recipe:
        from harness.guest.image import build_l1, build_tools
        from harness.guest.kernel import find_kernel
        from harness.matrix.recipe import write_recipe

        sigs = [] if args.no_known_issues else known.load(args.known_issues or known.DEFAULT_FILE)
        image = build_l1(find_kernel(args.kernel, args.modules), build_tools())
        write_recipe(args.avocado_recipe, plan, facts.to_json(), image.to_json(),
                     signatures_json(sigs))
        print(f"avocado recipe: {args.avocado_recipe} ({len(plan.variants)} tests); run it with "
              f"`avocado run {args.avocado_recipe}`", file=sys.stderr)
    if args.json:
        print(json.dumps(plan.to_json(), indent=2))
        return 0
    print(f"{plan.name}: {len(plan.variants)} variant(s), {len(plan.pruned)} pruned")
    for pv in plan.variants:
        print(f"  {pv.id}  ({pv.needs.cpus} CPU, {pv.needs.mem_mib} MiB)")
    for p in plan.pruned:
        print(f"  PRUNED {p.id}: {p.reason}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    path: Path = args.results
    if path.is_dir():
        records = collect_records(path)
        if records:
            plan_file = next(iter(path.rglob("nestvirt-plan.json")), None)
            extra = {}
            if plan_file is not None:
                extra = {k: v for k, v in json.loads(plan_file.read_text()).items()
                         if k in ("pruned", "matrix")}
            path = merge_records(records, path, {"merged_from": str(path)}, extra,
                                 name="nestvirt-results.json")
        elif (path / "results.json").is_file():
            path = path / "results.json"
        else:
            raise UsageError(f"{path}: no results.json and no record.json under it")
    try:
        doc, results = load_results(path)
    except ValueError as e:
        raise UsageError(str(e)) from e
    outputs = []
    if args.html or args.tap is not None or args.junit is not None:
        from harness.results.html import render_html
        from harness.results.views import junit_xml

        if args.html:
            args.html.write_text(render_html(doc, base_dir=args.html.parent))
            outputs.append(args.html)
        default_junit, default_tap, _ = view_paths(path)
        if args.tap is not None:
            t = args.tap if str(args.tap) not in ("", ".") else default_tap
            t.write_text(tap(results, name=tap_name))
            outputs.append(t)
        if args.junit is not None:
            j = args.junit if str(args.junit) not in ("", ".") else default_junit
            j.write_text(junit_xml(results))
            outputs.append(j)
    print(console_summary(doc, results))
    for o in outputs:
        print(f"wrote {o}")
    return 0
