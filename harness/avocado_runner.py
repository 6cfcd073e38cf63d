"""avocado over the same matrix: a runnables recipe, a resolver plugin and a job-post plugin.

Two ways in, one kind of test (harness/avocado_test.py, avocado-instrumented):

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
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .matrix import Plan, variant_to_json
from .parallel import Job, signatures_json, slug

TEST_FILE = Path(__file__).resolve().parent / "avocado_test.py"
TEST_NAME = "NestvirtVariant.test"


def runnables(plan: Plan, host: dict[str, Any], image: dict[str, Any],
              signatures: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One avocado-instrumented runnable recipe per variant, in input order."""
    sigs = tuple(signatures)
    plan_json = json.dumps({"name": plan.name, "source": plan.source,
                            "pruned": [p.to_json() for p in plan.pruned]})
    out = []
    for pv in plan.variants:
        # out is filled in by the test: avocado picks each test's output dir.
        job = Job(index=pv.index, attempt=1, id=pv.id, variant=variant_to_json(pv.variant),
                  out="", host=host, image=image, needs=pv.needs, signatures=sigs)
        leaf = "/run/nestvirt"
        params = [[leaf, "nestvirt_job", json.dumps(job.to_json())],
                  [leaf, "nestvirt_plan", plan_json]]
        out.append({
            "kind": "avocado-instrumented",
            "uri": f"{TEST_FILE}:{TEST_NAME}",
            "identifier": pv.id,
            "kwargs": {"variant": {"variant_id": slug(pv.id), "paths": ["/run/*"],
                                   "variant": [[leaf, params]]}},
        })
    return out


def write_recipe(path: Path, plan: Plan, host: dict[str, Any], image: dict[str, Any],
                 signatures: Iterable[dict[str, Any]]) -> Path:
    """An avocado runnables recipe (a JSON list) for ``avocado run PATH``."""
    path.write_text(json.dumps(runnables(plan, host, image, signatures), indent=1))
    return path


def merge_job(job_dir: Path) -> Path | None:
    """nestvirt-results.json and nestvirt's views from an avocado job dir's records."""
    from .batch import merge_records, write_views
    from .parallel import collect_records

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
            from .errors import NestvirtError
            from .matrix import expand_matrix, is_matrix_file, load_matrix

            path = Path(reference)
            if path.suffix not in (".yaml", ".yml") or not is_matrix_file(path):
                return ReferenceResolution(reference, ReferenceResolutionResult.NOTFOUND)
            try:
                from . import known
                from .guests import build_l1, build_tools
                from .kernel import find_kernel
                from .probe import probe

                facts = probe("auto")
                plan = expand_matrix(load_matrix(path), facts)
                image = build_l1(find_kernel(), build_tools())
                recipes = runnables(plan, facts.to_json(), image.to_json(),
                                    signatures_json(known.load()))
            except NestvirtError as e:
                return ReferenceResolution(reference, ReferenceResolutionResult.ERROR,
                                           info=f"nestvirt: {e}")
            info = "; ".join(f"pruned {p.id}: {p.reason}" for p in plan.pruned)
            return ReferenceResolution(reference, ReferenceResolutionResult.SUCCESS,
                                       [Runnable.from_dict(r) for r in recipes], info=info)

    class MatrixJobPost(JobPost):
        """After an avocado job: nestvirt-results.json and nestvirt's views in the job dir."""

        name = "nestvirt-report"
        description = "merge nestvirt variant records of the job into nestvirt's own views"

        def post(self, job: Any) -> None:
            merge_job(Path(job.logdir))
