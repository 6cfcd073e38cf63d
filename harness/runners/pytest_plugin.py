"""pytest plugin: every variant of a matrix file is a test item.

    pytest -n 2 ci/                               # ci/smoke.yaml (ci/conftest.py ignores the rest)
    pytest -n 2 ci/smoke-mini.yaml                # any matrix file named on the command line
    pytest -n auto --nestvirt-matrix ci/nightly.yaml

Registered through the ``pytest11`` entry point when nestvirt is installed, else by
ci/conftest.py. It only acts on YAML files that carry the ``nestvirt_matrix`` marker, so it is
inert in every other test session. Items call the same engine as the CLI (parallel.execute_job):
known issues become xfail, host skips become skips with the probe's reason, a fail shows the
failed checks and the repro.sh of its bundle. With pytest-xdist each worker writes under
OUT/<worker>/; the controller merges the per-variant records into OUT/results.json (input
order) and writes junit.xml, results.tap and report.html beside it.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest

from harness.core.errors import NestvirtError
from harness.matrix.files import PlannedVariant, expand_matrix, is_matrix_file, load_matrix
from harness.matrix.workers import (
    HostBudget,
    Job,
    collect_records,
    execute_job,
    failure_text,
    job_out,
    signatures_json,
)

OUT_KEY = pytest.StashKey[Path]()
RUN_KEY = pytest.StashKey["_NestvirtSession"]()
PLAN_FILE = "nestvirt-plan.json"


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("nestvirt", "nestvirt matrix runs")
    g.addoption("--nestvirt-matrix", metavar="FILE",
                help="run this matrix file's variants (alone: instead of the default paths)")
    g.addoption("--nestvirt-out", metavar="DIR",
                help="results directory (default results/pytest-<time>)")
    g.addoption("--nestvirt-accel", default="auto", choices=("auto", "kvm", "tcg"))
    g.addoption("--nestvirt-kernel", metavar="PATH", help="L1 kernel image")
    g.addoption("--nestvirt-qemu", metavar="NAME|PATH",
                help="the QEMU of variants whose block names none (default: the newest)")
    g.addoption("--nestvirt-known-issues", metavar="FILE",
                help="known-issue signatures (default ci/known-issues.json)")
    g.addoption("--nestvirt-no-known-issues", action="store_true",
                help="report every failure as a failure, known or not")
    g.addoption("--nestvirt-dst-host", metavar="USER@ADDR[:PORT]",
                help="start destinations on this host over SSH (default: $NESTVIRT_DST_HOST, "
                     "so each xdist worker can drive its own: --tx 'popen//python=env "
                     "NESTVIRT_DST_HOST=... python')")
    g.addoption("--nestvirt-dst-key", metavar="FILE",
                help="key for the destination host (default: $NESTVIRT_DST_KEY)")
    g.addoption("--nestvirt-dst-known-hosts", metavar="FILE",
                help="known_hosts for it (default: $NESTVIRT_DST_KNOWN_HOSTS)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "nestvirt: one variant of a nestvirt matrix")
    matrix = config.getoption("nestvirt_matrix")
    if matrix and config.args_source is not pytest.Config.ArgsSource.ARGS:
        # `pytest --nestvirt-matrix F` alone runs F, not the configured testpaths.
        config.args = [matrix]
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None and "nestvirt_out" in workerinput:
        out = Path(workerinput["nestvirt_out"])
    else:
        given = config.getoption("nestvirt_out")
        out = Path(given) if given else (config.rootpath / "results" /
                                         time.strftime("pytest-%Y%m%d-%H%M%S"))
    config.stash[OUT_KEY] = out.resolve()
    config.stash[RUN_KEY] = _NestvirtSession(config)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """pytest-xdist: every worker writes under the controller's out dir."""
    node.workerinput["nestvirt_out"] = str(node.config.stash[OUT_KEY])


def pytest_collect_file(parent: pytest.Collector, file_path: Path) -> pytest.Collector | None:
    if file_path.suffix not in (".yaml", ".yml") or not is_matrix_file(file_path):
        return None
    chosen = parent.config.getoption("nestvirt_matrix")
    if chosen and file_path.resolve() != Path(chosen).resolve():
        return None
    return MatrixFile.from_parent(parent, path=file_path)


class _NestvirtSession:
    """What one pytest process shares across items: probe, image, signatures, budget (lazy,
    so a session that collects no matrix never probes)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.started = time.time()
        self._facts: Any = None
        self._image: Any = None
        self._sigs: Any = None
        self._budget: HostBudget | None = None

    @property
    def budget(self) -> HostBudget:
        # Lazy: a session that runs no variant never touches the cache dir.
        if self._budget is None:
            self._budget = HostBudget()
        return self._budget

    @property
    def out(self) -> Path:
        return self.config.stash[OUT_KEY]

    @property
    def worker_out(self) -> Path:
        worker = getattr(self.config, "workerinput", {}).get("workerid", "main")
        return self.out / worker

    def facts(self, matrix: Any = None) -> Any:
        if self._facts is None:
            from harness.matrix.batch import matrix_paths
            from harness.qemu.inventory import probe_host

            self._facts = probe_host(self.config.getoption("nestvirt_accel"),
                                     self.config.getoption("nestvirt_qemu"),
                                     extra=matrix_paths(matrix) if matrix is not None else ())
        return self._facts

    def image(self) -> Any:
        if self._image is None:
            from harness.guest.image import build_l1, build_tools
            from harness.guest.kernel import find_kernel

            self._image = build_l1(find_kernel(self.config.getoption("nestvirt_kernel")),
                                   build_tools())
        return self._image

    def run_options(self) -> dict[str, Any]:
        """Job.run for this process: where its destinations start (option, else env)."""
        from harness.remote.ssh import HostSpec

        def opt(name: str) -> str | None:
            return self.config.getoption(f"nestvirt_{name}") or os.environ.get(
                f"NESTVIRT_{name.upper()}") or None

        target = opt("dst_host")
        if not target:
            return {}
        spec = HostSpec.parse(target, key_file=opt("dst_key"),
                              known_hosts=opt("dst_known_hosts"))
        return {"dst_host": spec.to_json()}

    def signatures(self) -> tuple[dict[str, Any], ...]:
        if self._sigs is None:
            from harness.results import known

            if self.config.getoption("nestvirt_no_known_issues"):
                self._sigs = ()
            else:
                path = self.config.getoption("nestvirt_known_issues")
                self._sigs = signatures_json(known.load(Path(path) if path else known.DEFAULT_FILE))
        return self._sigs


class MatrixFile(pytest.File):
    """A matrix YAML file: expands (with the probe's facts) into one item per variant."""

    def collect(self) -> Any:
        run = self.config.stash[RUN_KEY]
        try:
            matrix = load_matrix(self.path)
            # in_hostvm combinations need the host VM's boot: `nestvirt run --matrix` runs them
            # (the plan file counts them as elsewhere).
            plan = expand_matrix(matrix, run.facts(matrix), part="here")
        except NestvirtError as e:
            raise self.CollectError(f"nestvirt: {e}") from e
        if not self.config.option.collectonly:  # --collect-only leaves no results dir behind
            run.out.mkdir(parents=True, exist_ok=True)
            _write_plan(run.out / PLAN_FILE, plan.to_json())
        lines = block_lines(self.path)
        for pv in plan.variants:
            m = re.search(r"include\[(\d+)\]$", pv.origin)
            line = lines[int(m.group(1))] if m and int(m.group(1)) < len(lines) else 0
            yield MatrixItem.from_parent(self, name=pv.id, planned=pv, line=line)


def block_lines(path: Path) -> list[int]:
    """0-based line of each `include` block in a matrix file (where a variant comes from)."""
    import yaml

    try:
        root = yaml.compose(path.read_text())
    except yaml.YAMLError:
        return []
    for key, value in getattr(root, "value", []):
        if getattr(key, "value", None) == "include" and isinstance(value.value, list):
            return [item.start_mark.line for item in value.value]
    return []


class VariantFailed(Exception):
    """The variant ran and a check failed (or the harness could not judge it)."""

    def __init__(self, record: dict[str, Any]) -> None:
        super().__init__(record["result"]["reason"])
        self.record = record


class MatrixItem(pytest.Item):
    def __init__(self, *, planned: PlannedVariant, line: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.planned = planned
        self.line = line
        self.add_marker("nestvirt")

    def runtest(self) -> None:
        run = self.config.stash[RUN_KEY]
        pv = self.planned
        job = Job(index=pv.index, attempt=1, id=pv.id, variant=pv.variant.to_json(),
                  out=str(job_out(run.worker_out, pv.id, pv.variant.id)),
                  host=run.facts().to_json(), image=run.image().to_json(), needs=pv.needs,
                  signatures=run.signatures(), run=run.run_options())
        record = execute_job(job, budget=run.budget)
        self.user_properties.append(("nestvirt_artifacts", record["result"]["artifacts"].get("dir")))
        verdict, reason = record["result"]["verdict"], record["result"]["reason"]
        if verdict == "skip":
            raise _skip(reason)
        if verdict == "known-issue":
            pytest.xfail(reason)
        if verdict != "pass":
            raise VariantFailed(record)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException],
                     style: Any = None) -> Any:
        if isinstance(excinfo.value, VariantFailed):
            return failure_text(excinfo.value.record)
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        # The line of the matrix block the variant comes from: where a skip is reported.
        return self.path, self.line, f"nestvirt variant {self.name}"


def _skip(reason: str) -> BaseException:
    """A skip reported at the variant (matrix file), not at this plugin's line."""
    try:
        return pytest.skip.Exception(reason, _use_item_location=True)
    except TypeError:  # a pytest without that (private) keyword
        return pytest.skip.Exception(reason)


def _write_plan(path: Path, plan: dict[str, Any]) -> None:
    # Every xdist worker collects the same plan: write atomically, last one wins.
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(plan, indent=1))
    tmp.replace(path)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Controller (or the only process): merge this session's records into one results.json."""
    config = session.config
    if hasattr(config, "workerinput") or RUN_KEY not in config.stash:
        return
    run = config.stash[RUN_KEY]
    out = run.out
    if not out.is_dir():
        return
    # A reused --nestvirt-out may hold an earlier session's records: only this one's count.
    records = collect_records(out, since=run.started - 1)
    if not records:
        return
    from harness.matrix.batch import merge_records
    from harness.results.views import write_views

    plan = json.loads((out / PLAN_FILE).read_text()) if (out / PLAN_FILE).exists() else {}
    extra = {"matrix": {"name": plan.get("name"), "source": plan.get("source"),
                        "variants": len(plan.get("variants", []))},
             "pruned": plan.get("pruned", [])}
    run_info = {"argv": ["pytest", *config.invocation_params.args], "runner": "pytest",
                "started": time.strftime("%FT%T%z", time.localtime(run.started)),
                "seconds": round(time.time() - run.started, 2), "out": str(out),
                "jobs": getattr(config.option, "numprocesses", None) or 1}
    path = merge_records(records, out, run_info, extra)
    write_views(path)
    config.stash[_MERGED_KEY] = path


_MERGED_KEY = pytest.StashKey[Path]()


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    path = config.stash.get(_MERGED_KEY, None)
    if path is None:
        return
    doc = json.loads(path.read_text())
    tr = terminalreporter
    tr.section("nestvirt")
    pruned = doc.get("pruned") or []
    if pruned:
        tr.write_line(f"pruned (invalid combinations, not run): {len(pruned)}")
        for p in pruned[:40]:
            tr.write_line(f"  {p['id']}: {p['reason']}")
        if len(pruned) > 40:
            tr.write_line(f"  ... {len(pruned) - 40} more in results.json")
    tr.write_line(f"results: {path}  (report.html, junit.xml, results.tap beside it)")
