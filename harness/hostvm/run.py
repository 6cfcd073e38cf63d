"""``nestvirt run|selftest|vmexit --in-hostvm``: one host VM boot runs the command inside it with
``--accel kvm`` (for run, every variant); its results come back into the host's results
directory in the one schema, with the inner probe as the host facts, the host VM's identity
recorded, figures measured on the host VM's KVM labelled emulated (TCG is below it), and the
KVM nested tracepoints around each stop turned into a check for the guest-mode scenarios."""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from harness.core import slow
from harness.hostvm import cachedisk, evidence
from harness.hostvm.job import INNER_OUT, TRACE, render_job
from harness.hostvm.prepare import Prepared
from harness.hostvm.vm import Outcome, run_job
from harness.results.record import load_results, write_results
from harness.scenario.result import ScenarioResult
from harness.scenario.suite import SCENARIOS

# Options of `run` that belong to the outer run (never passed inside).
OUTER_FLAGS = ("--in-hostvm", "--hostvm-no-cache")
OUTER_VALUED = ("--out", "--hostvm-mem", "--hostvm-smp", "--hostvm-cpu", "--hostvm-qemu",
                "--hostvm-tcg-thread", "--hostvm-npt", "--hostvm-kvm-amd", "--hostvm-deadline",
                "--accel")
# Inside the host VM KVM is real kernel code, but its CPU is QEMU's TCG: a figure that would
# say "hardware" there is still emulated below.
HOSTVM_LABEL = ("emulated (real KVM, SVM, inside the TCG host VM): the host VM's CPU is TCG, "
                "so not a hardware cost; relative figures only")
# What one variant may take inside at most, and the host VM's own start: the run's deadline.
VARIANT_BOUND_S = 240
BOOT_BOUND_S = 90
# Scenarios that take longer than a variant's bound: dirty-limit boots four L1s and runs three
# migrations, two of them bounded at 150 s each.
SCENARIO_BOUND_S = {"dirty-limit": 600}


def inner_args(argv: Sequence[str], drop_valued: Sequence[str] = ()) -> list[str]:
    """The command's arguments as the user typed them, less the outer ones (--out, --accel and
    the --hostvm-* options, and ``drop_valued``, in both --opt V and --opt=V forms)."""
    valued = (*OUTER_VALUED, *drop_valued)
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in OUTER_FLAGS:
            continue
        if name in valued:
            skip = "=" not in a
            continue
        out.append(a)
    return out


def _shape(args: Sequence[str]) -> tuple[list[str], int, int]:
    """(scenario names, compression modes (5 when not named), --repeat) of run's arguments."""
    names: list[str] = []
    i, opts = 0, {}
    while i < len(args):
        a = args[i]
        if a.startswith("--"):
            k, eq, v = a.partition("=")
            if not eq and i + 1 < len(args) and not args[i + 1].startswith("-"):
                v, i = args[i + 1], i + 1
            opts[k] = v
        else:
            names.append(a)
        i += 1
    modes = 1 if "--compression" in opts else 5
    try:
        repeat = max(1, int(opts.get("--repeat", "1") or 1))
    except ValueError:
        repeat = 1
    return names, modes, repeat


def variant_count(args: Sequence[str]) -> int:
    """About how many variants the inner run has (for its deadline): scenarios named (the
    smoke suite's 11 when none) x compression modes (5 when not named) x --repeat."""
    names, modes, repeat = _shape(args)
    return (len(names) * modes if names else 11) * repeat


def run_bound(args: Sequence[str]) -> float:
    """The bound on a whole `run --in-hostvm`: the host VM's boot plus each variant's bound
    (SCENARIO_BOUND_S for the long scenarios, VARIANT_BOUND_S for the rest)."""
    names, modes, repeat = _shape(args)
    per = sum(SCENARIO_BOUND_S.get(n, VARIANT_BOUND_S) for n in names) * modes if names \
        else 11 * VARIANT_BOUND_S
    return BOOT_BOUND_S + per * repeat


def matrix_bound(variants: int | Sequence[str], repeat: int = 1) -> float:
    """The bound on `run --in-hostvm --matrix FILE` (unscaled): boot plus a variant's bound for
    each of the file's combinations (before pruning, so never short) and repeat. Given the
    combinations' scenario names, the long ones get their own bound (SCENARIO_BOUND_S)."""
    names = [""] * variants if isinstance(variants, int) else list(variants)
    per = sum(SCENARIO_BOUND_S.get(n, VARIANT_BOUND_S) for n in names) or VARIANT_BOUND_S
    return BOOT_BOUND_S + per * max(1, repeat)


def inner_path(path: str, local: Path) -> str:
    """A path the inner run wrote (under INNER_OUT) as it lies on the host after read-back."""
    return re.sub(rf"^{re.escape(INNER_OUT)}", str(local), path) if path else path


def label_emulated(doc: Any) -> int:
    """Every ``label`` in ``doc`` (nested dicts and lists) that says nothing (None or "": a
    hardware figure) becomes HOSTVM_LABEL; returns how many did."""
    n = 0
    if isinstance(doc, dict):
        for k, v in doc.items():
            if k == "label" and not v:
                doc[k] = HOSTVM_LABEL
                n += 1
            else:
                n += label_emulated(v)
    elif isinstance(doc, list):
        for v in doc:
            n += label_emulated(v)
    return n


def merge(inner_doc: dict[str, Any], results: list[ScenarioResult], local: Path,
          trace: dict[str, dict[str, Any]], identity: dict[str, Any]) -> list[ScenarioResult]:
    """The inner results as the host's: artefact paths rewritten, the host VM recorded, the
    figures labelled emulated, the nested trace attached and, where the scenario is about
    guest mode, judged as a check."""
    for r in results:
        label_emulated(r.metrics)
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


def inner_refused(outcome: Outcome, command: str, console: Sequence[str]) -> ScenarioResult:
    """An error verdict for an inner command that exited neither 0 nor 1, with its own line
    (``nestvirt: error: ...`` on the host VM's console) when it left one."""
    said = [ln for ln in console if ln.startswith("nestvirt: error")]
    why = f"the inner {command} exited {outcome.job_rc}" + (f": {said[-1]}" if said else
                                                             " without an error line")
    r = ScenarioResult(id="hostvm", scenario="hostvm", verdict="error", reason=why)
    r.metrics["hostvm_outcome"] = outcome.to_json()
    return r


def run_in_hostvm(prepared: Prepared, args: Sequence[str], out: Path, *,
                  command: str = "run", deadline_s: float | None = None,
                  job_files: Mapping[str, str] | None = None,
                  on_event: Callable[[dict[str, str]], None] | None = None,
                  cache: bool = True
                  ) -> tuple[dict[str, Any], list[ScenarioResult], dict[str, Any]]:
    """Boot the host VM once, run `nestvirt COMMAND --accel kvm ARGS` inside, read back.
    Returns (host facts of the inner probe, results, run info) and writes out/results.json.
    ``deadline_s`` None: from run's variant count (other commands must pass one).
    ``cache``: carry the inner run's saved L1 images on the cache disk (cachedisk.py)."""
    t0 = time.monotonic()
    workdir = out / "hostvm"
    local = workdir / "inner"
    shutil.rmtree(local, ignore_errors=True)
    bound = deadline_s or slow.scaled(run_bound(args))
    identity = prepared.spec.to_json()
    with cachedisk.held(identity, enabled=cache) as disk:
        job = render_job([command, "--accel", "kvm", "--out", INNER_OUT, *args],
                         mtimes=prepared.mtimes, cache=disk.path is not None)
        outcome = run_job(prepared.spec, {**(job_files or {}), "job.sh": job}, workdir,
                          deadline_s=bound, results=workdir / "readback", on_event=on_event,
                          cache_disk=disk.path)
    cachedisk.prune()
    said = [e for e in outcome.events if e.get("event") == "cache"]
    run_info: dict[str, Any] = {"hostvm": {**identity, "outcome": outcome.to_json(),
                                           "inner_command": command,
                                           "inner_args": list(args),
                                           "prepare_seconds": prepared.seconds,
                                           "cache_disk": {**disk.to_json(),
                                                          "inside": said[-1] if said else None}}}
    host: dict[str, Any] = {}
    results: list[ScenarioResult]
    back = workdir / "readback"
    if outcome.status == "ok" and (back / "run" / "results.json").exists():
        (back / "run").rename(local)
        inner_doc, results = load_results(local / "results.json")
        host = inner_doc.get("host", {})
        inner_run = inner_doc.get("run", {})
        run_info["inner"] = {k: inner_run[k] for k in ("argv", "seconds", "selftests", "on",
                                                       "timeout_s") if k in inner_run}
        trace = evidence.by_variant(_lines(back / Path(TRACE).name), _inner_qemus(local))
        results = merge(inner_doc, results, local, trace, identity)
    elif outcome.status == "ok":
        outcome.status, outcome.reason = "died", (f"the inner run wrote no results.json "
                                                  f"(job exit {outcome.job_rc})")
        outcome.console_tail = _tail(workdir / "hostvm-console.log")
        results = failed_run(outcome, args)
    else:
        results = failed_run(outcome, args)
    if outcome.status == "ok" and outcome.job_rc not in (0, 1):
        # 0 and 1 are the inner command's verdicts; anything else (2: bad input or setup,
        # 130: interrupted) means it did not run what was asked, whatever it wrote first.
        results.append(inner_refused(outcome, command, _tail(workdir / "hostvm-console.log",
                                                             40)))
    run_info["seconds"] = round(time.monotonic() - t0, 2)
    write_results(out, host, results, {**_run_info(out), **run_info})
    return host, results, run_info


def _run_info(out: Path) -> dict[str, Any]:
    from harness.results.record import run_record

    return run_record(out)


def _inner_qemus(local: Path) -> dict[int, tuple[str, str]]:
    """The inner QEMUs' pids and roles, from their QMP transcripts read back under ``local``
    (named by the inner paths the trace's variants are keyed by)."""
    return evidence.qemu_roles((f"{INNER_OUT}/{p.relative_to(local)}", _lines(p))
                               for p in sorted(local.rglob("*-qmp.jsonl")))


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []


def _tail(path: Path, n: int = 10) -> list[str]:
    return [ln for ln in _lines(path) if ln.strip()][-n:]


def summary_json(out: Path) -> str:
    return json.dumps(json.loads((out / "results.json").read_text()), indent=2)
