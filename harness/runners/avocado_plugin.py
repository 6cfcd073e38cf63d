"""avocado over the same matrix: a runnables recipe, a resolver plugin and a job-post plugin.

Two ways in, one kind of test (harness/runners/avocado_test.py, avocado-instrumented):

    nestvirt matrix ci/smoke.yaml --avocado-recipe smoke.json && avocado run smoke.json
    avocado run ci/smoke.yaml        # with nestvirt installed: the resolver below expands it

Each variant is one runnable named by its matrix id; its parameter ``nestvirt_job`` carries the
variant, probe and image, so avocado's task processes run without probing or building again.
avocado gives the job dir, its JSON/xUnit/TAP results and per-test output dirs; the job-post
plugin (installed) or `nestvirt report JOBDIR --html ...` merges the per-variant records into
nestvirt-results.json and writes nestvirt's own views beside avocado's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness.matrix.batch import merge_records
from harness.matrix.recipe import runnables
from harness.matrix.workers import collect_records, signatures_json
from harness.results.views import write_views


def merge_job(job_dir: Path) -> Path | None:
    """nestvirt-results.json and nestvirt's views from an avocado job dir's records."""
    records = collect_records(job_dir)
    if not records:
        return None
    plan_file = next(iter(job_dir.rglob("nestvirt-plan.json")), None)
    plan = json.loads(plan_file.read_text()) if plan_file else {}
    extra = {"matrix": {"name": plan.get("name"), "source": plan.get("source"),
                        "variants": len(records)},
             "pruned": plan.get("pruned", [])}
    path = merge_records(records, job_dir, {"runner": "avocado", "out": str(job_dir)}, extra,
                         name="nestvirt-results.json")
    write_views(path)
    return path


try:  # the plugins need avocado; the recipe above does not
    from avocado.core.nrunner.runnable import Runnable
    from avocado.core.plugin_interfaces import JobPost, Resolver
    from avocado.core.resolver import ReferenceResolution, ReferenceResolutionResult
except ImportError:  # pragma: no cover - avocado not installed
    Resolver = None  # type: ignore[assignment,misc]


if Resolver is not None:

    class MatrixResolver(Resolver):
        """`avocado run ci/smoke.yaml`: a nestvirt matrix file -> one test per variant."""

        name = "nestvirt-matrix"
        description = "nestvirt matrix files (YAML with nestvirt_matrix: 1)"

        def resolve(self, reference: str) -> Any:
            from harness.core.errors import NestvirtError
            from harness.matrix.files import expand_matrix, is_matrix_file, load_matrix

            path = Path(reference)
            if path.suffix not in (".yaml", ".yml") or not is_matrix_file(path):
                return ReferenceResolution(reference, ReferenceResolutionResult.NOTFOUND)
            try:
                from harness.guest.image import build_l1, build_tools
                from harness.guest.kernel import find_kernel
                from harness.matrix.batch import matrix_paths
                from harness.qemu.inventory import probe_host
                from harness.results import known

                matrix = load_matrix(path)
                facts = probe_host("auto", extra=matrix_paths(matrix))
                # in_hostvm combinations need the host VM's boot: `nestvirt run --matrix`.
                plan = expand_matrix(matrix, facts, part="here")
                image = build_l1(find_kernel(), build_tools())
                recipes = runnables(plan, facts.to_json(), image.to_json(),
                                    signatures_json(known.load()))
            except NestvirtError as e:
                return ReferenceResolution(reference, ReferenceResolutionResult.ERROR,
                                           info=f"nestvirt: {e}")
            info = "; ".join(f"pruned {p.id}: {p.reason}" for p in plan.pruned)
            if plan.elsewhere:
                info += (("; " if info else "") + f"{plan.elsewhere} in_hostvm combination(s) "
                         f"left out: they run through `nestvirt run --matrix {reference}`")
            return ReferenceResolution(reference, ReferenceResolutionResult.SUCCESS,
                                       [Runnable.from_dict(r) for r in recipes], info=info)

    class MatrixJobPost(JobPost):
        """After an avocado job: nestvirt-results.json and nestvirt's views in the job dir."""

        name = "nestvirt-report"
        description = "merge nestvirt variant records of the job into nestvirt's own views"

        def post(self, job: Any) -> None:
            merge_job(Path(job.logdir))
