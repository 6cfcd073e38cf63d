"""``nestvirt run --in-hostvm``: one host VM boot runs every variant of the run inside it with
``--accel kvm``; its results come back into the host's results directory in the one schema,
with the inner probe as the host facts, the host VM's identity recorded, and the KVM nested
tracepoints around each stop turned into a check for the guest-mode scenarios."""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from harness.core import slow
from harness.hostvm import evidence
from harness.hostvm.job import INNER_OUT, QEMU_PIDS, TRACE, render_job
from harness.hostvm.prepare import Prepared
from harness.hostvm.vm import Outcome, run_job
from harness.results.record import load_results, write_results
from harness.scenario.result import ScenarioResult
from harness.scenario.suite import SCENARIOS

# Options of `run` that belong to the outer run (never passed inside).
OUTER_FLAGS = ("--in-hostvm",)
OUTER_VALUED = ("--out", "--hostvm-mem", "--hostvm-smp", "--hostvm-cpu", "--hostvm-qemu",
                "--hostvm-tcg-thread", "--hostvm-npt", "--hostvm-deadline", "--accel")
# What one variant may take inside at most, and the host VM's own start: the run's deadline.
VARIANT_BOUND_S = 240
BOOT_BOUND_S = 90


def inner_args(argv: Sequence[str]) -> list[str]:
    """`run`'s arguments as the user typed them, less the outer ones (--out, --accel and the
    --hostvm-* options, in both --opt V and --opt=V forms)."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in OUTER_FLAGS:
            continue
        if name in OUTER_VALUED:
            skip = "=" not in a
            continue
        out.append(a)
    return out


def variant_count(args: Sequence[str]) -> int:
    """About how many variants the inner run has (for its deadline): scenarios named (the
    smoke suite's 11 when none) x compression modes (5 when not named) x --repeat."""
    names, i, opts = 0, 0, {}
    while i < len(args):
        a = args[i]
        if a.startswith("--"):
            k, eq, v = a.partition("=")
            if not eq and i + 1 < len(args) and not args[i + 1].startswith("-"):
                v, i = args[i + 1], i + 1
            opts[k] = v
        else:
            names += 1
        i += 1
    modes = 1 if "--compression" in opts else 5
    try:
        repeat = max(1, int(opts.get("--repeat", "1") or 1))
    except ValueError:
        repeat = 1
    return (names * modes if names else 11) * repeat


def inner_path(path: str, local: Path) -> str:
    """A path the inner run wrote (under INNER_OUT) as it lies on the host after read-back."""
    return re.sub(rf"^{re.escape(INNER_OUT)}", str(local), path) if path else path


def merge(inner_doc: dict[str, Any], results: list[ScenarioResult], local: Path,
          trace: dict[str, dict[str, Any]], identity: dict[str, Any]) -> list[ScenarioResult]:
    """The inner results as the host's: artefact paths rewritten, the host VM recorded, the
    nested trace attached and, where the scenario is about guest mode, judged as a check."""
    for r in results:
        d = r.artifacts.get("dir", "")  # the inner path: the trace's QEMUs are keyed by it
        r.artifacts["dir"] = inner_path(d, local)
        r.metrics["hostvm"] = {"qemu_version": identity.get("qemu_version"),
                               "mem_mib": identity.get("mem_mib"), "smp": identity.get("smp")}
        summary = trace.get(d.rstrip("/")) if d else None
        if summary:
            r.metrics["kvm_nested_trace"] = summary
        spec = SCENARIOS.get(r.scenario)
        if (spec is not None and spec.state == "nested" and not spec.paused
                and r.verdict in ("pass", "fail") and r.metrics.get("migration_status")
                == "completed"):
            c = evidence.nested_state_check(summary)
            r.metrics["stop_in_guest_mode"] = bool(summary and summary.get("src", {})
                                                   .get("ended_in_guest_mode"))
            r.checks.append(c)
            if not c.ok and r.verdict == "pass":
                r.verdict, r.reason = "fail", f"{c.name}: {c.detail}"
    return results


def failed_run(outcome: Outcome, wanted: Sequence[str]) -> list[ScenarioResult]:
    """One error verdict for the host VM itself, carrying its console's last words."""
    last = " | ".join(outcome.console_tail[-3:])
    r = ScenarioResult(id="hostvm", scenario="hostvm", verdict="error",
                       reason=f"{outcome.reason}; console: {last}" if last else outcome.reason)
    r.metrics["hostvm_outcome"] = outcome.to_json()
    r.metrics["wanted"] = list(wanted)
    return [r]


def run_in_hostvm(prepared: Prepared, args: Sequence[str], out: Path, *,
                  deadline_s: float | None = None,
                  on_event: Callable[[dict[str, str]], None] | None = None
                  ) -> tuple[dict[str, Any], list[ScenarioResult], dict[str, Any]]:
    """Boot the host VM once, run `nestvirt run --accel kvm ARGS` inside, read back. Returns
    (host facts of the inner probe, results, run info) and writes out/results.json."""
    t0 = time.monotonic()
    workdir = out / "hostvm"
    local = workdir / "inner"
    shutil.rmtree(local, ignore_errors=True)
    bound = deadline_s or slow.scaled(BOOT_BOUND_S + VARIANT_BOUND_S * variant_count(args))
    job = render_job(["run", "--accel", "kvm", "--out", INNER_OUT, *args],
                     mtimes=prepared.mtimes)
    outcome = run_job(prepared.spec, {"job.sh": job}, workdir, deadline_s=bound,
                      results=workdir / "readback", on_event=on_event)
    identity = prepared.spec.to_json()
    run_info: dict[str, Any] = {"hostvm": {**identity, "outcome": outcome.to_json(),
                                           "inner_args": list(args),
                                           "prepare_seconds": prepared.seconds}}
    host: dict[str, Any] = {}
    results: list[ScenarioResult]
    back = workdir / "readback"
    if outcome.status == "ok" and (back / "run" / "results.json").exists():
        (back / "run").rename(local)
        inner_doc, results = load_results(local / "results.json")
        host = inner_doc.get("host", {})
        run_info["inner"] = {k: inner_doc.get("run", {}).get(k) for k in ("argv", "seconds")}
        trace = evidence.by_variant(_lines(back / Path(TRACE).name),
                                    _lines(back / Path(QEMU_PIDS).name))
        results = merge(inner_doc, results, local, trace, identity)
    elif outcome.status == "ok":
        outcome.status, outcome.reason = "died", (f"the inner run wrote no results.json "
                                                  f"(job exit {outcome.job_rc})")
        outcome.console_tail = _tail(workdir / "hostvm-console.log")
        results = failed_run(outcome, args)
    else:
        results = failed_run(outcome, args)
    run_info["seconds"] = round(time.monotonic() - t0, 2)
    write_results(out, host, results, {**_run_info(out), **run_info})
    return host, results, run_info


def _run_info(out: Path) -> dict[str, Any]:
    from harness.results.record import run_record

    return run_record(out)


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []


def _tail(path: Path, n: int = 10) -> list[str]:
    return [ln for ln in _lines(path) if ln.strip()][-n:]


def summary_json(out: Path) -> str:
    return json.dumps(json.loads((out / "results.json").read_text()), indent=2)
