"""A matrix plan as an avocado runnables recipe: one avocado-instrumented runnable per variant,
carrying the variant, probe and image so avocado's tasks neither probe nor build again."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from harness.core.paths import REPO
from harness.matrix.files import Plan
from harness.matrix.workers import Job, slug

# The avocado-instrumented test lives with the runners; the recipe only names its file.
TEST_FILE = REPO / "harness" / "runners" / "avocado_test.py"
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
        job = Job(index=pv.index, attempt=1, id=pv.id, variant=pv.variant.to_json(),
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
