"""Every view comes from one results.json: console, JUnit, TAP and the HTML report, the last
one also opened in a real headless browser (Debian's chromium) when one is installed."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from harness.matrix.batch import console_summary, failure_rates, merge_records, progress_line
from harness.results.html import exit_cost_panels, migration_series, nice_ticks, render_html
from harness.results.record import load_results
from harness.results.views import view_paths

REPO = Path(__file__).resolve().parent.parent
MIXED = Path(__file__).parent / "data" / "reports" / "mixed-results.json"
BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")


def nestvirt(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.fixture
def results_json(tmp_path: Path) -> Path:
    dst = tmp_path / "results.json"
    shutil.copy(MIXED, dst)
    return dst


def test_report_writes_junit_tap_and_html_from_one_results_json(results_json: Path):
    html = results_json.parent / "out.html"
    cp = nestvirt("report", str(results_json), "--html", str(html), "--tap", "--junit")
    assert cp.returncode == 0, cp.stderr
    doc, results = load_results(results_json)
    verdicts = {r.id: r.verdict for r in results}
    # Console: the table plus what a matrix adds.
    assert "migrate-bare/none" in cp.stdout and "FAIL" in cp.stdout
    assert "pruned (invalid combinations, not run): 2" in cp.stdout
    junit_path, tap_path, _ = view_paths(results_json)
    # JUnit: one testcase per scenario, fail -> failure, skip and known issue -> skipped.
    suite = ET.parse(junit_path).getroot()
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert set(cases) == set(verdicts)
    assert cases["migrate-bare/none"].find("failure") is not None
    assert cases["migrate-plain/none/windows"].find("skipped") is not None
    assert suite.get("failures") == "1" and suite.get("tests") == str(len(verdicts))
    # TAP: the plan line, a SKIP directive, and TODO for the known issue (not a new failure).
    tap = tap_path.read_text().splitlines()
    assert tap[:2] == ["TAP version 13", f"1..{len(verdicts)}"]
    assert any(re.match(r"not ok \d+ migrate-bare/none$", ln) for ln in tap)
    assert any(re.match(r"ok \d+ migrate-plain/none/windows # SKIP Hyper-V", ln) for ln in tap)
    assert any(re.match(r"not ok \d+ migrate-plain/multifd-zstd#2 # TODO known issue", ln)
               for ln in tap)
    # HTML: one self-contained file (nothing fetched from elsewhere), every plot inline.
    page = html.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    assert "<link" not in page and "<img" not in page
    for plot in ("plot-total_time_ms", "plot-downtime_ms", "plot-ram_pages_per_second"):
        assert f'id="{plot}"' in page
    assert page.count('class="plot"') == 3 + 4  # three migration plots, four exit-cost panels
    assert "emulated (TCG): not a hardware exit cost" in page
    assert "migrate-plain/none+channels=4" in page  # the pruned table
    assert "repro.sh" in page and "kernel-log-clean" in page  # the failure with its checks


def test_report_data_extraction_and_absent_vmexit():
    doc = json.loads(MIXED.read_text())
    series = migration_series(doc["scenarios"])
    assert set(series["downtime_ms"]) == {"none", "multifd-zstd"}
    # Five migrate-* runs completed their migration (the failed one too: L1 crashed after it);
    # the skip has no migration and vmexit's own migration summary is not a migrate-* one.
    assert sum(len(v) for v in series["total_time_ms"].values()) == 5
    panels, labels = exit_cost_panels(doc["scenarios"])
    assert set(panels) == {"l1 cpuid", "l2 cpuid", "l2 vmmcall", "l2 pio"}
    assert set(panels["l2 cpuid"]) == {"none", "none (dst)"}
    assert labels and labels[0].startswith("emulated (TCG)")
    no_vmexit = dict(doc, scenarios=[s for s in doc["scenarios"] if s["scenario"] != "vmexit"])
    page = render_html(no_vmexit)
    assert "No vmexit results in this run" in page and page.count('class="plot"') == 3
    empty = render_html(dict(doc, scenarios=[]))
    assert "No completed migration" in empty and 'class="plot"' not in empty
    assert nice_ticks(1222) == [0, 250, 500, 750, 1000, 1250]


def test_report_merges_a_directory_of_records(tmp_path: Path):
    doc = json.loads(MIXED.read_text())
    for i, s in enumerate(reversed(doc["scenarios"])):  # written out of order on purpose
        d = tmp_path / "gw0" / f"v{i}"
        d.mkdir(parents=True)
        index = len(doc["scenarios"]) - 1 - i
        (d / "record.json").write_text(json.dumps({"index": index, "attempt": 1, "id": s["id"],
                                                   "result": s, "host": doc["host"],
                                                   "image": doc["run"]["image"]}))
    cp = nestvirt("report", str(tmp_path), "--junit")
    assert cp.returncode == 0, cp.stderr
    merged, results = load_results(tmp_path / "nestvirt-results.json")
    assert [r.id for r in results] == [s["id"] for s in doc["scenarios"]]
    assert merged["host"]["qemu"]["version"] == "7.2.22"
    assert (tmp_path / "nestvirt-junit.xml").exists()


def test_merge_never_overwrites_a_foreign_results_json(tmp_path: Path):
    (tmp_path / "results.json").write_text('{"avocado": true}')
    doc = json.loads(MIXED.read_text())
    rec = {"index": 0, "attempt": 1, "id": "x", "result": doc["scenarios"][0], "host": {}, "image": {}}
    merge_records([rec], tmp_path, {}, name="nestvirt-results.json")
    assert json.loads((tmp_path / "results.json").read_text()) == {"avocado": True}


def test_progress_is_one_short_line_per_finished_variant():
    rec = {"result": {"id": "migrate-plain/none", "verdict": "fail", "reason": "x" * 500,
                      "durations": {"total": 18.24}}}
    line = progress_line(3, 12, 65.2, rec)
    assert line.startswith("[ 3/12 1:05] migrate-plain/none FAIL 18.2s")
    assert "\n" not in line and len(line) < 160


def test_failure_rate_summary_in_console_and_html():
    recs = [{"index": 0, "attempt": k, "id": f"migrate-plain/multifd-zlib#{k}",
             "result": {"verdict": v}} for k, v in ((1, "pass"), (2, "known-issue"))]
    rates = failure_rates(recs)
    assert rates[0]["rate"] == 0.5 and rates[0]["first_fail_attempt"] == 2
    doc = {"scenarios": [], "repeats": rates, "run": {"until_fail": True, "repeat": 10},
           "until_fail": {"id": "migrate-plain/multifd-zlib", "attempt": 2, "of": 10,
                          "verdict": "known-issue"}}
    text = console_summary(doc, [])
    assert "migrate-plain/multifd-zlib     2      1   50%   2" in text
    assert "until-fail: migrate-plain/multifd-zlib was known-issue on attempt 2" in text
    page = render_html(doc)
    assert 'id="repeats-table"' in page and "50%" in page and 'id="until-fail"' in page


def _browser() -> str | None:
    return next((b for b in BROWSERS if shutil.which(b)), None)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_html_report_renders_in_a_headless_browser(results_json: Path, tmp_path: Path):
    browser = _browser()
    if browser is None:
        pytest.skip("no headless chromium installed (ci/setup-host.sh installs "
                    "chromium-headless-shell on Debian)")
    html = tmp_path / "report.html"
    assert nestvirt("report", str(results_json), "--html", str(html)).returncode == 0
    # --no-sandbox: the sandbox needs user namespaces, which CI containers (and root) lack.
    base = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*base, "--dump-dom", html.as_uri()], capture_output=True, text=True,
                         timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body[^>]*>", dom.stdout)
    assert body, dom.stdout[:500]
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(0)))
    # The page's script ran and every plot was laid out with a real size by the browser.
    assert attrs["data-plots"] == "7" and attrs["data-plots-drawn"] == "7", attrs
    assert attrs["data-scenarios"] == "7"
    shot = tmp_path / "report.png"
    cp = subprocess.run([*base, "--window-size=1280,2400", f"--screenshot={shot}", html.as_uri()],
                        capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0 and shot.exists(), cp.stderr[-2000:]
    assert _png_size(shot) == (1280, 2400)
    assert shot.stat().st_size > 50_000  # a page of plots and tables, not a blank canvas
