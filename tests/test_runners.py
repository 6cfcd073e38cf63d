"""The three runners over one engine: `nestvirt run --matrix -j 2`, `pytest -n 2` (the plugin)
and `avocado run` (the resolver and job-post plugins) give the same verdicts for the same
matrix; plus -j's Ctrl-C reaping and --until-fail on QEMU 7.2's real intermittent failure.

QEMU 7.2 under TCG loses dirty pages now and then (ci/known-issues.json): a variant may come
out known-issue in one runner and pass in another. Such a flip is QEMU's, not the runners':
the comparison is retried once and then skipped with QEMU's evidence.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import interrupt_when_booted

pytestmark = pytest.mark.qemu

REPO = Path(__file__).resolve().parent.parent
MINI = REPO / "ci" / "smoke-mini.yaml"
FLAKES = {"known-issue"}


def env(extra_path: Path | None = None) -> dict[str, str]:
    paths = [str(p) for p in (extra_path, REPO) if p] + [os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def run(argv: list[str], timeout: float = 600, extra_path: Path | None = None,
        **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=env(extra_path), **kw)


def verdicts(results_json: Path) -> dict[str, str]:
    doc = json.loads(results_json.read_text())
    return {s["id"]: s["verdict"] for s in doc["scenarios"]}


def pytest_plugin_args() -> list[str]:
    """A matrix outside ci/ has no ci/conftest.py to register the plugin: name it, unless
    the installed package's pytest11 entry point already does."""
    eps = importlib.metadata.entry_points(group="pytest11")
    return [] if any(ep.value == "harness.runners.pytest_plugin" for ep in eps) else [
        "-p", "harness.runners.pytest_plugin"]


def avocado_plugins(tmp: Path) -> Path | None:
    """What `pip install` would register, as a dist-info on PYTHONPATH (None: installed)."""
    eps = importlib.metadata.entry_points(group="avocado.plugins.resolver")
    if any(ep.value == "harness.runners.avocado_plugin:MatrixResolver" for ep in eps):
        return None
    site = tmp / "site"
    info = site / "nestvirt_plugins-0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: nestvirt-plugins\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text(
        "[avocado.plugins.resolver]\nnestvirt-matrix = harness.runners.avocado_plugin:MatrixResolver\n\n"
        "[avocado.plugins.job.prepost]\nnestvirt-report = harness.runners.avocado_plugin:MatrixJobPost\n")
    return site


def run_all_three(tmp: Path, matrix: Path) -> dict[str, dict[str, str]]:
    pytest.importorskip("avocado", reason="avocado-framework is not installed (pip install "
                                          "'nestvirt[avocado]')")
    cli = run([sys.executable, "-m", "harness", "run", "--matrix", str(matrix), "-j", "2",
               "--out", str(tmp / "cli")])
    assert cli.returncode in (0, 1), cli.stderr
    py = run([sys.executable, "-m", "pytest", "-n", "2", "-p", "no:cacheprovider", "-rs",
              str(matrix), "--nestvirt-out", str(tmp / "pytest")])
    assert py.returncode in (0, 1), py.stdout[-3000:] + py.stderr[-2000:]
    site = avocado_plugins(tmp)
    avo = run([sys.executable, "-m", "avocado", "run", str(matrix), "--job-results-dir",
               str(tmp / "avocado"), "--max-parallel-tasks", "2", "--disable-sysinfo"],
              extra_path=site)
    assert avo.returncode in (0, 1), avo.stdout[-3000:] + avo.stderr[-2000:]
    (job,) = [d for d in (tmp / "avocado").iterdir() if d.name.startswith("job-")]
    # avocado's own results: JSON and xUnit in its job dir, one test per variant.
    avo_json = json.loads((job / "results.json").read_text())
    assert (job / "results.xml").exists()
    return {"cli": verdicts(tmp / "cli" / "results.json"),
            "pytest": verdicts(tmp / "pytest" / "results.json"),
            "avocado": verdicts(job / "nestvirt-results.json"),
            "_avocado_status": {t["name"].split(";")[0]: t["status"] for t in avo_json["tests"]},
            "_pytest_out": {"text": py.stdout}, "_cli_out": {"text": cli.stdout + cli.stderr}}


def test_cli_pytest_and_avocado_agree_on_the_smoke_mini_matrix(tmp_path: Path):
    for attempt in (1, 2):
        got = run_all_three(tmp_path / f"try{attempt}", MINI)
        runners = {k: v for k, v in got.items() if not k.startswith("_")}
        ids = [list(v) for v in runners.values()]
        assert ids[0] == ids[1] == ids[2], ids  # same variants, same (input) order
        if runners["cli"] == runners["pytest"] == runners["avocado"]:
            break
        flips = {i: {r: v[i] for r, v in runners.items()} for i in ids[0]
                 if len({v[i] for v in runners.values()}) > 1}
        if not all(set(f.values()) <= FLAKES | {"pass"} for f in flips.values()):
            pytest.fail(f"runners disagree beyond QEMU's known flake: {flips}")
    else:
        pytest.skip(f"QEMU's known intermittent failure hit one runner twice: {flips}")
    v = runners["cli"]
    assert list(v.values()).count("skip") == 1 and set(v.values()) <= {"pass", "skip"} | FLAKES
    # avocado's own statuses carry the same verdicts (CANCEL: skipped here; WARN: known issue).
    mapping = {"pass": "PASS", "skip": "CANCEL", "fail": "FAIL", "error": "ERROR",
               "known-issue": "WARN"}
    assert got["_avocado_status"] == {i: mapping[x] for i, x in v.items()}
    # The host's "can't" is a skip with the probe's reason; pruned ones are listed, not run.
    assert "need -accel kvm" in got["_pytest_out"]["text"]
    assert "migrate-plain/none+channels=4: channels applies to" in got["_pytest_out"]["text"]
    assert "pruned (invalid combinations, not run): 2" in got["_cli_out"]["text"]
    for doc in (tmp_path / f"try{attempt}" / "cli" / "results.json",
                tmp_path / f"try{attempt}" / "pytest" / "results.json"):
        assert [p["id"] for p in json.loads(doc.read_text())["pruned"]] == [
            "migrate-plain/none+channels=4", "migrate-nested-evmcs/none"]
    # pytest-xdist workers wrote under their own dirs; views came from the merged results.json.
    out = tmp_path / f"try{attempt}" / "pytest"
    assert {p.name for p in out.iterdir() if p.is_dir()} <= {"gw0", "gw1"}
    assert {"junit.xml", "results.tap", "report.html"} <= {p.name for p in out.iterdir()}


def test_pytest_item_shows_failed_checks_and_the_repro(tmp_path: Path):
    matrix = tmp_path / "broken.yaml"
    matrix.write_text("nestvirt_matrix: 1\nname: broken\ninclude:\n"
                      "  - {scenario: migrate-plain, compression: none, l1_rate_mib_s: 4, "
                      "inject: corrupt-l1}\n")
    py = run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *pytest_plugin_args(),
              str(matrix), "--nestvirt-out", str(tmp_path / "out"), "--nestvirt-no-known-issues"])
    assert py.returncode == 1, py.stdout[-3000:]
    assert "migrate-plain/none+inject-corrupt-l1+l1_rate_mib_s=4: FAIL" in py.stdout
    assert re.search(r"^\s+l1-workload-pattern: L1 workload: \d+ bad of", py.stdout, re.M)
    assert re.search(r"^\s+reproduce: .*/repro.sh$", py.stdout, re.M)


def test_avocado_recipe_lists_one_test_per_variant(tmp_path: Path):
    pytest.importorskip("avocado")
    recipe = tmp_path / "mini.json"
    cp = run([sys.executable, "-m", "harness", "matrix", str(MINI), "--avocado-recipe", str(recipe)])
    assert cp.returncode == 0, cp.stderr
    ls = run([sys.executable, "-m", "avocado", "list", str(recipe)])
    assert ls.returncode == 0, ls.stderr
    assert re.findall(r"avocado-instrumented\s+(\S+)", ls.stdout) == [
        "migrate-bare/none+downtime_limit_ms=5000+l1_mib=16+l1_rate_mib_s=1",
        "migrate-plain/multifd-zstd+downtime_limit_ms=5000+l1_mib=16+l1_rate_mib_s=1",
        "migrate-plain/none/windows"]


def test_ctrl_c_on_a_parallel_run_reaps_every_qemu(tmp_path: Path):
    p = subprocess.Popen([sys.executable, "-m", "harness", "run", "--matrix", str(MINI), "-j", "2",
                          "--out", str(tmp_path)], cwd=REPO, env=env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    interrupt_when_booted(p, tmp_path, l1s=2, timeout=90)


def test_until_fail_finds_qemu72_zlib_corruption_and_reports_its_rate(tmp_path: Path, facts):
    # The lost-write bug is TCG's before QEMU 9.0: pinned to such a binary (7.2 here), since
    # the default one (10.0) does not have it.
    old = [q for q in facts.qemus or (facts.qemu,) if q.version_tuple < (9, 0, 0)]
    if not old:
        pytest.skip("no QEMU before 9.0 here: the lost-write bug this finds is fixed in 9.0")
    attempts = 6
    cp = run([sys.executable, "-m", "harness", "run", "migrate-plain", "--compression",
              "multifd-zlib", "--until-fail", "--repeat", str(attempts), "--out", str(tmp_path),
              "--qemu", old[0].binary], timeout=900)
    doc = json.loads((tmp_path / "results.json").read_text())
    (rate,) = doc["repeats"]
    if "until_fail" not in doc:
        pytest.skip(f"QEMU did not fail in {attempts} attempts this time: {rate}")
    stop = doc["until_fail"]
    k = stop["attempt"]
    assert stop["id"] == "migrate-plain/multifd-zlib" and 1 <= k <= attempts
    # Every attempt up to the failing one ran, none after it.
    assert [s["id"] for s in doc["scenarios"]] == [f"migrate-plain/multifd-zlib#{i}"
                                                   for i in range(1, k + 1)]
    assert (rate["runs"], rate["fails"], rate["first_fail_attempt"]) == (k, 1, k)
    assert rate["rate"] == round(1 / k, 3)
    # A known QEMU bug is reported as such (exit 0); anything else would be a new failure.
    assert cp.returncode == (0 if stop["verdict"] == "known-issue" else 1), cp.stderr
    assert f"was {stop['verdict']} on attempt {k}" in cp.stdout
    assert re.search(rf"migrate-plain/multifd-zlib\s+{k}\s+1\s+{round(100 / k)}%", cp.stdout)
    failing = doc["scenarios"][-1]
    assert failing["artifacts"]["repro"].endswith("repro.sh")
