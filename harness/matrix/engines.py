"""Which engine runs a variant: vmexit has its own, every other scenario the migration engine."""

from __future__ import annotations

from harness.bench.dirtylimit import RING_SCENARIO as DIRTY_RING
from harness.bench.dirtylimit import SCENARIO as DIRTY_LIMIT
from harness.bench.dirtylimit import run_dirty_limit_variant
from harness.scenario.engine import Runner, run_variant
from harness.scenario.spec import Variant
from harness.vmexit.plan import SCENARIO as VMEXIT
from harness.vmexit.run import run_vmexit_variant


def runner_for(variant: Variant) -> Runner:
    """The engine that runs a variant: vmexit has its own, every other scenario run_variant."""
    if variant.spec.name == VMEXIT:
        return run_vmexit_variant
    if variant.spec.name in (DIRTY_LIMIT, DIRTY_RING):
        return run_dirty_limit_variant
    return run_variant
