"""results.json (the one schema) and its views: console table, JUnit XML, TAP."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from .errors import UsageError
from .scenario import ScenarioResult

SCHEMA_VERSION = 1


def run_record(out: Path, **fields: Any) -> dict[str, Any]:
    """results.json's "run" block as a run opens: how it was called, when, where, by whom."""
    return {"argv": sys.argv, "started": time.strftime("%FT%T%z"), "out": str(out),
            "pid": os.getpid(), **fields}


def write_results(out: Path, host: dict, results: list[ScenarioResult],
                  run_info: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """Write OUT/results.json atomically (a Ctrl-C mid-run still leaves the scenarios done).

    ``extra`` adds top-level keys (matrix runs: "matrix", "pruned", "repeats").
    """
    doc = {"schema": SCHEMA_VERSION, "run": run_info, "host": host,
           "scenarios": [r.to_json() for r in results], **(extra or {})}
    path = out / "results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str))
    tmp.replace(path)
    return path


def exit_status(results: list[ScenarioResult]) -> int:
    """0 when nothing failed or errored (known issues are reported, not counted), else 1."""
    return 1 if any(r.verdict in ("fail", "error") for r in results) else 0


def text_table(rows: list[tuple[str, ...]]) -> list[str]:
    """Align every column but the last (free text) of rows whose first row is the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=False)) + "  " + row[-1]
            for row in rows]


def verdict_counts(results: list[ScenarioResult]) -> str:
    """'3 pass, 1 skip': how many results have each verdict ("" for none)."""
    counts: dict[str, int] = {}
    for r in results:
        counts[r.verdict] = counts.get(r.verdict, 0) + 1
    return ", ".join(f"{n} {v}" for v, n in sorted(counts.items()))


def console_table(results: list[ScenarioResult]) -> str:
    rows = [("SCENARIO", "VERDICT", "MIGRATE", "DOWNTIME", "TOTAL", "DETAIL")]
    for r in results:
        mig = r.metrics.get("migration", {})
        secs = r.metrics.get("migration_seconds")
        rows.append((
            r.id, r.verdict.upper(),
            f"{secs:.2f}s" if isinstance(secs, (int, float)) else "-",
            f"{mig['downtime_ms']}ms" if "downtime_ms" in mig else "-",
            f"{r.durations.get('total', 0):.1f}s",
            (r.reason or f"{sum(c.ok for c in r.checks)}/{len(r.checks)} checks ok")[:70],
        ))
    lines = text_table(rows)
    lines.append(verdict_counts(results) or "no scenarios")
    return "\n".join(lines)


def junit_xml(results: list[ScenarioResult], suite: str = "nestvirt") -> str:
    fails = sum(r.verdict == "fail" for r in results)
    errs = sum(r.verdict == "error" for r in results)
    skips = sum(r.verdict == "skip" for r in results)
    out = [f'<testsuite name={quoteattr(suite)} tests="{len(results)}" failures="{fails}" '
           f'errors="{errs}" skipped="{skips}" timestamp={quoteattr(time.strftime("%FT%T"))}>']
    for r in results:
        t = r.durations.get("total", 0)
        out.append(f'  <testcase classname="nestvirt.{r.scenario}" name={quoteattr(r.id)} '
                   f'time="{t}">')
        if r.verdict == "fail":
            out.append(f"    <failure message={quoteattr(r.reason[:300])}>"
                       f"{escape(json.dumps([c.to_json() for c in r.checks], indent=1))}</failure>")
        elif r.verdict == "error":
            out.append(f"    <error message={quoteattr(r.reason[:300])}/>")
        elif r.verdict in ("skip", "known-issue"):
            msg = r.reason if r.verdict == "skip" else f"known-issue: {r.reason}"
            out.append(f"    <skipped message={quoteattr(msg[:300])}/>")
        out.append("  </testcase>")
    out.append("</testsuite>")
    return "\n".join(out) + "\n"


def tap(results: list[ScenarioResult], name: Callable[[ScenarioResult], str] | None = None) -> str:
    """TAP version 13 in kselftest's shape: "ok N name", "ok N name # SKIP reason",
    "not ok N name # TIMEOUT S seconds" or "# exit=RC", a "# reason" line under each failure
    or error, and kselftest's "# Totals" line. ``name`` maps a result to its TAP name (id)."""
    label = name or (lambda r: r.id)
    out = ["TAP version 13", f"1..{len(results)}"]
    for i, r in enumerate(results, 1):
        n = label(r)
        reason = " ".join(r.reason.split())  # one TAP line, whatever the reason holds
        if r.verdict == "pass":
            out.append(f"ok {i} {n}")
        elif r.verdict == "skip":
            out.append(f"ok {i} {n} # SKIP {reason}".rstrip())
        else:
            limit = r.metrics.get("timeout_s")
            if r.metrics.get("timed_out"):
                tail = f" # TIMEOUT {limit:g} seconds" if isinstance(limit, (int, float)) else " # TIMEOUT"
            elif isinstance(r.metrics.get("exit_code"), int):
                tail = f" # exit={r.metrics['exit_code']}"
            else:
                tail = ""
            out.append(f"not ok {i} {n}{tail}")
            if reason:
                out.append(f"# {r.verdict}: {reason}")
    count = {v: sum(r.verdict == v for r in results) for v in ("pass", "fail", "skip", "error")}
    out.append(f"# Totals: pass:{count['pass']} fail:{count['fail']} xfail:0 xpass:0 "
               f"skip:{count['skip']} error:{count['error']}")
    return "\n".join(out) + "\n"


def result_from_json(d: dict[str, Any]) -> ScenarioResult:
    """One scenarios[] entry of results.json back as a ScenarioResult (inverse of to_json)."""
    from .checks import Check

    return ScenarioResult(
        id=str(d["id"]), scenario=str(d.get("scenario", "")), verdict=str(d.get("verdict", "")),
        reason=str(d.get("reason", "")), params=dict(d.get("params") or {}),
        durations=dict(d.get("durations") or {}), metrics=dict(d.get("metrics") or {}),
        checks=[Check(str(c["name"]), bool(c["ok"]), str(c.get("detail", "")))
                for c in d.get("checks") or []],
        artifacts=dict(d.get("artifacts") or {}))


def load_results(path: Path) -> tuple[dict[str, Any], list[ScenarioResult]]:
    """Read a results.json: the whole document and its scenarios as ScenarioResults.

    Raises ValueError (with the path) when the file is not a results document.
    """
    try:
        doc = json.loads(Path(path).read_text())
        if not isinstance(doc, dict) or not isinstance(doc.get("scenarios"), list):
            raise ValueError("no 'scenarios' list")
        return doc, [result_from_json(s) for s in doc["scenarios"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a nestvirt results.json ({e})") from e


def prepare_out(out: Path | None) -> Path:
    """The run's results directory (default results/<time>), created and proven writable."""
    out = out or Path("results") / time.strftime("%Y%m%d-%H%M%S")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe_file = out / ".writable"
        probe_file.write_text("")
        probe_file.unlink()
    except OSError as e:
        raise UsageError(f"--out {out}: not writable ({e.strerror})") from e
    return out


def link_latest(out: Path) -> None:
    """Point OUT/../latest at this run (a convenience: failures to link are ignored)."""
    latest = out.parent / "latest"
    try:
        if latest.is_symlink():
            latest.unlink()
        if not latest.exists():
            latest.symlink_to(out.name)
    except OSError:
        pass
