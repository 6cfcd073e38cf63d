"""`nestvirt hostvm status|build|boot` and the `--in-hostvm` options of `run`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from harness.core import slow
from harness.core.errors import UsageError
from harness.hostvm.vm import DEFAULT_MEM_MIB, DEFAULT_SMP, DEFAULT_TCG_THREAD, TCG_THREADS


def add_hostvm_options(p: argparse.ArgumentParser) -> None:
    """The host VM's shape, for `hostvm` and `run --in-hostvm`."""
    p.add_argument("--hostvm-mem", type=int, default=DEFAULT_MEM_MIB, metavar="MIB",
                   help=f"host VM memory (default {DEFAULT_MEM_MIB}: two inner L1s at once)")
    p.add_argument("--hostvm-smp", type=int, default=DEFAULT_SMP, metavar="N",
                   help=f"host VM vCPUs (default {DEFAULT_SMP})")
    p.add_argument("--hostvm-cpu", default="max", metavar="MODEL",
                   help="host VM -cpu under TCG (default max: nested SVM with NPT)")
    p.add_argument("--hostvm-tcg-thread", default=DEFAULT_TCG_THREAD, choices=TCG_THREADS,
                   help=f"TCG vCPU threading of the host VM (default {DEFAULT_TCG_THREAD})")
    p.add_argument("--hostvm-npt", choices=("on", "off"), default="on",
                   help="the host VM's KVM on TCG's nested paging (on) or shadow paging (off)")
    p.add_argument("--hostvm-kvm-amd", metavar="OPT=V[,OPT=V]", default="",
                   help="more kvm_amd options in the host VM (e.g. vls=0,vgif=0: leave one of "
                   "TCG's emulated SVM features unused)")
    p.add_argument("--hostvm-qemu", metavar="NAME|PATH",
                   help="the outer QEMU (default: the inventory's newest)")
    p.add_argument("--hostvm-deadline", type=float, metavar="S",
                   help="bound on the whole host VM run (default: from the variant count)")
    p.add_argument("--hostvm-no-cache", action="store_true",
                   help="boot without the cache disk: the inner run builds its saved L1 "
                   "images afresh and keeps none")


def add_command(sub: argparse._SubParsersAction) -> None:
    h = sub.add_parser("hostvm", help="the KVM host VM (TCG-booted, nested SVM): status, "
                       "build its image, boot it and print its inner probe",
                       description="A Linux booted here under TCG with -cpu max whose KVM "
                       "(kvm-amd, nested=1) runs nestvirt's KVM paths: `nestvirt run "
                       "--in-hostvm` runs scenarios inside it with --accel kvm.")
    h.add_argument("action", choices=("status", "build", "boot"))
    h.add_argument("--kernel", help="host VM and L1 kernel (default: as `run`)")
    h.add_argument("--modules", help="module tree for --kernel")
    h.add_argument("--out", type=Path, help="results directory for boot (default results/<time>)")
    h.add_argument("--json", action="store_true")
    add_hostvm_options(h)


def prepare_from(args: argparse.Namespace, build: bool = True,
                 extra_trees: tuple[Path, ...] = ()):
    from harness.hostvm.prepare import prepare

    return prepare(kernel=getattr(args, "kernel", None), modules=getattr(args, "modules", None),
                   qemu=args.hostvm_qemu, mem_mib=args.hostvm_mem, smp=args.hostvm_smp,
                   cpu=args.hostvm_cpu, tcg_thread=args.hostvm_tcg_thread,
                   npt=args.hostvm_npt == "on",
                   kvm_amd=tuple(o for o in args.hostvm_kvm_amd.split(",") if o),
                   build=build, extra_trees=extra_trees)


def cmd_hostvm(args: argparse.Namespace) -> int:
    from harness.core.errors import SetupError

    if args.action == "status":
        try:
            p = prepare_from(args, build=False)
        except SetupError as e:
            print(json.dumps({"ready": False, "why": str(e)}) if args.json else f"not ready: {e}")
            return 1
        doc = {"ready": True, **p.spec.to_json()}
        print(json.dumps(doc, indent=2) if args.json else
              f"ready: image {p.spec.image.path} ({p.spec.image.files} files, "
              f"{p.spec.image.bytes >> 20} MiB), QEMU {p.spec.qemu_version}, "
              f"{p.spec.mem_mib} MiB, {p.spec.smp} vCPUs")
        return 0
    t0 = time.monotonic()
    p = prepare_from(args)
    if args.action == "build":
        print(json.dumps({**p.spec.to_json(), "seconds": p.seconds, "built": p.built}, indent=2)
              if args.json else f"host VM image {p.spec.image.path}: "
              f"{'built' if p.built else 'up to date'} in {time.monotonic() - t0:.1f}s "
              f"({p.spec.image.files} files, {p.spec.image.bytes >> 20} MiB)")
        return 0
    return _boot(p, args)


def _boot(p, args: argparse.Namespace) -> int:
    """Boot once, run the inner probe (`doctor --accel kvm --json`), print it and the timings."""
    from harness.hostvm.job import render_job
    from harness.hostvm.vm import run_job
    from harness.results.record import prepare_out

    out = prepare_out(args.out)
    job = render_job(["doctor", "--accel", "kvm", "--json"], trace=False,
                     stdout="/results/doctor.json", mtimes=p.mtimes)
    o = run_job(p.spec, {"job.sh": job}, out / "hostvm", deadline_s=slow.scaled(180),
                results=out / "hostvm" / "readback")
    doc = {"hostvm": p.spec.to_json(), "outcome": o.to_json()}
    probe = out / "hostvm" / "readback" / "doctor.json"
    if o.status == "ok" and probe.exists():
        doc["inner_probe"] = json.loads(probe.read_text() or "{}")
    (out / "hostvm.json").write_text(json.dumps(doc, indent=2))
    if o.status != "ok" or o.job_rc:
        why = o.reason or f"inner probe exited {o.job_rc}"
        print(f"nestvirt: host VM: {why}", file=sys.stderr)
        for ln in o.console_tail[-5:]:
            print(f"  {ln}", file=sys.stderr)
        return 2 if o.status == "fatal" else 1
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        ip = doc.get("inner_probe", {})
        caps = ip.get("kvm", {}).get("caps", {})
        print(f"host VM ready in {o.seconds.get('boot_to_ready')}s (total "
              f"{o.seconds.get('total')}s): inner accel {ip.get('accel')}, "
              f"{ip.get('kvm', {}).get('module')} nested={ip.get('kvm', {}).get('nested_param')}, "
              f"caps {', '.join(k for k, v in caps.items() if v)}; {out / 'hostvm.json'}")
    return 0


def cmd_run_in_hostvm(args: argparse.Namespace, raw: list[str], *,
                      matrix_text: str | None = None,
                      matrix_combos: Sequence[str] = ()) -> int:
    """`run --in-hostvm`: bad input checked here first, then one host VM for every variant.
    With a matrix file (read and checked by the caller: ``matrix_text`` and the scenario of
    each of its combinations), the file travels in the job and the inner run reads it from there."""
    from harness.core import slow
    from harness.hostvm.job import JOB_DIR
    from harness.hostvm.run import inner_args, matrix_bound

    if getattr(args, "dst_host", None):
        raise UsageError("--in-hostvm does not combine with --dst-host")
    if getattr(args, "matrix", None) and matrix_text is None:
        raise UsageError("--in-hostvm --matrix: the matrix file was not read")
    if matrix_text is None:
        return cmd_in_hostvm(args, "run", inner_args(after_command(raw, "run")),
                             deadline_s=args.hostvm_deadline)
    # The whole file runs inside (the in_hostvm axis is moot there) unless a part was asked.
    part = getattr(args, "matrix_part", "split")
    inner = [*inner_args(after_command(raw, "run"), drop_valued=("--matrix", "--matrix-part")),
             "--matrix", f"{JOB_DIR}/matrix.yaml",
             "--matrix-part", "all" if part == "split" else part]
    bound = args.hostvm_deadline or slow.scaled(matrix_bound(matrix_combos, args.repeat or 1))
    return cmd_in_hostvm(args, "run", inner, deadline_s=bound,
                         job_files={"matrix.yaml": matrix_text})


HOSTVM_PART_DIR = "in-hostvm"


def run_matrix_hostvm_part(args: argparse.Namespace, raw: list[str], prepared, out: Path,
                           matrix_text: str, combos: Sequence[str]):
    """The in_hostvm combinations of a matrix run here: one host VM boot runs them with
    ``--matrix-part hostvm --accel kvm``; its results.json lands in OUT/in-hostvm and its
    results are returned (host facts of the inner probe, results, run info) for the outer run
    to merge. ``prepared``: the host VM, made (and its options checked) before anything ran."""
    from harness.core import slow
    from harness.hostvm.job import JOB_DIR
    from harness.hostvm.run import inner_args, matrix_bound, run_in_hostvm

    inner = [*inner_args(after_command(raw, "run"), drop_valued=("--matrix", "--matrix-part")),
             "--matrix", f"{JOB_DIR}/matrix.yaml", "--matrix-part", "hostvm"]
    bound = args.hostvm_deadline or slow.scaled(matrix_bound(combos, args.repeat or 1))
    if not args.json:
        print(f"nestvirt: {len(combos)} combination(s) in the KVM host VM: QEMU "
              f"{prepared.spec.qemu_version} TCG -cpu {prepared.spec.cpu}, "
              f"{prepared.spec.mem_mib} MiB, {prepared.spec.smp} vCPUs", file=sys.stderr)

    part_out = out / HOSTVM_PART_DIR
    part_out.mkdir(parents=True, exist_ok=True)
    return run_in_hostvm(prepared, inner, part_out, deadline_s=bound,
                         job_files={"matrix.yaml": matrix_text},
                         on_event=None if args.json else show_event,
                         cache=not getattr(args, "hostvm_no_cache", False))


def show_event(ev: dict[str, str]) -> None:
    """The host VM's milestones and its cache disk, one line each on stderr."""
    if ev["event"] in ("ready", "job-done", "fatal"):
        print(f"nestvirt: host VM {ev['event']} at {ev['t']}s", file=sys.stderr)
    elif ev["event"] == "cache":
        print("nestvirt: host VM cache disk: "
              + (f"{ev.get('images')} saved L1 images, {ev.get('free_mib')} MiB free"
                 if ev.get("mounted") == "1" else f"not mounted ({ev.get('error')})"),
              file=sys.stderr)


def after_command(raw: list[str], command: str) -> list[str]:
    """What the user typed after the command's name (all of it when the name is absent)."""
    return raw[raw.index(command) + 1:] if command in raw else list(raw)


def cmd_in_hostvm(args: argparse.Namespace, command: str, inner: list[str], *,
                  deadline_s: float | None, extra_trees: tuple[Path, ...] = (),
                  notes: list[str] | None = None,
                  job_files: dict[str, str] | None = None) -> int:
    """`COMMAND --in-hostvm`: one host VM runs `nestvirt COMMAND --accel kvm INNER`; its
    results come back into --out in the one schema. Exit 2 when the host VM itself failed."""
    from harness.hostvm.run import run_in_hostvm
    from harness.results.record import exit_status, link_latest, prepare_out
    from harness.results.views import console_table, junit_xml

    if getattr(args, "accel", None) == "tcg":
        raise UsageError("--in-hostvm runs with --accel kvm inside the host VM; drop --accel tcg")
    p = prepare_from(args, extra_trees=extra_trees)
    out = prepare_out(args.out)
    for note in notes or [] if not args.json else []:
        print(f"nestvirt: {note}", file=sys.stderr)
    if not args.json:
        print(f"nestvirt: host VM: QEMU {p.spec.qemu_version} TCG -cpu {p.spec.cpu}, "
              f"{p.spec.mem_mib} MiB, {p.spec.smp} vCPUs; inside: {command} --accel kvm "
              f"{' '.join(inner)}", file=sys.stderr)

    _, results, _ = run_in_hostvm(p, inner, out, command=command, deadline_s=deadline_s,
                                  job_files=job_files,
                                  on_event=None if args.json else show_event,
                                  cache=not getattr(args, "hostvm_no_cache", False))
    (out / "junit.xml").write_text(junit_xml(results))
    link_latest(out)
    fatal = results and results[0].id == "hostvm" and \
        results[0].metrics.get("hostvm_outcome", {}).get("status") == "fatal"
    if args.json:
        print((out / "results.json").read_text())
    else:
        print(console_table(results))
        _print_vmexit_figures(results)
        print(f"results: {out / 'results.json'}")
    if fatal:
        print(f"nestvirt: error: {results[0].reason}", file=sys.stderr)
        return 2
    return exit_status(results)


def _print_vmexit_figures(results) -> None:
    from harness.vmexit.plan import SCENARIO
    from harness.vmexit.stats import figures_table

    for r in results:
        if r.scenario == SCENARIO and r.metrics.get("figures") is not None:
            print(figures_table(r))


# Bounds on the whole host VM run for the other commands (the host VM's boot and the inner
# Python's start included): per selftest, its own deadline plus its process's start under TCG.
SELFTEST_START_S = 15
SELFTEST_FIXED_S = 240
VMEXIT_BOUND_S = 1500
# vmexit's KVM loop sizes are for hardware; in the host VM a nested exit runs through TCG
# (measured: see README), so a run the user did not size gets these.
HOSTVM_VMEXIT_DEFAULTS = {"--iters": "2000", "--reports": "6", "--repeat": "2"}


def cmd_selftest_in_hostvm(args: argparse.Namespace, raw: list[str], build, names: list[str],
                           timeout_s: float) -> int:
    """`selftest --in-hostvm`: the tests built here (cached) are carried into the host VM and
    run there with `selftest --on host` (the host VM's own KVM), unless --on l1 was typed."""
    from harness.hostvm.run import inner_args

    ok = [build.get(n) for n in names if build.get(n).ok]
    failed = [n for n in names if not build.get(n).ok]
    if not ok:
        raise UsageError("--in-hostvm: none of the selected selftests built")
    bins = build.dir / "bin" if (build.dir / "bin").is_dir() else build.dir
    inner = inner_args(after_command(raw, "selftest"),
                       drop_valued=("--kernel-tree", "--selftests", "--filter", "--timeout"))
    inner += ["--selftests", str(bins), "--filter", ",".join(t.name for t in ok),
              "--timeout", f"{timeout_s:g}"]
    if not any(a == "--on" or a.startswith("--on=") for a in inner):
        inner += ["--on", "host"]
    bound = args.hostvm_deadline or SELFTEST_FIXED_S + len(ok) * (timeout_s + SELFTEST_START_S)
    return cmd_in_hostvm(args, "selftest", inner, deadline_s=bound, extra_trees=(bins,),
                         notes=[f"not built, left out: {', '.join(failed)}"] if failed else [])


def cmd_vmexit_in_hostvm(args: argparse.Namespace, raw: list[str]) -> int:
    """`vmexit --in-hostvm`: the exit-cost loops on the host VM's KVM (SVM); the figures come
    back labelled emulated (the host VM's CPU is TCG)."""
    from harness.hostvm.run import inner_args

    inner = inner_args(after_command(raw, "vmexit"))
    for opt, value in HOSTVM_VMEXIT_DEFAULTS.items():
        if not any(a == opt or a.startswith(opt + "=") for a in inner):
            inner += [opt, value]
    return cmd_in_hostvm(args, "vmexit", inner,
                         deadline_s=args.hostvm_deadline or VMEXIT_BOUND_S)
