"""`nestvirt` command line: doctor, list, run. A thin adapter over probe, guests and the engine."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import NoReturn

from . import known, proc
from .errors import SetupError, UsageError
from .migration import COMPRESSION_MODES
from .scenario import INJECTIONS, RunContext, ScenarioResult, run_variant
from .suite import SCENARIOS, SMOKE, apply_profile, expand


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2, no usage dump
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="nestvirt", description="Nested virtualization migration test harness.")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    d = sub.add_parser("doctor", help="probe this host and QEMU; print what runs here")
    d.add_argument("--accel", default="auto", choices=("auto", "kvm", "tcg"))
    d.add_argument("--json", action="store_true")
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
    r.add_argument("--profile", help="Hyper-V enlightenment profile for L1 (see templates/profiles.json)")
    r.add_argument("--hv", metavar="hv-a,hv-b,...", help="hv-* flags (laid over --profile)")
    r.add_argument("--known-issues", type=Path, metavar="FILE",
                   help="signatures of known failures (default ci/known-issues.json)")
    r.add_argument("--no-known-issues", action="store_true",
                   help="report every failure as fail, known or not")
    r.add_argument("--inject", choices=INJECTIONS,
                   help="deliberately break the run to prove a check catches it")
    return p


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        args = build_parser().parse_args(argv)
        return {"doctor": cmd_doctor, "list": cmd_list, "run": cmd_run}[args.cmd](args)
    except (UsageError, SetupError) as e:
        print(f"nestvirt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nestvirt: interrupted", file=sys.stderr)
        return 130
    finally:
        proc.reap_all()


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def cmd_doctor(args: argparse.Namespace) -> int:
    from .probe import probe, render_table

    facts = probe(args.accel)
    print(json.dumps(facts.to_json(), indent=2) if args.json else render_table(facts))
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


def _writable_out(out: Path | None) -> Path:
    out = out or Path("results") / time.strftime("%Y%m%d-%H%M%S")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe_file = out / ".writable"
        probe_file.write_text("")
        probe_file.unlink()
    except OSError as e:
        raise UsageError(f"--out {out}: not writable ({e.strerror})") from e
    return out


def cmd_run(args: argparse.Namespace) -> int:
    from .enlightenments import resolve_profile
    from .guests import build_l1, build_tools
    from .kernel import find_kernel
    from .probe import probe
    from .results import console_table, exit_status, junit_xml, write_results

    knobs = {"channels": args.channels, "threads": args.threads,
             "decompress_threads": args.decompress_threads, "level": args.level,
             "wait_thread": args.wait_thread == "on", "xbzrle_cache_mib": args.xbzrle_cache_mib,
             "transport": args.transport}
    # Everything the user typed is checked before anything starts.
    variants = expand(args.scenarios, args.compression, knobs, inject=args.inject)
    sigs = [] if args.no_known_issues else known.load(args.known_issues or known.DEFAULT_FILE)
    kernel = find_kernel(args.kernel, args.modules)
    out = _writable_out(args.out)
    facts = probe(args.accel)
    profile = resolve_profile(args.profile, args.hv, l1_nested=facts.l1_nested, vendor=facts.vendor)
    variants = apply_profile(variants, profile, l1_nested=facts.l1_nested, vendor=facts.vendor)
    if facts.accel != "kvm":
        # Loud on purpose: a nested run silently emulated is the trap this line prevents.
        print(f"nestvirt: accel {facts.accel}: {facts.accel_reason}", file=sys.stderr)
    tools = build_tools()
    image = build_l1(kernel, tools)
    ctx = RunContext(host=facts, image=image, out=out)
    run_info = {"argv": sys.argv, "started": time.strftime("%FT%T%z"), "image": image.to_json(),
                "out": str(out), "pid": os.getpid()}
    results: list[ScenarioResult] = []
    t0 = time.monotonic()
    try:
        for i, v in enumerate(variants, 1):
            if not args.json:
                print(f"[{i}/{len(variants)}] {v.id} ...", file=sys.stderr, flush=True)
            result = run_variant(v, ctx)
            known.classify([result], sigs, facts.accel, facts.qemu.version)
            results.append(result)
            write_results(out, facts.to_json(), results, run_info)
    finally:
        # Reached on Ctrl-C too: what finished is kept.
        run_info["seconds"] = round(time.monotonic() - t0, 2)
        write_results(out, facts.to_json(), results, run_info)
        (out / "junit.xml").write_text(junit_xml(results))
        _link_latest(out)
    if args.json:
        print((out / "results.json").read_text())
    else:
        print(console_table(results))
        print(f"results: {out / 'results.json'}")
    return exit_status(results)


def _link_latest(out: Path) -> None:
    latest = out.parent / "latest"
    try:
        if latest.is_symlink():
            latest.unlink()
        if not latest.exists():
            latest.symlink_to(out.name)
    except OSError:
        pass  # a convenience only


if __name__ == "__main__":
    sys.exit(main())
