"""`nestvirt` command line: doctor, list, run, vmexit, selftest, bench. A thin adapter over the engines."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from harness.core import proc, scratch, slow
from harness.core.errors import SetupError, UsageError
from harness.matrix.engines import runner_for
from harness.results import known
from harness.results.record import link_latest, prepare_out, run_record
from harness.scenario.engine import RunContext
from harness.scenario.faults import INJECTIONS
from harness.scenario.result import ScenarioResult
from harness.scenario.spec import GUEST_MODE_RETRIES, Variant
from harness.scenario.suite import SCENARIOS, SMOKE, apply_profile, expand
from harness.vm.migration import COMPRESSION_MODES
from harness.vm.tls import TLS_MODES

if TYPE_CHECKING:
    from harness.host.probe import HostFacts


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2, no usage dump
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="nestvirt", description="Nested virtualization migration test harness.")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    d = sub.add_parser("doctor", help="probe this host and QEMU; print what runs here")
    d.add_argument("--accel", default="auto", choices=("auto", "kvm", "tcg"))
    d.add_argument("--json", action="store_true")
    _add_qemu_option(d)
    q = sub.add_parser("qemu", help="the QEMU binaries nestvirt knows (list), or fetch QEMU 10",
                       description="list: every QEMU binary nestvirt knows here (PATH, "
                       "NESTVIRT_QEMU, --qemu, the config file, fetched ones) with what each "
                       "offers; the newest is the default. fetch: Debian bookworm-backports' "
                       "QEMU into the cache (private apt configuration, nothing installed), "
                       "verified by starting it.")
    q.add_argument("action", nargs="?", choices=("list", "fetch"), default="list")
    q.add_argument("--json", action="store_true")
    q.add_argument("--refresh", action="store_true",
                   help="list: probe every binary again; fetch: download again")
    _add_qemu_option(q)
    ls = sub.add_parser("list", help="list scenarios and the smoke suite")
    ls.add_argument("--json", action="store_true")
    r = sub.add_parser("run", help="run scenarios (default: the smoke suite)")
    r.add_argument("scenarios", nargs="*", metavar="SCENARIO")
    r.add_argument("--compression", metavar="MODE",
                   help=f"one of {', '.join(COMPRESSION_MODES)} (default: every mode)")
    r.add_argument("--accel", default="auto", choices=("auto", "kvm", "tcg"))
    r.add_argument("--out", type=Path, help="results directory (default results/<time>)")
    r.add_argument("--json", action="store_true", help="print results.json instead of a table")
    r.add_argument("--kernel", help="L1 kernel image (default: NESTVIRT_KERNEL, host, Debian)")
    r.add_argument("--modules", help="module tree for --kernel (lib/modules/RELEASE)")
    r.add_argument("--channels", type=int, default=2, help="multifd channels")
    r.add_argument("--threads", type=int, default=2, help="legacy compress threads")
    r.add_argument("--decompress-threads", type=int, default=2)
    r.add_argument("--level", type=int, help="compression level of the chosen mode")
    r.add_argument("--wait-thread", choices=("on", "off"), default="on",
                   help="legacy compress-wait-thread")
    r.add_argument("--xbzrle-cache-mib", type=int, default=64)
    r.add_argument("--transport", choices=("tcp", "unix"), default="tcp")
    r.add_argument("--max-bandwidth-mib", type=int, default=0, metavar="MIB",
                   help="QEMU max-bandwidth in MiB/s (default 0: unthrottled); throttling forces "
                        "more passes and dirty syncs")
    r.add_argument("--downtime-limit-ms", type=int, metavar="MS",
                   help="QEMU downtime-limit (default: QEMU's own, 300): larger converges in "
                        "fewer dirty syncs")
    r.add_argument("--auto-converge", action="store_true",
                   help="QEMU's auto-converge capability: throttle the guest's vCPUs when it "
                        "dirties faster than the stream")
    r.add_argument("--profile", help="Hyper-V enlightenment profile for L1 (see templates/profiles.json)")
    r.add_argument("--hv", metavar="hv-a,hv-b,...", help="hv-* flags (laid over --profile)")
    r.add_argument("--known-issues", type=Path, metavar="FILE",
                   help="signatures of known failures (default ci/known-issues.json)")
    r.add_argument("--no-known-issues", action="store_true",
                   help="report every failure as fail, known or not")
    r.add_argument("--inject", choices=INJECTIONS,
                   help="deliberately break the run to prove a check catches it")
    _add_qemu_option(r)
    r.add_argument("--src-qemu", metavar="NAME|PATH",
                   help="the source's QEMU (default: --qemu, else the newest)")
    r.add_argument("--dst-qemu", metavar="NAME|PATH",
                   help="the destination's QEMU (default: the source's); a cross-version pair "
                        "runs the newest machine type both have")
    r.add_argument("--guest-mode-retries", type=int, default=GUEST_MODE_RETRIES, metavar="N",
                   help="under TCG, cancel and retry a live nested switchover that would land "
                        f"in guest mode up to N times (default {GUEST_MODE_RETRIES}; 0: report "
                        "QEMU's refusal)")
    r.add_argument("--tls", choices=TLS_MODES, default="none",
                   help="encrypt the migration: x509 (a CA, server and client certificates made "
                        "per run with certtool; verify-peer and an authz on the destination) or "
                        "psk (a pre-shared key made per run)")
    r.add_argument("--dst-host", metavar="USER@ADDR[:PORT]",
                   help="start each destination QEMU on this host over SSH (key only; its host "
                        "key must be in known_hosts), at the same path as --dst-qemu's here; "
                        "the migration goes to ADDR")
    r.add_argument("--dst-key", metavar="FILE",
                   help="private key for --dst-host (default: ssh-agent, then ~/.ssh keys)")
    r.add_argument("--dst-known-hosts", metavar="FILE",
                   help="known_hosts file with --dst-host's key (default ~/.ssh/known_hosts)")
    r.add_argument("--cold", action="store_true",
                   help="boot every L1 instead of restoring the saved, booted image of its "
                        "configuration (the checks are the same)")
    r.add_argument("--stall-timeout", type=float, default=15.0, metavar="S",
                   help="cancel a migration whose byte count has not moved for S seconds "
                        "(default 15; on a dead link TCP alone retries for ~15 min)")
    r.add_argument("--in-hostvm", action="store_true",
                   help="run inside the KVM host VM (booted here under TCG, nested SVM) with "
                        "--accel kvm: one host VM for every variant (see `nestvirt hostvm`)")
    from harness.hostvm.command import add_command as add_hostvm_command
    from harness.hostvm.command import add_hostvm_options

    add_hostvm_options(r)
    add_hostvm_command(sub)
    _add_vmexit_parser(sub)
    _add_selftest_parser(sub)
    # Matrix runs, parallel/repeated runs, replays (run options) and the matrix/report commands.
    from harness.matrix.batch import add_commands, add_run_options

    add_run_options(r)
    add_commands(sub)
    from harness.bench.command import add_command as add_bench_command

    add_bench_command(sub)
    return p


def _add_qemu_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--qemu", metavar="NAME|PATH",
                   help="the QEMU to use (a name from `nestvirt qemu`, newest, oldest, a version "
                        "such as 7.2, or a path); default: $NESTVIRT_QEMU, else the newest. "
                        "Pinned: never swapped for another binary")


def _add_vmexit_parser(sub: argparse._SubParsersAction) -> None:
    v = sub.add_parser("vmexit", help="measure nested vmexit cost per enlightenment profile")
    v.add_argument("--profile", action="append", default=[], metavar="NAME",
                   help="profile to compare (repeatable; 'none' is always measured as baseline)")
    v.add_argument("--hv", action="append", default=[], metavar="hv-a,hv-b,...",
                   help="an hv-* list measured as its own profile (repeatable)")
    v.add_argument("--reports", type=int, help="reports per loop run, the first is warm-up "
                   "(default 11 on KVM, 6 under TCG)")
    v.add_argument("--iters", type=int, help="exits per report (default 20000 on KVM, 500 under TCG)")
    v.add_argument("--repeat", type=int, help="repetitions per profile, interleaved (default 3)")
    v.add_argument("--no-migrate", action="store_true",
                   help="skip migrating the first profile's L1 and measuring again there")
    v.add_argument("--accel", default="auto", choices=("auto", "kvm", "tcg"))
    v.add_argument("--kernel", help="L1 kernel image (default: NESTVIRT_KERNEL, host, Debian)")
    v.add_argument("--modules", help="module tree for --kernel (lib/modules/RELEASE)")
    v.add_argument("--out", type=Path, help="results directory (default results/<time>)")
    v.add_argument("--json", action="store_true", help="print results.json instead of a table")
    _add_qemu_option(v)
    v.add_argument("--in-hostvm", action="store_true",
                   help="measure inside the KVM host VM with --accel kvm: real KVM (SVM) "
                        "exits, but the host VM's CPU is TCG, so every figure is labelled "
                        "emulated")
    from harness.hostvm.command import add_hostvm_options

    add_hostvm_options(v)


def _add_selftest_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("selftest", help="run the kernel's KVM selftests in L1 (or on the host)",
                       description="Build tools/testing/selftests/kvm statically (cached), run each "
                       "selected test in L1 with its own deadline, report pass/fail/skip/timeout. "
                       "Source: --selftests, else --kernel-tree, else Debian's linux-source "
                       "matching the kernel.")
    s.add_argument("--kernel", help="L1 kernel image (default: NESTVIRT_KERNEL, host, Debian)")
    s.add_argument("--modules", help="module tree for --kernel (lib/modules/RELEASE)")
    src = s.add_mutually_exclusive_group()
    src.add_argument("--kernel-tree", type=Path, metavar="DIR",
                     help="kernel source tree to build tools/testing/selftests/kvm from")
    src.add_argument("--selftests", type=Path, metavar="DIR",
                     help="directory of already built (static) selftest binaries")
    s.add_argument("--filter", action="append", default=[], metavar="NAMES|GLOBS",
                   help="tests to run: names or globs, comma-separated, repeatable (default: all)")
    s.add_argument("--timeout", type=float, metavar="S",
                   help="deadline per test in seconds (default: the tree's kvm/settings, else 120)")
    s.add_argument("--profile", help="Hyper-V enlightenment profile for L1's CPU")
    s.add_argument("--accel", default="auto", choices=("auto", "kvm", "tcg"))
    s.add_argument("--on", choices=("l1", "host"), default="l1",
                   help="l1: in the kernel under test, nested (default); host: on this host's "
                   "kernel, each test a skip with the probe's reason where it has no usable KVM")
    s.add_argument("--mem", type=int, default=2048, metavar="MIB",
                   help="L1 memory (default 2048: the memory tests map 1 GiB and more)")
    s.add_argument("--smp", type=int, default=1,
                   help="L1 vCPUs (default 1; 2 lets the tests that need two CPUs run, but under "
                   "TCG L1 then sometimes locks up and later tests time out)")
    s.add_argument("--list", action="store_true", help="list the built tests and stop")
    s.add_argument("--out", type=Path, help="results directory (default results/<time>)")
    s.add_argument("--json", action="store_true", help="print results.json instead of a table")
    _add_qemu_option(s)
    s.add_argument("--in-hostvm", action="store_true",
                   help="run inside the KVM host VM (booted here under TCG) with --accel kvm: "
                        "--on host there runs the tests against the host VM's own KVM (real "
                        "kvm-amd, not nested under the test's L1); built here first")
    from harness.hostvm.command import add_hostvm_options

    add_hostvm_options(s)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    # Private temp roots of runs that were killed (SIGKILL leaves them): their owners are gone.
    scratch.sweep()
    try:
        args = build_parser().parse_args(argv)
        args.raw_argv = list(sys.argv[1:] if argv is None else argv)
        slow.factor()  # a bad NESTVIRT_TIMEOUT_SCALE is refused before anything starts
        return {"doctor": cmd_doctor, "qemu": cmd_qemu, "list": cmd_list, "run": cmd_run,
                "vmexit": cmd_vmexit, "selftest": cmd_selftest, "matrix": cmd_matrix,
                "report": cmd_report, "bench": cmd_bench, "hostvm": cmd_hostvm}[args.cmd](args)
    except (UsageError, SetupError) as e:
        print(f"nestvirt: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        from harness.scenario.result import DISK_ERRNOS, failed_write

        if e.errno not in DISK_ERRNOS:
            raise
        # A results disk that filled or went read-only under a command that does not handle
        # it itself (plain `run` does, per scenario): one line, and what was written stays.
        print(f"nestvirt: error: out of disk: {failed_write(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nestvirt: interrupted", file=sys.stderr)
        return 130
    finally:
        proc.reap_all()


def _interrupt(signum: int, frame: object) -> None:
    # Ctrl-C and SIGTERM alike: stop, reap, keep what finished. A second signal must not
    # interrupt the teardown the first started.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    proc.note_interrupt()
    raise KeyboardInterrupt


def cmd_doctor(args: argparse.Namespace) -> int:
    from harness.host.probe import render_table
    from harness.qemu.inventory import inventory_rows, probe_host

    facts = probe_host(args.accel, args.qemu)
    if args.json:
        print(json.dumps(facts.to_json(), indent=2))
    else:
        print(render_table(facts))
        print("\n".join(inventory_rows(facts)))
    return 0


def cmd_qemu(args: argparse.Namespace) -> int:
    from harness.qemu.fetch import fetch
    from harness.qemu.inventory import load_inventory, newest, render_inventory, select

    if args.action == "fetch":
        if args.qemu:
            raise UsageError("qemu fetch takes no --qemu (it fetches Debian's)")
        got = fetch(refresh=args.refresh)
        if args.json:
            print(json.dumps({"dir": str(got.dir), "package_version": got.package_version,
                              "binary": got.binary, "module_dir": got.module_dir,
                              "firmware_dirs": list(got.firmware_dirs), "fresh": got.fresh},
                             indent=2))
        else:
            how = "fetched and verified" if got.fresh else "already in the cache"
            print(f"QEMU {got.package_version}: {how}: {got.binary}")
            for w in (got.verification.warnings if got.verification else ()):
                print(f"  warning: {w}")
        return 0
    inv = load_inventory([args.qemu] if args.qemu and "/" in args.qemu else [],
                         refresh=args.refresh)
    default = select(inv.qemus, args.qemu) if args.qemu else newest(inv.qemus)
    if args.json:
        print(json.dumps({**inv.to_json(), "default": default.binary if default else None},
                         indent=2))
    else:
        print(render_inventory(inv, default) if inv.qemus or inv.broken
              else "no QEMU found: install qemu-system-x86, run `nestvirt qemu fetch`, or "
                   "give --qemu PATH")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    smoke = [n for n, _ in SMOKE]
    if args.json:
        print(json.dumps({"scenarios": {n: s.description for n, s in SCENARIOS.items()},
                          "smoke": smoke, "compression": list(COMPRESSION_MODES)}, indent=2))
        return 0
    width = max(map(len, SCENARIOS))
    for name, spec in SCENARIOS.items():
        mark = "*" if name in smoke else " "
        print(f"{mark} {name.ljust(width)}  {spec.description}")
    print(f"(* in the smoke suite) compression modes: {', '.join(COMPRESSION_MODES)}")
    return 0




def _close_run(out: Path, host: dict, results: list[ScenarioResult], run_info: dict,
               t0: float) -> None:
    from harness.results.record import write_results
    from harness.results.views import junit_xml

    run_info["seconds"] = round(time.monotonic() - t0, 2)
    write_results(out, host, results, run_info)
    (out / "junit.xml").write_text(junit_xml(results))
    link_latest(out)


def _report_run(as_json: bool, out: Path, results: list[ScenarioResult]) -> int:
    from harness.results.record import exit_status
    from harness.results.views import console_table

    if as_json:
        print((out / "results.json").read_text())
    else:
        print(console_table(results))
        _print_figures(results)
        print(f"results: {out / 'results.json'}")
    return exit_status(results)


def cmd_run(args: argparse.Namespace) -> int:
    from harness.guest.image import build_l1, build_tools
    from harness.guest.kernel import find_kernel
    from harness.host.enlightenments import resolve_profile
    from harness.host.probe import warn_if_emulated
    from harness.matrix.batch import (
        check_injects,
        cmd_run_batch,
        mode_knobs,
        run_options,
        wants_batch,
    )
    from harness.qemu.inventory import probe_host
    from harness.results.record import write_results
    from harness.scenario.binaries import plan_variants
    from harness.scenario.result import DISK_ERRNOS, failed_write

    if args.guest_mode_retries < 0:
        raise UsageError("--guest-mode-retries must be 0 or more")
    if args.repeat is not None and args.repeat < 1:
        # 0 is falsy: unchecked it fell through to the plain run of the whole suite.
        raise UsageError(f"--repeat must be at least 1 (got {args.repeat})")
    if args.matrix_part != "split" and not args.matrix:
        raise UsageError("--matrix-part goes with --matrix")
    if args.in_hostvm:
        from harness.hostvm.command import cmd_run_in_hostvm

        # What the inner run would refuse is refused here, before a host VM boots.
        run_options(args)
        expand(args.scenarios, args.compression, mode_knobs(args), inject=args.inject,
               guest_mode_retries=args.guest_mode_retries)
        if args.matrix:
            # Checked here (a typo is one line before any boot); the text travels in the job.
            from harness.matrix.files import combination_scenarios, load_matrix

            matrix = load_matrix(args.matrix)
            part = "all" if args.matrix_part == "split" else args.matrix_part
            return cmd_run_in_hostvm(args, args.raw_argv,
                                     matrix_text=args.matrix.read_text(),
                                     matrix_combos=combination_scenarios(matrix, part))
        return cmd_run_in_hostvm(args, args.raw_argv)
    if wants_batch(args):
        return cmd_run_batch(args)
    knobs = mode_knobs(args)
    # Everything the user typed is checked before anything starts.
    opts = run_options(args)
    variants = expand(args.scenarios, args.compression, knobs, inject=args.inject,
                      guest_mode_retries=args.guest_mode_retries)
    check_injects(variants, opts["dst_host"])
    sigs = [] if args.no_known_issues else known.load(args.known_issues or known.DEFAULT_FILE)
    kernel = find_kernel(args.kernel, args.modules)
    facts = probe_host(args.accel, args.qemu, extra=(args.src_qemu, args.dst_qemu))
    variants = plan_variants(variants, facts, args.src_qemu, args.dst_qemu)
    if args.compression and (args.qemu or args.src_qemu or args.dst_qemu):
        # A feature asked for by name on a binary named by hand: a skip would hide the typo.
        refuse_pinned_lacks(variants, facts)
    out = prepare_out(args.out)
    profile = resolve_profile(args.profile, args.hv, l1_nested=facts.l1_nested, vendor=facts.vendor)
    variants = apply_profile(variants, profile, l1_nested=facts.l1_nested, vendor=facts.vendor)
    warn_if_emulated(facts)
    tools = build_tools()
    image = build_l1(kernel, tools)
    ctx = RunContext(host=facts, image=image, out=out, dst_host=opts["dst_host"],
                     stall_timeout=opts["stall_timeout"], start=opts["start"])
    run_info = run_record(out, image=image.to_json())
    if opts["dst_host"] is not None:
        run_info["dst_host"] = opts["dst_host"].label
    results: list[ScenarioResult] = []
    t0 = time.monotonic()
    unsaved: str | None = None
    try:
        for i, v in enumerate(variants, 1):
            if not args.json:
                el = int(time.monotonic() - t0)
                print(f"[{i}/{len(variants)} {el // 60}:{el % 60:02d}] {v.id} ...", file=sys.stderr,
                      flush=True)
            result = runner_for(v)(v, ctx)
            known.classify([result], sigs, facts.accel, facts.qemu.version)
            results.append(result)
            try:
                _write_repro(result, v, image.to_json(), facts.to_json())
                write_results(out, facts.to_json(), results, run_info)
            except OSError as e:
                if e.errno not in DISK_ERRNOS:
                    raise
                unsaved = failed_write(e)
                break  # the next variant would fill nothing but the same full disk
    finally:
        # Reached on Ctrl-C too: what finished is kept.
        try:
            _close_run(out, facts.to_json(), results, run_info, t0)
        except OSError as e:
            if e.errno not in DISK_ERRNOS:
                raise
            unsaved = unsaved or failed_write(e)
    if unsaved:
        # Nothing that could be written is lost: what the disk refused goes to the console.
        from harness.results.views import console_table

        print(console_table(results))
        print(f"nestvirt: error: --out {out} is full: {unsaved}; the {len(results)} result(s) "
              "above are complete only here", file=sys.stderr)
        return 2
    return _report_run(args.json, out, results)


def refuse_pinned_lacks(variants: list[Variant], facts: HostFacts) -> None:
    """UsageError naming the binary and what it lacks, for the first variant whose named
    (pinned) QEMU cannot run the mode that was asked for."""
    from harness.scenario.binaries import lacks

    for v in variants:
        plan = v.qemu
        if plan is None or not plan.pinned:
            continue
        src, dst = facts.binary(plan.src), facts.binary(plan.dst)
        if src is None or dst is None:
            continue
        missing = lacks(v.mode, plan, src, dst)
        if missing:
            binary = plan.src if v.mode.unsupported_reason(src) else plan.dst
            raise UsageError(f"--compression {v.mode.compression} on {binary}: {missing}")


def _write_repro(result: ScenarioResult, variant: Variant, image: dict, host: dict) -> None:
    """A failed variant leaves a repro bundle (variant.json, host.json, repro.sh) behind."""
    from harness.results.repro import BUNDLE_VERDICTS, write_bundle

    if result.verdict in BUNDLE_VERDICTS and result.artifacts.get("dir"):
        write_bundle(result, variant.to_json(), image, host)


def cmd_hostvm(args: argparse.Namespace) -> int:
    from harness.hostvm.command import cmd_hostvm as run_hostvm_command

    return run_hostvm_command(args)


def cmd_matrix(args: argparse.Namespace) -> int:
    from harness.matrix.batch import cmd_matrix as run_matrix_command

    return run_matrix_command(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from harness.bench.command import cmd_bench as run_bench_command

    return run_bench_command(args)


def cmd_report(args: argparse.Namespace) -> int:
    from harness.matrix.batch import cmd_report as run_report_command

    return run_report_command(args)


def _print_figures(results: list[ScenarioResult]) -> None:
    from harness.vmexit.plan import SCENARIO
    from harness.vmexit.stats import figures_table

    for r in results:
        if r.scenario == SCENARIO and r.metrics.get("figures") is not None:
            print(figures_table(r))


def cmd_vmexit(args: argparse.Namespace) -> int:
    from harness.guest.image import build_l1, build_tools
    from harness.guest.kernel import find_kernel
    from harness.host.enlightenments import dependency_problems, get_profile, parse_hv_list
    from harness.host.probe import warn_if_emulated
    from harness.qemu.inventory import probe_host
    from harness.vmexit.plan import check_numbers, default_plan, plan_profiles
    from harness.vmexit.run import run_vmexit

    # Everything the user typed is checked before anything starts (the probe starts QEMU).
    check_numbers(2 if args.reports is None else args.reports,
                  1 if args.iters is None else args.iters, 1 if args.repeat is None else args.repeat)
    for name in args.profile:
        get_profile(name)
    for hv in args.hv:
        problems = dependency_problems(parse_hv_list(hv))
        if problems:
            raise UsageError(f"enlightenments {hv}: " + "; ".join(problems))
    if args.in_hostvm:
        from harness.hostvm.command import cmd_vmexit_in_hostvm

        return cmd_vmexit_in_hostvm(args, args.raw_argv)
    kernel = find_kernel(args.kernel, args.modules)
    facts = probe_host(args.accel, args.qemu)
    out = prepare_out(args.out)
    profiles = plan_profiles(args.profile, args.hv, l1_nested=facts.l1_nested, vendor=facts.vendor)
    plan = default_plan(profiles, facts.accel, reports=args.reports, iters=args.iters,
                        repeat=args.repeat, migrate=not args.no_migrate)
    warn_if_emulated(facts)
    image = build_l1(kernel, build_tools())
    ctx = RunContext(host=facts, image=image, out=out)
    run_info = run_record(out, image=image.to_json())
    results: list[ScenarioResult] = []
    t0 = time.monotonic()
    try:
        results.append(run_vmexit(ctx, plan))
    finally:
        # Reached on Ctrl-C too: what finished is kept.
        _close_run(out, facts.to_json(), results, run_info, t0)
    return _report_run(args.json, out, results)


def cmd_selftest(args: argparse.Namespace) -> int:
    from harness.guest.image import build_l1, build_tools
    from harness.guest.kernel import find_kernel
    from harness.host.enlightenments import resolve_profile
    from harness.host.probe import warn_if_emulated
    from harness.qemu.inventory import probe_host
    from harness.results.record import exit_status, write_results
    from harness.results.views import junit_xml, tap
    from harness.selftests import run as st
    from harness.selftests.kselftest import select

    if args.timeout is not None and args.timeout <= 0:
        raise UsageError(f"--timeout {args.timeout:g}: must be more than 0")
    if args.mem < 256 or args.smp < 1:
        raise UsageError("--mem must be at least 256 (MiB) and --smp at least 1")
    kernel = find_kernel(args.kernel, args.modules)
    t0 = time.monotonic()
    build = st.resolve_build(kernel, args.kernel_tree, args.selftests,
                             lambda line: print(f"nestvirt: {line}", file=sys.stderr))
    setup_s = round(time.monotonic() - t0, 2)
    names, unmatched = select(build.names(), args.filter)
    if unmatched:
        raise UsageError(f"--filter {', '.join(unmatched)}: no such selftest in {build.source} "
                         "(see --list)")
    if args.list:
        for t in map(build.get, names):
            print(f"{t.name:36} {'built' if t.ok else 'BUILD FAILED: ' + t.error}")
        return 0
    if args.in_hostvm:
        from harness.hostvm.command import cmd_selftest_in_hostvm

        timeout = args.timeout or build.timeout_s or st.DEFAULT_TIMEOUT_S
        return cmd_selftest_in_hostvm(args, args.raw_argv, build, names, timeout)
    facts = probe_host(args.accel, args.qemu)
    out = prepare_out(args.out)
    profile = resolve_profile(args.profile, None, l1_nested=facts.l1_nested, vendor=facts.vendor)
    timeout = args.timeout or build.timeout_s or st.DEFAULT_TIMEOUT_S
    plan = st.SelftestPlan(build, tuple(names), timeout, args.on, profile, args.mem, args.smp)
    warn_if_emulated(facts)
    run_info = run_record(out, selftests=build.to_json(), on=args.on, timeout_s=timeout,
                          setup_seconds=setup_s, kernel=kernel.to_json())

    def progress(i: int, n: int, name: str) -> None:
        if not args.json:
            print(f"[{i}/{n}] {name} ...", file=sys.stderr, flush=True)

    t0 = time.monotonic()
    results: list[ScenarioResult] = []

    def done(r: ScenarioResult) -> None:  # results.json grows as tests finish (Ctrl-C keeps them)
        results.append(r)
        write_results(out, facts.to_json(), results, run_info)

    try:
        if args.on == "host":
            if st.host_unsupported(facts):
                print(f"nestvirt: {st.host_unsupported(facts)}", file=sys.stderr)
            results = st.run_on_host(plan, facts, out, progress, done)
        else:
            image = build_l1(kernel, build_tools())
            run_info["image"] = image.to_json()
            results = st.run_in_l1(plan, RunContext(host=facts, image=image, out=out), progress, done)
    finally:
        run_info["seconds"] = round(time.monotonic() - t0, 2)
        write_results(out, facts.to_json(), results, run_info)
        (out / "junit.xml").write_text(junit_xml(results, suite="kselftest-kvm"))
        (out / "results.tap").write_text(tap(results, st.tap_name))
        link_latest(out)
    if args.json:
        print((out / "results.json").read_text())
    else:
        print(st.summary_table(results))
        print(f"results: {out / 'results.json'} (TAP: results.tap, JUnit: junit.xml)")
    return exit_status(results)




if __name__ == "__main__":
    sys.exit(main())
