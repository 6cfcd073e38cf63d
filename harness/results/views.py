"""Views of results: the console table, JUnit XML, TAP (kselftest's shape), and the writer of
every file view (JUnit, TAP, HTML) from one results.json."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from harness.results.html import qemu_versions, render_html
from harness.results.record import load_results
from harness.scenario.result import ScenarioResult


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
    rows = [("SCENARIO", "VERDICT", "QEMU", "MIGRATE", "DOWNTIME", "TOTAL", "DETAIL")]
    for r in results:
        mig = r.metrics.get("migration", {})
        secs = r.metrics.get("migration_seconds")
        rows.append((
            r.id, r.verdict.upper(), qemu_versions(r.params),
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



def write_views(results_json: Path, html: Path | None = None, tap_path: Path | None = None,
                junit: Path | None = None) -> list[Path]:
    """JUnit, TAP and the HTML report, all from one results.json (default names beside it)."""
    doc, results = load_results(results_json)
    default_junit, default_tap, default_html = view_paths(results_json)
    junit = junit or default_junit
    tap_path = tap_path or default_tap
    html = html or default_html
    junit.write_text(junit_xml(results))
    tap_path.write_text(tap(results, name=tap_name))
    html.write_text(render_html(doc, base_dir=html.parent))
    return [junit, tap_path, html]


def view_paths(results_json: Path) -> tuple[Path, Path, Path]:
    """Default JUnit, TAP and HTML paths beside a results file: junit.xml, results.tap and
    report.html for results.json; nestvirt-junit.xml, nestvirt-results.tap and
    nestvirt-report.html for nestvirt-results.json (an avocado job dir has its own results.*)."""
    base, stem = results_json.parent, results_json.stem
    prefix = stem[: -len("results")] if stem.endswith("results") else f"{stem}-"
    return base / f"{prefix}junit.xml", base / f"{stem}.tap", base / f"{prefix}report.html"


def tap_name(r: ScenarioResult) -> str:
    # TAP's TODO directive is its "known failure": consumers do not count it as a failure.
    return f"{r.id} # TODO known issue" if r.verdict == "known-issue" else r.id
